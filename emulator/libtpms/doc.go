// Package libtpms is the only cgo package of vtpmd: it wraps libtpms as a Go type, Engine.
//
// libtpms keeps all of its state in C globals, so there is exactly one Engine per process
// (Open returns emulator.ErrInUse for a second one) and every libtpms call is serialized by the
// Engine's mutex. The one exception is Cancel, which libtpms designs to be called from a
// second thread while Process runs.
//
// The Engine never touches files: libtpms' NVRAM callbacks are routed to an emulator.Store
// supplied by the caller, which must make a blob durable before Store returns, because the TPM
// answers the command that caused the write only after the callback returns.
//
// It can serve a data connection itself (ServeData): a native thread per connected socket reads
// a command, runs it in libtpms and sends the answer, waking no goroutine, while the engine is
// armed (ProcessAppendArmed succeeded and no other call came since); every other message goes
// to a Go handler. The engine lock is then a semaphore shared by Go and those threads.
//
// Failures of libtpms calls are reported as tpmwire.Result values (the TPM 1.2 error space that
// swtpm's control channel also uses); TPM 2 command failures are inside the response bytes,
// not errors.
package libtpms
