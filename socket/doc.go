// Package socket speaks swtpm's wire protocols: the control channel (CMD_* messages, big-endian,
// fixed sizes, 4-byte error replies), the data channel (raw TPM commands, one per read as swtpm
// frames them, and the 9-byte tpm-send-command-header variant), fd passing with CMD_SET_DATAFD,
// and the listeners QEMU, libvirt, swtpm_ioctl, swtpm_setup and the tss2 swtpm TCTI connect to.
//
// It knows nothing of libtpms or files: a Server drives one TPM (an interface implemented by
// backend.Instance). Listening is here too: a ListenSpec is parsed once from swtpm's --ctrl or
// --server sub-options, opened into an Endpoint, and Server.Serve serves both channels. Result
// codes are attached in one place, the dispatcher, through Options.ResultOf.
//
// Control and data connections are served on their own goroutines, so a CMD_CANCEL_TPM_CMD
// reaches a command that is executing. A data connection that is a stream socket is handed to
// the TPM when it can serve it on a native thread (NativeDataServer): that thread runs plain
// TPM 2 commands itself and brings every other message back to this package's Go path, so the
// framing and answers above hold either way. Responses on each connection stay in request order; at
// most one control client and one data client are served at a time, as swtpm does, and a new
// control client is accepted when the previous one closed.
//
// The byte-level contract is swtpm's (its tpm_ioctl.h and the observed behaviour of swtpm
// 0.7–0.9, see docs/notes.md): request and response sizes, result codes, the order of state and
// size checks, the 500 ms window to complete a partly received control message, whole-blob
// GET_STATEBLOB replies (totlength == length) and streamed SET_STATEBLOB bodies. Where swtpm
// waits without bound (the rest of a TPM header, further parts of a streamed payload), vtpmd
// waits 500 ms per read, so a stalled client never holds the other channel or the next client;
// nothing a client writes closes a data connection or ends the process.
package socket
