package manager

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/vtpmd/vtpmd/manager/registry"
)

// Hardware is what the manager needs of the host's TPM: sealing and a monotonic counter.
// hwtpm.TPM provides it (see hardware.go).
type Hardware interface {
	Seal(ctx context.Context, secret []byte) (json.RawMessage, error)
	Unseal(ctx context.Context, sealed json.RawMessage) ([]byte, error)
	Counter
	// PolicyName describes the unseal policy (for status and records).
	PolicyName() string
	Describe() string
	Close() error
}

// Config is one manager.
type Config struct {
	// Dir holds the ledger and the sealed ledger key (mode 0700).
	Dir string
	// Listen is the API's unix socket; SocketGID its group (-1: the manager's), mode 0660.
	Listen    string
	SocketGID int
	// AutoEnroll enrols every new vTPM (empty state) that asks for a key.
	AutoEnroll bool
	// RecoveryKey is the operator's recovery public key: each state key is also wrapped to it.
	RecoveryKey *rsa.PublicKey
	// Registry locates VMs by UUID or name for the operator's requests.
	Registry *registry.Registry
	// InstanceExe is the program a vTPM process must run (its /proc/PID/exe); "" is the
	// manager's own executable, vtpmd.
	InstanceExe string
	Log         *slog.Logger
}

// Server is a running manager.
type Server struct {
	cfg Config
	hw  Hardware
	log *slog.Logger

	mu     sync.Mutex // guards ledger and serializes ledger writes
	ledger *ledger
	store  *ledgerStore

	identity *hostIdentity // the host's hardware identity (identity.go); nil: none
}

const ledgerKeyName = "ledger-key.sealed"

// New opens the manager's records in cfg.Dir with the hardware TPM hw: the ledger key is
// unsealed (created on first start) and the ledger checked against the hardware counter.
func New(ctx context.Context, cfg Config, hw Hardware) (*Server, error) {
	log := cfg.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if err := os.MkdirAll(cfg.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("manager directory: %w", err)
	}
	macKey, base, err := ledgerKey(ctx, cfg.Dir, hw)
	if err != nil {
		return nil, err
	}
	st := &ledgerStore{path: filepath.Join(cfg.Dir, ledgerName), macKey: macKey, counter: hw, base: base}
	l, err := st.load(ctx)
	if err != nil {
		return nil, err
	}
	if cfg.Registry == nil {
		cfg.Registry = registry.New("")
	}
	if cfg.InstanceExe == "" {
		if cfg.InstanceExe, err = os.Executable(); err != nil {
			return nil, fmt.Errorf("the manager's own executable: %w", err)
		}
	}
	s := &Server{cfg: cfg, hw: hw, log: log, ledger: l, store: st}
	if s.identity, err = openIdentity(ctx, cfg.Dir, hw, log); err != nil {
		// the manager still seals and counts; attestation and certificates say why not
		log.Warn("no host identity", "err", err)
		s.identity = nil
	}
	return s, nil
}

// ledgerKey unseals the key that authenticates the ledger, creating and sealing one on first
// start. A sealed key from another TPM fails to unseal: the directory belongs to another host.
// Sealed with the key is the hardware counter's value when the directory was made (base): a
// TPM's new counter may start above 1 (past counters deleted before), and a ledger that is
// missing is new only while the counter is still at base or one past it (a first save cut
// short).
func ledgerKey(ctx context.Context, dir string, hw Hardware) (key []byte, base uint64, err error) {
	p := filepath.Join(dir, ledgerKeyName)
	raw, err := readLimited(p, 1<<20)
	if err == nil {
		secret, err := hw.Unseal(ctx, raw)
		if err != nil {
			return nil, 0, fmt.Errorf("unseal the ledger key %s: %w", p, err)
		}
		if len(secret) != ledgerKeySize+8 {
			clear(secret)
			return nil, 0, fmt.Errorf("ledger key %s: %d bytes sealed, want %d", p, len(secret), ledgerKeySize+8)
		}
		return secret[:ledgerKeySize], binary.BigEndian.Uint64(secret[ledgerKeySize:]), nil
	}
	if !os.IsNotExist(err) {
		return nil, 0, err
	}
	if _, serr := os.Stat(filepath.Join(dir, ledgerName)); serr == nil {
		return nil, 0, fmt.Errorf("%s is missing but a ledger exists: refusing to start over", p)
	}
	if base, err = hw.Read(ctx); err != nil {
		return nil, 0, fmt.Errorf("read hardware counter: %w", err)
	}
	secret := make([]byte, ledgerKeySize, ledgerKeySize+8)
	if _, err := rand.Read(secret); err != nil {
		return nil, 0, err
	}
	secret = binary.BigEndian.AppendUint64(secret, base)
	sealed, err := hw.Seal(ctx, secret)
	if err != nil {
		clear(secret)
		return nil, 0, fmt.Errorf("seal a new ledger key: %w", err)
	}
	if err := writePrivate(p, sealed); err != nil {
		clear(secret)
		return nil, 0, err
	}
	return secret[:ledgerKeySize], base, nil
}

const ledgerKeySize = 32

// Serve answers the API on ln until ctx ends.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	srv := s.httpServer(s.Handler())
	srv.ConnContext = withPeer
	return serveHTTP(ctx, srv, func() error { return srv.Serve(ln) }, "manager API")
}

// httpServer is an HTTP server with the manager's bounds on requests (both of its listeners).
func (s *Server) httpServer(h http.Handler) *http.Server {
	return &http.Server{
		Handler:           h,
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       10 * time.Second,
		WriteTimeout:      30 * time.Second,
		MaxHeaderBytes:    16 << 10,
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelWarn),
	}
}

// serveHTTP runs serve (srv's Serve or ServeTLS) until ctx ends, then shuts srv down.
func serveHTTP(ctx context.Context, srv *http.Server, serve func() error, what string) error {
	stop := context.AfterFunc(ctx, func() {
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.Shutdown(sctx)
	})
	defer stop()
	if err := serve(); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("%s: %w", what, err)
	}
	return nil
}

// Handler is the manager's API.
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST "+pathKey, handle(s.key))
	mux.HandleFunc("POST "+pathVersion, handle(s.version))
	mux.HandleFunc("GET "+pathStatus, handle(s.status))
	mux.HandleFunc("POST "+pathEnroll, handle(s.enroll))
	mux.HandleFunc("POST "+pathUnenroll, handle(s.unenroll))
	mux.HandleFunc("POST "+pathAccept, handle(s.accept))
	mux.HandleFunc("POST "+pathAdopt, handle(s.adopt))
	for _, add := range routeSets {
		for _, r := range add(s) {
			mux.HandleFunc(r.pattern, r.handler)
		}
	}
	return mux
}

// route is one API endpoint: a ServeMux pattern ("POST /v1/…") and its handler (made with
// handle, so the peer is identified first).
type route struct {
	pattern string
	handler http.HandlerFunc
}

// routeSets are the API's further endpoints, one set per concern (projection, attestation,
// certificates, migration), each registered by its own file's init.
var routeSets []func(*Server) []route

// registerRoutes adds a set of endpoints to every Server's API.
func registerRoutes(f func(*Server) []route) { routeSets = append(routeSets, f) }

// requestTimeout bounds one request's work, whatever its client does.
const requestTimeout = time.Minute

// maxRequest bounds a request body.
const maxRequest = 64 << 10

// handle adapts a typed handler: the peer is identified first, the body decoded strictly,
// errors answered with their kind.
func handle[Req, Resp any](f func(ctx context.Context, p Peer, req *Req) (*Resp, error)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		p, err := peerFrom(r.Context())
		if err != nil {
			writeError(w, err)
			return
		}
		req := new(Req)
		if r.Method == http.MethodPost {
			dec := json.NewDecoder(io.LimitReader(r.Body, maxRequest))
			dec.DisallowUnknownFields()
			if err := dec.Decode(req); err != nil {
				writeError(w, fmt.Errorf("%w: %w", errBadRequest, err))
				return
			}
		}
		// hardware TPM work is not cut short when the client goes away: a command cut in the
		// middle leaves objects and sessions loaded in a TPM without a resource manager, and an
		// NV increment counted but not recorded
		ctx, cancel := context.WithTimeout(context.WithoutCancel(r.Context()), requestTimeout)
		defer cancel()
		resp, err := f(ctx, p, req)
		if err != nil {
			writeError(w, err)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(resp)
	}
}

var errBadRequest = errors.New("manager: bad request")

// errorKinds name the sentinel errors on the wire, with their HTTP status.
var errorKinds = []struct {
	err    error
	kind   string
	status int
}{
	{ErrForbidden, "forbidden", http.StatusForbidden},
	{ErrNotEnrolled, "not-enrolled", http.StatusNotFound},
	{ErrRollback, "rollback", http.StatusConflict},
	{ErrIncomplete, "incomplete", http.StatusConflict},
	{errBadRequest, "bad-request", http.StatusBadRequest},
}

func writeError(w http.ResponseWriter, err error) {
	status, kind := http.StatusInternalServerError, ""
	for _, k := range errorKinds {
		if errors.Is(err, k.err) {
			status, kind = k.status, k.kind
			break
		}
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(apiError{Error: err.Error(), Kind: kind})
}

func writePrivate(path string, data []byte) error {
	return atomicWrite(path, data)
}
