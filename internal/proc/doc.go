// Package proc manages the vTPM processes vtpmd runs for others (the libvirt hook now, the
// host manager next): it starts a daemon detached, optionally as another user and with
// descriptors handed on, and waits until it is ready (Start), tells whether a process is
// alive and what it runs (Alive, Inspect), finds `vtpmd socket` and `swtpm socket` instances
// by their command-line sub-options (FindInstances, IsInstance), reads pid files
// (ReadPidFile) and stops processes (Terminate).
//
// It reads /proc and knows nothing of libvirt or of TPMs beyond the shape of a vTPM's
// command line.
//
// What it promises:
//
//   - Nothing here panics or blocks without bound: every wait is limited by a duration and by
//     its context.
//   - Start's daemon outlives the caller (own session, in /, standard input and output on
//     /dev/null, standard error appended to a log opened without following symbolic links
//     and created mode 0600); a daemon that does not become ready is killed, and the error
//     carries the last lines of its log.
//   - Terminate sends SIGTERM, then SIGKILL after the grace period; it fails when it may not
//     signal the process, when the process survives SIGKILL, or when its context ends first.
//   - A zombie counts as gone.
package proc
