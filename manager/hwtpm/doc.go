// Package hwtpm is the host manager's access to the host's hardware TPM 2.0: it seals secrets
// (every vTPM's state key) to that TPM, optionally to the host's PCRs, and keeps monotonic
// counters that protect the manager's own records against rollback.
//
// What it promises:
//
//   - ParseSpec reads tpm2-tools' TCTI spellings of a TPM — device:/dev/tpmrm0 (the default;
//     also a bare absolute path), swtpm:path=SOCK or swtpm:host=H,port=P (swtpm's data
//     channel), mssim:host=H,port=P (the MS/IBM simulator protocol) — and refuses anything
//     else with an error wrapping ErrBadSpec that says what it wanted; it never panics.
//   - Every method that talks to the TPM takes a context first. A command cut short by the
//     context, or by a broken connection, drops the connection (ErrTransport) and the next
//     command opens a new one, so a late response is never read as the answer to another
//     command. A TPM's methods are safe for concurrent use; operations take turns. A device
//     stays open; a swtpm or simulator connection lasts one operation, because they serve one
//     client at a time and others (tpm2-tools, a second manager) may want the TPM between.
//   - The storage key is the TCG's SRK template (ECC P-256, else RSA-2048) created under the
//     owner hierarchy with TPM2_CreatePrimary whenever it is needed: it is derived from the
//     TPM's owner seed, so nothing is persisted and no persistent handle is taken from other
//     users of the TPM (systemd, clevis, …). Every operation flushes the transient objects and
//     sessions it loaded before it returns, whatever ends it; an operation holds at most two
//     objects at a time (swtpm and many TPMs hold three).
//   - Seal makes a KeyedHash sealed-data object (fixedTPM, fixedParent, noDA) under the
//     storage key; Sealed holds its TPM2B_PUBLIC and TPM2B_PRIVATE (as tpm2-tools writes
//     them), its policy in normal form, and the storage key's name, and marshals to JSON.
//     Unseal compares that name with this TPM's storage key before it loads anything: a blob
//     from another TPM, or from this TPM before its owner hierarchy was cleared, fails with
//     ErrWrongTPM; a malformed or damaged one with ErrBadSealed.
//   - PolicyNone binds a secret to this TPM alone: only this TPM's storage key loads it.
//     PolicyPCR also binds it to the current values of host PCRs in one bank (TPM2_PolicyPCR):
//     after one of them changes Unseal fails with ErrPolicy, naming the PCRs that changed.
//   - Secrets cross the bus encrypted: Create and Unseal run in a session salted with the
//     storage key that encrypts the secret (AES-128-CFB parameter encryption), so a probe on
//     the TPM's bus sees neither, and the raw bytes on the wire hold no secret. The secret is
//     never logged (the package does not log) and not copied more than go-tpm copies it; the
//     slice Unseal returns is the caller's to zero. go-tpm's intermediate buffers (the
//     marshalled parameters it encrypts and decrypts in place) are beyond its reach.
//   - DefineCounter makes an NV counter (TPM_NT_COUNTER: read and incremented with the index's
//     empty authorization, noDA, not orderly, so each increment is in NV before the TPM
//     answers); defining it again keeps it, and an index used otherwise is ErrIndexInUse.
//     Increment and ReadCounter run in an HMAC session salted with the storage key, so the
//     value read is authenticated by the TPM rather than taken from the bus.
//   - The host's identity: EndorsementKey derives the EK from the TCG's standard template
//     (RSA-2048 when the TPM holds an RSA EK certificate, else ECC P-256) with its certificate
//     from NV 0x01c00002 / 0x01c0000a; CreateAK (restricted) and CreateSigningKey
//     (unrestricted) make ECDSA P-256 keys under the storage key whose Key blob holds only the
//     TPM-wrapped private part; Quote (with the PCR values it covers), Certify and
//     ActivateCredential (EK with its PolicySecret(endorsement)) use them, and Signer is a
//     crypto.Signer doing TPM2_Sign. A blob of another TPM fails with ErrBadKey wrapping
//     ErrWrongTPM. ParseAttest, ParsePublic and VerifySignature read outside bytes without a
//     TPM and never panic (fuzzed).
//
// It needs the owner hierarchy's authorization to be empty (as it is on a host whose TPM is
// not provisioned by something else), and a device or swtpm that is already started;
// for the MS simulator Open signals power-on and runs TPM2_Startup itself.
//
// TODO(PolicyAuthorizeNV): a PCR-sealed secret is stranded by every legitimate host update
// (firmware, shim, kernel) that changes a sealed PCR. The fix is to seal to
// TPM2_PolicyAuthorizeNV over an NV index that holds the approved policy digest (a TPMT_HA),
// and to write the next approved PolicyPCR digest into it before the update. It is not done
// because who may write that index is the whole security question and is still open: an
// index writable with the empty owner authorization lets anyone who controls the host approve
// any PCR values. Candidates: a PolicySigned write policy under an operator's key, or a
// write lock (TPMA_NV_WRITEDEFINE / WRITE_STCLEAR) that early boot sets. Until then callers
// reseal after an update while they can still unseal.
package hwtpm
