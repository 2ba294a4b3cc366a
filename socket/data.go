package socket

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"syscall"
	"time"

	"github.com/vtpmd/vtpmd/internal/tpmwire"
	"golang.org/x/sys/unix"
)

// Data-channel framing follows swtpm's SWTPM_IO_Read: a command is what one read returns, up to
// swtpm's buffer (the TPM's largest command plus a send-command prefix). The header's size field
// does not frame anything: libtpms compares it with the bytes that arrived and answers
// TPM_RC_COMMAND_SIZE (TPM_BAD_PARAM_SIZE for TPM 1.2) when they differ. So every write that
// fits the buffer gets exactly one answer, whatever its size field says, and the stream never
// loses step with the guest. Only a read shorter than a TPM header is continued, as in swtpm,
// but for at most partialWindow (swtpm waits without bound, its main loop and control channel
// blocked); what arrived by then is answered as a command.

const (
	// tpm2SendCmd is TPM_SEND_COMMAND of the MS simulator protocol, the first word of the
	// tpm-send-command-header prefix.
	tpm2SendCmd = 8
	// sendCmdPrefixSize is that prefix: u32 TPM_SEND_COMMAND, u8 locality, u32 size.
	sendCmdPrefixSize = 9

	// rcInsufficient (TPM_RC_INSUFFICIENT) and resBadParamSize (TPM_BAD_PARAM_SIZE) answer a
	// command shorter than a TPM header, as swtpm's tpmlib_process does.
	rcInsufficient  = 0x9a
	resBadParamSize = 0x19
)

// partialWindow bounds every partial read: the rest of a TPM header on the data channel, the
// rest of a control message, and each further read of a streamed control payload. It is
// swtpm's control-channel window.
const partialWindow = 500 * time.Millisecond

// Frame is one message read from the data channel, as swtpm's main loop sees it.
type Frame struct {
	// Command is the TPM command: the whole message, or what follows the send-command prefix.
	// It may be shorter than a TPM header, and its size field may disagree with its length.
	Command []byte
	// Prefixed is set for the tpm-send-command-header variant; Locality is its locality byte
	// (applied unchecked, as swtpm does).
	Prefixed bool
	Locality uint8
}

// ParseFrame splits a data-channel message the way swtpm's tpmlib_handle_tcg_tpm2_cmd_header
// does: a TPM 2 message of at least a header's length whose tag is not a TPM 2 command tag and
// whose first word is TPM_SEND_COMMAND carries the 9-byte prefix before its command; the
// prefix's size field is ignored. Command aliases msg.
func ParseFrame(msg []byte, tpm2 bool) Frame {
	if tpm2 && len(msg) >= tpmwire.HeaderSize {
		tag := binary.BigEndian.Uint16(msg)
		if tag != tpmwire.TagNoSessions && tag != tpmwire.TagSessions && binary.BigEndian.Uint32(msg) == tpm2SendCmd {
			return Frame{Command: msg[sendCmdPrefixSize:], Prefixed: true, Locality: msg[4]}
		}
	}
	return Frame{Command: msg}
}

// deadliner is a connection whose reads can be bounded (net.Conn, pollable *os.File).
type deadliner interface{ SetReadDeadline(time.Time) error }

// frameReader receives data-channel messages (see the framing comment above).
type frameReader struct {
	r   io.Reader
	dl  deadliner // nil: reads cannot be bounded
	buf []byte
}

func newFrameReader(r io.Reader, size int) *frameReader {
	fr := &frameReader{r: r, buf: make([]byte, size)}
	fr.dl, _ = r.(deadliner)
	return fr
}

// next returns one message; it is valid until the next call. An error means the connection is
// gone (closed by the peer, or broken): it is never caused by what the bytes say.
func (fr *frameReader) next() ([]byte, error) {
	n, err := fr.r.Read(fr.buf)
	if n >= tpmwire.HeaderSize {
		return fr.buf[:n], nil
	}
	if err != nil {
		return nil, err
	}
	return fr.rest(n)
}

// rest continues a read of n < tpmwire.HeaderSize bytes until a header's worth arrived, or
// partialWindow passed since the first byte.
func (fr *frameReader) rest(n int) ([]byte, error) {
	bounded := false
	for n < tpmwire.HeaderSize {
		if n > 0 && !bounded && fr.dl != nil {
			bounded = fr.dl.SetReadDeadline(time.Now().Add(partialWindow)) == nil
			if bounded {
				defer fr.dl.SetReadDeadline(time.Time{})
			}
		}
		m, err := fr.r.Read(fr.buf[n:])
		n += m
		if n >= tpmwire.HeaderSize {
			break
		}
		if err != nil {
			if bounded && errors.Is(err, os.ErrDeadlineExceeded) {
				break // answer what arrived
			}
			return nil, err
		}
	}
	return fr.buf[:n], nil
}

// FatalResponse is what a stopped TPM answers to every command: QEMU tells the TPM version
// from its tag.
func FatalResponse(tpm2 bool) []byte {
	if tpm2 {
		return tpmwire.ErrorResponse(true, tpmwire.RCFailure)
	}
	return tpmwire.ErrorResponse(false, uint32(tpmwire.ResFail))
}

// shortResponse answers a command shorter than a TPM header.
func shortResponse(tpm2 bool) []byte {
	if tpm2 {
		return tpmwire.ErrorResponse(true, rcInsufficient)
	}
	return tpmwire.ErrorResponse(false, resBadParamSize)
}

// serveDataConn serves one data connection: one read and one write per command. Nothing a
// client writes ends the connection or the process; only its closing (or a broken connection)
// does.
func (s *Server) serveDataConn(ctx context.Context, c io.ReadWriteCloser, terminate bool) {
	if s.serveNative(ctx, c) {
		s.dataClosed(terminate)
		return
	}
	stop := s.closeOnDone(ctx, c)
	defer stop()
	defer c.Close()
	tpm2 := s.tpm.IsTPM2()
	r := newFrameReader(c, int(s.tpm.BufferSize())+sendCmdPrefixSize)
	var respBuf []byte // responses of an appending TPM, reused: a busy channel makes no garbage
	for {
		msg, err := r.next()
		if err != nil {
			if !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) {
				s.log.Warn("data channel", "err", err)
			}
			s.dataClosed(terminate)
			return
		}
		s.dump("SWTPM_IO_Read", msg)
		f := ParseFrame(msg, tpm2)
		resp := s.process(f, &respBuf)
		if f.Prefixed {
			resp = appendPrefixedResponse(nil, resp)
		}
		s.dump("SWTPM_IO_Write", resp)
		if _, err := c.Write(resp); err != nil {
			s.log.Warn("data reply", "err", err)
			s.dataClosed(terminate)
			return
		}
		if s.opts.Disconnect {
			return // with disconnect every response ends the connection
		}
	}
}

func (s *Server) dataClosed(terminate bool) {
	if terminate {
		s.finish("data connection closed")
	}
}

// appendPrefixedResponse appends resp as the tpm-send-command-header variant answers it: its
// length, the response, and a 4-byte zero trailer.
func appendPrefixedResponse(dst, resp []byte) []byte {
	dst = binary.BigEndian.AppendUint32(dst, uint32(len(resp)))
	dst = append(dst, resp...)
	return append(dst, 0, 0, 0, 0)
}

// process runs one command, handling what swtpm's main loop and tpmlib_process intercept
// before libtpms, in their order: the prefix's locality, a stopped TPM, a command shorter than
// a header, and the SET_LOCALITY vendor command (both families).
func (s *Server) process(f Frame, buf *[]byte) []byte {
	tpm2 := s.tpm.IsTPM2()
	if f.Prefixed {
		// swtpm applies the prefix's locality without range checks; it persists.
		_ = s.tpm.SetLocality(f.Locality)
	}
	if !s.tpm.Running() {
		return FatalResponse(tpm2)
	}
	cmd := f.Command
	if len(cmd) < tpmwire.HeaderSize {
		return shortResponse(tpm2)
	}
	if binary.BigEndian.Uint32(cmd[6:10]) == tpmwire.CCSetLocality {
		return s.setLocalityCmd(cmd, tpm2)
	}
	trace := s.log.Enabled(context.Background(), slog.LevelDebug)
	if trace {
		s.log.Debug("data cmd", "cmd", fmt.Sprintf("%x", cmd))
	}
	resp, err := s.runTPM(cmd, buf)
	if err != nil {
		s.log.Error("tpm command failed", "err", err)
		return FatalResponse(tpm2)
	}
	if trace {
		s.log.Debug("data rsp", "rsp", fmt.Sprintf("%x", resp))
	}
	return resp
}

// appendProcessor is a TPM that can append its response to the caller's buffer.
type appendProcessor interface {
	ProcessAppend(dst, cmd []byte) ([]byte, error)
}

// runTPM runs cmd on the TPM; the response of an appending TPM is in *buf (reused by the next
// command: valid until then).
func (s *Server) runTPM(cmd []byte, buf *[]byte) ([]byte, error) {
	ap, ok := s.tpm.(appendProcessor)
	if !ok {
		return s.tpm.Process(cmd)
	}
	resp, err := ap.ProcessAppend((*buf)[:0], cmd)
	if err != nil {
		return nil, err
	}
	*buf = resp
	return resp, nil
}

// setLocalityCmd is swtpm's TPM_CC_SET_LOCALITY vendor command (allowed with --locality
// allow-set-locality): its length is checked first, then whether it is allowed.
func (s *Server) setLocalityCmd(cmd []byte, tpm2 bool) []byte {
	if len(cmd) < tpmwire.HeaderSize+1 {
		return shortResponse(tpm2)
	}
	if !s.opts.AllowSetLocality {
		return FatalResponse(tpm2)
	}
	refused := tpmwire.ErrorResponse(false, uint32(tpmwire.ResBadLocality))
	if tpm2 {
		refused = tpmwire.ErrorResponse(true, tpmwire.RCSetLocalityRefused)
	}
	loc := cmd[tpmwire.HeaderSize]
	if !s.localityAllowed(loc) || s.tpm.SetLocality(loc) != nil {
		return refused
	}
	return tpmwire.ErrorResponse(tpm2, tpmwire.RCSuccess)
}

// NativeDataServer is a TPM that can serve a data connection on a native thread of its own:
// per command one read, the TPM, one send, no goroutine woken (libtpms.Engine.ServeData).
// slow answers every message the thread does not run itself; ServeNative takes fd.
type NativeDataServer interface {
	ServeNative(fd, bufSize int, slow func(msg []byte) (resp []byte, more bool)) (done <-chan struct{}, shutdown func(), err error)
}

// serveNative serves c on a native thread when the TPM can and nothing per message needs Go
// on the way (no traffic dump, no debug trace, no disconnect after each response; TPM 2). It
// reports false, with c untouched, when c is left to the Go data path.
func (s *Server) serveNative(ctx context.Context, c io.ReadWriteCloser) bool {
	ns, ok := s.tpm.(NativeDataServer)
	sc, isConn := c.(syscall.Conn)
	if !ok || !isConn || s.opts.GoDataPath || s.opts.Dump != nil || s.opts.Disconnect || !s.tpm.IsTPM2() ||
		s.log.Enabled(ctx, slog.LevelDebug) {
		return false
	}
	fd, err := dupConnFD(sc)
	if err != nil {
		return false
	}
	var respBuf, framed []byte
	done, shutdown, err := ns.ServeNative(fd, int(s.tpm.BufferSize())+sendCmdPrefixSize, func(msg []byte) ([]byte, bool) {
		f := ParseFrame(msg, true)
		resp := s.process(f, &respBuf)
		if f.Prefixed {
			framed = appendPrefixedResponse(framed[:0], resp)
			resp = framed
		}
		return resp, true
	})
	if err != nil {
		unix.Close(fd)
		s.log.Debug("data channel on goroutines", "reason", err)
		return false
	}
	c.Close() // the thread has its own descriptor of the connection
	select {
	case <-done:
	case <-ctx.Done():
		shutdown()
		<-done
	case <-s.done:
		shutdown()
		<-done
	}
	return true
}

// dupConnFD duplicates a connection's descriptor (close-on-exec).
func dupConnFD(sc syscall.Conn) (int, error) {
	rc, err := sc.SyscallConn()
	if err != nil {
		return -1, err
	}
	fd := -1
	var derr error
	if err := rc.Control(func(f uintptr) { fd, derr = unix.FcntlInt(f, unix.F_DUPFD_CLOEXEC, 0) }); err != nil {
		return -1, err
	}
	return fd, derr
}
