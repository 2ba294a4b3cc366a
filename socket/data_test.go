package socket

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vtpmd/vtpmd/internal/tpmwire"
)

func cmdBytes(size int) []byte {
	b := make([]byte, size)
	binary.BigEndian.PutUint16(b, 0x8001)
	binary.BigEndian.PutUint32(b[2:], uint32(size))
	binary.BigEndian.PutUint32(b[6:], 0x17b)
	for i := 10; i < size; i++ {
		b[i] = byte(i)
	}
	return b
}

// prefixed puts the tpm-send-command-header in front of cmd.
func prefixed(loc uint8, size int, cmd []byte) []byte {
	b := binary.BigEndian.AppendUint32(nil, tpm2SendCmd)
	b = append(b, loc)
	b = binary.BigEndian.AppendUint32(b, uint32(size))
	return append(b, cmd...)
}

func TestParseFrame(t *testing.T) {
	getRandom := cmdBytes(12)
	tests := []struct {
		name     string
		in       []byte
		tpm2     bool
		want     []byte
		prefixed bool
		loc      uint8
	}{
		{name: "plain", in: getRandom, tpm2: true, want: getRandom},
		{name: "size field not checked", in: cmdBytes(12)[:11], tpm2: true, want: cmdBytes(12)[:11]},
		{name: "send-command header", in: prefixed(3, 12, getRandom), tpm2: true, want: getRandom, prefixed: true, loc: 3},
		{name: "prefix size ignored", in: prefixed(1, 99, getRandom), tpm2: true, want: getRandom, prefixed: true, loc: 1},
		{name: "prefix with a short command", in: prefixed(0, 12, getRandom[:1]), tpm2: true, want: getRandom[:1], prefixed: true},
		{name: "prefix alone is too short", in: prefixed(0, 12, nil), tpm2: true, want: prefixed(0, 12, nil)},
		{name: "prefix ignored for tpm 1.2", in: prefixed(3, 12, getRandom), tpm2: false, want: prefixed(3, 12, getRandom)},
		{name: "tpm 2 tag is never a prefix", in: []byte{0x80, 0x01, 0, 8, 0, 0, 0, 0, 0, 0}, tpm2: true, want: []byte{0x80, 0x01, 0, 8, 0, 0, 0, 0, 0, 0}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := ParseFrame(tt.in, tt.tpm2)
			if !bytes.Equal(f.Command, tt.want) || f.Prefixed != tt.prefixed || f.Locality != tt.loc {
				t.Fatalf("frame = %x prefixed=%v loc=%d", f.Command, f.Prefixed, f.Locality)
			}
		})
	}
}

// pipe returns a connected pair of unix stream sockets (writes up to their buffer arrive in
// one read, as on QEMU's data channel).
func pipe(t *testing.T) (net.Conn, net.Conn) {
	t.Helper()
	a, b, err := socketpairConns()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close(); b.Close() })
	return a, b
}

func TestFrameReader(t *testing.T) {
	const size = 4096 + sendCmdPrefixSize
	read := func(t *testing.T, r *frameReader) ([]byte, time.Duration, error) {
		start := time.Now()
		msg, err := r.next()
		return append([]byte(nil), msg...), time.Since(start), err
	}
	t.Run("one write is one message whatever its size field says", func(t *testing.T) {
		a, b := pipe(t)
		r := newFrameReader(a, size)
		for _, w := range [][]byte{cmdBytes(12), cmdBytes(100)[:10], append(cmdBytes(12), cmdBytes(12)...), cmdBytes(size)} {
			b.Write(w)
			msg, _, err := read(t, r)
			if err != nil || !bytes.Equal(msg, w) {
				t.Fatalf("message %x (%v), want %x", msg, err, w)
			}
		}
	})
	t.Run("a write beyond the buffer is read as two", func(t *testing.T) {
		a, b := pipe(t)
		r := newFrameReader(a, size)
		w := cmdBytes(size + 20)
		b.Write(w)
		for _, want := range [][]byte{w[:size], w[size:]} {
			msg, _, err := read(t, r)
			if err != nil || !bytes.Equal(msg, want) {
				t.Fatalf("message of %d bytes (%v), want %d", len(msg), err, len(want))
			}
		}
	})
	t.Run("a header in two writes", func(t *testing.T) {
		a, b := pipe(t)
		r := newFrameReader(a, size)
		w := cmdBytes(12)
		go func() {
			b.Write(w[:4])
			time.Sleep(50 * time.Millisecond)
			b.Write(w[4:])
		}()
		msg, _, err := read(t, r)
		if err != nil || !bytes.Equal(msg, w) {
			t.Fatalf("message %x (%v)", msg, err)
		}
	})
	t.Run("a stalled header is answered after the window", func(t *testing.T) {
		a, b := pipe(t)
		r := newFrameReader(a, size)
		b.Write([]byte{0x80, 1, 0})
		msg, took, err := read(t, r)
		if err != nil || !bytes.Equal(msg, []byte{0x80, 1, 0}) {
			t.Fatalf("message %x (%v)", msg, err)
		}
		if took < partialWindow-50*time.Millisecond || took > partialWindow+time.Second {
			t.Fatalf("partial message after %v, want about %v", took, partialWindow)
		}
		// the deadline is gone: an idle connection waits for the next write
		go func() { time.Sleep(partialWindow + 200*time.Millisecond); b.Write(cmdBytes(12)) }()
		if msg, _, err := read(t, r); err != nil || !bytes.Equal(msg, cmdBytes(12)) {
			t.Fatalf("next message %x (%v)", msg, err)
		}
	})
	t.Run("closed mid-header", func(t *testing.T) {
		a, b := pipe(t)
		r := newFrameReader(a, size)
		b.Write([]byte{0x80, 1})
		b.Close()
		if _, _, err := read(t, r); !errors.Is(err, io.EOF) {
			t.Fatalf("err = %v, want EOF", err)
		}
	})
	t.Run("closed between messages", func(t *testing.T) {
		a, b := pipe(t)
		r := newFrameReader(a, size)
		b.Close()
		if _, _, err := read(t, r); !errors.Is(err, io.EOF) {
			t.Fatalf("err = %v, want EOF", err)
		}
	})
}

// TestDataChannelNeverLosesStep sends what a guest may write and checks that every write gets
// one answer, the channel stays open, and the next command is answered as usual.
func TestDataChannelNeverLosesStep(t *testing.T) {
	f := newFake()
	s, c := startServer(t, f, Options{Terminate: true})
	d := dataPair(t, c)
	if err := c.Init(0); err != nil {
		t.Fatal(err)
	}
	next := cmdBytes(12)
	for _, w := range [][]byte{
		cmdBytes(100)[:10],  // announces 100, sends 10
		cmdBytes(5000)[:10], // announces more than the buffer
		func() []byte { b := cmdBytes(12); binary.BigEndian.PutUint32(b[2:], 2<<20); return b }(),
		func() []byte { b := cmdBytes(12); binary.BigEndian.PutUint32(b[2:], 4); return b }(),
		[]byte("garbage garbage"),             // no TPM header at all
		append(cmdBytes(12), 1, 2, 3),         // trailing bytes
		append(cmdBytes(12), cmdBytes(12)...), // two commands in one write
		prefixed(0, 12, cmdBytes(12)[:4]),     // prefix and a short command
		cmdBytes(4096 + sendCmdPrefixSize),    // the whole buffer
	} {
		if got := roundTrip(t, d, w); !oneAnswer(got, ParseFrame(w, true).Prefixed) {
			t.Fatalf("answer to %x...: %x", w[:min(len(w), 16)], got)
		}
		if got := roundTrip(t, d, next); !bytes.Equal(got[10:14], []byte{0, 0, 1, 0x7b}) {
			t.Fatalf("next command after %x...: %x", w[:min(len(w), 16)], got)
		}
	}
	// shorter than a header: swtpm's short-message answer, after the window
	start := time.Now()
	if got := roundTrip(t, d, []byte{0x80, 1, 0, 0}); !bytes.Equal(got, tpmwire.ErrorResponse(true, rcInsufficient)) {
		t.Fatalf("short message: %x", got)
	}
	if time.Since(start) < partialWindow-50*time.Millisecond {
		t.Fatal("a partial header was answered before the window closed")
	}
	select {
	case <-s.Done():
		t.Fatalf("the server finished: %s", s.Reason())
	default:
	}
}

// TestStalledDataDoesNotBlockControl: while the data channel waits for the rest of a header,
// control commands are answered.
func TestStalledDataDoesNotBlockControl(t *testing.T) {
	f := newFake()
	_, c := startServer(t, f, Options{})
	d := dataPair(t, c)
	c.Init(0)
	d.Write([]byte{0x80, 1})
	start := time.Now()
	if _, err := c.GetConfig(); err != nil {
		t.Fatal(err)
	}
	if took := time.Since(start); took > partialWindow/2 {
		t.Fatalf("GET_CONFIG took %v while the data channel stalled", took)
	}
}

// oneAnswer reports whether got is exactly one TPM response (in a send-command-header reply).
func oneAnswer(got []byte, prefixed bool) bool {
	if prefixed {
		if len(got) < 8 || int(binary.BigEndian.Uint32(got))+8 != len(got) {
			return false
		}
		got = got[4 : len(got)-4]
	}
	return len(got) >= tpmwire.HeaderSize && int(binary.BigEndian.Uint32(got[2:])) == len(got)
}

// roundTrip writes w on the data channel and reads one answer (all that arrives until the
// peer is quiet for 100 ms: a second answer would show).
func roundTrip(t *testing.T, d net.Conn, w []byte) []byte {
	t.Helper()
	if _, err := d.Write(w); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 8192)
	var got []byte
	d.SetReadDeadline(time.Now().Add(3 * time.Second))
	defer d.SetReadDeadline(time.Time{})
	for {
		n, err := d.Read(buf)
		got = append(got, buf[:n]...)
		if err != nil {
			if len(got) == 0 {
				t.Fatalf("no answer to %x...: %v", w[:min(len(w), 16)], err)
			}
			return got
		}
		d.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
	}
}

// FuzzReadFrame feeds any bytes, written in chunks, through the data channel's reader and
// parser: nothing is lost or duplicated (but a fragment shorter than a header that the stream
// ends in), no message exceeds the buffer, and every message is
// parsed as swtpm does.
func FuzzReadFrame(f *testing.F) {
	f.Add(cmdBytes(12), true)
	f.Add(append([]byte{0, 0, 0, 8, 0, 0, 0, 0, 12}, cmdBytes(12)...), true)
	f.Add([]byte{0, 0xc1, 0, 0, 0, 0x0c, 0, 0, 0, 0x99, 0, 1}, false)
	f.Add([]byte{0x80, 1, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0}, true)
	f.Add(append(cmdBytes(12), 1, 2, 3, 4, 5), true)
	f.Add(cmdBytes(5000), true)
	f.Add(prefixed(9, 12, []byte{0x80}), true)
	f.Fuzz(func(t *testing.T, in []byte, tpm2 bool) {
		const size = 64 + sendCmdPrefixSize
		// the first byte chooses the write size, so reads split where writes did
		chunk := 1
		if len(in) > 0 {
			chunk = 1 + int(in[0])%(2*size)
		}
		r := newFrameReader(&chunkReader{b: in, n: chunk}, size)
		var all []byte
		for i := 0; i <= len(in); i++ {
			msg, err := r.next()
			if err != nil {
				if !errors.Is(err, io.EOF) {
					t.Fatalf("read error %v", err)
				}
				break
			}
			if len(msg) == 0 || len(msg) > size {
				t.Fatalf("message of %d bytes", len(msg))
			}
			all = append(all, msg...)
			fr := ParseFrame(msg, tpm2)
			if fr.Prefixed {
				if !tpm2 || len(msg) < tpmwire.HeaderSize || !bytes.Equal(fr.Command, msg[sendCmdPrefixSize:]) {
					t.Fatalf("prefix taken from %x", msg)
				}
			} else if !bytes.Equal(fr.Command, msg) {
				t.Fatalf("command %x from %x", fr.Command, msg)
			}
		}
		// only a last fragment shorter than a header is dropped, when the stream ends in it
		if !bytes.HasPrefix(in, all) || len(in)-len(all) >= tpmwire.HeaderSize {
			t.Fatalf("read %x, wrote %x", all, in)
		}
	})
}

// chunkReader returns at most n bytes per read, then io.EOF.
type chunkReader struct {
	b []byte
	n int
}

func (c *chunkReader) Read(p []byte) (int, error) {
	if len(c.b) == 0 {
		return 0, io.EOF
	}
	k := copy(p[:min(len(p), c.n)], c.b)
	c.b = c.b[k:]
	return k, nil
}

// FuzzDataChannel writes any message of a header's length up to the buffer on a served data
// channel: it gets exactly one answer, and the channel keeps serving.
func FuzzDataChannel(f *testing.F) {
	f.Add(cmdBytes(12))
	f.Add(cmdBytes(100)[:10])
	f.Add(append(cmdBytes(12), 9, 9))
	f.Add(prefixed(0, 12, cmdBytes(12)))
	f.Add(prefixed(0, 12, cmdBytes(12)[:3]))
	f.Add([]byte("0123456789"))
	f.Add([]byte{0x80, 1, 0, 0, 0, 0x0b, 0x20, 0, 0x10, 0, 4})
	f.Fuzz(func(t *testing.T, msg []byte) {
		if len(msg) < tpmwire.HeaderSize || len(msg) > 4096+sendCmdPrefixSize {
			return
		}
		fk := newFake()
		fk.running = true
		a, b, err := socketpairConns()
		if err != nil {
			t.Skip(err)
		}
		s := NewServer(fk, Options{Terminate: true})
		ctx, cancel := context.WithCancel(context.Background())
		s.goServe(func() { s.serveDataConn(ctx, a, false) })
		defer func() { cancel(); b.Close(); s.Wait() }()
		b.Write(msg)
		buf := make([]byte, 8192)
		b.SetReadDeadline(time.Now().Add(2 * time.Second))
		n, err := io.ReadAtLeast(b, buf, tpmwire.HeaderSize)
		if err != nil {
			t.Fatalf("no answer: %v", err)
		}
		b.Write(cmdBytes(12))
		m, err := io.ReadAtLeast(b, buf[n:], tpmwire.HeaderSize)
		if err != nil {
			t.Fatalf("no answer to the next command: %v", err)
		}
		if got := buf[n : n+m]; !bytes.Equal(got[10:min(len(got), 14)], []byte{0, 0, 1, 0x7b}) {
			t.Fatalf("next command answered %x (first answer %x)", got, buf[:n])
		}
		select {
		case <-s.Done():
			t.Fatalf("server finished: %s", s.Reason())
		default:
		}
	})
}

// socketpairConns is a connected pair of unix stream sockets as net.Conns.
func socketpairConns() (net.Conn, net.Conn, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, err
	}
	var conns [2]net.Conn
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), "pair")
		conns[i], err = net.FileConn(f)
		f.Close()
		if err != nil {
			return nil, nil, err
		}
	}
	return conns[0], conns[1], nil
}

// BenchmarkDataChannel is one command's round trip through a served data channel (fake TPM):
// one read and one write on the server's side.
func BenchmarkDataChannel(b *testing.B) {
	fk := newFake()
	fk.running = true
	a, c, err := socketpairConns()
	if err != nil {
		b.Fatal(err)
	}
	s := NewServer(fk, Options{})
	ctx, cancel := context.WithCancel(context.Background())
	s.goServe(func() { s.serveDataConn(ctx, a, false) })
	defer func() { cancel(); c.Close(); s.Wait() }()
	cmd := cmdBytes(12)
	buf := make([]byte, 64)
	b.ReportAllocs()
	for b.Loop() {
		c.Write(cmd)
		if _, err := io.ReadAtLeast(c, buf, 14); err != nil {
			b.Fatal(err)
		}
	}
}
