package proc

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"time"
)

// Sentinel errors of Start.
var (
	// ErrExited is wrapped when the daemon exits before it is ready.
	ErrExited = errors.New("exited before it was ready")
	// ErrNotReady is wrapped when the daemon is not ready in time.
	ErrNotReady = errors.New("was not ready in time")
)

// Daemon is a long-running process to start detached from the caller: in its own session,
// in /, with standard input and output on /dev/null and standard error appended to a log.
// It is ready when it has created its unix socket, or when Ready says so.
type Daemon struct {
	Path string   // executable
	Args []string // arguments after the program name
	// Log receives the daemon's standard error; it is created mode 0600 when missing, never
	// opened through a symbolic link, and its last lines go into Start's errors.
	Log string
	// Banner, when set, is written to the log as a timestamped line before the daemon starts
	// (who starts it, for whom).
	Banner string
	// Socket is the unix socket whose appearance means the daemon is ready (unless Ready is
	// set; then it only names the daemon's socket in errors).
	Socket string
	// SocketOwner is the uid the socket must belong to (the daemon may create it as itself
	// and chown it afterwards); -1 accepts any owner.
	SocketOwner int
	// Ready, when set, replaces the wait for Socket: the daemon (process pid) is ready once it
	// returns true. It is polled, so it must not block.
	Ready func(pid int) bool
	// Files are passed to the daemon as descriptors 3, 4, ... in this order.
	Files []*os.File
	// Credential, when set, is the user and groups the daemon runs as from its first
	// instruction (the caller needs the privilege to set them); nil keeps the caller's.
	Credential *syscall.Credential
	// Wait bounds the wait for readiness.
	Wait time.Duration
}

// Started is a daemon that Start saw become ready.
type Started struct {
	PID int
	Exe string // /proc/PID/exe once ready, "" if unreadable
}

// Start launches d and waits until it is ready, it exits, d.Wait passes or ctx ends;
// in the last two cases it kills the daemon. The daemon outlives the caller.
func Start(ctx context.Context, d Daemon) (*Started, error) {
	logf, err := os.OpenFile(d.Log, os.O_WRONLY|os.O_CREATE|os.O_APPEND|syscall.O_NOFOLLOW, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open log: %w", err)
	}
	defer logf.Close()
	devnull, err := os.OpenFile(os.DevNull, os.O_RDWR, 0)
	if err != nil {
		return nil, err
	}
	defer devnull.Close()
	if d.Banner != "" {
		fmt.Fprintf(logf, "%s %s\n", time.Now().UTC().Format(time.RFC3339Nano), d.Banner)
	}
	cmd := exec.Command(d.Path, d.Args...)
	cmd.Dir = "/"
	cmd.Stdin, cmd.Stdout, cmd.Stderr = devnull, devnull, logf
	cmd.ExtraFiles = d.Files
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Credential: d.Credential}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", d.Path, err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	if err := d.waitReady(ctx, cmd.Process.Pid, exited); err != nil {
		_ = cmd.Process.Kill()
		return nil, err
	}
	pid := cmd.Process.Pid
	return &Started{PID: pid, Exe: Exe(pid)}, nil
}

// waitReady polls for readiness until the daemon exits, d.Wait passes or ctx ends.
func (d *Daemon) waitReady(ctx context.Context, pid int, exited <-chan error) error {
	deadline := time.NewTimer(d.Wait)
	defer deadline.Stop()
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for {
		if d.Ready != nil && d.Ready(pid) || d.Ready == nil && d.socketReady() {
			return nil
		}
		select {
		case err := <-exited:
			return fmt.Errorf("%s %w (%v): %s", d.Path, ErrExited, err, LogTail(d.Log))
		case <-deadline.C:
			return fmt.Errorf("%s (for %s) %w (%v): %s", d.Path, d.Socket, ErrNotReady, d.Wait, LogTail(d.Log))
		case <-ctx.Done():
			return fmt.Errorf("%s: wait for %s: %w", d.Path, d.Socket, ctx.Err())
		case <-tick.C:
		}
	}
}

// socketReady reports whether the daemon's socket exists, with the expected owner.
func (d *Daemon) socketReady() bool {
	fi, err := os.Lstat(d.Socket)
	if err != nil || fi.Mode()&os.ModeSocket == 0 {
		return false
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	return d.SocketOwner < 0 || !ok || int(st.Uid) == d.SocketOwner
}

// LogTail returns the last lines (at most 4, of the last KiB) of a log, for error messages.
func LogTail(p string) string {
	f, err := os.Open(p)
	if err != nil {
		return "(no log)"
	}
	defer f.Close()
	const n = 1024
	if fi, err := f.Stat(); err == nil && fi.Size() > n {
		_, _ = f.Seek(fi.Size()-n, io.SeekStart)
	}
	data, _ := io.ReadAll(io.LimitReader(f, n))
	s := strings.TrimSpace(string(data))
	if lines := strings.Split(s, "\n"); len(lines) > 4 {
		s = strings.Join(lines[len(lines)-4:], "\n")
	}
	return "log " + p + ": " + s
}
