package socket

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"

	"github.com/vtpmd/vtpmd/internal/tpmwire"
)

// after says what the control loop does once a reply is written.
type after int

const (
	afterNext     after = iota // read the next command
	afterClose                 // close this control connection
	afterShutdown              // finish the server
)

// ResultInChain is the default Options.ResultOf: the tpmwire.Result in err's chain, else
// TPM_FAIL.
func ResultInChain(err error) tpmwire.Result {
	var r tpmwire.Result
	if errors.As(err, &r) {
		return r
	}
	return tpmwire.ResFail
}

// resultOf is where a handler's error becomes the control channel's result code: the one place
// codes are attached. The TPM's conditions are classified by Options.ResultOf.
func (s *Server) resultOf(err error) tpmwire.Result {
	if err == nil {
		return tpmwire.ResSuccess
	}
	return s.opts.ResultOf(err)
}

func res(r tpmwire.Result) []byte { return putBE32(nil, uint32(r)) }

// needRunning says whether a command needs an initialized TPM (swtpm checks it before the
// payload size).
func (s *Server) needRunning(cmd Cmd) bool {
	switch cmd {
	case CmdGetTPMEstablished, CmdHashStart, CmdHashData, CmdHashEnd, CmdCancelTPMCmd,
		CmdStoreVolatile, CmdResetTPMEstablished, CmdGetStateBlob:
		return true
	}
	return false
}

func (s *Server) dispatch(ctx context.Context, r *ctrlReader, req *ctrlRequest) ([]byte, after) {
	cmd, p := req.cmd, req.payload
	if s.log.Enabled(ctx, slog.LevelDebug) {
		s.log.Debug("ctrl cmd", "cmd", cmd, "payload", fmt.Sprintf("%x", p))
	}
	running := s.tpm.Running()
	if s.needRunning(cmd) && !running {
		return res(tpmwire.ResBadOrdinal), afterNext
	}
	exact0 := func(f func() error) ([]byte, after) {
		if len(p) != 0 {
			return res(tpmwire.ResBadParameter), afterNext
		}
		return res(s.resultOf(f())), afterNext
	}
	switch cmd {
	case CmdGetCapability:
		return putBE32(nil, 0, s.tpm.Capabilities()), afterNext

	case CmdInit:
		if len(p) != 4 {
			return res(tpmwire.ResBadParameter), afterNext
		}
		return res(s.resultOf(s.tpm.Init(be32(p)))), afterNext

	case CmdShutdown:
		if len(p) != 0 {
			return res(tpmwire.ResBadParameter), afterNext
		}
		if err := s.tpm.Shutdown(); err != nil {
			s.log.Warn("shutdown", "err", err)
		}
		return res(tpmwire.ResSuccess), afterShutdown

	case CmdGetTPMEstablished:
		if len(p) != 0 {
			return res(tpmwire.ResBadParameter), afterNext
		}
		bit, err := s.tpm.Established()
		if err != nil {
			return res(s.resultOf(err)), afterNext
		}
		b := putBE32(nil, 0)
		if bit {
			return append(b, 1, 0, 0, 0), afterNext
		}
		return append(b, 0, 0, 0, 0), afterNext

	case CmdSetLocality:
		if len(p) < 1 {
			return res(tpmwire.ResBadParameter), afterNext
		}
		if !s.localityAllowed(p[0]) {
			return res(tpmwire.ResBadLocality), afterNext
		}
		return res(s.resultOf(s.tpm.SetLocality(p[0]))), afterNext

	case CmdHashStart:
		return exact0(s.tpm.HashStart)

	case CmdHashData:
		return s.hashData(r, p)

	case CmdHashEnd:
		return exact0(s.tpm.HashEnd)

	case CmdCancelTPMCmd:
		return exact0(s.tpm.Cancel)

	case CmdStoreVolatile:
		return exact0(s.tpm.StoreVolatile)

	case CmdResetTPMEstablished:
		if len(p) < 1 {
			return res(tpmwire.ResBadParameter), afterNext
		}
		if !s.localityAllowed(p[0]) {
			return res(tpmwire.ResBadLocality), afterNext
		}
		return res(s.resultOf(s.tpm.ResetEstablished(p[0]))), afterNext

	case CmdGetStateBlob:
		return s.getStateBlob(p), afterNext

	case CmdSetStateBlob:
		return s.setStateBlob(r, p, running)

	case CmdStop:
		return exact0(s.tpm.Stop)

	case CmdGetConfig:
		if len(p) != 0 {
			return res(tpmwire.ResBadParameter), afterNext
		}
		return putBE32(nil, 0, s.tpm.Config()), afterNext

	case CmdSetDataFD:
		return s.setDataFD(ctx, req), afterNext

	case CmdSetBufferSize:
		if len(p) < 4 { // swtpm ignores what follows the request
			return res(tpmwire.ResBadParameter), afterNext
		}
		wanted := be32(p)
		if wanted != 0 && running {
			return res(tpmwire.ResBadOrdinal), afterNext
		}
		size, mn, mx, err := s.tpm.SetBufferSize(wanted)
		if err != nil {
			return res(s.resultOf(err)), afterNext
		}
		return putBE32(nil, 0, size, mn, mx), afterNext

	case CmdGetInfo:
		return s.getInfo(p), afterNext

	case CmdLockStorage:
		if len(p) != 4 {
			return res(tpmwire.ResBadParameter), afterNext
		}
		if err := s.tpm.LockStorage(be32(p)); err != nil {
			s.log.Error("LOCK_STORAGE", "err", err)
			return res(tpmwire.ResFail), afterNext // whatever stopped the lock, as swtpm
		}
		return res(tpmwire.ResSuccess), afterNext
	}
	return res(tpmwire.ResBadOrdinal), afterNext
}

// localityAllowed: localities 0-4, and 4 only without --locality reject-locality-4.
func (s *Server) localityAllowed(loc uint8) bool {
	return loc < 4 || (loc == 4 && !s.opts.RejectLocality4)
}

// hashData hashes the data that came with the message, then streams the rest of the announced
// length. As swtpm, the first part is hashed before the length is checked against it (a TPM
// 1.2 without a hash sequence answers TPM_SHA_THREAD either way); more data than announced is
// refused. A client that stops sending loses the connection without an answer.
func (s *Server) hashData(r *ctrlReader, p []byte) ([]byte, after) {
	if len(p) < 4 {
		return res(tpmwire.ResBadParameter), afterNext
	}
	length := int(be32(p))
	data := p[4:]
	if err := s.tpm.HashData(data[:min(len(data), length)]); err != nil {
		return res(s.resultOf(err)), afterNext
	}
	if len(data) > length {
		return res(tpmwire.ResBadParameter), afterNext
	}
	remain := length - len(data)
	buf := make([]byte, min(remain, MaxHashData))
	for remain > 0 {
		chunk := buf[:min(remain, len(buf))]
		if err := r.readMore(chunk); err != nil {
			s.log.Warn("HASH_DATA", "err", err)
			return nil, afterClose
		}
		if err := s.tpm.HashData(chunk); err != nil {
			return res(s.resultOf(err)), afterNext
		}
		remain -= len(chunk)
	}
	return res(tpmwire.ResSuccess), afterNext
}

// getStateBlob answers with the whole blob in one reply (totlength == length), as QEMU needs.
func (s *Server) getStateBlob(p []byte) []byte {
	if len(p) < 12 { // swtpm ignores what follows the request
		return res(tpmwire.ResBadParameter)
	}
	flags, typ, offset := be32(p), be32(p[4:]), be32(p[8:])
	blob, enc, err := s.tpm.GetStateBlob(typ, flags&StateFlagDecrypted != 0)
	if err != nil {
		return putBE32(nil, uint32(s.resultOf(err)), 0, 0, 0)
	}
	if blob == nil {
		return putBE32(nil, uint32(tpmwire.ResRetry), 0, 0, 0)
	}
	var outFlags uint32
	if enc {
		outFlags = StateFlagEncrypted
	}
	var rest []byte
	if int64(offset) < int64(len(blob)) {
		rest = blob[offset:]
	}
	out := putBE32(make([]byte, 0, 16+len(rest)), 0, outFlags, uint32(len(rest)), uint32(len(rest)))
	return append(out, rest...)
}

// setStateBlob receives a streamed blob. swtpm checks, in this order: a running TPM
// (TPM_BAD_ORDINAL), more data than announced (TPM_BAD_PARAMETER), then the blob. The announced
// body is always consumed, or the connection closed, so a refused blob is never read as further
// commands (swtpm reads the rest of a refused blob as commands and answers each); a client
// that stops sending loses the connection without an answer, as with swtpm.
func (s *Server) setStateBlob(r *ctrlReader, p []byte, running bool) ([]byte, after) {
	if len(p) < 12 {
		return res(tpmwire.ResBadParameter), afterNext
	}
	flags, typ, length := be32(p), be32(p[4:]), be32(p[8:])
	first := p[12:]
	trailing := uint64(len(first)) > uint64(length)
	if length > MaxStateBlob {
		if running {
			return res(tpmwire.ResBadOrdinal), afterClose
		}
		return res(tpmwire.ResFail), afterClose
	}
	var blob []byte
	if !trailing {
		blob = make([]byte, length)
		copy(blob, first)
		if err := r.readMore(blob[len(first):]); err != nil {
			s.log.Warn("SET_STATEBLOB", "err", err)
			return nil, afterClose
		}
	}
	switch {
	case running:
		return res(tpmwire.ResBadOrdinal), afterNext
	case trailing:
		return res(tpmwire.ResBadParameter), afterNext
	}
	if length == 0 {
		blob = nil
	}
	return res(s.resultOf(s.tpm.SetStateBlob(typ, flags&StateFlagEncrypted != 0, blob))), afterNext
}

func (s *Server) getInfo(p []byte) []byte {
	if len(p) < 16 { // swtpm ignores what follows the request
		return res(tpmwire.ResBadParameter)
	}
	flags := uint64(be32(p))<<32 | uint64(be32(p[4:]))
	offset := be32(p[8:])
	info, err := s.tpm.Info(flags)
	if err != nil {
		return res(s.resultOf(err))
	}
	if int64(offset) >= int64(len(info)) {
		return res(tpmwire.ResBadParameter)
	}
	data := append([]byte(info), 0) // the NUL terminator is counted and sent
	total := uint32(len(data))
	chunk := data[offset:]
	if len(chunk) > 3072 {
		chunk = chunk[:3072]
	}
	out := putBE32(nil, 0, total, uint32(len(chunk)))
	return append(out, chunk...)
}

func (s *Server) setDataFD(ctx context.Context, req *ctrlRequest) []byte {
	if len(req.payload) != 0 || req.fd == nil {
		return res(tpmwire.ResBadParameter)
	}
	s.mu.Lock()
	if s.dataSet {
		s.mu.Unlock()
		return res(tpmwire.ResIOError)
	}
	s.dataSet = true
	s.mu.Unlock()
	c, err := fileConn(req.fd)
	if err != nil {
		s.setDataSet(false)
		s.log.Warn("SET_DATAFD", "err", err)
		return res(tpmwire.ResBadParameter)
	}
	s.goServe(func() {
		s.serveDataConn(ctx, c, s.opts.Terminate)
		s.setDataSet(false)
	})
	return res(tpmwire.ResSuccess)
}

// fileConn turns a passed fd into a net.Conn (it must be a stream socket).
func fileConn(f *os.File) (net.Conn, error) {
	c, err := net.FileConn(f)
	if err != nil {
		return nil, fmt.Errorf("passed data fd: %w", err)
	}
	return c, nil
}
