//go:build linux && (amd64 || arm64)

package seccomp

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// childEnv makes the test binary a confined child: "<action>:<probe>".
const childEnv = "VTPMD_SECCOMP_TEST_CHILD"

func TestMain(m *testing.M) {
	if spec := os.Getenv(childEnv); spec != "" {
		os.Exit(child(spec))
	}
	os.Exit(m.Run())
}

// probes are the forbidden (and allowed) calls a child makes once confined; each returns the
// errno the call got, had it been let through.
var probes = map[string]func() syscall.Errno{
	// execve(NULL, ...): EFAULT when allowed; nothing is executed either way.
	"execve": func() syscall.Errno { _, _, e := unix.RawSyscall(unix.SYS_EXECVE, 0, 0, 0); return e },
	"mount": func() syscall.Errno {
		_, _, e := unix.RawSyscall6(unix.SYS_MOUNT, 0, 0, 0, 0, 0, 0)
		return e
	},
	"ptrace": func() syscall.Errno {
		_, _, e := unix.RawSyscall6(unix.SYS_PTRACE, unix.PTRACE_PEEKDATA, 1, 0, 0, 0, 0)
		return e
	},
	"init_module": func() syscall.Errno { _, _, e := unix.RawSyscall(unix.SYS_INIT_MODULE, 0, 0, 0); return e },
	"setuid": func() syscall.Errno {
		_, _, e := unix.RawSyscall(unix.SYS_SETUID, uintptr(os.Getuid()), 0, 0)
		return e
	},
	"prctl": func() syscall.Errno {
		_, _, e := unix.RawSyscall6(unix.SYS_PRCTL, unix.PR_GET_DUMPABLE, 0, 0, 0, 0, 0)
		return e
	},
	// a fork: only ever made under kill (under log it would fork a copy of the Go runtime).
	"fork": func() syscall.Errno {
		r, _, e := unix.RawSyscall6(unix.SYS_CLONE, uintptr(unix.SIGCHLD), 0, 0, 0, 0, 0)
		if e == 0 && r == 0 {
			unix.RawSyscall(unix.SYS_EXIT_GROUP, 0, 0, 0)
		}
		return e
	},
	// allowed, in a way glibc's pthread_create understands
	"clone3": func() syscall.Errno { _, _, e := unix.RawSyscall(unix.SYS_CLONE3, 0, 0, 0); return e },
	"none":   func() syscall.Errno { return 0 },
}

// child installs the filter, checks the Go runtime still works under it, then makes the probe.
func child(spec string) int {
	act, probe, _ := strings.Cut(spec, ":")
	a, err := ParseAction(act)
	if err != nil {
		fmt.Println(err)
		return 3
	}
	if err := Install(a); err != nil {
		fmt.Println("install:", err)
		return 3
	}
	fmt.Println("confined")
	if err := workout(a); err != nil {
		fmt.Println("workout:", err)
		return 4
	}
	fmt.Println("runtime ok")
	e := probes[probe]()
	fmt.Printf("survived errno=%d\n", int(e))
	return 0
}

// workout exercises what vtpmd does under the filter: new threads (clone with CLONE_THREAD),
// heap growth (mmap, prctl PR_SET_VMA), GC, timers, the netpoller, signals, files; every
// thread must carry the filter.
func workout(a Action) error {
	var wg sync.WaitGroup
	for i := 0; i < 16; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			runtime.LockOSThread() // a locked goroutine that exits takes its thread along
			time.Sleep(10 * time.Millisecond)
		}()
	}
	wg.Wait()
	keep := make([][]byte, 64)
	for i := range keep {
		keep[i] = bytes.Repeat([]byte{byte(i)}, 1<<20)
	}
	runtime.GC()
	runtime.KeepAlive(keep)
	runtime.GC()
	select {
	case <-time.After(20 * time.Millisecond):
	case <-time.After(time.Second):
		return errors.New("timer")
	}
	dir, err := os.MkdirTemp("", "seccomp-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	ln, err := net.Listen("unix", filepath.Join(dir, "s"))
	if err != nil {
		return err
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err == nil {
			b := make([]byte, 4)
			c.Read(b)
			c.Write(b)
			c.Close()
		}
	}()
	c, err := net.Dial("unix", filepath.Join(dir, "s"))
	if err != nil {
		return err
	}
	c.SetDeadline(time.Now().Add(5 * time.Second))
	c.Write([]byte("ping"))
	b := make([]byte, 4)
	if _, err := c.Read(b); err != nil || string(b) != "ping" {
		return fmt.Errorf("unix socket echo: %q %v", b, err)
	}
	c.Close()
	f := filepath.Join(dir, "f")
	if err := os.WriteFile(f+".tmp", []byte("x"), 0o600); err != nil {
		return err
	}
	if err := os.Rename(f+".tmp", f); err != nil {
		return err
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGUSR1)
	syscall.Kill(os.Getpid(), syscall.SIGUSR1)
	select {
	case <-sig:
	case <-time.After(5 * time.Second):
		return errors.New("SIGUSR1 not delivered")
	}
	// the runtime's own mapping names (prctl PR_SET_VMA) and a fresh mapping named by us
	m, err := unix.Mmap(-1, 0, 1<<16, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANON)
	if err != nil {
		return err
	}
	name := []byte("vtpmd-test\x00")
	_, _, e := unix.RawSyscall6(unix.SYS_PRCTL, prSetVMA, 0 /* PR_SET_VMA_ANON_NAME */, uintptr(unsafe.Pointer(&m[0])),
		uintptr(len(m)), uintptr(unsafe.Pointer(&name[0])), 0)
	if e != 0 && e != unix.EINVAL {
		return fmt.Errorf("prctl(PR_SET_VMA): %w", e)
	}
	unix.Munmap(m)
	return allThreadsConfined(a)
}

// allThreadsConfined reads every thread's Seccomp mode: 2 (filter) unless a is None.
func allThreadsConfined(a Action) error {
	want := "2"
	if a == None {
		want = "0"
	}
	tasks, err := os.ReadDir("/proc/self/task")
	if err != nil {
		return err
	}
	for _, task := range tasks {
		b, err := os.ReadFile("/proc/self/task/" + task.Name() + "/status")
		if err != nil {
			continue // the thread exited
		}
		for _, line := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(line, "Seccomp:"); ok && strings.TrimSpace(v) != want {
				return fmt.Errorf("thread %s: Seccomp %s, want %s", task.Name(), strings.TrimSpace(v), want)
			}
		}
	}
	return nil
}

type result struct {
	pid      int
	out      string
	signaled syscall.Signal // 0: exited
	code     int
}

func runChild(t *testing.T, spec string) result {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), childEnv+"="+spec)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	var ee *exec.ExitError
	if err != nil && !errors.As(err, &ee) {
		t.Fatalf("%s: %v", spec, err)
	}
	r := result{pid: cmd.Process.Pid, out: out.String(), code: cmd.ProcessState.ExitCode()}
	if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		r.signaled = ws.Signal()
	}
	return r
}

// TestKill: under action=kill each forbidden call kills the process with SIGSYS, after the Go
// runtime has worked under the filter; clone3 answers ENOSYS.
func TestKill(t *testing.T) {
	for _, probe := range []string{"execve", "mount", "ptrace", "init_module", "setuid", "prctl", "fork"} {
		t.Run(probe, func(t *testing.T) {
			r := runChild(t, "kill:"+probe)
			if r.signaled != syscall.SIGSYS || !strings.Contains(r.out, "runtime ok") || strings.Contains(r.out, "survived") {
				t.Fatalf("child: signal %v, exit %d, output:\n%s", r.signaled, r.code, r.out)
			}
		})
	}
	r := runChild(t, "kill:clone3")
	if r.code != 0 || !strings.Contains(r.out, fmt.Sprintf("survived errno=%d", int(unix.ENOSYS))) {
		t.Fatalf("clone3: exit %d, output:\n%s", r.code, r.out)
	}
}

// TestLog: under action=log forbidden calls go through, and the kernel logs them (checked in
// the kernel log where it can be read).
func TestLog(t *testing.T) {
	for _, c := range []struct {
		probe string
		nr    int
		want  syscall.Errno
	}{{"execve", unix.SYS_EXECVE, unix.EFAULT}, {"ptrace", unix.SYS_PTRACE, unix.ESRCH}, {"prctl", unix.SYS_PRCTL, 0}} {
		r := runChild(t, "log:"+c.probe)
		if r.code != 0 || !strings.Contains(r.out, fmt.Sprintf("survived errno=%d", int(c.want))) {
			t.Fatalf("%s: exit %d, signal %v, output:\n%s", c.probe, r.code, r.signaled, r.out)
		}
		// audit type 1326 (AUDIT_SECCOMP) with SECCOMP_RET_LOG's code
		entry := fmt.Sprintf(`pid=%d .* syscall=%d .*code=0x%x`, r.pid, c.nr, unix.SECCOMP_RET_LOG)
		if !kernelLogged(t, regexp.MustCompile(entry)) {
			t.Logf("%s: no kernel log entry %q (the log may not be readable here)", c.probe, entry)
		}
	}
}

// kernelLogged waits briefly for re in the kernel log; false when it is not there or dmesg
// cannot read it.
func kernelLogged(t *testing.T, re *regexp.Regexp) bool {
	t.Helper()
	for i := 0; i < 20; i++ {
		out, err := exec.Command("dmesg").Output()
		if err != nil {
			return false
		}
		if re.Match(out) {
			return true
		}
		time.Sleep(100 * time.Millisecond)
	}
	return false
}

// TestNone: action=none installs nothing.
func TestNone(t *testing.T) {
	r := runChild(t, "none:execve")
	if r.code != 0 || !strings.Contains(r.out, fmt.Sprintf("survived errno=%d", int(unix.EFAULT))) {
		t.Fatalf("exit %d, output:\n%s", r.code, r.out)
	}
}
