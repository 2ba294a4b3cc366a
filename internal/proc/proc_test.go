package proc

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
)

// fakeEnv makes the test binary act as a vTPM daemon: ok (listen on the socket of its
// path= sub-option until SIGTERM), stubborn (the same, ignoring SIGTERM), fail (exit at once
// with a message) or hang (never create the socket).
const fakeEnv = "VTPMD_PROC_TEST_FAKE_DAEMON"

func TestMain(m *testing.M) {
	if mode := os.Getenv(fakeEnv); mode != "" {
		os.Exit(fakeDaemon(mode, os.Args[1:]))
	}
	os.Exit(m.Run())
}

func fakeDaemon(mode string, args []string) int {
	var path string
	for _, a := range args {
		for _, kv := range strings.Split(a, ",") {
			if v, ok := strings.CutPrefix(kv, "path="); ok {
				path = v
			}
		}
	}
	switch mode {
	case "fail":
		fmt.Fprintln(os.Stderr, "fake daemon: cannot open the TPM state")
		return 1
	case "hang":
		time.Sleep(time.Hour)
		return 0
	case "pidfd":
		// ready by writing its pid to the descriptor it was handed, never creating a socket
		f := os.NewFile(3, "pid")
		fmt.Fprint(f, os.Getpid())
		f.Close()
		time.Sleep(time.Hour)
		return 0
	}
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM)
	l, err := net.Listen("unix", path)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	for {
		<-sigs
		if mode != "stubborn" {
			l.Close()
			return 0
		}
	}
}

// daemon describes the test binary as a fake `vtpmd socket` serving dir/ctrl.sock.
func daemon(t *testing.T, mode string) Daemon {
	t.Helper()
	t.Setenv(fakeEnv, mode)
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	sock := filepath.Join(dir, "ctrl.sock")
	return Daemon{
		Path:        exe,
		Args:        []string{"socket", "--ctrl", "type=unixio,path=" + sock},
		Log:         filepath.Join(dir, "daemon.log"),
		Banner:      "test: starting a fake daemon",
		Socket:      sock,
		SocketOwner: os.Getuid(),
		Wait:        2 * time.Second,
	}
}

func TestStartFindTerminate(t *testing.T) {
	for _, mode := range []string{"ok", "stubborn"} {
		t.Run(mode, func(t *testing.T) {
			d := daemon(t, mode)
			st, err := Start(context.Background(), d)
			if err != nil {
				t.Fatal(err)
			}
			if !Alive(st.PID) || st.Exe == "" {
				t.Fatalf("started %+v, alive %v", st, Alive(st.PID))
			}
			if got := FindInstances("path", d.Socket); !slices.Equal(got, []int{st.PID}) {
				t.Fatalf("FindInstances = %v, want [%d]", got, st.PID)
			}
			if !IsInstance(st.PID, "path", d.Socket) || IsInstance(st.PID, "path", d.Socket+"x") || IsInstance(os.Getpid(), "path", d.Socket) {
				t.Fatal("IsInstance")
			}
			if log, _ := os.ReadFile(d.Log); !strings.Contains(string(log), d.Banner) {
				t.Fatalf("log %q lacks the banner", log)
			}
			signalled, err := Terminate(context.Background(), st.PID, 200*time.Millisecond)
			if err != nil || !signalled {
				t.Fatalf("Terminate = %v, %v", signalled, err)
			}
			if Alive(st.PID) {
				t.Fatal("still alive")
			}
			if signalled, err := Terminate(context.Background(), st.PID, time.Second); signalled || err != nil {
				t.Fatalf("Terminate of a stopped process = %v, %v", signalled, err)
			}
		})
	}
}

func TestStartFailures(t *testing.T) {
	cancelled, cancel := context.WithCancel(context.Background())
	cancel()
	tests := []struct {
		mode string
		ctx  context.Context
		want error
		text string
	}{
		{"fail", context.Background(), ErrExited, "cannot open the TPM state"},
		{"hang", context.Background(), ErrNotReady, "daemon.log"},
		{"hang", cancelled, context.Canceled, ""},
	}
	for _, tt := range tests {
		t.Run(tt.mode, func(t *testing.T) {
			d := daemon(t, tt.mode)
			d.Wait = 300 * time.Millisecond
			start := time.Now()
			_, err := Start(tt.ctx, d)
			if !errors.Is(err, tt.want) || !strings.Contains(err.Error(), tt.text) {
				t.Fatalf("err = %v, want %v with %q", err, tt.want, tt.text)
			}
			if d := time.Since(start); d > 3*time.Second {
				t.Fatalf("took %v", d)
			}
			deadline := time.Now().Add(2 * time.Second)
			for len(FindInstances("path", d.Socket)) > 0 && time.Now().Before(deadline) {
				time.Sleep(10 * time.Millisecond)
			}
			if pids := FindInstances("path", d.Socket); len(pids) > 0 {
				t.Fatalf("left processes %v", pids)
			}
		})
	}
}

func TestStartRefusesLogSymlink(t *testing.T) {
	d := daemon(t, "ok")
	victim := filepath.Join(t.TempDir(), "victim")
	os.WriteFile(victim, []byte("keep"), 0o600)
	if err := os.Symlink(victim, d.Log); err != nil {
		t.Fatal(err)
	}
	if _, err := Start(context.Background(), d); err == nil {
		t.Fatal("started with a symlinked log")
	}
	if b, _ := os.ReadFile(victim); string(b) != "keep" {
		t.Fatal("wrote through the symlink")
	}
}

func TestInspectSelf(t *testing.T) {
	info, err := Inspect(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(info.Args, os.Args) || info.Exe == "" {
		t.Fatalf("info %+v, args %q", info, os.Args)
	}
	for _, pid := range []int{0, -1, 1 << 30} {
		if Alive(pid) {
			t.Errorf("pid %d alive", pid)
		}
		if _, err := Inspect(pid); !errors.Is(err, ErrNotRunning) {
			t.Errorf("pid %d: err = %v", pid, err)
		}
	}
}

// TestAliveStates reads the state from fake /proc/PID/stat files.
func TestAliveStates(t *testing.T) {
	old := root
	root = t.TempDir()
	defer func() { root = old }()
	tests := []struct {
		stat  string
		alive bool
	}{
		{"10 (vtpmd) S 1 2 3", true},
		{"11 (a) Z) R 1 2 3", true},
		{"12 (vtpmd) Z 1 2 3", false},
		{"13 (vtpmd) X 1 2 3", false},
		{"14 (vtpmd)", false},
		{"15 vtpmd S", false},
		{"", false},
	}
	for _, tt := range tests {
		pid := strings.Fields(tt.stat + " 16")[0]
		os.MkdirAll(filepath.Join(root, pid), 0o755)
		os.WriteFile(filepath.Join(root, pid, "stat"), []byte(tt.stat), 0o644)
		var n int
		fmt.Sscan(pid, &n)
		if got := Alive(n); got != tt.alive {
			t.Errorf("%q: Alive = %v", tt.stat, got)
		}
	}
}

func TestHasSubOption(t *testing.T) {
	tests := []struct {
		args       []string
		key, value string
		want       bool
	}{
		{[]string{"socket", "--ctrl", "type=unixio,path=/a.sock,mode=0600"}, "path", "/a.sock", true},
		{[]string{"socket", "--tpmstate", "dir=/s/tpm2,mode=0600"}, "dir", "/s/tpm2", true},
		{[]string{"socket", "--ctrl", "type=unixio,path=/a.sock.old"}, "path", "/a.sock", false},
		{[]string{"socket", "--ctrl", "type=unixio,xpath=/a.sock"}, "path", "/a.sock", false},
		{nil, "path", "/a.sock", false},
	}
	for _, tt := range tests {
		if got := hasSubOption(tt.args, tt.key, tt.value); got != tt.want {
			t.Errorf("%q %s=%s: %v", tt.args, tt.key, tt.value, got)
		}
	}
}

func TestReadPidFile(t *testing.T) {
	dir := t.TempDir()
	tests := []struct {
		content string
		want    int
		err     error
	}{
		{"1234\n", 1234, nil},
		{"1234", 1234, nil},
		{"", 0, ErrBadPidFile},
		{"0", 0, ErrBadPidFile},
		{"-5", 0, ErrBadPidFile},
		{"12 34", 0, ErrBadPidFile},
		{strings.Repeat("9", 100), 0, ErrBadPidFile},
	}
	for i, tt := range tests {
		p := filepath.Join(dir, fmt.Sprint(i))
		os.WriteFile(p, []byte(tt.content), 0o644)
		got, err := ReadPidFile(p)
		if got != tt.want || !errors.Is(err, tt.err) {
			t.Errorf("%q: %d, %v", tt.content, got, err)
		}
	}
	if _, err := ReadPidFile(filepath.Join(dir, "absent")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("absent: %v", err)
	}
}

func TestLogTail(t *testing.T) {
	p := filepath.Join(t.TempDir(), "log")
	if got := LogTail(p); got != "(no log)" {
		t.Fatalf("missing log: %q", got)
	}
	var b strings.Builder
	for i := range 200 {
		fmt.Fprintf(&b, "line %d\n", i)
	}
	os.WriteFile(p, []byte(b.String()), 0o600)
	if got, want := LogTail(p), "log "+p+": line 196\nline 197\nline 198\nline 199"; got != want {
		t.Fatalf("got %q, want %q", got, want)
	}
}

// TestStartReadyFiles: a daemon handed a file as descriptor 3 is ready when Ready says so.
func TestStartReadyFiles(t *testing.T) {
	d := daemon(t, "pidfd")
	f, err := os.CreateTemp(t.TempDir(), "pid")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	d.Files = []*os.File{f}
	d.Ready = func(pid int) bool {
		b, _ := os.ReadFile(f.Name())
		return string(b) == fmt.Sprint(pid)
	}
	st, err := Start(context.Background(), d)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(d.Socket); !os.IsNotExist(err) {
		t.Fatalf("socket %v", err)
	}
	if _, err := Terminate(context.Background(), st.PID, time.Second); err != nil {
		t.Fatal(err)
	}
	// never ready: Start gives up and kills it
	d.Ready = func(int) bool { return false }
	d.Wait = 200 * time.Millisecond
	if _, err := Start(context.Background(), d); !errors.Is(err, ErrNotReady) {
		t.Fatalf("err = %v", err)
	}
}
