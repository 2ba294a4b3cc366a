package socket

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/internal/tpmwire"

	"golang.org/x/sys/unix"
)

// fakeTPM records calls; it models only the state a server test needs.
type fakeTPM struct {
	mu       sync.Mutex
	running  bool
	tpm2     bool
	locality uint8
	calls    []string
	blobs    map[uint32][]byte
	hashed   []byte
	block    chan struct{} // Process waits on it when set
	canceled bool
}

func newFake() *fakeTPM { return &fakeTPM{tpm2: true, blobs: map[uint32][]byte{}} }

func (f *fakeTPM) rec(s string) { f.mu.Lock(); f.calls = append(f.calls, s); f.mu.Unlock() }

func (f *fakeTPM) Capabilities() uint32 { return CapsTPM2 }
func (f *fakeTPM) Running() bool        { f.mu.Lock(); defer f.mu.Unlock(); return f.running }
func (f *fakeTPM) IsTPM2() bool         { return f.tpm2 }
func (f *fakeTPM) Init(flags uint32) error {
	f.rec("init")
	f.mu.Lock()
	f.running = true
	f.mu.Unlock()
	return nil
}
func (f *fakeTPM) Stop() error {
	f.rec("stop")
	f.mu.Lock()
	f.running = false
	f.mu.Unlock()
	return nil
}
func (f *fakeTPM) Shutdown() error            { f.rec("shutdown"); return nil }
func (f *fakeTPM) Established() (bool, error) { return true, nil }
func (f *fakeTPM) SetLocality(l uint8) error  { f.mu.Lock(); f.locality = l; f.mu.Unlock(); return nil }
func (f *fakeTPM) ResetEstablished(l uint8) error {
	if l < 3 {
		return tpmwire.ResBadLocality
	}
	return nil
}
func (f *fakeTPM) HashStart() error { f.hashed = nil; return nil }
func (f *fakeTPM) HashData(b []byte) error {
	f.hashed = append(f.hashed, b...)
	return nil
}
func (f *fakeTPM) HashEnd() error { return nil }
func (f *fakeTPM) Cancel() error {
	f.mu.Lock()
	f.canceled = true
	b := f.block
	f.mu.Unlock()
	if b != nil {
		close(b)
	}
	return nil
}
func (f *fakeTPM) StoreVolatile() error { return nil }
func (f *fakeTPM) GetStateBlob(typ uint32, decrypt bool) ([]byte, bool, error) {
	if typ > 3 {
		return nil, false, tpmwire.ResFail
	}
	return f.blobs[typ], false, nil
}
func (f *fakeTPM) SetStateBlob(typ uint32, enc bool, b []byte) error {
	f.blobs[typ] = b
	return nil
}
func (f *fakeTPM) Config() uint32 { return 0 }
func (f *fakeTPM) SetBufferSize(n uint32) (uint32, uint32, uint32, error) {
	if n == 0 {
		n = 4096
	}
	return min(max(n, 2808), 4096), 2808, 4096, nil
}
func (f *fakeTPM) Info(flags uint64) (string, error) { return `{"TPMSpecification":{}}`, nil }
func (f *fakeTPM) LockStorage(r uint32) error        { return nil }
func (f *fakeTPM) BufferSize() uint32                { return 4096 }
func (f *fakeTPM) Process(cmd []byte) ([]byte, error) {
	f.mu.Lock()
	b := f.block
	f.mu.Unlock()
	if b != nil {
		<-b
	}
	// echo: success response carrying the command code
	resp := []byte{0x80, 0x01, 0, 0, 0, 14, 0, 0, 0, 0}
	return append(resp, cmd[6:10]...), nil
}

// startServer serves a fake over a unix control socket pair.
func startServer(t *testing.T, f *fakeTPM, o Options) (*Server, *Client) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	conns := make([]net.Conn, 2)
	for i, fd := range fds {
		file := os.NewFile(uintptr(fd), "ctrl")
		conns[i], err = net.FileConn(file)
		file.Close()
		if err != nil {
			t.Fatal(err)
		}
	}
	s := NewServer(f, o)
	ctx, cancel := context.WithCancel(context.Background())
	s.ServeCtrlConn(ctx, conns[0])
	t.Cleanup(func() { cancel(); conns[1].Close(); s.Wait() })
	return s, NewClient(conns[1])
}

func raw(t *testing.T, c *Client, msg []byte) []byte {
	t.Helper()
	b, err := c.Raw(msg, 8192, 2*time.Second)
	if err != nil {
		t.Fatalf("raw %x: %v", msg, err)
	}
	return b
}

func hexBE(vals ...uint32) []byte { return putBE32(nil, vals...) }

func TestCtrlWireFormat(t *testing.T) {
	f := newFake()
	_, c := startServer(t, f, Options{})
	tests := []struct {
		name string
		msg  []byte
		want []byte
	}{
		{"capabilities", hexBE(1), hexBE(0, CapsTPM2)},
		{"capabilities ignores extra bytes", hexBE(1, 7), hexBE(0, CapsTPM2)},
		{"established before init is 4-byte 0x0a", hexBE(4), hexBE(0xa)},
		{"established with junk before init is still 0x0a", hexBE(4, 1), hexBE(0xa)},
		{"init with short payload waits; full", hexBE(2, 0), hexBE(0)},
		{"established after init", hexBE(4), append(hexBE(0), 1, 0, 0, 0)},
		{"established with junk", hexBE(4, 1), hexBE(3)},
		{"set locality qemu style", append(hexBE(5), 3, 0, 0, 0), hexBE(0)},
		{"set locality 5", append(hexBE(5), 5, 0, 0, 0), hexBE(0x3d)},
		{"reset established locality 0", append(hexBE(0xb), 0, 0, 0, 0), hexBE(0x3d)},
		{"buffer size query", hexBE(0x11, 0), hexBE(0, 4096, 2808, 4096)},
		{"buffer size set while running", hexBE(0x11, 3000), hexBE(0xa)},
		{"stop with payload", hexBE(0xe, 0), hexBE(3)},
		{"config", hexBE(0xf), hexBE(0, 0)},
		{"unknown", hexBE(0x99), hexBE(0xa)},
		{"get info offset past end", hexBE(0x12, 0, 1, 1000, 0), hexBE(3)},
		{"savestate missing gives 0x800 header", hexBE(0xc, 1, 3, 0), hexBE(0x800, 0, 0, 0)},
		{"a failed GET_STATEBLOB gives the full header", hexBE(0xc, 1, 9, 0), hexBE(9, 0, 0, 0)},
		{"GET_STATEBLOB ignores extra bytes", hexBE(0xc, 1, 3, 0, 7), hexBE(0x800, 0, 0, 0)},
		{"set state blob while running", append(hexBE(0xd, 0, 1, 2), 0xaa, 0xbb), hexBE(0xa)},
		{"running is checked before surplus data", append(hexBE(0xd, 0, 1, 1), 0xaa, 0xbb), hexBE(0xa)},
		{"buffer size ignores extra bytes", hexBE(0x11, 0, 7), hexBE(0, 4096, 2808, 4096)},
		{"stop", hexBE(0xe), hexBE(0)},
		{"buffer size set while stopped", hexBE(0x11, 1000), hexBE(0, 2808, 2808, 4096)},
		{"set data fd without fd", hexBE(0x10), hexBE(3)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := raw(t, c, tt.msg)
			if !bytes.Equal(got, tt.want) {
				t.Fatalf("reply %x, want %x", got, tt.want)
			}
		})
	}
}

func TestCtrlStateBlobStreaming(t *testing.T) {
	f := newFake()
	_, c := startServer(t, f, Options{})
	blob := bytes.Repeat([]byte{0x5a}, 100000) // larger than one read
	if err := c.SetStateBlob(BlobPermanent, 0, blob); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(f.blobs[BlobPermanent], blob) {
		t.Fatalf("stored %d bytes, want %d", len(f.blobs[BlobPermanent]), len(blob))
	}
	if err := c.Init(0); err != nil {
		t.Fatal(err)
	}
	got, flags, err := c.GetStateBlob(BlobPermanent, StateFlagDecrypted)
	if err != nil || flags != 0 || !bytes.Equal(got, blob) {
		t.Fatalf("GetStateBlob: %d bytes flags %d err %v", len(got), flags, err)
	}
	// offset: the rest of the blob
	resp := raw(t, c, hexBE(0xc, 1, 1, 99990))
	if !bytes.Equal(resp[:16], hexBE(0, 0, 10, 10)) {
		t.Fatalf("offset reply header %x", resp[:16])
	}
	// oversized SET_STATEBLOB: TPM_FAIL and the connection is closed.
	if err := c.Stop(); err != nil {
		t.Fatal(err)
	}
	resp = raw(t, c, hexBE(0xd, 0, 1, MaxStateBlob+1))
	if !bytes.Equal(resp, hexBE(9)) {
		t.Fatalf("oversized blob reply %x", resp)
	}
	if _, err := c.Raw(hexBE(1), 16, time.Second); err == nil {
		t.Fatal("connection still open after oversized blob")
	}
}

func TestCtrlIncompleteMessageClosesWithoutReply(t *testing.T) {
	f := newFake()
	_, c := startServer(t, f, Options{})
	start := time.Now()
	got, err := c.Raw([]byte{0, 0, 0, 2, 0, 0}, 16, 3*time.Second) // INIT with 2 payload bytes
	if len(got) != 0 || !errors.Is(err, io.EOF) {
		t.Fatalf("got %x, %v; want EOF without reply", got, err)
	}
	if d := time.Since(start); d < 400*time.Millisecond {
		t.Fatalf("closed after %v, want ~500ms", d)
	}
}

// TestCtrlStalledStreamCloses: a streamed payload that stops arriving costs the client its
// connection after the window, without an answer (integration: the next client is served).
func TestCtrlStalledStreamCloses(t *testing.T) {
	for _, tc := range []struct {
		name    string
		running bool
		msg     []byte
	}{
		{"HASH_DATA announcing 1 MiB with 4 KiB", true, append(hexBE(7, 1<<20), make([]byte, 4096)...)},
		{"HASH_DATA announcing 8 KiB with a full buffer", true, append(hexBE(7, 8192), make([]byte, 4096)...)},
		{"SET_STATEBLOB announcing 100 KB with 1 KB", false, append(hexBE(0xd, 0, 1, 100000), make([]byte, 1000)...)},
		{"SET_STATEBLOB announcing 100 KB with 5 KB", false, append(hexBE(0xd, 0, 1, 100000), make([]byte, 5000)...)},
		{"SET_STATEBLOB while running, announcing 100 KB with 5 KB", true, append(hexBE(0xd, 0, 1, 100000), make([]byte, 5000)...)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFake()
			f.running = tc.running
			_, c := startServer(t, f, Options{})
			if tc.running {
				if err := c.HashStart(); err != nil {
					t.Fatal(err)
				}
			}
			start := time.Now()
			got, err := c.Raw(tc.msg, 16, 3*time.Second)
			if len(got) != 0 || !errors.Is(err, io.EOF) {
				t.Fatalf("got %x, %v; want EOF without reply", got, err)
			}
			if d := time.Since(start); d < partialWindow-100*time.Millisecond || d > partialWindow+time.Second {
				t.Fatalf("closed after %v, want about %v", d, partialWindow)
			}
		})
	}
}

// TestCtrlSlowStreamIsServed: a payload whose parts keep coming within the window is taken,
// however long it takes in all.
func TestCtrlSlowStreamIsServed(t *testing.T) {
	f := newFake()
	_, c := startServer(t, f, Options{})
	blob := bytes.Repeat([]byte{0x33}, 50000)
	conn := c.Conn()
	conn.Write(hexBE(0xd, 0, 1, uint32(len(blob))))
	for i := 0; i < len(blob); i += 10000 {
		time.Sleep(partialWindow / 3)
		conn.Write(blob[i : i+10000])
	}
	got, err := c.Raw(nil, 4, 2*time.Second)
	if err != nil || !bytes.Equal(got, hexBE(0)) {
		t.Fatalf("reply %x %v", got, err)
	}
	if !bytes.Equal(f.blobs[BlobPermanent], blob) {
		t.Fatal("blob not stored")
	}
}

func TestHashDataStreams(t *testing.T) {
	f := newFake()
	_, c := startServer(t, f, Options{})
	c.Init(0)
	data := bytes.Repeat([]byte("0123456789"), 1000)
	if err := c.HashStart(); err != nil {
		t.Fatal(err)
	}
	msg := append(hexBE(7, uint32(len(data))), data...)
	if got := raw(t, c, msg); !bytes.Equal(got, hexBE(0)) {
		t.Fatalf("HASH_DATA reply %x", got)
	}
	if !bytes.Equal(f.hashed, data) {
		t.Fatalf("hashed %d bytes, want %d", len(f.hashed), len(data))
	}
	if got := raw(t, c, append(hexBE(7, 2), 1, 2, 3)); !bytes.Equal(got, hexBE(3)) {
		t.Fatalf("HASH_DATA with surplus: %x", got)
	}
}

// dataPair passes one end of a socketpair with SET_DATAFD and returns the other end.
func dataPair(t *testing.T, c *Client) net.Conn {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	theirs := os.NewFile(uintptr(fds[0]), "theirs")
	ours := os.NewFile(uintptr(fds[1]), "ours")
	defer ours.Close()
	if err := c.SetDataFD(theirs); err != nil {
		t.Fatal(err)
	}
	theirs.Close()
	conn, err := net.FileConn(ours)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

func TestDataChannelViaSetDataFD(t *testing.T) {
	f := newFake()
	s, c := startServer(t, f, Options{Terminate: true})
	d := dataPair(t, c)
	// second SET_DATAFD while one is set: TPM_IOERROR
	fds, _ := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	extra := os.NewFile(uintptr(fds[0]), "x")
	defer extra.Close()
	defer unix.Close(fds[1])
	if err := c.SetDataFD(extra); !errors.Is(err, tpmwire.ResIOError) {
		t.Fatalf("second SET_DATAFD: %v", err)
	}
	// QEMU's version probe before INIT: a TPM 2 tagged fatal error in one read
	probe := []byte{0x80, 0x01, 0, 0, 0, 0x0a, 0, 0, 0x01, 0x81}
	d.Write(probe)
	buf := make([]byte, 1024)
	n, err := d.Read(buf)
	if err != nil || !bytes.Equal(buf[:n], FatalResponse(true)) {
		t.Fatalf("probe reply %x %v", buf[:n], err)
	}
	c.Init(0)
	// a command split over two writes is still one command
	cmd := []byte{0x80, 0x01, 0, 0, 0, 0x0c, 0, 0, 0x01, 0x7b, 0, 8}
	d.Write(cmd[:5])
	time.Sleep(20 * time.Millisecond)
	d.Write(cmd[5:])
	n, _ = io.ReadAtLeast(d, buf, 14)
	if binary.BigEndian.Uint32(buf[10:14]) != 0x17b {
		t.Fatalf("reply %x", buf[:n])
	}
	// send-command-header variant: size prefix and 4-byte ack; locality applied
	d.Write(append([]byte{0, 0, 0, 8, 2, 0, 0, 0, 12}, cmd...))
	n, _ = io.ReadAtLeast(d, buf, 4+14+4)
	if binary.BigEndian.Uint32(buf) != 14 || !bytes.Equal(buf[18:22], []byte{0, 0, 0, 0}) || f.locality != 2 {
		t.Fatalf("prefixed reply %x locality %d", buf[:n], f.locality)
	}
	// --terminate: closing the data channel ends the server
	d.Close()
	select {
	case <-s.Done():
	case <-time.After(2 * time.Second):
		t.Fatal("server did not finish after data channel closed with --terminate")
	}
}

func TestCancelReachesRunningCommand(t *testing.T) {
	f := newFake()
	_, c := startServer(t, f, Options{})
	d := dataPair(t, c)
	c.Init(0)
	f.mu.Lock()
	f.block = make(chan struct{})
	f.mu.Unlock()
	d.Write([]byte{0x80, 0x01, 0, 0, 0, 0x0c, 0, 0, 0x01, 0x7b, 0, 8})
	time.Sleep(50 * time.Millisecond)
	if err := c.Cancel(); err != nil {
		t.Fatal(err)
	}
	d.SetReadDeadline(time.Now().Add(2 * time.Second))
	buf := make([]byte, 64)
	if _, err := io.ReadAtLeast(d, buf, 14); err != nil {
		t.Fatalf("command did not complete after cancel: %v", err)
	}
	if !f.canceled {
		t.Fatal("cancel not delivered")
	}
}

func TestShutdownFinishes(t *testing.T) {
	f := newFake()
	s, c := startServer(t, f, Options{})
	if err := c.Shutdown(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-s.Done():
	case <-time.After(time.Second):
		t.Fatal("no finish after SHUTDOWN")
	}
	if s.Reason() != "CMD_SHUTDOWN" {
		t.Fatalf("reason %q", s.Reason())
	}
}

func FuzzCtrlMessage(f *testing.F) {
	f.Add(hexBE(1))
	f.Add(hexBE(2, 1))
	f.Add(append(hexBE(0xd, 0, 1, 4), 1, 2, 3, 4))
	f.Add(append(hexBE(7, 3), 1, 2, 3))
	f.Add(hexBE(0xc, 1, 1, 0))
	f.Add(hexBE(0x12, 0, 3, 0, 0))
	f.Add(append(hexBE(5), 9))
	f.Add(append(hexBE(7, 2), 1, 2, 3))            // HASH_DATA with more than announced
	f.Add(append(hexBE(7, 1<<20), 1, 2, 3))        // HASH_DATA announcing more than sent
	f.Add(append(hexBE(0xd, 0, 1, 1), 1, 2))       // SET_STATEBLOB with more than announced
	f.Add(append(hexBE(0xd, 0, 9, 4), 1, 2, 3, 4)) // SET_STATEBLOB of an unknown type
	f.Add(hexBE(0xc, 0, 1, 0, 0))                  // GET_STATEBLOB with extra bytes
	f.Add(hexBE(0x11, 1, 1))                       // SET_BUFFERSIZE with extra bytes
	f.Add(append(hexBE(2, 0), hexBE(4)...))        // two messages in one write
	f.Fuzz(func(t *testing.T, msg []byte) {
		if len(msg) > 8192 {
			return
		}
		fk := newFake()
		fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			t.Skip(err)
		}
		a := os.NewFile(uintptr(fds[0]), "a")
		b := os.NewFile(uintptr(fds[1]), "b")
		ca, _ := net.FileConn(a)
		cb, _ := net.FileConn(b)
		a.Close()
		b.Close()
		s := NewServer(fk, Options{})
		ctx, cancel := context.WithCancel(context.Background())
		s.ServeCtrlConn(ctx, ca)
		cb.Write(msg)
		cb.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
		io.ReadAll(cb)
		cancel()
		cb.Close()
		s.Wait()
	})
}
