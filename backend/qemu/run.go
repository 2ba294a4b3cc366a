package qemu

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Exit statuses of Run besides QEMU's own.
const (
	ExitFailure  = 1   // something failed before QEMU ran
	ExitNotFound = 127 // QEMU could not be started
)

// SignalError is returned when a signal interrupted the run; Run's status is then 128+N.
type SignalError struct{ Signal syscall.Signal }

func (e *SignalError) Error() string { return "interrupted by " + e.Signal.String() }

// ExitCode is the shell's status for the signal.
func (e *SignalError) ExitCode() int { return 128 + int(e.Signal) }

// Run is `vtpmd run`: it makes a vTPM for c, runs QEMU with it in the foreground and removes
// everything it made, also when it is interrupted by SIGINT, SIGTERM or SIGHUP (or ctx ends).
// It returns the status to exit with (see the package documentation) and what went wrong,
// if anything did: an error with a status of 0 from QEMU still makes the status 1.
func Run(ctx context.Context, c Config) (int, error) {
	if err := c.check(); err != nil {
		return ExitFailure, err
	}
	r := &runner{c: &c, first: make(chan struct{}), again: make(chan struct{}, 1)}
	ctx, stop := r.watchSignals(ctx)
	defer stop()
	code, err := r.run(ctx)
	if s := r.interruption(ctx); s != 0 {
		se := &SignalError{Signal: s}
		return se.ExitCode(), errors.Join(append([]error{se}, unlessCancelled(err)...)...)
	}
	if err != nil && code == 0 {
		code = ExitFailure
	}
	return code, err
}

// unlessCancelled drops err when it only says that the run was interrupted.
func unlessCancelled(err error) []error {
	if err == nil || errors.Is(err, context.Canceled) {
		return nil
	}
	return []error{err}
}

// runner is one Run's state.
type runner struct {
	c     *Config
	mu    sync.Mutex
	sig   syscall.Signal // the first signal received, 0 if none
	first chan struct{}  // closed when sig is set
	again chan struct{}  // a further signal: stop waiting, kill
}

// watchSignals returns ctx, cancelled at the first SIGINT, SIGTERM or SIGHUP; later ones go
// to r.again. stop ends the watch.
func (r *runner) watchSignals(parent context.Context) (context.Context, func()) {
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	ctx, cancel := context.WithCancel(parent)
	done := make(chan struct{})
	go func() {
		for {
			select {
			case s := <-sigs:
				r.mu.Lock()
				if r.sig == 0 {
					r.sig = s.(syscall.Signal)
					close(r.first)
				} else {
					select {
					case r.again <- struct{}{}:
					default:
					}
				}
				r.mu.Unlock()
				cancel()
			case <-done:
				return
			}
		}
	}()
	return ctx, func() {
		signal.Stop(sigs)
		close(done)
		cancel()
	}
}

// interruption is the signal that ended the run, 0 if none did. When ctx ended first (the
// caller may watch the same signals), the signal is waited for a moment; a context ended
// without one counts as SIGTERM.
func (r *runner) interruption(ctx context.Context) syscall.Signal {
	r.mu.Lock()
	s := r.sig
	r.mu.Unlock()
	if s != 0 || ctx.Err() == nil {
		return s
	}
	select {
	case <-r.first:
		r.mu.Lock()
		defer r.mu.Unlock()
		return r.sig
	case <-time.After(100 * time.Millisecond):
		return syscall.SIGTERM
	}
}

// run makes the temporary directory and the vTPM, runs QEMU and cleans up.
func (r *runner) run(ctx context.Context) (code int, err error) {
	c := r.c
	dir, err := os.MkdirTemp(c.TempDir, "vtpmd-run-")
	if err != nil {
		return ExitFailure, fmt.Errorf("temporary directory: %w", err)
	}
	defer func() {
		if rerr := os.RemoveAll(dir); rerr != nil {
			err = errors.Join(err, fmt.Errorf("remove %s: %w", dir, rerr))
		}
	}()
	sock := filepath.Join(dir, "ctrl.sock")
	if len(sock) >= len(unix.RawSockaddrUnix{}.Path) {
		return ExitFailure, fmt.Errorf("%w: socket path %s is too long for a unix socket (set TMPDIR to a shorter directory)", ErrBadPath, sock)
	}
	stateDir, ephemeral := c.StateDir, c.StateDir == ""
	if ephemeral {
		stateDir = filepath.Join(dir, "state")
	}
	if err := os.MkdirAll(stateDir, 0o700); err != nil {
		return ExitFailure, fmt.Errorf("state directory: %w", err)
	}
	caDir := c.CADir
	if caDir == "" {
		caDir = filepath.Join(dir, "ca")
	}
	log := c.Log.With("state", stateDir)
	if c.EKCerts {
		start := time.Now()
		made, err := manufacture(ctx, c, stateDir, caDir, log)
		if err != nil {
			return ExitFailure, err
		}
		if made {
			log.Info("manufactured the TPM", "ca", caDir, "took", time.Since(start).Round(time.Millisecond))
		}
	}
	v, err := startVTPM(ctx, c, dir, stateDir, sock)
	if err != nil {
		return ExitFailure, err
	}
	model := chooseModel(c.QEMU, c.TPM2, c.Model)
	log.Info("vTPM ready", "tpm2", c.TPM2, "model", model, "ephemeral", ephemeral, "pid", v.cmd.Process.Pid)
	code, qerr := r.runQEMU(ctx, append(append([]string(nil), c.QEMU[1:]...), tpmArgs(sock, model)...))
	verr := v.stop(c.Grace)
	log.Info("QEMU exited", "status", code)
	return code, errors.Join(qerr, verr)
}

// runQEMU runs QEMU in the foreground and returns its exit status. When ctx ends, QEMU gets
// SIGTERM, and SIGKILL after the grace period or at a further signal.
func (r *runner) runQEMU(ctx context.Context, args []string) (int, error) {
	c := r.c
	cmd := exec.Command(c.QEMU[0], args...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = c.Stdin, c.Stdout, c.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
	if err := ctx.Err(); err != nil {
		return ExitFailure, err
	}
	if err := cmd.Start(); err != nil {
		return ExitNotFound, fmt.Errorf("start QEMU: %w", err)
	}
	done := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		close(done)
	}()
	select {
	case <-done:
		return exitStatus(cmd.ProcessState), nil
	case <-ctx.Done():
	}
	_ = cmd.Process.Signal(syscall.SIGTERM)
	t := time.NewTimer(c.Grace)
	defer t.Stop()
	select {
	case <-done:
	case <-t.C:
		_ = cmd.Process.Kill()
		<-done
	case <-r.again:
		_ = cmd.Process.Kill()
		<-done
	}
	return exitStatus(cmd.ProcessState), nil
}

// exitStatus is a process's status as a shell reports it: the exit code, or 128+N for a
// death by signal N.
func exitStatus(ps *os.ProcessState) int {
	if ws, ok := ps.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		return 128 + int(ws.Signal())
	}
	return ps.ExitCode()
}
