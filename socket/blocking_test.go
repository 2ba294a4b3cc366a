package socket

import (
	"io"
	"net"
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func socketpairConns(t *testing.T) (net.Conn, net.Conn) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	var cs [2]net.Conn
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), "sp")
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		cs[i] = c
	}
	return cs[0], cs[1]
}

// TestBlockingStream: reads and writes pass through, and Close from another goroutine wakes a
// read blocked in the kernel (how a stopping server ends its data connection).
func TestBlockingStream(t *testing.T) {
	ours, peer := socketpairConns(t)
	defer peer.Close()
	b := newBlockingStream(ours)
	if b == nil {
		t.Fatal("a unix socket was not taken over")
	}
	if _, err := peer.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4)
	if _, err := io.ReadFull(b, buf); err != nil || string(buf) != "ping" {
		t.Fatalf("read %q, %v", buf, err)
	}
	if _, err := b.Write([]byte("pong")); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(peer, buf); err != nil || string(buf) != "pong" {
		t.Fatalf("peer read %q, %v", buf, err)
	}
	done := make(chan error, 1)
	go func() {
		_, err := b.Read(buf)
		done <- err
	}()
	time.Sleep(50 * time.Millisecond) // let the read block
	b.Close()
	select {
	case err := <-done:
		if err != io.EOF {
			t.Fatalf("blocked read ended with %v, want EOF", err)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("Close did not wake the blocked read")
	}
	b.release()
	b.Close() // after release: a no-op, never a shutdown of a reused descriptor
}

func TestBlockingStreamOnlyForSockets(t *testing.T) {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer w.Close()
	if b := newBlockingStream(r); b != nil {
		t.Fatal("a pipe was taken over")
	}
	if _, err := w.Write([]byte("x")); err != nil {
		t.Fatal("the pipe was closed")
	}
}
