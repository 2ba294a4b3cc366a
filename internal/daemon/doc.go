// Package daemon is the process plumbing of vtpmd's long-running commands, with swtpm's
// semantics: detaching with --daemon (Go cannot fork, so the binary re-executes itself and the
// parent waits until the child is ready), --chroot, --runas, --pid and --log.
//
// It knows nothing of TPMs: callers decide when the process is ready (SignalReady).
package daemon
