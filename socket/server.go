package socket

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"sync"
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
}

// Server serves one TPM on swtpm's control and data channels.
type Server struct {
	tpm  TPM
	opts Options
	log  *slog.Logger

	mu      sync.Mutex
	dataSet bool // guarded by mu; a data channel is configured (SET_DATAFD refused)
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

// ServeCtrl accepts control clients one at a time until ctx is done or the server finishes.
func (s *Server) ServeCtrl(ctx context.Context, ln net.Listener) {
	s.goServe(func() { s.acceptLoop(ctx, ln, func(c net.Conn) { s.serveCtrlConn(ctx, c) }) })
}

// ServeCtrlConn serves an already connected control client (--ctrl ...,clientfd=N).
func (s *Server) ServeCtrlConn(ctx context.Context, c net.Conn) {
	s.goServe(func() { s.serveCtrlConn(ctx, c) })
}

// ServeData accepts data clients one at a time (--server with a listening socket).
func (s *Server) ServeData(ctx context.Context, ln net.Listener) {
	s.setDataSet(true)
	s.goServe(func() { s.acceptLoop(ctx, ln, func(c net.Conn) { s.serveDataConn(ctx, c, s.opts.Terminate) }) })
}

// ServeDataConn serves an already connected data channel (--fd, --server ...,fd=N: a stream
// socket or a character device); losing it ends the server.
func (s *Server) ServeDataConn(ctx context.Context, c io.ReadWriteCloser) {
	s.setDataSet(true)
	s.goServe(func() { s.serveDataConn(ctx, c, true) })
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
		resp, next := s.dispatch(ctx, r, req)
		req.closeFD()
		if resp != nil {
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
