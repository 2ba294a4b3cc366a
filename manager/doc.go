// Package manager is vtpmd's host manager, one per host, and its client. The manager owns the
// host's hardware TPM (package hwtpm) and keeps every enrolled vTPM's state key sealed to it:
// a copied state directory is useless off its host, and an older copy is refused (rollback).
//
// The API is HTTP+JSON on a unix socket. Every request's peer is identified by SO_PEERCRED
// before it is served: a state key is released only to the one process that serves that
// vTPM's state directory (its command line names the directory, and it runs as the directory's
// owner or root); the operator's requests (enroll, unenroll, accept, status) need root.
//
// The manager's own records (the ledger) are a JSON file written atomically; each write first
// increments a monotonic counter in the hardware TPM's NV and carries its value, so a ledger
// rolled back on disk no longer matches the counter and is refused at start.
//
// The host's identity lives in the hardware TPM too (identity.go, docs/certificates.md): an AK,
// a CA key the AK certified and a TLS key, kept in DIR/identity.json as TPM-wrapped blobs
// only. HostQuote, HostIdentity, TLSCertificate and TrustedCAs serve attestation and
// migration; the CA issues vTPM EK and platform certificates to vtpmd setup for the vTPMs the
// manager protects, marked virtual and naming the host's AK and the VM.
//
// Without a manager, vtpmd works as before. A vTPM that is not enrolled is served as today; an
// enrolled one cannot start without its manager (it cannot decrypt its state).
package manager
