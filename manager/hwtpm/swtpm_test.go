package hwtpm

import (
	"bytes"
	"context"
	"crypto/sha256"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
)

// swtpmBinary is Debian's swtpm, by full path: a vtpmd link named swtpm may come first in PATH.
const swtpmBinary = "/usr/bin/swtpm"

// swtpm is a Debian swtpm serving a TPM 2.0 on a unix socket (or a TCP port), standing in
// for the host's hardware TPM.
type swtpm struct {
	t        testing.TB
	stateDir string
	sock     string // unix data socket, when port is 0
	port     int    // TCP data port (control on port+1)
	flags    []string
	cmd      *exec.Cmd
	log      bytes.Buffer
}

// startSwtpm starts a swtpm with a fresh state (a new TPM, with its own seeds) on a unix
// socket and stops it when the test ends.
func startSwtpm(t testing.TB) *swtpm {
	t.Helper()
	return startSwtpmFlags(t, "not-need-init,startup-clear")
}

// startSwtpmFlags is startSwtpm with other --flags ("" for none).
func startSwtpmFlags(t testing.TB, flags string) *swtpm {
	t.Helper()
	s := &swtpm{t: t, stateDir: t.TempDir()}
	s.sock = filepath.Join(shortDir(t), "data")
	if flags != "" {
		s.flags = []string{"--flags", flags}
	}
	s.start()
	return s
}

// startSwtpmTCP is startSwtpm on TCP ports.
func startSwtpmTCP(t testing.TB) *swtpm {
	t.Helper()
	s := &swtpm{t: t, stateDir: t.TempDir(), port: freePortPair(t), flags: []string{"--flags", "not-need-init,startup-clear"}}
	s.start()
	return s
}

func needSwtpm(t testing.TB) {
	t.Helper()
	if _, err := os.Stat(swtpmBinary); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("Debian's swtpm is missing in CI: %v", err)
		}
		t.Skipf("Debian's swtpm is not installed: %v", err)
	}
}

func (s *swtpm) start() {
	t := s.t
	t.Helper()
	needSwtpm(t)
	args := append([]string{"socket", "--tpm2", "--tpmstate", "dir=" + s.stateDir}, s.flags...)
	if s.port == 0 {
		args = append(args, "--server", "type=unixio,path="+s.sock,
			"--ctrl", "type=unixio,path="+s.sock+".ctrl")
	} else {
		args = append(args, "--server", "type=tcp,bindaddr=127.0.0.1,port="+strconv.Itoa(s.port),
			"--ctrl", "type=tcp,bindaddr=127.0.0.1,port="+strconv.Itoa(s.port+1))
	}
	s.log.Reset()
	s.cmd = exec.Command(swtpmBinary, args...)
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
	network, addr := "unix", s.sock
	if s.port != 0 {
		network, addr = "tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(s.port))
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		c, err := net.Dial(network, addr)
		if err == nil {
			c.Close()
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("swtpm did not listen on %s within 5s: %v\n%s", addr, err, s.log.String())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// restart stops swtpm with SIGTERM and starts it again on the same state.
func (s *swtpm) restart() {
	s.t.Helper()
	if err := s.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		s.t.Fatal(err)
	}
	_ = s.cmd.Wait()
	s.start()
}

// spec is the spec of this swtpm's data channel.
func (s *swtpm) spec() Spec {
	if s.port != 0 {
		return Spec{Kind: KindSwtpm, Host: "127.0.0.1", Port: s.port}
	}
	return Spec{Kind: KindSwtpm, Path: s.sock}
}

// open opens the swtpm as a TPM and closes it when the test ends.
func (s *swtpm) open() *TPM {
	s.t.Helper()
	tpm, err := Open(testContext(s.t), s.spec())
	if err != nil {
		s.t.Fatalf("Open: %v\nswtpm: %s", err, s.log.String())
	}
	s.t.Cleanup(func() { _ = tpm.Close() })
	return tpm
}

// extend extends a SHA-256 PCR, through the TPM's own connection (swtpm serves one at a time).
func extend(t testing.TB, tpm *TPM, pcr int, data string) {
	t.Helper()
	digest := sha256.Sum256([]byte(data))
	err := tpm.do(testContext(t), func(tp transport.TPM) error {
		_, err := tpm2.PCRExtend{
			PCRHandle: tpm2.AuthHandle{Handle: tpm2.TPMHandle(pcr), Auth: tpm2.PasswordAuth(nil)},
			Digests:   tpm2.TPMLDigestValues{Digests: []tpm2.TPMTHA{{HashAlg: tpm2.TPMAlgSHA256, Digest: digest[:]}}},
		}.Execute(tp)
		return err
	})
	if err != nil {
		t.Fatalf("extend PCR %d: %v", pcr, err)
	}
}

func testContext(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// shortDir is a temporary directory with a path short enough for unix sockets.
func shortDir(t testing.TB) string {
	t.Helper()
	dir := t.TempDir()
	if len(dir) < 80 {
		return dir
	}
	dir, err := os.MkdirTemp("", "hwtpm")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// freePortPair finds a port p such that p and p+1 are both free on 127.0.0.1 (just now).
func freePortPair(t testing.TB) int {
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

type transportTPM = transport.TPM
