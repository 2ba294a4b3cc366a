package socket

import (
	"errors"
	"io"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// blockingStream serves a data connection with plain blocking read(2)/write(2) on its own
// descriptor, as swtpm does, instead of through Go's network poller: one TPM command is one
// read and one write, and the goroutine is not parked and woken for each (measured in
// docs/benchmarks.md). Close shuts the socket down, which wakes a read blocked in the kernel;
// release closes the descriptor once the reader is done with it.
type blockingStream struct {
	fd       int
	shutOnce sync.Once
}

// newBlockingStream takes over c's socket: it duplicates the descriptor, makes it blocking
// and closes c. It returns nil (and leaves c alone) for anything that is not a socket.
func newBlockingStream(c io.ReadWriteCloser) *blockingStream {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return nil
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return nil
	}
	fd := -1
	if err := raw.Control(func(s uintptr) {
		if _, err := unix.GetsockoptInt(int(s), unix.SOL_SOCKET, unix.SO_TYPE); err != nil {
			return // not a socket (a character device passed with --fd)
		}
		if d, err := unix.FcntlInt(s, unix.F_DUPFD_CLOEXEC, 0); err == nil {
			fd = d
		}
	}); err != nil || fd < 0 {
		return nil
	}
	// O_NONBLOCK is shared with c's descriptor, which is closed right after and not used again
	if err := unix.SetNonblock(fd, false); err != nil {
		unix.Close(fd)
		return nil
	}
	c.Close()
	return &blockingStream{fd: fd}
}

func (b *blockingStream) Read(p []byte) (int, error) {
	for {
		n, err := unix.Read(b.fd, p)
		switch {
		case errors.Is(err, unix.EINTR):
			continue
		case err != nil:
			return 0, err
		case n == 0 && len(p) > 0:
			return 0, io.EOF
		}
		return n, nil
	}
}

func (b *blockingStream) Write(p []byte) (int, error) {
	done := 0
	for done < len(p) {
		n, err := unix.Write(b.fd, p[done:])
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return done, err
		}
		done += n
	}
	return done, nil
}

// Close shuts the connection down (both directions); safe from any goroutine, and a read
// blocked in the kernel returns EOF.
func (b *blockingStream) Close() error {
	b.shutOnce.Do(func() { unix.Shutdown(b.fd, unix.SHUT_RDWR) })
	return nil
}

// release closes the descriptor; only the goroutine that reads may call it, once.
func (b *blockingStream) release() {
	b.Close()
	unix.Close(b.fd)
}
