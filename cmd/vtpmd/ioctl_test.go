package main

import (
	"bytes"
	"strings"
	"testing"

	"github.com/vtpmd/vtpmd/socket"
)

func TestParseIoctlArgs(t *testing.T) {
	tests := []struct {
		args    string
		action  string
		network string
		addr    string
		errText string
	}{
		{"--unix /run/x.sock -c", "c", "unix", "/run/x.sock", ""},
		{"-i --unix /s", "i", "unix", "/s", ""},
		{"--tcp :1234 -s", "s", "tcp", "127.0.0.1:1234", ""},
		{"--tcp 10.0.0.1: -e", "e", "tcp", "10.0.0.1:6546", ""},
		{"--unix /s -l 3", "l", "unix", "/s", ""},
		{"--unix /s -l 5", "", "", "", "Locality outside valid range of [0..4]."},
		{"--unix /s --save permanent /tmp/f", "save", "unix", "/s", ""},
		{"--unix /s --save bogus /tmp/f", "", "", "", "Unknown blob type 'bogus'."},
		{"--unix /s", "", "", "", "No valid command."},
		{"-c", "", "", "", "Error: Missing device name."},
		{"--unix /s -x", "", "", "", "unrecognized option '-x'"},
		{"--unix /s -l", "", "", "", "option '-l' requires an argument"},
		{"--unix /s -c -i", "", "", "", "No valid command."},
		{"--unix /s -b 4096", "b", "unix", "/s", ""},
		{"--unix /s -b x", "", "", "", "Could not parse buffersize 'x'."},
		{"--unix /s --info 0x3", "info", "unix", "/s", ""},
	}
	for _, tt := range tests {
		t.Run(tt.args, func(t *testing.T) {
			req, done, err := parseIoctlArgs("swtpm_ioctl", strings.Fields(tt.args), &bytes.Buffer{})
			if done {
				t.Fatal("unexpected early exit")
			}
			if tt.errText != "" {
				if err == nil || !strings.Contains(err.Error(), tt.errText) {
					t.Fatalf("err = %v, want %q", err, tt.errText)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if req.action != tt.action || req.network != tt.network || req.addr != tt.addr {
				t.Fatalf("got %+v", req)
			}
		})
	}
	var out bytes.Buffer
	if _, done, _ := parseIoctlArgs("swtpm_ioctl", []string{"--help"}, &out); !done || !strings.Contains(out.String(), "--save <type> <file>") {
		t.Fatalf("--help: %v %q", done, out.String())
	}
	if r, _, _ := parseIoctlArgs("x", []string{"--unix", "/s", "--load", "volatile", "/f"}, &out); r.blobType != socket.BlobVolatile || r.file != "/f" {
		t.Fatalf("load: %+v", r)
	}
}

func TestUsageMessage(t *testing.T) {
	o := newSocketOpts()
	err := o.tpmstate.Set("dir=/x,bogus=1")
	if err == nil || usageMessage(err) != "Unknown option 'bogus'" {
		t.Fatalf("usageMessage = %q", usageMessage(err))
	}
}
