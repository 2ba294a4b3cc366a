package hwtpm

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"time"
)

// Sizes of the wire.
const (
	headerSize  = 10      // TPM command/response header: tag, size, code
	maxResponse = 1 << 16 // bigger than any TPM's MAX_RESPONSE_SIZE (4096 on most)
)

// MS simulator protocol (TpmTcpProtocol.h): commands on the data port, signals on the
// platform port. Every exchange but SESSION_END ends with a u32 0 from the simulator.
const (
	mssimSendCommand uint32 = 8
	mssimSessionEnd  uint32 = 20
	mssimPowerOn     uint32 = 1
	mssimNVOn        uint32 = 11
)

// Response codes a TSS retries (TPM_RC_RETRY, TPM_RC_YIELDED, TPM_RC_TESTING).
const (
	rcRetry   uint32 = 0x922
	rcYielded uint32 = 0x908
	rcTesting uint32 = 0x90a
)

// ErrTransport is wrapped by failures to reach the TPM or to read a well-formed response:
// the connection is dropped and the next command opens a new one.
var ErrTransport = errors.New("TPM transport failed")

// conn is what a link talks over: a socket or a device file.
type conn interface {
	io.ReadWriteCloser
	SetDeadline(time.Time) error
}

// link is one TPM connection, opened on first use and again after any transport failure, so
// that a command cut short (a cancelled context, a restarted swtpm) does not leave the next
// one reading a stale response. A link is not for concurrent commands; TPM serializes them
// and releases socket connections between operations.
type link struct {
	spec Spec
	// dialTimeout bounds connecting when the context has no deadline.
	dialTimeout time.Duration

	mu     sync.Mutex // guards c and closed, not the exchange on c
	c      conn
	closed bool
}

// send runs one command and returns its response, retrying while the TPM asks to.
func (l *link) send(ctx context.Context, cmd []byte) ([]byte, error) {
	for delay := time.Millisecond; ; delay = min(2*delay, 100*time.Millisecond) {
		resp, err := l.roundTrip(ctx, cmd)
		if err != nil {
			return nil, err
		}
		switch binary.BigEndian.Uint32(resp[6:10]) {
		case rcRetry, rcYielded, rcTesting:
		default:
			return resp, nil
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("%w: %w", ErrTransport, ctx.Err())
		case <-time.After(delay):
		}
	}
}

// roundTrip runs one exchange; after a failure the connection is dropped.
func (l *link) roundTrip(ctx context.Context, cmd []byte) ([]byte, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrTransport, err)
	}
	c, err := l.connect(ctx)
	if err != nil {
		return nil, err
	}
	resp, err := l.exchangeCtx(ctx, c, cmd)
	if err != nil {
		l.drop(c)
		return nil, fmt.Errorf("%w: %s: %w", ErrTransport, l.spec, err)
	}
	return resp, nil
}

// exchangeCtx is exchange, cut short when ctx ends (where c supports deadlines: a device
// without poll support runs the command to its end).
func (l *link) exchangeCtx(ctx context.Context, c conn, cmd []byte) ([]byte, error) {
	_ = c.SetDeadline(time.Time{})
	stop := context.AfterFunc(ctx, func() { _ = c.SetDeadline(time.Unix(1, 0)) })
	resp, err := l.exchange(c, cmd)
	if !stop() {
		// ctx ended meanwhile and may have set a deadline in the past on c: drop c even if
		// the response arrived.
		if err == nil {
			l.drop(c)
			return resp, nil
		}
		err = fmt.Errorf("%w: %w", ctx.Err(), err)
	}
	return resp, err
}

// connect returns the open connection or opens one.
func (l *link) connect(ctx context.Context) (conn, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return nil, ErrClosed
	}
	if l.c != nil {
		return l.c, nil
	}
	c, err := l.dial(ctx)
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %w", ErrTransport, l.spec, err)
	}
	l.c = c
	return c, nil
}

func (l *link) dial(ctx context.Context) (conn, error) {
	if _, ok := ctx.Deadline(); !ok && l.dialTimeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, l.dialTimeout)
		defer cancel()
	}
	var d net.Dialer
	switch {
	case l.spec.Kind == KindDevice:
		f, err := os.OpenFile(l.spec.Path, os.O_RDWR, 0)
		if err != nil {
			return nil, fmt.Errorf("open TPM device: %w", err)
		}
		return f, nil
	case l.spec.Path != "":
		c, err := d.DialContext(ctx, "unix", l.spec.Path)
		if err != nil {
			return nil, fmt.Errorf("connect to swtpm: %w", err)
		}
		return c.(conn), nil
	default:
		c, err := d.DialContext(ctx, "tcp", l.spec.dataAddr())
		if err != nil {
			return nil, fmt.Errorf("connect to %s: %w", l.spec.Kind, err)
		}
		return c.(conn), nil
	}
}

// drop closes c if it is still the link's connection.
func (l *link) drop(c conn) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.c == c {
		l.c = nil
	}
	_ = c.Close()
}

// close ends the link; commands after it fail with ErrClosed.
func (l *link) close() error {
	l.mu.Lock()
	l.closed = true
	l.mu.Unlock()
	return l.release()
}

// release closes the connection; the next command opens a new one.
func (l *link) release() error {
	l.mu.Lock()
	c := l.c
	l.c = nil
	l.mu.Unlock()
	if c == nil {
		return nil
	}
	if l.spec.Kind == KindMssim {
		// Tell the simulator this client is done, as a TSS does; it sends no ack.
		_ = c.SetDeadline(time.Now().Add(time.Second))
		_, _ = c.Write(binary.BigEndian.AppendUint32(nil, mssimSessionEnd))
	}
	return c.Close()
}

// exchange writes one command and reads its response in the spec's framing.
func (l *link) exchange(c conn, cmd []byte) ([]byte, error) {
	switch {
	case l.spec.Kind == KindDevice:
		return exchangeDevice(c, cmd)
	case l.spec.Kind == KindMssim:
		return exchangeMssim(c, cmd, 0)
	default:
		return exchangeStream(c, cmd)
	}
}

// exchangeStream is a data channel: the command, then a response framed by its header.
func exchangeStream(rw io.ReadWriter, cmd []byte) ([]byte, error) {
	if _, err := rw.Write(cmd); err != nil {
		return nil, fmt.Errorf("write command: %w", err)
	}
	var hdr [headerSize]byte
	if _, err := io.ReadFull(rw, hdr[:]); err != nil {
		return nil, fmt.Errorf("read response header: %w", err)
	}
	size, err := responseSize(hdr[:])
	if err != nil {
		return nil, err
	}
	resp := make([]byte, size)
	copy(resp, hdr[:])
	if _, err := io.ReadFull(rw, resp[headerSize:]); err != nil {
		return nil, fmt.Errorf("read response body (%d bytes): %w", size, err)
	}
	return resp, nil
}

// exchangeDevice is a TPM character device: one write, and the whole response in one read
// (a kernel that hands out less is read on until the header's size).
func exchangeDevice(rw io.ReadWriter, cmd []byte) ([]byte, error) {
	if _, err := rw.Write(cmd); err != nil {
		return nil, fmt.Errorf("write command: %w", err)
	}
	buf := make([]byte, maxResponse)
	n, err := rw.Read(buf)
	if err != nil {
		return nil, fmt.Errorf("read response: %w", err)
	}
	if n < headerSize {
		return nil, fmt.Errorf("response of %d bytes is shorter than its header", n)
	}
	size, err := responseSize(buf[:n])
	if err != nil {
		return nil, err
	}
	if n > size {
		return nil, fmt.Errorf("read %d bytes for a response of %d", n, size)
	}
	if _, err := io.ReadFull(rw, buf[n:size]); err != nil {
		return nil, fmt.Errorf("read response body (%d of %d bytes): %w", n, size, err)
	}
	return buf[:size:size], nil
}

// exchangeMssim is the simulator's data port: u32 TPM_SEND_COMMAND, u8 locality, u32 size,
// the command; back come u32 size, the response, and a u32 0.
func exchangeMssim(rw io.ReadWriter, cmd []byte, locality uint8) ([]byte, error) {
	msg := make([]byte, 0, 9+len(cmd))
	msg = binary.BigEndian.AppendUint32(msg, mssimSendCommand)
	msg = append(msg, locality)
	msg = binary.BigEndian.AppendUint32(msg, uint32(len(cmd)))
	msg = append(msg, cmd...)
	if _, err := rw.Write(msg); err != nil {
		return nil, fmt.Errorf("write command: %w", err)
	}
	var u32 [4]byte
	if _, err := io.ReadFull(rw, u32[:]); err != nil {
		return nil, fmt.Errorf("read response size: %w", err)
	}
	n := binary.BigEndian.Uint32(u32[:])
	if n < headerSize || n > maxResponse {
		return nil, fmt.Errorf("simulator response size %d out of range", n)
	}
	resp := make([]byte, n)
	if _, err := io.ReadFull(rw, resp); err != nil {
		return nil, fmt.Errorf("read response (%d bytes): %w", n, err)
	}
	if size, err := responseSize(resp); err != nil {
		return nil, err
	} else if size != int(n) {
		return nil, fmt.Errorf("simulator framed %d bytes around a response of %d", n, size)
	}
	if err := readAck(rw); err != nil {
		return nil, err
	}
	return resp, nil
}

// readAck reads the simulator's u32 0 that ends an exchange.
func readAck(r io.Reader) error {
	var ack [4]byte
	if _, err := io.ReadFull(r, ack[:]); err != nil {
		return fmt.Errorf("read simulator acknowledgement: %w", err)
	}
	if v := binary.BigEndian.Uint32(ack[:]); v != 0 {
		return fmt.Errorf("simulator acknowledged with %d, not 0", v)
	}
	return nil
}

// responseSize checks a response header's size field.
func responseSize(hdr []byte) (int, error) {
	size := int(binary.BigEndian.Uint32(hdr[2:6]))
	if size < headerSize || size > maxResponse {
		return 0, fmt.Errorf("response size %d out of range", size)
	}
	return size, nil
}

// mssimPowerUp signals power-on and NV-on on the simulator's platform port, as a TSS does when
// it connects; both are no-ops on a simulator that is already on.
func mssimPowerUp(ctx context.Context, spec Spec) error {
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", spec.platformAddr())
	if err != nil {
		return fmt.Errorf("%w: connect to the simulator's platform port: %w", ErrTransport, err)
	}
	defer c.Close()
	deadline, ok := ctx.Deadline()
	if !ok {
		deadline = time.Now().Add(10 * time.Second)
	}
	_ = c.SetDeadline(deadline)
	stop := context.AfterFunc(ctx, func() { _ = c.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	for _, sig := range []uint32{mssimPowerOn, mssimNVOn} {
		if _, err := c.Write(binary.BigEndian.AppendUint32(nil, sig)); err != nil {
			return fmt.Errorf("%w: platform signal %d: %w", ErrTransport, sig, err)
		}
		if err := readAck(c); err != nil {
			return fmt.Errorf("%w: platform signal %d: %w", ErrTransport, sig, err)
		}
	}
	_, _ = c.Write(binary.BigEndian.AppendUint32(nil, mssimSessionEnd))
	return nil
}
