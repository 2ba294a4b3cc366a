// Package daemon is the process plumbing of vtpmd's long-running commands, with swtpm's
// semantics: detaching with --daemon (Go cannot fork, so the binary re-executes itself and the
// parent waits until the child is ready), --chroot, --runas, --pid and --log; and, for a process
// that serves one vTPM, returning its heap to the OS when it goes quiet after a burst.
//
// It knows nothing of TPMs: callers decide when the process is ready (SignalReady).
package daemon
