package manager

import (
	"context"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/internal/swtpmtest"
)

// FuzzAPI writes arbitrary bytes to the manager's socket: whatever arrives, the manager
// answers or closes that connection, and keeps serving (a status request still works).
func FuzzAPI(f *testing.F) {
	for _, s := range []string{
		"GET /v1/status HTTP/1.1\r\nHost: m\r\n\r\n",
		"POST /v1/key HTTP/1.1\r\nHost: m\r\nContent-Length: 27\r\n\r\n{\"state_path\":\"/nonexist\"}",
		"POST /v1/version HTTP/1.1\r\nHost: m\r\nContent-Length: 2\r\n\r\n{}",
		"POST /v1/enroll HTTP/1.1\r\nHost: m\r\nContent-Length: 13\r\n\r\n{\"vm\":\"none\"}",
		"POST /v1/adopt HTTP/1.1\r\nHost: m\r\nContent-Length: 40\r\n\r\n{\"state_path\":\"relative\",\"key\":\"AAAA\"}",
		"POST /v1/key HTTP/1.1\r\nHost: m\r\nContent-Length: 999999999\r\n\r\n{",
		"\x00\x01\x02garbage",
	} {
		f.Add([]byte(s))
	}
	hw := swtpmtest.Start(f)
	ctx, cancel := context.WithCancel(context.Background())
	f.Cleanup(cancel)
	h, err := OpenHardware(ctx, hw.Spec(), "none", 0)
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { h.Close() })
	srv, err := New(ctx, Config{Dir: f.TempDir(), Registry: nil}, h)
	if err != nil {
		f.Fatal(err)
	}
	sock := shortSocket(f)
	ln, err := listenAPI(sock, "")
	if err != nil {
		f.Fatal(err)
	}
	go srv.Serve(ctx, ln)
	client := NewClient(sock)
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := net.Dial("unix", sock)
		if err != nil {
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(5 * time.Second))
		c.Write(data)
		c.(*net.UnixConn).CloseWrite()
		buf := make([]byte, 4096)
		n, _ := c.Read(buf)
		c.Close()
		resp := string(buf[:n])
		if n > 0 && !strings.HasPrefix(resp, "HTTP/1.") {
			t.Fatalf("not an HTTP answer: %q", resp)
		}
		// this process serves no vTPM and the manager has no records: nothing but a status
		// can succeed
		if first, _, _ := strings.Cut(string(data), "\n"); strings.Contains(resp, " 200 OK") && !strings.Contains(first, "/v1/status") {
			t.Fatalf("%q succeeded: %q", data, resp)
		}
		if _, err := client.Status(context.Background()); err != nil {
			t.Fatalf("the manager stopped serving after %q: %v", data, err)
		}
	})
}

func shortSocket(t testing.TB) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "vtpmd-fuzz-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir + "/m.sock"
}

// FuzzStatePathOfArgs: a peer's command line (from /proc) never makes the parser panic, and a
// path it finds is absolute and clean.
func FuzzStatePathOfArgs(f *testing.F) {
	f.Add("vtpmd\x00socket\x00--tpmstate\x00dir=/var/lib/x/tpm2,mode=0600")
	f.Add("swtpm_setup\x00--tpm-state\x00dir:///var/lib/y\x00--tpm2")
	f.Add("vtpmd\x00socket\x00--tpmstate=backend-uri=file:///s/f")
	f.Add("x\x00--tpmstate\x00dir={\"a\":1}")
	f.Fuzz(func(t *testing.T, cmdline string) {
		p := statePathOfArgs(strings.Split(cmdline, "\x00"))
		if p != "" && (!strings.HasPrefix(p, "/") || strings.Contains(p, "/../")) {
			t.Fatalf("%q -> %q", cmdline, p)
		}
	})
}
