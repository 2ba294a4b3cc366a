package ioctl

import (
	"bytes"
	"context"
	"errors"
	"reflect"
	"strconv"
	"strings"
	"testing"

	"github.com/vtpmd/vtpmd/socket"
)

var testTool = Program{Name: "swtpm_ioctl", Version: "0.8.0"}

func TestParseArgs(t *testing.T) {
	tests := []struct {
		args     string
		command  Command
		endpoint Endpoint
		errText  string
	}{
		{"--unix /run/x.sock -c", GetCapability, Endpoint{"unix", "/run/x.sock"}, ""},
		{"-i --unix /s", Init, Endpoint{"unix", "/s"}, ""},
		{"--tcp :1234 -s", Shutdown, Endpoint{"tcp", "127.0.0.1:1234"}, ""},
		{"--tcp 10.0.0.1: -e", GetEstablished, Endpoint{"tcp", "10.0.0.1:6546"}, ""},
		{"--unix /s -l 3", SetLocality, Endpoint{"unix", "/s"}, ""},
		{"--unix /s -l 5", NoCommand, Endpoint{}, "Locality outside valid range of [0..4]."},
		{"--unix /s --save permanent /tmp/f", SaveStateBlob, Endpoint{"unix", "/s"}, ""},
		{"--unix /s --save bogus /tmp/f", NoCommand, Endpoint{}, "Unknown blob type 'bogus'."},
		{"--unix /s", NoCommand, Endpoint{}, "No valid command."},
		{"-c", NoCommand, Endpoint{}, "Error: Missing device name."},
		{"--unix /s -x", NoCommand, Endpoint{}, "unrecognized option '-x'"},
		{"--unix /s -l", NoCommand, Endpoint{}, "option '-l' requires an argument"},
		{"--unix /s -c -i", NoCommand, Endpoint{}, "No valid command."},
		{"--unix /s -b 4096", SetBufferSize, Endpoint{"unix", "/s"}, ""},
		{"--unix /s -b x", NoCommand, Endpoint{}, "Could not parse buffersize 'x'."},
		{"--unix /s --info 0x3", GetInfo, Endpoint{"unix", "/s"}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.args, func(t *testing.T) {
			req, err := ParseArgs(testTool, strings.Fields(tt.args))
			if req != nil && (req.Command == ShowHelp || req.Command == ShowVersion) {
				t.Fatal("unexpected early exit")
			}
			if tt.errText != "" {
				if err == nil || !strings.Contains(err.Error(), tt.errText) {
					t.Fatalf("err = %v, want %q", err, tt.errText)
				}
				if !errors.Is(err, ErrInvalidArgs) {
					t.Fatalf("err = %v, not ErrInvalidArgs", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if req.Command != tt.command || req.Endpoint != tt.endpoint {
				t.Fatalf("got %+v", req)
			}
		})
	}
	req, err := ParseArgs(testTool, []string{"--help"})
	if err != nil || req.Command != ShowHelp {
		t.Fatalf("--help: %+v %v", req, err)
	}
	var out bytes.Buffer
	if err := Run(context.Background(), req, &out, nil); err != nil || !strings.Contains(out.String(), "--save <type> <file>") {
		t.Fatalf("--help: %v %q", err, out.String())
	}
	if r, _ := ParseArgs(Program{Name: "x"}, []string{"--unix", "/s", "--load", "volatile", "/f"}); r == nil || r.BlobType != socket.BlobVolatile || r.File != "/f" {
		t.Fatalf("load: %+v", r)
	}
}

// TestParseArgsValues checks the typed arguments and the exact messages of every mistake.
func TestParseArgsValues(t *testing.T) {
	tests := []struct {
		args string
		want Request
	}{
		{"--unix /s -r 3", Request{Command: ResetEstablished, Locality: 3}},
		{"--unix /s -l 9 -l +4", Request{Command: SetLocality, Locality: 4}},
		{"--unix /s -b 3000", Request{Command: SetBufferSize, BufferSize: 3000}},
		{"--unix /s --info 0x10", Request{Command: GetInfo, InfoFlags: 16}},
		{"--unix /s -h -", Request{Command: Hash, HashData: "-"}},
		{"--unix /s --save savestate /f", Request{Command: SaveStateBlob, BlobType: socket.BlobSavestate, File: "/f"}},
		{"--unix /s --load permanent /f", Request{Command: LoadStateBlob, BlobType: socket.BlobPermanent, File: "/f"}},
		{"--unix --help -c", Request{Command: GetCapability}},
	}
	for _, tt := range tests {
		req, err := ParseArgs(testTool, strings.Fields(tt.args))
		if err != nil {
			t.Fatalf("%s: %v", tt.args, err)
		}
		req.Program, req.Endpoint = Program{}, Endpoint{}
		if *req != tt.want {
			t.Errorf("%s: got %+v, want %+v", tt.args, *req, tt.want)
		}
	}
	errs := []struct {
		args, text string
		kind       error
	}{
		{"--tcp host:x -c", "Could not parse port 'x'.", ErrInvalidArgs},
		{"--tcp host:65536 -c", "Could not parse port '65536'.", ErrInvalidArgs},
		{"--unix /s --info zz", "Could not parse info flags 'zz'.", ErrInvalidArgs},
		{"--unix /s -r -1", "Locality outside valid range of [0..4].", ErrInvalidArgs},
		{"--unix /s --save permanent", "swtpm_ioctl: option '--save' requires 2 arguments", ErrInvalidArgs},
		{"--unix /s --bogus", "swtpm_ioctl: unrecognized option '--bogus'", ErrInvalidArgs},
		{"--unix", "swtpm_ioctl: option '--unix' requires an argument", ErrInvalidArgs},
		{"--tpm-device /dev/vtpm0 -c", "CUSE devices are not supported by vtpmd; use --unix or --tcp", ErrDeviceUnsupported},
		{"-c /dev/vtpm0", "CUSE devices are not supported by vtpmd; use --unix or --tcp", ErrDeviceUnsupported},
	}
	for _, tt := range errs {
		req, err := ParseArgs(testTool, strings.Fields(tt.args))
		if err == nil || err.Error() != tt.text || !errors.Is(err, tt.kind) || req != nil {
			t.Errorf("%s: got %+v, %v; want %q", tt.args, req, err, tt.text)
		}
	}
	if req, err := ParseArgs(testTool, []string{"-x", "--version"}); err == nil || req != nil {
		t.Errorf("an earlier mistake must win over --version: %+v %v", req, err)
	}
	if req, err := ParseArgs(testTool, []string{"-c", "--version", "-x"}); err != nil || req.Command != ShowVersion {
		t.Errorf("--version must end parsing: %+v %v", req, err)
	}
}

// FuzzParseArgs feeds NUL-separated command lines to the parser: it must not panic, must be
// deterministic, and what it accepts must be a usable request.
func FuzzParseArgs(f *testing.F) {
	for _, seed := range []string{
		"--unix\x00/s\x00-c", "--tcp\x00:1234\x00-s", "--unix\x00/s\x00-l\x003",
		"--unix\x00/s\x00--save\x00permanent\x00/f", "--help", "--unix\x00/s\x00--info\x000x3",
	} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, line string) {
		args := strings.Split(line, "\x00")
		req, err := ParseArgs(testTool, args)
		again, againErr := ParseArgs(testTool, args)
		if !reflect.DeepEqual(req, again) || (err == nil) != (againErr == nil) {
			t.Fatalf("not deterministic: %+v %v / %+v %v", req, err, again, againErr)
		}
		if err != nil {
			if req != nil || err.Error() == "" || !(errors.Is(err, ErrInvalidArgs) || errors.Is(err, ErrDeviceUnsupported)) {
				t.Fatalf("bad error: %+v %v", req, err)
			}
			return
		}
		checkParsed(t, req)
	})
}

// checkParsed checks that an accepted request can be sent as it is.
func checkParsed(t *testing.T, req *Request) {
	t.Helper()
	switch req.Command {
	case NoCommand:
		t.Fatalf("accepted without a command: %+v", req)
	case ShowHelp, ShowVersion:
		return
	case SetLocality, ResetEstablished:
		if req.Locality > 4 {
			t.Fatalf("locality %d accepted", req.Locality)
		}
	case SaveStateBlob, LoadStateBlob:
		if req.BlobType < socket.BlobPermanent || req.BlobType > socket.BlobSavestate {
			t.Fatalf("blob type %d accepted", req.BlobType)
		}
	}
	switch req.Endpoint.Network {
	case "unix":
	case "tcp":
		i := strings.LastIndex(req.Endpoint.Address, ":")
		if _, err := strconv.ParseUint(req.Endpoint.Address[i+1:], 10, 16); i < 1 || err != nil {
			t.Fatalf("tcp address %q without a port", req.Endpoint.Address)
		}
	default:
		t.Fatalf("accepted without a socket: %+v", req)
	}
}
