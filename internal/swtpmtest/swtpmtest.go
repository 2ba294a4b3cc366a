// Package swtpmtest starts Debian's swtpm as a stand-in for the host's hardware TPM in tests:
// a real TPM 2.0 on a unix data socket, with its own seeds, stopped when the test ends.
package swtpmtest

import (
	"bytes"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Binary is Debian's swtpm, by full path: a vtpmd link named swtpm may come first in PATH.
const Binary = "/usr/bin/swtpm"

// TPM is one running swtpm.
type TPM struct {
	t        testing.TB
	StateDir string
	// Socket is the unix data socket (hwtpm spec "swtpm:path=" + Socket).
	Socket string
	cmd    *exec.Cmd
	mu     sync.Mutex
	log    bytes.Buffer
}

// Need skips the test when Debian's swtpm is missing, and fails it in CI.
func Need(t testing.TB) {
	t.Helper()
	if _, err := os.Stat(Binary); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("Debian's swtpm is missing in CI: %v", err)
		}
		t.Skipf("Debian's swtpm is not installed: %v", err)
	}
}

// Start starts a new TPM (fresh state, own seeds) and stops it when the test ends.
func Start(t testing.TB) *TPM {
	t.Helper()
	Need(t)
	sockDir, err := os.MkdirTemp("", "vtpmd-hw-") // short: unix socket paths are limited
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(sockDir) })
	s := &TPM{t: t, StateDir: t.TempDir(), Socket: filepath.Join(sockDir, "data")}
	s.start()
	return s
}

// Spec is the hwtpm spelling of this TPM.
func (s *TPM) Spec() string { return "swtpm:path=" + s.Socket }

func (s *TPM) start() {
	t := s.t
	t.Helper()
	s.cmd = exec.Command(Binary, "socket", "--tpm2", "--tpmstate", "dir="+s.StateDir,
		"--flags", "not-need-init,startup-clear",
		"--server", "type=unixio,path="+s.Socket, "--ctrl", "type=unixio,path="+s.Socket+".ctrl")
	s.cmd.Stdout, s.cmd.Stderr = &lockedWriter{s}, &lockedWriter{s}
	if err := s.cmd.Start(); err != nil {
		t.Fatalf("start swtpm: %v", err)
	}
	cmd := s.cmd
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			_ = cmd.Process.Kill()
			_ = cmd.Wait()
		}
	})
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := net.Dial("unix", s.Socket)
		if err == nil {
			c.Close()
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("swtpm did not listen on %s within 10s: %v\n%s", s.Socket, err, s.Log())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// Restart stops swtpm (SIGTERM) and starts it again on the same state: a host reboot.
func (s *TPM) Restart() {
	s.t.Helper()
	s.Stop()
	s.start()
}

// Stop ends swtpm.
func (s *TPM) Stop() {
	if s.cmd.ProcessState != nil {
		return
	}
	_ = s.cmd.Process.Signal(syscall.SIGTERM)
	_ = s.cmd.Wait()
}

// Log is what swtpm printed.
func (s *TPM) Log() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.log.String()
}

type lockedWriter struct{ s *TPM }

func (w *lockedWriter) Write(p []byte) (int, error) {
	w.s.mu.Lock()
	defer w.s.mu.Unlock()
	return w.s.log.Write(p)
}
