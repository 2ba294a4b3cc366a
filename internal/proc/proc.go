package proc

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Sentinel errors.
var (
	// ErrNotRunning is wrapped when a process does not exist or is a zombie.
	ErrNotRunning = errors.New("process is not running")
	// ErrBadPidFile is wrapped when a pid file does not hold a process id.
	ErrBadPidFile = errors.New("bad pid file")
)

// root is /proc; tests may point it elsewhere.
var root = "/proc"

// Info describes a live process.
type Info struct {
	PID  int
	Exe  string   // /proc/PID/exe target, "" if unreadable
	Args []string // command line
}

func readSmall(p string, limit int64) ([]byte, error) {
	f, err := os.Open(p)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return io.ReadAll(io.LimitReader(f, limit))
}

// state returns the one-letter state of pid ("" if it does not exist).
func state(pid int) string {
	data, err := readSmall(filepath.Join(root, strconv.Itoa(pid), "stat"), 4096)
	if err != nil {
		return ""
	}
	// pid (comm) S ...: comm may contain spaces and parentheses; the state follows the last ')'.
	i := bytes.LastIndexByte(data, ')')
	if i < 0 || i+2 >= len(data) {
		return ""
	}
	return string(data[i+2])
}

// Alive reports whether pid exists and is not a zombie.
func Alive(pid int) bool {
	if pid <= 0 {
		return false
	}
	s := state(pid)
	return s != "" && s != "Z" && s != "X"
}

// Exe returns the executable of pid (/proc/PID/exe), "" when it cannot be read.
func Exe(pid int) string {
	exe, _ := os.Readlink(filepath.Join(root, strconv.Itoa(pid), "exe"))
	return exe
}

// Inspect reads a live process's executable and command line.
func Inspect(pid int) (*Info, error) {
	if !Alive(pid) {
		return nil, fmt.Errorf("process %d: %w", pid, ErrNotRunning)
	}
	data, err := readSmall(filepath.Join(root, strconv.Itoa(pid), "cmdline"), 256<<10)
	if err != nil {
		return nil, fmt.Errorf("process %d: %w", pid, err)
	}
	info := &Info{PID: pid, Exe: Exe(pid)}
	if len(data) > 0 {
		info.Args = strings.Split(strings.TrimSuffix(string(data), "\x00"), "\x00")
	}
	return info, nil
}

// hasSubOption reports whether args contain a swtpm-style option string with key=value as
// one of its comma-separated parts.
func hasSubOption(args []string, key, value string) bool {
	want := key + "=" + value
	for _, a := range args {
		for _, part := range strings.Split(a, ",") {
			if part == want {
				return true
			}
		}
	}
	return false
}

// IsInstance reports whether pid is a live vTPM instance (a `vtpmd socket` or `swtpm socket`
// process) with the swtpm-style sub-option key=value among its arguments, e.g. its control
// socket ("path", "/run/vtpmd/x.sock") or its state directory ("dir", ".../tpm2").
func IsInstance(pid int, key, value string) bool {
	info, err := Inspect(pid)
	if err != nil {
		return false
	}
	hasSocket := false
	for _, a := range info.Args {
		if a == "socket" {
			hasSocket = true
			break
		}
	}
	return hasSocket && hasSubOption(info.Args, key, value)
}

// FindInstances lists the live vTPM instances (see IsInstance) whose sub-option key equals
// value, in /proc's order.
func FindInstances(key, value string) []int {
	entries, err := os.ReadDir(root)
	if err != nil {
		return nil
	}
	var pids []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid <= 0 {
			continue
		}
		if IsInstance(pid, key, value) {
			pids = append(pids, pid)
		}
	}
	return pids
}

// Terminate sends SIGTERM to pid and waits up to grace for it to go (exit or become a zombie),
// then sends SIGKILL. It reports whether a signal was needed at all. When ctx ends first it
// stops waiting and returns ctx's error.
func Terminate(ctx context.Context, pid int, grace time.Duration) (bool, error) {
	if !Alive(pid) {
		return false, nil
	}
	if err := syscall.Kill(pid, syscall.SIGTERM); err != nil {
		if errors.Is(err, syscall.ESRCH) {
			return false, nil
		}
		return false, fmt.Errorf("stop process %d: %w", pid, err)
	}
	gone, err := waitGone(ctx, pid, grace, 20*time.Millisecond)
	if gone || err != nil {
		return true, err
	}
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
		return true, fmt.Errorf("kill process %d: %w", pid, err)
	}
	if gone, err := waitGone(ctx, pid, time.Second, 10*time.Millisecond); gone || err != nil {
		return true, err
	}
	return true, fmt.Errorf("process %d survived SIGKILL", pid)
}

// waitGone polls every tick, for up to limit, until pid is no longer alive.
func waitGone(ctx context.Context, pid int, limit, tick time.Duration) (bool, error) {
	deadline := time.NewTimer(limit)
	defer deadline.Stop()
	t := time.NewTicker(tick)
	defer t.Stop()
	for {
		if !Alive(pid) {
			return true, nil
		}
		select {
		case <-ctx.Done():
			return false, fmt.Errorf("stop process %d: %w", pid, ctx.Err())
		case <-deadline.C:
			return !Alive(pid), nil
		case <-t.C:
		}
	}
}

// ReadPidFile reads a pid file (a decimal number, optionally followed by white space, as
// libvirt and swtpm write them).
func ReadPidFile(p string) (int, error) {
	data, err := readSmall(p, 64)
	if err != nil {
		return 0, err
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(data)))
	if err != nil || pid <= 0 {
		return 0, fmt.Errorf("%w %s", ErrBadPidFile, p)
	}
	return pid, nil
}
