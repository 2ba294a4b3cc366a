//go:build integration

package integration

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// seccompStatus is /proc/PID/status's Seccomp mode ("2": a filter is installed).
func seccompStatus(pid int) string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return err.Error()
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "Seccomp:"); ok {
			return strings.TrimSpace(v)
		}
	}
	return "?"
}

// waitConfined waits until the process has its seccomp filter (installed once the channels,
// the state and the pid file are open).
func waitConfined(t *testing.T, pid int) {
	t.Helper()
	waitFor(t, 10*time.Second, func() bool { return seccompStatus(pid) == "2" })
}

// exitedCleanly fails the test if the emulator died of a signal (SIGSYS: the filter killed it).
func exitedCleanly(t *testing.T, e *emulator, d time.Duration) {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- e.cmd.Wait() }()
	select {
	case err := <-done:
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
				t.Fatalf("vtpmd died of %v:\n%s", ws.Signal(), tail(readFile(t, e.log), 2000))
			}
			t.Fatalf("vtpmd: %v", err)
		}
	case <-time.After(d):
		t.Fatalf("vtpmd still running %v after QEMU exited", d)
	}
}

// TestSeccompBoot boots the guest (TPM 2 with tpm-crb, TPM 1.2 with tpm-tis) against vtpmd
// socket --seccomp action=kill: the filter is installed, the guest extends and reads PCR 16,
// and vtpmd ends normally (--terminate) instead of being killed by its filter.
func TestSeccompBoot(t *testing.T) {
	for _, c := range []struct {
		name, machine, model string
		tpm2                 bool
	}{{"tpm2", "q35", "tpm-crb", true}, {"tpm1.2", "pc", "tpm-tis", false}} {
		t.Run(c.name, func(t *testing.T) {
			args := []string{"--terminate", "--seccomp", "action=kill"}
			if c.tpm2 {
				args = append(args, "--tpm2")
			}
			e := startEmulator(t, env.bin, "", args...)
			waitConfined(t, e.cmd.Process.Pid)
			q := startQEMU(t, vm{firmware: "seabios", machine: c.machine, model: c.model, ctrl: e.ctrl, noReboot: true})
			q.wait(t, 180*time.Second)
			g := guestValues(q.serialText())
			if c.tpm2 && (g["tpm_version_major"] != "2" || g["extend_ok"] != "true" || g["after_extend_pcr16"] != pcr16AfterOneExtend) {
				t.Fatalf("guest saw %v", g)
			}
			if !c.tpm2 && g["tpm_version_major"] != "1" {
				t.Fatalf("guest saw %v", g)
			}
			exitedCleanly(t, e, 20*time.Second)
		})
	}
}

// TestSeccompMigration live-migrates the guest between two vtpmd run with --seccomp
// action=kill: GET_STATEBLOB, SET_STATEBLOB and the lock hand-over work under the filter, and
// the PCR 16 chain continues on the destination.
func TestSeccompMigration(t *testing.T) {
	args := []string{"--tpm2", "--seccomp", "action=kill", "--migration", "release-lock-outgoing"}
	src := startEmulator(t, env.bin, "", args...)
	dst := startEmulator(t, env.bin, "", append(args, "--migration", "incoming,release-lock-outgoing")...)
	waitConfined(t, src.cmd.Process.Pid)
	waitConfined(t, dst.cmd.Process.Pid)
	migrateChain(t, src, dst)
	for name, e := range map[string]*emulator{"source": src, "destination": dst} {
		if s := seccompStatus(e.cmd.Process.Pid); s != "2" {
			t.Fatalf("%s vtpmd: Seccomp %s after the migration (killed?)\n%s", name, s, tail(readFile(t, e.log), 2000))
		}
	}
}

// TestSeccompDaemon: --daemon re-executes vtpmd before the filter (an exec under it would be
// killed); the daemon is confined by default (no --seccomp), as swtpm is, and not with
// action=none.
func TestSeccompDaemon(t *testing.T) {
	for _, c := range []struct {
		args []string
		want string
	}{{nil, "2"}, {[]string{"--seccomp", "action=kill"}, "2"}, {[]string{"--seccomp", "action=log"}, "2"}, {[]string{"--seccomp", "action=none"}, "0"}} {
		t.Run(strings.Join(append([]string{"seccomp"}, c.args...), " "), func(t *testing.T) {
			dir := t.TempDir()
			pidFile := filepath.Join(dir, "pid")
			os.MkdirAll(filepath.Join(dir, "state"), 0o700)
			args := append([]string{"socket", "--tpm2", "--daemon", "--pid", "file=" + pidFile, "--tpmstate", "dir=" + filepath.Join(dir, "state"),
				"--ctrl", "type=unixio,path=" + filepath.Join(dir, "ctrl"), "--flags", "not-need-init,startup-clear"}, c.args...)
			if out, err := exec.Command(env.bin, args...).CombinedOutput(); err != nil {
				t.Fatalf("vtpmd --daemon: %v\n%s", err, out)
			}
			b, err := os.ReadFile(pidFile)
			if err != nil {
				t.Fatal(err)
			}
			pid, _ := strconv.Atoi(string(b))
			t.Cleanup(func() {
				syscall.Kill(pid, syscall.SIGTERM)
				waitFor(t, 10*time.Second, func() bool { return syscall.Kill(pid, 0) != nil })
			})
			waitFor(t, 10*time.Second, func() bool { return seccompStatus(pid) == c.want })
		})
	}
}
