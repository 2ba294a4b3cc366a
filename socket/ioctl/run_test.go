package ioctl

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vtpmd/vtpmd/internal/tpmwire"
	"github.com/vtpmd/vtpmd/socket"
)

// exchange is one control message the fake TPM expects and the bytes it answers.
type exchange struct {
	want, reply []byte
}

// be builds big-endian u32 words.
func be(words ...uint32) []byte {
	var b []byte
	for _, w := range words {
		b = binary.BigEndian.AppendUint32(b, w)
	}
	return b
}

// fakeControl is a client whose peer checks each message and answers it from the script.
func fakeControl(t *testing.T, script ...exchange) *socket.Client {
	t.Helper()
	ours, theirs := net.Pipe()
	done := make(chan struct{})
	go func() {
		defer close(done)
		defer theirs.Close()
		for i, x := range script {
			got := make([]byte, len(x.want))
			if _, err := io.ReadFull(theirs, got); err != nil {
				t.Errorf("exchange %d: read: %v", i, err)
				return
			}
			if !bytes.Equal(got, x.want) {
				t.Errorf("exchange %d: got %x, want %x", i, got, x.want)
				return
			}
			if _, err := theirs.Write(x.reply); err != nil {
				t.Errorf("exchange %d: write: %v", i, err)
				return
			}
		}
	}()
	t.Cleanup(func() { ours.Close(); <-done })
	return socket.NewClient(ours)
}

func TestSendOutput(t *testing.T) {
	tests := []struct {
		name   string
		req    Request
		script []exchange
		out    string
	}{
		{"capability", Request{Command: GetCapability}, []exchange{{be(1), be(0, 0x1ffff)}}, "ptm capability is 0x1ffff\n"},
		{"established", Request{Command: GetEstablished}, []exchange{{be(4), be(0, 1<<24)}}, "tpmEstablished is 1\n"},
		{"config", Request{Command: GetConfig}, []exchange{{be(0xf), be(0, 3)}}, "ptm configuration flags: 0x3\n"},
		{"buffersize", Request{Command: SetBufferSize, BufferSize: 3000}, []exchange{{be(0x11, 3000), be(0, 3000, 1024, 4096)}},
			"TPM buffersize: 3000\nminimum size  : 1024\nmaximum size  : 4096\n"},
		{"info", Request{Command: GetInfo, InfoFlags: 1<<32 | 2}, []exchange{{be(0x12, 1, 2, 0, 0), append(be(0, 3, 3), "{}\x00"...)}}, "{}\n"},
		{"init", Request{Command: Init}, []exchange{{be(2, 1), be(0)}}, ""},
		{"stop", Request{Command: Stop}, []exchange{{be(0xe), be(0)}}, ""},
		{"shutdown", Request{Command: Shutdown}, []exchange{{be(3), be(0)}}, ""},
		{"locality", Request{Command: SetLocality, Locality: 3}, []exchange{{append(be(5), 3, 0, 0, 0), be(0)}}, ""},
		{"reset", Request{Command: ResetEstablished, Locality: 4}, []exchange{{append(be(0xb), 4, 0, 0, 0), be(0)}}, ""},
		{"volatile", Request{Command: StoreVolatile}, []exchange{{be(0xa), be(0)}}, ""},
		{"cancel", Request{Command: Cancel}, []exchange{{be(9), be(0)}}, ""},
		{"hash", Request{Command: Hash, HashData: "abc"}, []exchange{{be(6), be(0)}, {append(be(7, 3), "abc"...), be(0)}, {be(8), be(0)}}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var out bytes.Buffer
			if err := Send(fakeControl(t, tt.script...), &tt.req, &out, nil); err != nil {
				t.Fatal(err)
			}
			if out.String() != tt.out {
				t.Fatalf("output %q, want %q", out.String(), tt.out)
			}
		})
	}
}

func TestSendFailures(t *testing.T) {
	c := fakeControl(t, exchange{be(1), be(uint32(tpmwire.ResBadOrdinal))})
	err := Send(c, &Request{Command: GetCapability}, io.Discard, nil)
	var r tpmwire.Result
	if err == nil || err.Error() != "TPM result from PTM_GET_CAPABILITY: 0xa" || !errors.Is(err, ErrCommandFailed) ||
		!errors.As(err, &r) || r != tpmwire.ResBadOrdinal {
		t.Fatalf("err = %v", err)
	}
	c = fakeControl(t) // the peer hangs up at once
	err = Send(c, &Request{Command: Stop}, io.Discard, nil)
	if err == nil || !strings.HasPrefix(err.Error(), "PTM_STOP failed: ") || !errors.Is(err, ErrCommandFailed) {
		t.Fatalf("err = %v", err)
	}
	if err := Send(fakeControl(t), nil, io.Discard, nil); !errors.Is(err, ErrInvalidArgs) {
		t.Fatalf("nil request: %v", err)
	}
	if err := Send(fakeControl(t), &Request{}, io.Discard, nil); err == nil || err.Error() != "No valid command." {
		t.Fatalf("no command: %v", err)
	}
}

// TestHashStdin checks that '-' hashes stdin in messages of at most socket.MaxHashData bytes.
func TestHashStdin(t *testing.T) {
	data := bytes.Repeat([]byte{'x'}, socket.MaxHashData+10)
	c := fakeControl(t,
		exchange{be(6), be(0)},
		exchange{append(be(7, socket.MaxHashData), data[:socket.MaxHashData]...), be(0)},
		exchange{append(be(7, 10), data[socket.MaxHashData:]...), be(0)},
		exchange{be(8), be(0)})
	if err := Send(c, &Request{Command: Hash, HashData: "-"}, io.Discard, bytes.NewReader(data)); err != nil {
		t.Fatal(err)
	}
}

func TestStateBlobFiles(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "blob")
	c := fakeControl(t, exchange{be(0xc, 0, socket.BlobVolatile, 0), append(be(0, 0, 3, 3), 7, 8, 9)})
	if err := Send(c, &Request{Command: SaveStateBlob, BlobType: socket.BlobVolatile, File: file}, io.Discard, nil); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(file); err != nil || !bytes.Equal(b, []byte{7, 8, 9}) {
		t.Fatalf("saved %x %v", b, err)
	}
	c = fakeControl(t, exchange{append(be(0xd, 0, socket.BlobVolatile, 3), 7, 8, 9), be(0)})
	if err := Send(c, &Request{Command: LoadStateBlob, BlobType: socket.BlobVolatile, File: file}, io.Discard, nil); err != nil {
		t.Fatal(err)
	}
	empty := filepath.Join(dir, "empty")
	c = fakeControl(t, exchange{be(0xc, 0, socket.BlobSavestate, 0), be(uint32(tpmwire.ResRetry), 0, 0, 0)})
	if err := Send(c, &Request{Command: SaveStateBlob, BlobType: socket.BlobSavestate, File: empty}, io.Discard, nil); err != nil {
		t.Fatal(err)
	}
	if st, err := os.Stat(empty); err != nil || st.Size() != 0 {
		t.Fatalf("a missing blob must be an empty file: %v %v", st, err)
	}
	missing := filepath.Join(dir, "missing")
	err := Send(fakeControl(t), &Request{Command: LoadStateBlob, File: missing}, io.Discard, nil)
	if err == nil || !strings.HasPrefix(err.Error(), "Could not read file '"+missing+"': ") || !errors.Is(err, ErrStateFile) || !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("err = %v", err)
	}
}

func TestRunConnectFailure(t *testing.T) {
	ctx := context.Background()
	req := &Request{Command: GetCapability, Endpoint: Endpoint{"unix", filepath.Join(t.TempDir(), "none.sock")}}
	err := Run(ctx, req, io.Discard, nil)
	if err == nil || err.Error() != "Connect failed: no such file or directory" || !errors.Is(err, ErrConnect) {
		t.Fatalf("err = %v", err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Skip(err)
	}
	addr := l.Addr().(*net.TCPAddr)
	l.Close()
	req.Endpoint = Endpoint{"tcp", addr.String()}
	err = Run(ctx, req, io.Discard, nil)
	want := "Could not connect to host '127.0.0.1' on port '" + strings.TrimPrefix(addr.String(), "127.0.0.1:") + "' using TCP socket: connection refused"
	if err == nil || err.Error() != want || !errors.Is(err, ErrConnect) {
		t.Fatalf("err = %v, want %q", err, want)
	}
}

func TestRunHelpAndVersion(t *testing.T) {
	var out bytes.Buffer
	tool := Program{Name: "swtpm_ioctl", Version: "9.9.9"}
	if err := Run(context.Background(), &Request{Program: tool, Command: ShowVersion}, &out, nil); err != nil {
		t.Fatal(err)
	}
	if out.String() != "TPM emulator control tool version 9.9.9, Copyright (c) 2015 IBM Corp.\n" {
		t.Fatalf("--version: %q", out.String())
	}
	out.Reset()
	if err := Run(context.Background(), &Request{Program: tool, Command: ShowHelp}, &out, nil); err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(out.String(), "TPM emulator control tool version 9.9.9, Copyright (c) 2015 IBM Corp.\n\nUsage: swtpm_ioctl command <device path>\n") ||
		!strings.HasSuffix(out.String(), "--help                : display help screen and exit\n") {
		t.Fatalf("--help: %q", out.String())
	}
}
