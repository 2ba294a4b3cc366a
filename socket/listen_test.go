package socket

import (
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vtpmd/vtpmd/internal/opts"
)

func mustOpts(t *testing.T, s string, allowed []string) *opts.Set {
	t.Helper()
	if s == "" {
		return nil
	}
	set, err := opts.Parse(s, allowed...)
	if err != nil {
		t.Fatal(err)
	}
	return set
}

func TestParseCtrl(t *testing.T) {
	tests := []struct {
		in      string
		want    ListenSpec
		wantErr string
	}{
		{in: "type=unixio,path=/run/x.sock,mode=0600,terminate", want: ListenSpec{Network: "unix", Path: "/run/x.sock", Mode: 0o600, UID: -1, GID: -1, ListenFD: -1, ConnFD: -1, Terminate: true}},
		{in: "type=unixio,path=/x", want: ListenSpec{Network: "unix", Path: "/x", Mode: 0o770, UID: -1, GID: -1, ListenFD: -1, ConnFD: -1}},
		{in: "type=tcp,port=2322", want: ListenSpec{Network: "tcp", Addr: "127.0.0.1:2322", UID: -1, GID: -1, ListenFD: -1, ConnFD: -1}},
		{in: "type=tcp,port=1,bindaddr=::1,ifname=lo", want: ListenSpec{Network: "tcp", Addr: "[::1%lo]:1", UID: -1, GID: -1, ListenFD: -1, ConnFD: -1}},
		{in: "type=unixio,clientfd=7", want: ListenSpec{UID: -1, GID: -1, ListenFD: -1, ConnFD: 7}},
		{in: "type=unixio,fd=5", want: ListenSpec{UID: -1, GID: -1, ListenFD: 5, ConnFD: -1}},
		{in: "type=tcp,clientfd=7", wantErr: "clientfd= requires type=unixio"},
		{in: "path=/x", wantErr: "missing type"},
		{in: "type=udp", wantErr: "unsupported type 'udp'"},
		{in: "type=unixio", wantErr: "type=unixio needs path= or fd="},
		{in: "type=tcp,port=70000", wantErr: "needs a valid port"},
		{in: "type=unixio,path=/x,mode=99x", wantErr: "--ctrl"},
		{in: "type=unixio,path=/x,uid=no-such-user-here", wantErr: "--ctrl"},
	}
	for _, tt := range tests {
		got, err := ParseCtrl(mustOpts(t, tt.in, CtrlOptions))
		if tt.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("ParseCtrl(%q) err = %v, want %q", tt.in, err, tt.wantErr)
			}
			continue
		}
		if err != nil {
			t.Errorf("ParseCtrl(%q): %v", tt.in, err)
			continue
		}
		got.Name = ""
		if *got != tt.want {
			t.Errorf("ParseCtrl(%q) = %+v, want %+v", tt.in, *got, tt.want)
		}
	}
	if sp, err := ParseCtrl(nil); sp != nil || err != nil {
		t.Errorf("ParseCtrl(nil) = %v, %v", sp, err)
	}
}

func TestParseData(t *testing.T) {
	t.Setenv("TPM_PORT", "")
	sp, err := ParseData(nil, 2321, -1)
	if err != nil || sp.Addr != "127.0.0.1:2321" || !sp.Disconnect {
		t.Fatalf("-p 2321: %+v %v", sp, err)
	}
	if _, err := ParseData(mustOpts(t, "type=tcp", ServerOptions), -1, -1); err == nil || !strings.Contains(err.Error(), "TPM_PORT") {
		t.Fatalf("no port: %v", err)
	}
	t.Setenv("TPM_PORT", "2400")
	if sp, err := ParseData(mustOpts(t, "type=tcp", ServerOptions), -1, -1); err != nil || sp.Addr != "127.0.0.1:2400" {
		t.Fatalf("TPM_PORT: %+v %v", sp, err)
	}
	if sp, err := ParseData(mustOpts(t, "type=tcp,fd=9", ServerOptions), -1, -1); err != nil || sp.ConnFD != 9 {
		t.Fatalf("server fd=: %+v %v", sp, err)
	}
	if _, err := ParseData(nil, -1, 1); err == nil || !strings.Contains(err.Error(), "stdin/stdout/stderr") {
		t.Fatalf("--fd 1: %v", err)
	}
	f, err := os.CreateTemp(t.TempDir(), "regular")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := ParseData(nil, -1, int(f.Fd())); err == nil || !strings.Contains(err.Error(), "socket or a character device") {
		t.Fatalf("--fd of a regular file: %v", err)
	}
	if sp, err := ParseData(nil, -1, -1); sp != nil || err != nil {
		t.Fatalf("no data channel: %v %v", sp, err)
	}
}

// TestOpenUnix: the socket file gets the spec's mode, and Close removes it.
func TestOpenUnix(t *testing.T) {
	path := filepath.Join(t.TempDir(), "ctrl.sock")
	sp, err := ParseCtrl(mustOpts(t, "type=unixio,path="+path+",mode=0600", CtrlOptions))
	if err != nil {
		t.Fatal(err)
	}
	ep, err := sp.Open()
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(path)
	if err != nil || fi.Mode().Perm() != 0o600 || fi.Mode()&os.ModeSocket == 0 {
		t.Fatalf("socket file: %v %v", fi, err)
	}
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	ep.Close()
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Fatalf("socket file left after Close: %v", err)
	}
}
