package qemu

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/internal/syncbuf"
)

// fakeEnv makes the test binary act as `vtpmd socket`: ok (listen on its control socket, write
// its pid file, serve until SIGTERM) or fail (exit at once with a message).
const fakeEnv = "VTPMD_QEMU_TEST_FAKE_VTPMD"

func TestMain(m *testing.M) {
	if mode := os.Getenv(fakeEnv); mode != "" {
		os.Exit(fakeVTPMD(mode, os.Args[1:]))
	}
	os.Exit(m.Run())
}

func fakeVTPMD(mode string, args []string) int {
	var sock, pid, state string
	for i := 0; i+1 < len(args); i++ {
		for _, kv := range strings.Split(args[i+1], ",") {
			k, v, _ := strings.Cut(kv, "=")
			switch args[i] + " " + k {
			case "--ctrl path":
				sock = v
			case "--pid file":
				pid = v
			case "--tpmstate dir":
				state = v
			}
		}
	}
	if mode == "fail" {
		fmt.Fprintln(os.Stderr, "fake vtpmd: cannot open the TPM state")
		return 1
	}
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM)
	l, err := net.Listen("unix", sock)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer l.Close()
	if fi, err := os.Stat(state); err != nil || !fi.IsDir() {
		fmt.Fprintln(os.Stderr, "fake vtpmd: no state directory", err)
		return 1
	}
	os.WriteFile(pid, []byte(fmt.Sprint(os.Getpid())), 0o644)
	<-sigs
	os.Remove(pid)
	return 0
}

// testConfig runs the fake vTPM and, as "QEMU", sh -c script (which sees the added arguments
// as "$@") in a temporary directory of its own.
func testConfig(t *testing.T, mode, script string) (Config, *syncbuf.Buffer) {
	t.Helper()
	t.Setenv(fakeEnv, mode)
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	out := &syncbuf.Buffer{}
	return Config{
		QEMU: []string{"sh", "-c", script, "sh"}, TPM2: true, Vtpmd: exe,
		TempDir: t.TempDir(), Stdin: strings.NewReader(""), Stdout: out, Stderr: out, Grace: 2 * time.Second,
	}, out
}

// assertEmpty fails when the run left something in its temporary directory's parent.
func assertEmpty(t *testing.T, dir string) {
	t.Helper()
	if entries, _ := os.ReadDir(dir); len(entries) != 0 {
		t.Fatalf("left behind in %s: %v", dir, entries)
	}
}

func TestRunExitStatusAndCleanup(t *testing.T) {
	c, out := testConfig(t, "ok", `echo "$@"; ls -l "${2#*path=}" >/dev/null || exit 99; exit 7`)
	code, err := Run(context.Background(), c)
	if code != 7 || err != nil {
		t.Fatalf("Run = %d, %v\n%s", code, err, out)
	}
	if !strings.Contains(out.String(), "-tpmdev emulator,id=vtpmd-run-tpm,chardev=vtpmd-run-chr -device tpm-tis,tpmdev=vtpmd-run-tpm") {
		t.Fatalf("QEMU's arguments: %s", out)
	}
	assertEmpty(t, c.TempDir)

	// QEMU killed by a signal: 128+N, as a shell reports it
	c, out = testConfig(t, "ok", `kill -KILL $$`)
	if code, err := Run(context.Background(), c); code != 137 || err != nil {
		t.Fatalf("Run = %d, %v\n%s", code, err, out)
	}
	assertEmpty(t, c.TempDir)
}

func TestRunFailures(t *testing.T) {
	c, _ := testConfig(t, "fail", "exit 0")
	code, err := Run(context.Background(), c)
	if code != ExitFailure || !errors.Is(err, ErrVTPM) || !strings.Contains(err.Error(), "cannot open the TPM state") {
		t.Fatalf("vTPM failure: %d, %v", code, err)
	}
	assertEmpty(t, c.TempDir)

	c, _ = testConfig(t, "ok", "")
	c.QEMU = []string{"/nonexistent/qemu-system-x86_64"}
	if code, err := Run(context.Background(), c); code != ExitNotFound || err == nil {
		t.Fatalf("missing QEMU: %d, %v", code, err)
	}
	assertEmpty(t, c.TempDir)

	c, _ = testConfig(t, "ok", "")
	c.QEMU = append(c.QEMU, "-device", "tpm-crb,tpmdev=x")
	if code, err := Run(context.Background(), c); code != ExitFailure || !errors.Is(err, ErrHasTPM) {
		t.Fatalf("QEMU with a TPM: %d, %v", code, err)
	}
}

// TestRunCancelled: the context ends while QEMU runs (as a signal ends it): QEMU gets
// SIGTERM, the vTPM stops, nothing is left, the status is 128+SIGTERM.
func TestRunCancelled(t *testing.T) {
	c, out := testConfig(t, "ok", `trap 'echo got TERM; exit 0' TERM; echo started; while :; do sleep 0.05; done`)
	ctx, cancel := context.WithCancel(context.Background())
	go func() {
		for !strings.Contains(out.String(), "started") {
			time.Sleep(10 * time.Millisecond)
		}
		cancel()
	}()
	start := time.Now()
	code, err := Run(ctx, c)
	var se *SignalError
	if code != 128+int(syscall.SIGTERM) || !errors.As(err, &se) {
		t.Fatalf("Run = %d, %v\n%s", code, err, out)
	}
	if !strings.Contains(out.String(), "got TERM") {
		t.Fatalf("QEMU did not get SIGTERM:\n%s", out)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("took %v", d)
	}
	assertEmpty(t, c.TempDir)
}

// TestRunManufactures (libtpms): a kept state directory is manufactured once, with EK
// certificates from a kept CA, and reused; an ephemeral run leaves nothing.
func TestRunManufactures(t *testing.T) {
	c, out := testConfig(t, "ok", "exit 0")
	c.StateDir, c.CADir, c.EKCerts = filepath.Join(t.TempDir(), "state"), filepath.Join(t.TempDir(), "ca"), true
	if code, err := Run(context.Background(), c); code != 0 || err != nil {
		t.Fatalf("Run = %d, %v\n%s", code, err, out)
	}
	perm := filepath.Join(c.StateDir, "tpm2-00.permall")
	first, err := os.ReadFile(perm)
	if err != nil {
		t.Fatal(err)
	}
	root, err := os.ReadFile(filepath.Join(c.CADir, "swtpm-localca-rootca-cert.pem"))
	if err != nil || !bytes.Contains(root, []byte("CERTIFICATE")) {
		t.Fatalf("CA root certificate: %v", err)
	}
	if fi, _ := os.Stat(c.StateDir); fi.Mode().Perm() != 0o700 {
		t.Fatalf("state directory mode %v", fi.Mode())
	}
	if code, err := Run(context.Background(), c); code != 0 || err != nil {
		t.Fatalf("second Run = %d, %v", code, err)
	}
	if again, _ := os.ReadFile(perm); !bytes.Equal(first, again) {
		t.Fatal("the kept state was manufactured again")
	}
	assertEmpty(t, c.TempDir)

	c.StateDir, c.CADir = "", ""
	if code, err := Run(context.Background(), c); code != 0 || err != nil {
		t.Fatalf("ephemeral Run = %d, %v", code, err)
	}
	assertEmpty(t, c.TempDir)
}
