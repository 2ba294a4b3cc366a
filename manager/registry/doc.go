// Package registry keeps what vtpmd knows about each VM's vTPM: one JSON record per VM
// (<dir>/<uuid>.json) with its backend, state directory, socket, process, policy and a
// bounded history of lifecycle events. The libvirt hook writes it at every hook call, `vtpmd
// status` reads it, and the host manager will own it.
//
// What it promises:
//
//   - Records are keyed by UUID only; any other key is refused (ErrBadUUID) before the
//     file system is touched, so a key cannot name a file outside the directory.
//   - Update and Append read, change and replace a record under the registry's exclusive lock
//     (flock on <dir>/.lock), waiting at most a bounded time (ErrLocked) or until the context
//     ends; files are replaced atomically and durably (package atomicfile), so a reader sees
//     the old or the new record, never a torn one.
//   - The directory is created mode 0700 and records are written mode 0600; records and lock
//     are opened without following symbolic links; records read back are size-bounded.
//   - A record keeps at most 500 events, dropping the oldest first.
//   - List skips files that are not records and reports unreadable ones without failing the
//     others.
//
// It does not import package libvirt: libvirt depends on it, not the other way round.
package registry
