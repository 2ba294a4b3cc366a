package daemon

import (
	"context"
	"fmt"
	"io"
	"os"
	"strconv"
	"syscall"

	"golang.org/x/sys/unix"
)

// daemonEnv carries the readiness pipe's fd number to the re-executed daemon.
const daemonEnv = "VTPMD_DAEMON_READY_FD"

// ErrChildFailed is returned by Detach in the parent when the daemon exited before it was
// ready; ExitCode says with which status.
type ErrChildFailed struct{ Status int }

func (e *ErrChildFailed) Error() string { return fmt.Sprintf("daemon exited with status %d", e.Status) }

// ExitCode is the daemon's exit status, for the parent to exit with.
func (e *ErrChildFailed) ExitCode() int { return e.Status }

// IsDetached reports whether this process is the re-executed daemon (so --daemon must not
// detach again).
func IsDetached() bool { return os.Getenv(daemonEnv) != "" }

// Detach implements --daemon. Go cannot fork, so the binary re-executes itself in a new
// session with the same arguments and inherited fds; the parent exits once the child is ready
// (sockets and pid file exist), or with the child's failure, as swtpm's --daemon does.
func Detach(ctx context.Context) error {
	exe, err := os.Readlink("/proc/self/exe")
	if err != nil {
		return fmt.Errorf("daemonize: %w", err)
	}
	readyR, readyW, err := os.Pipe()
	if err != nil {
		return fmt.Errorf("daemonize: %w", err)
	}
	errR, errW, err := os.Pipe()
	if err != nil {
		return fmt.Errorf("daemonize: %w", err)
	}
	// The child keeps every fd we inherited (key fds, pid fds, sockets): those without
	// close-on-exec. Our own fds (the Go runtime's, the pipes) are closed-on-exec.
	maxFD := 3
	entries, _ := os.ReadDir("/proc/self/fd")
	inherited := map[int]bool{}
	for _, e := range entries {
		fd, err := strconv.Atoi(e.Name())
		if err != nil || fd < 3 {
			continue
		}
		if fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err == nil && fl&unix.FD_CLOEXEC == 0 {
			inherited[fd] = true
			maxFD = max(maxFD, fd+1)
		}
	}
	readyFD := maxFD
	devnull, err := os.Open(os.DevNull)
	if err != nil {
		return fmt.Errorf("daemonize: %w", err)
	}
	files := make([]uintptr, readyFD+1)
	files[0], files[1], files[2] = devnull.Fd(), devnull.Fd(), errW.Fd()
	for fd := 3; fd < readyFD; fd++ {
		if inherited[fd] {
			files[fd] = uintptr(fd)
		} else {
			files[fd] = ^uintptr(0) // closed in the child
		}
	}
	files[readyFD] = readyW.Fd()
	env := append(os.Environ(), daemonEnv+"="+strconv.Itoa(readyFD))
	pid, err := syscall.ForkExec(exe, os.Args, &syscall.ProcAttr{
		Env: env, Files: files, Sys: &syscall.SysProcAttr{Setsid: true},
	})
	readyW.Close()
	errW.Close()
	devnull.Close()
	if err != nil {
		return fmt.Errorf("daemonize: start %s: %w", exe, err)
	}
	go io.Copy(os.Stderr, errR)
	buf := make([]byte, 1)
	if n, _ := readyR.Read(buf); n == 1 {
		return nil
	}
	var ws syscall.WaitStatus
	if _, err := syscall.Wait4(pid, &ws, 0, nil); err == nil && ws.Exited() && ws.ExitStatus() != 0 {
		return &ErrChildFailed{Status: ws.ExitStatus()}
	}
	return &ErrChildFailed{Status: 1}
}

// SignalReady tells a waiting --daemon parent that the sockets are up, then detaches stdio.
func SignalReady() {
	s := os.Getenv(daemonEnv)
	if s == "" {
		return
	}
	os.Unsetenv(daemonEnv)
	fd, err := strconv.Atoi(s)
	if err != nil {
		return
	}
	f := os.NewFile(uintptr(fd), "ready")
	f.Write([]byte{1})
	f.Close()
	if devnull, err := os.OpenFile(os.DevNull, os.O_RDWR, 0); err == nil {
		unix.Dup2(int(devnull.Fd()), 2)
		devnull.Close()
	}
}
