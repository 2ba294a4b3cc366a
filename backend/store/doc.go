// Package store keeps a vTPM's state where swtpm keeps it, in swtpm's formats, so a state
// directory or linear file moves between swtpm and vtpmd in both directions. Store implements
// emulator.Store; each blob is sealed and opened with package blob (and the --key state key).
//
// # Locations
//
//   - dir://<dir> (or a bare path): files tpm2-00.permall, tpm2-00.volatilestate and
//     tpm2-00.savestate (tpm-00.* for TPM 1.2), each one blob, plus the lock file .lock.
//   - file://<path>: swtpm's linear store, one regular file or block device: a 192-byte
//     little-endian header (magic "nilmptws", version 1, header size 192, 15 entries of
//     offset, data length, section length; entries 0-2 are permall, volatilestate,
//     savestate) followed by the blobs, each in a section of the next power of two. Blobs
//     are placed, moved and compacted exactly as swtpm does. A file or device without the
//     magic is a new, empty store: Open formats it as swtpm does when it opens its backend
//     (even for --print-states): a missing file is created (192 bytes, the header alone), an
//     empty one grows to the header, a foreign one gets the header over its first 192 bytes
//     and keeps its size, durably (below); swtpm_setup relies on it. Regular files are
//     resized to the image; block devices never are.
//
// # Durability and atomicity
//
// A write is durable before Store or Delete returns.
//
//   - dir://: the blob is written to TMP2-00.<name> (opened O_NOFOLLOW), fsynced, renamed
//     over the target, and the directory is fsynced. A crash at any instant leaves the previous
//     or the new blob, never a torn one.
//   - file://, regular file, lock off (the default): the whole new image is written to
//     <path>.tmp with the store's mode, owner, security label and ACLs, fsynced, renamed over
//     the store, and the directory fsynced: the same guarantee as dir://. If any of those
//     cannot be reproduced, or the directory does not let us create the temporary file, the
//     image is written in place as below.
//   - file://, block device, or regular file with lock on (the lock lives on the file itself,
//     so it must not be replaced): the image is updated in place like swtpm does, the changed
//     sections first, fsync, then the header, fsync. The write is durable when Store returns,
//     but a crash during it can leave a torn blob. Torn encrypted blobs, and torn headers or
//     lengths, are detected on load (HMAC, totlen, TLV and header checks) and refused; a torn
//     unencrypted blob of unchanged length may not be.
//
// Defer and Sync batch a sequence of writes (libtpms writing permall several times while it
// powers on): nothing reaches the disk before Sync, which then writes each blob once with the
// guarantees above, so a crash during the sequence leaves the previous state.
//
// File modes follow swtpm: created files get Options.Mode (default 0640) subject to the umask;
// with an explicit mode (ModeSet) files get exactly that mode and a successful Load chmods the
// file to it; otherwise a successful Load only gives the owner write permission back.
//
// # Lock
//
// The lock is an open-file-description (OFD) write lock on <dir>/.lock (file://: on the store
// file itself), opened O_WRONLY|O_CREAT|O_NOFOLLOW (mode 0660) and never deleted. OFD locks
// conflict with the classic fcntl lock swtpm takes on the same file, so vtpmd and swtpm exclude
// each other, and unlike classic locks they are not dropped when this process closes some
// other descriptor of the file.
//
// # State versions
//
// With Options.Versioned (which needs a state key), every blob written carries a state
// version in a TLV of its own after swtpm's (blob.SealVersioned; Debian's swtpm loads such
// files with the same key and skips the TLV). Versions come from one counter for all three
// blobs that only grows: each durable write takes the next number, and Open continues from the
// highest stored. Blobs without a version (swtpm's, or written without Versioned) count as 0.
// Each blob's stamp also says what versions the other blobs had when it was written, so that
// with a record of the last version (Options.MinVersion, the host manager's) Open refuses
// state that is older, or partly older, than the record (ErrRollback). To keep that true at
// every instant of a crash, a versioned store orders its writes: in a batch (Sync) the writes
// go first, each numbered and stamped in the order written, deletions last; a deletion with no
// write beside it first rewrites the newest other blob with the next version (the same data,
// a fresh stamp), so deleting the newest blob never makes the state look older than recorded.
// Options.OnWrite hears of each version once it is durable. Lock reads the versions again when
// it takes the lock, since another process may have written in between. Deleting every blob
// leaves nothing to carry a version: such state is refused against a record like a rollback.
// A deleted blob that is put back is caught by the next write's stamp, not before.
//
// # Files that are not files
//
// Every state file, the lock file and a file:// store are opened so that nothing can make the
// open block or redirect it: O_NONBLOCK (a FIFO's open does not wait for its other end), and
// the descriptor's type checked once open. A FIFO, a device, a socket or a directory in their
// place (for file://, anything but a regular file or a block device) is refused at once with
// an error that says what is there and wraps ErrNotRegular. Symbolic links are followed where
// swtpm follows them, to the same check: dir:// blobs (swtpm's dir backend opens them
// without O_NOFOLLOW; a write replaces the link, never its target); the lock file, the
// temporary files and a file:// store are opened O_NOFOLLOW, as swtpm opens them.
//
// # Bad state
//
// State files of early swtpm releases, a libtpms blob stored without swtpm's header (plain, or
// encrypted the legacy way), are read as swtpm 0.7.1 reads them (see package blob) and written
// back in the current format at the next write. Corrupt, truncated, tampered or wrongly keyed
// state is refused with an error that names the
// file and wraps one of package blob's sentinels (or ErrLinearHeader); a tampered or moved
// state version wraps blob.ErrVersionAuth, a kind of blob.ErrDecrypt. A failed Load changes
// nothing on disk, not even file modes.
package store
