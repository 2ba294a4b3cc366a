// Package store keeps a vTPM's state where swtpm keeps it, in swtpm's formats, so a state
// directory or file moves between swtpm and vtpmd in both directions:
//
//   - dir://<dir>: files tpm2-00.permall, tpm2-00.volatilestate, tpm2-00.savestate (tpm-00.*
//     for TPM 1.2), each a blob in package blob's format, plus a .lock file;
//   - file://<path>: swtpm's linear store, one regular file or block device with a 192-byte
//     little-endian header ("nilmptws") indexing the blobs.
//
// Writes are durable before Store returns: a temporary file (swtpm's TMP2-00.<name>) is
// written and fsynced, renamed over the target, and the directory is fsynced, so a crash at
// any instant leaves the previous or the new blob, never a torn one. The linear store writes a
// whole new image the same way when it is a regular file, and in place with fsync on a block
// device.
//
// The lock is an open-file-description (OFD) write lock on <dir>/.lock, which conflicts with
// the classic fcntl lock swtpm takes on the same file, so vtpmd and swtpm exclude each other.
// Corrupt, truncated, tampered or wrongly keyed state is refused with an error wrapping one of
// package blob's sentinels; nothing on disk is changed by a failed load.
package store
