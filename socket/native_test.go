package socket

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"os"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// nativeFake is a fakeTPM that serves data connections the way a native thread does (every
// message to slow, in a goroutine here), recording that it was asked to.
type nativeFake struct {
	*fakeTPM
	mu       sync.Mutex
	served   int
	shutdown int
}

func (n *nativeFake) ServeNative(fd, bufSize int, slow func([]byte) ([]byte, bool)) (<-chan struct{}, func(), error) {
	n.mu.Lock()
	n.served++
	n.mu.Unlock()
	f := os.NewFile(uintptr(fd), "native")
	done := make(chan struct{})
	go func() {
		defer close(done)
		defer f.Close()
		buf := make([]byte, bufSize)
		for {
			m, err := f.Read(buf)
			if err != nil || m == 0 {
				return
			}
			resp, more := slow(buf[:m])
			if len(resp) > 0 {
				if _, err := f.Write(resp); err != nil {
					return
				}
			}
			if !more {
				return
			}
		}
	}()
	return done, func() {
		n.mu.Lock()
		n.shutdown++
		n.mu.Unlock()
		unix.Shutdown(fd, unix.SHUT_RDWR)
	}, nil
}

func (n *nativeFake) counts() (int, int) {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.served, n.shutdown
}

func TestNativeDataPathChoice(t *testing.T) {
	debugLog := slog.New(slog.NewTextHandler(io.Discard, &slog.HandlerOptions{Level: slog.LevelDebug}))
	tests := []struct {
		name   string
		opts   Options
		tpm12  bool
		native bool
	}{
		{"default: native", Options{}, false, true},
		{"measured against: GoDataPath", Options{GoDataPath: true}, false, false},
		{"traffic dump", Options{Dump: io.Discard}, false, false},
		{"disconnect after each response", Options{Disconnect: true}, false, false},
		{"debug trace", Options{Log: debugLog}, false, false},
		{"TPM 1.2", Options{}, true, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			fk := &nativeFake{fakeTPM: newFake()}
			fk.running = true
			fk.tpm2 = !tt.tpm12
			a, b, err := socketpairConns()
			if err != nil {
				t.Fatal(err)
			}
			defer b.Close()
			s := NewServer(fk, tt.opts)
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			finished := make(chan struct{})
			go func() { s.serveDataConn(ctx, a, false); close(finished) }()

			// a plain command, then one with the send-command prefix: both answered
			cmd := []byte{0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x7b, 0, 8}
			if tt.tpm12 {
				cmd = []byte{0, 0xc1, 0, 0, 0, 14, 0, 0, 0, 0x46, 0, 0, 0, 8}
			}
			buf := make([]byte, 256)
			b.SetReadDeadline(time.Now().Add(5 * time.Second))
			b.Write(cmd)
			n, err := b.Read(buf)
			if err != nil || !bytes.Equal(buf[10:n], cmd[6:10]) {
				t.Fatalf("answer %x %v", buf[:n], err)
			}
			if !tt.tpm12 && !tt.opts.Disconnect {
				b.Write(prefixed(0, 12, cmd))
				n, err = b.Read(buf)
				if err != nil || n != 4+14+4 || !bytes.Equal(buf[4+10:4+14], cmd[6:10]) {
					t.Fatalf("prefixed answer %x %v", buf[:n], err)
				}
			}
			served, _ := fk.counts()
			if (served == 1) != tt.native {
				t.Errorf("native thread asked %d times, want native %v", served, tt.native)
			}
			cancel()
			select {
			case <-finished:
			case <-time.After(5 * time.Second):
				t.Fatal("the data connection outlived its context")
			}
			if _, shut := fk.counts(); tt.native && shut != 1 {
				t.Errorf("cancelled native connection: %d shutdowns, want 1", shut)
			}
		})
	}
}
