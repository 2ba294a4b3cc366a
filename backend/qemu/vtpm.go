package qemu

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/vtpmd/vtpmd/internal/proc"
)

// vtpm is the `vtpmd socket` child serving the TPM.
type vtpm struct {
	cmd  *exec.Cmd
	log  string
	done chan struct{} // closed once the process is reaped
}

// startVTPM starts `vtpmd socket` on stateDir, serving the control socket sock, and waits
// until it has written its pid file: it does so once the TPM is ready to be served.
func startVTPM(ctx context.Context, c *Config, dir, stateDir, sock string) (*vtpm, error) {
	logPath := c.VTPMLog
	if logPath == "" {
		logPath = filepath.Join(dir, "vtpmd.log")
	}
	logf, err := os.OpenFile(logPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND|syscall.O_NOFOLLOW, 0o600)
	if err != nil {
		return nil, fmt.Errorf("vTPM log: %w", err)
	}
	defer logf.Close()
	pidPath := filepath.Join(dir, "vtpmd.pid")
	args := []string{"socket"}
	if c.TPM2 {
		args = append(args, "--tpm2")
	}
	// --terminate: the vTPM also ends when QEMU's data connection does, should this
	// process be gone; --manager none: an ephemeral TPM is none of the host manager's business
	args = append(args,
		"--tpmstate", "dir="+stateDir+",mode=0600",
		"--ctrl", "type=unixio,path="+sock+",mode=0600",
		"--pid", "file="+pidPath,
		"--log", "fd=2",
		"--terminate",
		"--manager", "none")
	cmd := exec.Command(c.Vtpmd, args...)
	cmd.Dir = "/"
	cmd.Stderr = logf
	// its own process group: a terminal's ^C is QEMU's to handle; the vTPM is stopped after it
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGTERM}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrVTPM, err)
	}
	v := &vtpm{cmd: cmd, log: logPath, done: make(chan struct{})}
	go func() {
		_ = cmd.Wait()
		close(v.done)
	}()
	if err := v.waitReady(ctx, pidPath); err != nil {
		_ = v.stop(time.Second)
		return nil, err
	}
	return v, nil
}

// waitReady polls the pid file until it holds the vTPM's pid.
func (v *vtpm) waitReady(ctx context.Context, pidPath string) error {
	deadline := time.NewTimer(startTimeout)
	defer deadline.Stop()
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	want := strconv.Itoa(v.cmd.Process.Pid)
	for {
		if b, err := os.ReadFile(pidPath); err == nil && strings.TrimSpace(string(b)) == want {
			return nil
		}
		select {
		case <-v.done:
			return fmt.Errorf("%w: %s: %s", ErrVTPM, v.cmd.ProcessState, proc.LogTail(v.log))
		case <-deadline.C:
			return fmt.Errorf("%w: not ready within %v: %s", ErrVTPM, startTimeout, proc.LogTail(v.log))
		case <-ctx.Done():
			return fmt.Errorf("%w: %w", ErrVTPM, context.Cause(ctx))
		case <-tick.C:
		}
	}
}

// stop ends the vTPM: SIGTERM (it stores its state and exits), SIGKILL after grace. It
// fails when the vTPM had to be killed or exited with an error.
func (v *vtpm) stop(grace time.Duration) error {
	select {
	case <-v.done:
	default:
		_ = v.cmd.Process.Signal(syscall.SIGTERM)
		t := time.NewTimer(grace)
		defer t.Stop()
		select {
		case <-v.done:
		case <-t.C:
			_ = v.cmd.Process.Kill()
			<-v.done
			return fmt.Errorf("vTPM did not stop within %v after SIGTERM; killed", grace)
		}
	}
	if ps := v.cmd.ProcessState; ps != nil && !ps.Success() {
		if ws, ok := ps.Sys().(syscall.WaitStatus); ok && ws.Signaled() && ws.Signal() == syscall.SIGTERM {
			return nil // vtpmd handles SIGTERM; this only happens before it installed its handler
		}
		return fmt.Errorf("vTPM: %s: %s", ps, proc.LogTail(v.log))
	}
	return nil
}
