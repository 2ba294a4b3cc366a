// Package backend is one vTPM instance: the lifecycle state machine that swtpm's control
// channel drives (stopped / running, INIT as a TPM reset, automatic TPM2_Shutdown before a
// re-INIT, STOP or exit), the state store it keeps its blobs in (subpackages store and blob:
// swtpm-compatible files, atomic durable writes, locking, encryption) and migration blobs.
//
// An Instance implements socket.TPM. Every error it returns to the control channel is a
// tpmwire.Result carrying swtpm's result code for the condition.
package backend
