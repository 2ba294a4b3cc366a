package libvirt

import (
	"bytes"
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

// procRoot is /proc; tests may point it elsewhere.
var procRoot = "/proc"

// ProcInfo describes a live process.
type ProcInfo struct {
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

// procState returns the one-letter state of pid ("" if it does not exist).
func procState(pid int) string {
	data, err := readSmall(filepath.Join(procRoot, strconv.Itoa(pid), "stat"), 4096)
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
	s := procState(pid)
	return s != "" && s != "Z" && s != "X"
}

// Inspect reads a live process's exe and command line.
func Inspect(pid int) (*ProcInfo, error) {
	if !Alive(pid) {
		return nil, fmt.Errorf("process %d is not running", pid)
	}
	dir := filepath.Join(procRoot, strconv.Itoa(pid))
	data, err := readSmall(filepath.Join(dir, "cmdline"), 256<<10)
	if err != nil {
		return nil, fmt.Errorf("process %d: %w", pid, err)
	}
	info := &ProcInfo{PID: pid}
	if len(data) > 0 {
		info.Args = strings.Split(strings.TrimSuffix(string(data), "\x00"), "\x00")
	}
	info.Exe, _ = os.Readlink(filepath.Join(dir, "exe"))
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

// isInstance reports whether pid is a live vTPM (vtpmd socket or swtpm socket) process whose
// control socket (ctrl path=) or state directory (tpmstate dir=) is the one given.
func isInstance(pid int, key, value string) bool {
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

// FindInstances lists live vTPM processes whose sub-option key equals value, e.g.
// ("path", "/run/vtpmd/x.sock") or ("dir", "/var/lib/libvirt/swtpm/<uuid>/tpm2").
func FindInstances(key, value string) []int {
	entries, err := os.ReadDir(procRoot)
	if err != nil {
		return nil
	}
	var pids []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid <= 0 {
			continue
		}
		if isInstance(pid, key, value) {
			pids = append(pids, pid)
		}
	}
	return pids
}

// terminate sends SIGTERM to pid and waits up to grace for it to go (exit or become a zombie),
// then sends SIGKILL. It reports whether a signal was needed at all.
func terminate(pid int, grace time.Duration) (bool, error) {
	if !Alive(pid) {
		return false, nil
	}
	if err := syscall.Kill(pid, syscall.SIGTERM); err != nil {
		if errors.Is(err, syscall.ESRCH) {
			return false, nil
		}
		return false, fmt.Errorf("stop process %d: %w", pid, err)
	}
	deadline := time.Now().Add(grace)
	for time.Now().Before(deadline) {
		if !Alive(pid) {
			return true, nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
		return true, fmt.Errorf("kill process %d: %w", pid, err)
	}
	for i := 0; i < 100 && Alive(pid); i++ {
		time.Sleep(10 * time.Millisecond)
	}
	if Alive(pid) {
		return true, fmt.Errorf("process %d survived SIGKILL", pid)
	}
	return true, nil
}

// readPidFile reads a pid file written by libvirt (a decimal number and a newline).
func readPidFile(p string) (int, error) {
	data, err := readSmall(p, 64)
	if err != nil {
		return 0, err
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(data)))
	if err != nil || pid <= 0 {
		return 0, fmt.Errorf("pid file %s: bad content", p)
	}
	return pid, nil
}
