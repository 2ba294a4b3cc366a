package socket

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"

	"github.com/vtpmd/vtpmd/internal/tpmwire"
)

// TPM response codes the server produces itself, beyond tpmwire's.
const (
	tpm2SendCmd = 8 // TPM_SEND_COMMAND of the MS simulator protocol
)

// maxDiscard bounds how many bytes of an oversized command are read and dropped to keep the
// stream in sync; beyond it the connection is closed.
const maxDiscard = 1 << 20

// ErrFrame is wrapped by data-channel framing errors.
var ErrFrame = errors.New("socket: bad tpm command frame")

// Frame is one command read from the data channel.
type Frame struct {
	// Command is the raw TPM command (header included).
	Command []byte
	// Prefixed is set for the tpm-send-command-header variant; Locality is its locality byte.
	Prefixed bool
	Locality uint8
	// Oversize is set (and Command holds only the header) when the header's size exceeded the
	// limit; the body was discarded.
	Oversize bool
}

// ReadFrame reads one TPM command, framed by its header's size field. tpm2 enables detection of
// the 9-byte tpm-send-command-header prefix. max bounds the command size.
func ReadFrame(r io.Reader, tpm2 bool, max int) (*Frame, error) {
	var hdr [10]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return nil, err
	}
	f := &Frame{}
	tag := binary.BigEndian.Uint16(hdr[:2])
	if tpm2 && tag != tpmwire.TagNoSessions && tag != tpmwire.TagSessions && binary.BigEndian.Uint32(hdr[:4]) == tpm2SendCmd {
		// u32 TPM_SEND_COMMAND, u8 locality, u32 size, then the command.
		f.Prefixed = true
		f.Locality = hdr[4]
		first := hdr[9]
		hdr[0] = first
		if _, err := io.ReadFull(r, hdr[1:]); err != nil {
			return nil, fmt.Errorf("%w: truncated command after send-command header: %w", ErrFrame, err)
		}
	}
	size := int(binary.BigEndian.Uint32(hdr[2:6]))
	if size < 10 {
		f.Command = hdr[:]
		return f, fmt.Errorf("%w: command size %d smaller than its header", ErrFrame, size)
	}
	if size > max {
		f.Command = hdr[:]
		f.Oversize = true
		if size-10 > maxDiscard {
			return f, fmt.Errorf("%w: command size %d exceeds %d", ErrFrame, size, max)
		}
		if _, err := io.CopyN(io.Discard, r, int64(size-10)); err != nil {
			return f, fmt.Errorf("%w: truncated oversized command: %w", ErrFrame, err)
		}
		return f, nil
	}
	cmd := make([]byte, size)
	copy(cmd, hdr[:])
	if _, err := io.ReadFull(r, cmd[10:]); err != nil {
		return nil, fmt.Errorf("%w: truncated command (%d of %d bytes): %w", ErrFrame, 10, size, err)
	}
	f.Command = cmd
	return f, nil
}

// FatalResponse is what a stopped TPM answers to every command: QEMU tells the TPM version
// from its tag.
func FatalResponse(tpm2 bool) []byte {
	if tpm2 {
		return tpmwire.ErrorResponse(true, tpmwire.RCFailure)
	}
	return tpmwire.ErrorResponse(false, uint32(tpmwire.ResFail))
}

func (s *Server) serveDataConn(ctx context.Context, c io.ReadWriteCloser, terminate bool) {
	stop := s.closeOnDone(ctx, c)
	defer stop()
	defer c.Close()
	tpm2 := s.tpm.IsTPM2()
	maxCmd := int(s.tpm.BufferSize())
	br := bufio.NewReaderSize(c, 4096+16)
	for {
		f, err := ReadFrame(br, tpm2, maxCmd)
		var resp []byte
		switch {
		case err != nil && f == nil:
			if !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) {
				s.log.Warn("data channel", "err", err)
			}
			s.dataClosed(terminate)
			return
		case err != nil || f.Oversize:
			s.log.Warn("data channel: refusing command", "err", err, "oversize", f.Oversize)
			resp = tpmwire.ErrorResponse(tpm2, tpmwire.RCCommandSize)
		default:
			resp = s.process(f)
		}
		if f.Prefixed {
			out := binary.BigEndian.AppendUint32(nil, uint32(len(resp)))
			out = append(out, resp...)
			resp = append(out, 0, 0, 0, 0)
		}
		if _, werr := c.Write(resp); werr != nil {
			s.log.Warn("data reply", "err", werr)
			s.dataClosed(terminate)
			return
		}
		if err != nil || s.opts.Disconnect {
			// After a framing error the stream cannot be trusted; with disconnect every
			// response ends the connection.
			if err != nil {
				s.dataClosed(terminate)
			}
			return
		}
	}
}

func (s *Server) dataClosed(terminate bool) {
	if terminate {
		s.finish("data connection closed")
	}
}

// process runs one framed command, handling what swtpm intercepts before libtpms.
func (s *Server) process(f *Frame) []byte {
	tpm2 := s.tpm.IsTPM2()
	if f.Prefixed {
		// swtpm applies the prefix's locality without range checks; it persists.
		_ = s.tpm.SetLocality(f.Locality)
	}
	if !s.tpm.Running() {
		return FatalResponse(tpm2)
	}
	cmd := f.Command
	if tpm2 && binary.BigEndian.Uint32(cmd[6:10]) == tpmwire.CCSetLocality {
		if !s.opts.AllowSetLocality || len(cmd) < 11 {
			return FatalResponse(true)
		}
		loc := cmd[10]
		if !s.localityAllowed(loc) {
			return tpmwire.ErrorResponse(true, tpmwire.RCSetLocalityRefused)
		}
		if err := s.tpm.SetLocality(loc); err != nil {
			return tpmwire.ErrorResponse(true, tpmwire.RCSetLocalityRefused)
		}
		return tpmwire.ErrorResponse(true, tpmwire.RCSuccess)
	}
	trace := s.log.Enabled(context.Background(), slog.LevelDebug)
	if trace {
		s.log.Debug("data cmd", "cmd", fmt.Sprintf("%x", cmd))
	}
	resp, err := s.tpm.Process(cmd)
	if err != nil {
		s.log.Error("tpm command failed", "err", err)
		return FatalResponse(tpm2)
	}
	if trace {
		s.log.Debug("data rsp", "rsp", fmt.Sprintf("%x", resp))
	}
	return resp
}
