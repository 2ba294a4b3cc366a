package socket

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"

	"github.com/vtpmd/vtpmd/internal/tpmwire"
)

// Options are the swtpm behaviours a Server reproduces.
type Options struct {
	// Terminate exits when the data connection is lost (swtpm -t/--terminate).
	Terminate bool
	// CtrlTerminate exits when the control client disconnects (--ctrl ...,terminate).
	CtrlTerminate bool
	// Disconnect closes the data connection after every response (--server ...,disconnect).
	Disconnect bool
	// RejectLocality4 refuses locality 4 (--locality reject-locality-4).
	RejectLocality4 bool
	// AllowSetLocality enables the TPM2_CC_SET_LOCALITY vendor command on the data channel.
	AllowSetLocality bool
	// Log receives protocol traces at debug level and errors.
	Log *slog.Logger
	// Dump receives every control and data message in swtpm's --log dump format (nil: none).
	Dump io.Writer
	// ResultOf classifies a TPM method's error as a control-channel result code (nil:
	// ResultInChain). backend.ResultOf is the table for a backend.Instance.
	ResultOf func(error) tpmwire.Result
	// GoDataPath serves data connections on goroutines even when the TPM can serve them on a
	// native thread (NativeDataServer): the earlier data path, kept to measure against. vtpmd
	// sets it when GoDataPathEnv is 1.
	GoDataPath bool
}

// GoDataPathEnv is the environment variable that, set to 1, makes vtpmd serve data connections
// on goroutines (Options.GoDataPath); `just bench` measures both paths.
const GoDataPathEnv = "VTPMD_GO_DATA_PATH"

// Server serves one TPM on swtpm's control and data channels.
type Server struct {
	tpm  TPM
	opts Options
	log  *slog.Logger

	mu      sync.Mutex
	dataSet bool       // guarded by mu; a data channel is configured (SET_DATAFD refused)
	dumpMu  sync.Mutex // serializes Options.Dump writes
	wg      sync.WaitGroup

	done     chan struct{}
	doneOnce sync.Once
	reason   string
}

// NewServer returns a Server for tpm.
func NewServer(tpm TPM, opts Options) *Server {
	log := opts.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if opts.ResultOf == nil {
		opts.ResultOf = ResultInChain
	}
	return &Server{tpm: tpm, opts: opts, log: log, done: make(chan struct{})}
}

// Done is closed when the server should exit: after CMD_SHUTDOWN, or when a connection whose
// loss terminates the process went away.
func (s *Server) Done() <-chan struct{} { return s.done }

// Reason says why Done was closed.
func (s *Server) Reason() string {
	<-s.done
	return s.reason
}

func (s *Server) finish(reason string) {
	s.doneOnce.Do(func() {
		s.reason = reason
		s.log.Info("exiting", "reason", reason)
		close(s.done)
	})
}

// Wait blocks until every connection goroutine has returned (after their listeners and
// connections were closed by ctx).
func (s *Server) Wait() { s.wg.Wait() }

// ErrNoChannel is returned when neither a control nor a data channel is configured.
var ErrNoChannel = errors.New("no control channel and no data channel: use --ctrl and/or --server")

// Serve serves the control channel and the data channel (either may be nil) on their own
// goroutines and returns; Done tells when the server should exit, Wait when it has. The
// endpoints' Terminate and Disconnect settings apply. The caller closes the endpoints.
func (s *Server) Serve(ctx context.Context, ctrl, data *Endpoint) error {
	if ctrl == nil && data == nil {
		return ErrNoChannel
	}
	if ctrl != nil {
		s.opts.CtrlTerminate = s.opts.CtrlTerminate || ctrl.spec.Terminate
		if err := s.serveCtrl(ctx, ctrl); err != nil {
			return err
		}
	}
	if data != nil {
		s.opts.Disconnect = s.opts.Disconnect || data.spec.Disconnect
		s.setDataSet(true)
		if data.conn != nil {
			// an inherited data connection (--fd, --server fd=): losing it ends the server
			s.goServe(func() { s.serveDataConn(ctx, data.conn, true) })
		} else {
			s.goServe(func() { s.acceptLoop(ctx, data.ln, func(c net.Conn) { s.serveDataConn(ctx, c, s.opts.Terminate) }) })
		}
	}
	return nil
}

// serveCtrl accepts control clients one at a time, or serves the one inherited client
// (--ctrl ...,clientfd=N).
func (s *Server) serveCtrl(ctx context.Context, ctrl *Endpoint) error {
	if ctrl.conn == nil {
		s.goServe(func() { s.acceptLoop(ctx, ctrl.ln, func(c net.Conn) { s.serveCtrlConn(ctx, c) }) })
		return nil
	}
	c, ok := ctrl.conn.(net.Conn)
	if !ok {
		return fmt.Errorf("%s: the control channel must be a socket", ctrl.spec.Name)
	}
	s.goServe(func() { s.serveCtrlConn(ctx, c) })
	return nil
}

// ServeCtrlConn serves an already connected control client.
func (s *Server) ServeCtrlConn(ctx context.Context, c net.Conn) {
	s.goServe(func() { s.serveCtrlConn(ctx, c) })
}

// goServe runs f on a goroutine that Wait waits for.
func (s *Server) goServe(f func()) {
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		f()
	}()
}

func (s *Server) setDataSet(v bool) {
	s.mu.Lock()
	s.dataSet = v
	s.mu.Unlock()
}

func (s *Server) acceptLoop(ctx context.Context, ln net.Listener, serve func(net.Conn)) {
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	go func() {
		<-s.done
		ln.Close()
	}()
	for {
		c, err := ln.Accept()
		if err != nil {
			if !errors.Is(err, net.ErrClosed) {
				s.log.Error("accept", "err", err)
			}
			return
		}
		serve(c) // one client at a time, as swtpm
		select {
		case <-s.done:
			return
		default:
		}
	}
}

// closeOnDone closes c when ctx ends or the server finishes, unblocking its reader.
func (s *Server) closeOnDone(ctx context.Context, c io.Closer) func() {
	quit := make(chan struct{})
	go func() {
		select {
		case <-ctx.Done():
		case <-s.done:
		case <-quit:
		}
		c.Close()
	}()
	return func() { close(quit) }
}

func (s *Server) serveCtrlConn(ctx context.Context, c net.Conn) {
	stop := s.closeOnDone(ctx, c)
	defer stop()
	r := newCtrlReader(c)
	for {
		req, err := r.read()
		if err != nil {
			if !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) {
				s.log.Warn("control channel", "err", err)
			}
			break
		}
		if s.opts.Dump != nil {
			s.dump("Ctrl Cmd", req.wire())
		}
		resp, next := s.dispatch(ctx, r, req)
		req.closeFD()
		if resp != nil {
			s.dump("Ctrl Rsp", resp)
			if _, err := c.Write(resp); err != nil {
				s.log.Warn("control reply", "cmd", req.cmd, "err", err)
				break
			}
		}
		if next == afterShutdown {
			s.finish("CMD_SHUTDOWN")
			break
		}
		if next == afterClose {
			break
		}
	}
	if s.opts.CtrlTerminate {
		s.finish("control client disconnected")
	}
}
