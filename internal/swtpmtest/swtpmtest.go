// Package swtpmtest starts Debian's swtpm as a stand-in for the host's hardware TPM in tests:
// a real TPM 2.0 on a unix data socket (or TCP ports), with its own seeds, stopped when the
// test ends.
package swtpmtest

import (
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/internal/syncbuf"
)

// Binary is Debian's swtpm, by full path: a vtpmd link named swtpm may come first in PATH.
const Binary = "/usr/bin/swtpm"

// DefaultFlags power the TPM on and start it up, as a booted host's TPM is.
const DefaultFlags = "not-need-init,startup-clear"

// Options shape one swtpm.
type Options struct {
	// TCP serves the data channel on 127.0.0.1:Port and control on Port+1 instead of a unix
	// socket.
	TCP bool
	// Flags is swtpm's --flags ("" for none; Start uses DefaultFlags).
	Flags string
}

// TPM is one running swtpm.
type TPM struct {
	t        testing.TB
	opts     Options
	StateDir string
	// Socket is the unix data socket (hwtpm spec "swtpm:path=" + Socket); Port the TCP data
	// port with Options.TCP.
	Socket string
	Port   int
	cmd    *exec.Cmd
	log    syncbuf.Buffer
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

// Start starts a new, started-up TPM (fresh state, own seeds) on a unix socket and stops it
// when the test ends.
func Start(t testing.TB) *TPM { return StartWith(t, Options{Flags: DefaultFlags}) }

// StartWith is Start with other options.
func StartWith(t testing.TB, o Options) *TPM {
	t.Helper()
	Need(t)
	s := &TPM{t: t, opts: o, StateDir: t.TempDir()}
	if o.TCP {
		s.Port = FreePortPair(t)
	} else {
		s.Socket = filepath.Join(ShortDir(t), "data")
	}
	s.start()
	return s
}

// Spec is the hwtpm spelling of this TPM.
func (s *TPM) Spec() string {
	if s.opts.TCP {
		return "swtpm:host=127.0.0.1,port=" + strconv.Itoa(s.Port)
	}
	return "swtpm:path=" + s.Socket
}

func (s *TPM) start() {
	t := s.t
	t.Helper()
	args := []string{"socket", "--tpm2", "--tpmstate", "dir=" + s.StateDir}
	if s.opts.Flags != "" {
		args = append(args, "--flags", s.opts.Flags)
	}
	network, addr := "unix", s.Socket
	if s.opts.TCP {
		network, addr = "tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(s.Port))
		args = append(args, "--server", "type=tcp,bindaddr=127.0.0.1,port="+strconv.Itoa(s.Port),
			"--ctrl", "type=tcp,bindaddr=127.0.0.1,port="+strconv.Itoa(s.Port+1))
	} else {
		args = append(args, "--server", "type=unixio,path="+s.Socket, "--ctrl", "type=unixio,path="+s.Socket+".ctrl")
	}
	s.cmd = exec.Command(Binary, args...)
	s.cmd.Stdout, s.cmd.Stderr = &s.log, &s.log
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
		c, err := net.Dial(network, addr)
		if err == nil {
			c.Close()
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("swtpm did not listen on %s within 10s: %v\n%s", addr, err, s.Log())
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
func (s *TPM) Log() string { return s.log.String() }

// FreePortPair finds a port p such that p and p+1 are both free on 127.0.0.1 (just now).
func FreePortPair(t testing.TB) int {
	t.Helper()
	for range 50 {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		p := l.Addr().(*net.TCPAddr).Port
		l2, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(p+1)))
		l.Close()
		if err == nil && p < 65534 {
			l2.Close()
			return p
		}
	}
	t.Fatal("no free pair of TCP ports")
	return 0
}

// ShortDir is a temporary directory whose path is short enough for unix sockets (t.TempDir's
// may not be), removed when the test ends.
func ShortDir(t testing.TB) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "vtpmd-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}
