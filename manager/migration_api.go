package manager

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
)

// API paths of migration: the vTPM's (export, import, admit, its guest index) and the
// operator's (history, accept, the event stream).
const (
	pathMigExport  = "/v1/migration/export"
	pathMigImport  = "/v1/migration/import"
	pathMigAdmit   = "/v1/migration/admit"
	pathMigNV      = "/v1/migration/nv"
	pathMigHistory = "/v1/migration/history"
	pathMigAccept  = "/v1/migration/accept"
	pathEvents     = "/v1/events"
)

// maxBlobRequest bounds a request that carries state blobs (three of at most 512 KiB, in
// base64).
const maxBlobRequest = 4 << 20

// ExportRequest asks the manager to seal one state blob of the vTPM at StatePath.
type ExportRequest struct {
	StatePath string `json:"state_path"`
	// Ticket is the export under way in this vTPM ("": none).
	Ticket string `json:"ticket,omitempty"`
	Type   uint32 `json:"type"`
	Blob   []byte `json:"blob"`
}

// ExportResponse is the sealed blob and its ticket ("" when the policy let it leave plain).
type ExportResponse struct {
	Ticket string `json:"ticket,omitempty"`
	Blob   []byte `json:"blob"`
}

// ImportRequest hands the blobs SET_STATEBLOB received (by type) to the manager.
type ImportRequest struct {
	StatePath string            `json:"state_path"`
	Blobs     map[uint32][]byte `json:"blobs"`
}

// ImportResponse is the opened blobs (swtpm's migration blobs), over the unix socket only.
type ImportResponse struct {
	Blobs map[uint32][]byte `json:"blobs"`
}

// StateRequest names the vTPM the asking process serves.
type StateRequest struct {
	StatePath string `json:"state_path"`
}

// NVInfoResponse is the guest's migration index: its write authorization and contents.
type NVInfoResponse struct {
	Auth     []byte `json:"auth"`
	Contents []byte `json:"contents"`
}

// HistoryRequest names a VM (UUID, name or state path; "": every VM).
type HistoryRequest struct {
	VM string `json:"vm"`
}

// HistoryResponse is a VM's moves, oldest first.
type HistoryResponse struct {
	Entries []HistoryEntry `json:"entries"`
}

// migrationErrorKind is an entry of errorKinds.
type migrationErrorKind = struct {
	err    error
	kind   string
	status int
}

func init() {
	errorKinds = append(errorKinds,
		migrationErrorKind{ErrMovedAway, "moved-away", http.StatusConflict},
		migrationErrorKind{ErrTicketReleased, "ticket-released", http.StatusConflict},
		migrationErrorKind{ErrTicketCancelled, "ticket-cancelled", http.StatusConflict},
		migrationErrorKind{ErrTicketUnknown, "ticket-unknown", http.StatusConflict},
		migrationErrorKind{ErrBlobSet, "blob-set", http.StatusConflict},
		migrationErrorKind{ErrEnvelope, "envelope", http.StatusBadRequest},
		migrationErrorKind{ErrUntrusted, "untrusted", http.StatusForbidden},
		migrationErrorKind{ErrPlainRefused, "plain-refused", http.StatusConflict},
		migrationErrorKind{ErrNoIdentity, "no-identity", http.StatusConflict},
	)
	registerRoutes(func(s *Server) []route {
		return []route{
			{"POST " + pathMigExport, handleLarge(s.migExport)},
			{"POST " + pathMigImport, handleLarge(s.migImport)},
			{"POST " + pathMigAdmit, handle(s.migAdmit)},
			{"POST " + pathMigNV, handle(s.migNV)},
			{"POST " + pathMigHistory, handle(s.migHistory)},
			{"POST " + pathMigAccept, handle(s.migAccept)},
			{"GET " + pathEvents, s.migEvents},
		}
	})
}

// handleLarge is handle for requests that carry state blobs: the peer is identified first,
// the body decoded strictly up to maxBlobRequest (handle's limit is for small requests).
func handleLarge[Req, Resp any](f func(ctx context.Context, p Peer, req *Req) (*Resp, error)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(io.LimitReader(r.Body, maxBlobRequest+1))
		if err != nil || len(body) > maxBlobRequest {
			writeError(w, fmt.Errorf("%w: request body too large or unreadable", errBadRequest))
			return
		}
		writeLargeThrough(w, r, body, f)
	}
}

// writeLargeThrough serves a body larger than handle's limit with the same steps as handle.
func writeLargeThrough[Req, Resp any](w http.ResponseWriter, r *http.Request, body []byte, f func(ctx context.Context, p Peer, req *Req) (*Resp, error)) {
	p, err := peerFrom(r.Context())
	if err != nil {
		writeError(w, err)
		return
	}
	req := new(Req)
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(req); err != nil {
		writeError(w, fmt.Errorf("%w: %w", errBadRequest, err))
		return
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(r.Context()), requestTimeout)
	defer cancel()
	ctx = context.WithValue(ctx, requesterKey{}, r.Context())
	resp, err := f(ctx, p, req)
	if err != nil {
		writeError(w, err)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(resp)
}

// instanceMigration is the prelude of the requests a vTPM makes about its own state: the
// instance the peer serves at statePath, and the migration service.
func (s *Server) instanceMigration(p Peer, statePath string) (*migration, string, error) {
	path, err := s.instancePath(p, statePath)
	if err != nil {
		return nil, "", err
	}
	m, err := s.migration()
	if err != nil {
		return nil, "", err
	}
	return m, path, nil
}

func (s *Server) migExport(ctx context.Context, p Peer, req *ExportRequest) (*ExportResponse, error) {
	m, path, err := s.instanceMigration(p, req.StatePath)
	if err != nil {
		return nil, err
	}
	t, b, err := m.export(ctx, path, req.Ticket, req.Type, req.Blob)
	if err != nil {
		return nil, err
	}
	return &ExportResponse{Ticket: t, Blob: b}, nil
}

func (s *Server) migImport(ctx context.Context, p Peer, req *ImportRequest) (*ImportResponse, error) {
	m, path, err := s.instanceMigration(p, req.StatePath)
	if err != nil {
		return nil, err
	}
	out, err := m.importBlobs(ctx, path, req.Blobs)
	if err != nil {
		m.log.Warn("migrated state refused", "state", path, "err", err)
		return nil, err
	}
	return &ImportResponse{Blobs: out}, nil
}

func (s *Server) migAdmit(ctx context.Context, p Peer, req *StateRequest) (*struct{}, error) {
	m, path, err := s.instanceMigration(p, req.StatePath)
	if err != nil {
		return nil, err
	}
	return &struct{}{}, m.admit(ctx, path)
}

func (s *Server) migNV(_ context.Context, p Peer, req *StateRequest) (*NVInfoResponse, error) {
	m, path, err := s.instanceMigration(p, req.StatePath)
	if err != nil {
		return nil, err
	}
	return m.nvInfo(path)
}

func (s *Server) migHistory(_ context.Context, p Peer, req *HistoryRequest) (*HistoryResponse, error) {
	if err := authorizeOperator(p); err != nil {
		return nil, err
	}
	m, err := s.migration()
	if err != nil {
		return nil, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	return &HistoryResponse{Entries: m.rec.historyOf(s.migrationName(m, req.VM))}, nil
}

// migrationName turns a VM's name, UUID or state path into what the history records (the
// state path of an enrolled vTPM or a registry entry resolves to itself).
func (s *Server) migrationName(m *migration, vm string) string {
	if vm == "" || strings.HasPrefix(vm, "/") {
		if c, err := cleanStatePath(vm); err == nil {
			return c
		}
	}
	return vm
}

func (s *Server) migAccept(_ context.Context, p Peer, req *HistoryRequest) (*struct{}, error) {
	if err := authorizeOperator(p); err != nil {
		return nil, err
	}
	m, err := s.migration()
	if err != nil {
		return nil, err
	}
	path := ""
	m.mu.Lock()
	for _, v := range m.rec.VTPMs {
		if v.StatePath == s.migrationName(m, req.VM) || v.VM == req.VM || v.Name == req.VM {
			path = v.StatePath
		}
	}
	m.mu.Unlock()
	if path == "" {
		if c, err := cleanStatePath(req.VM); err == nil {
			path = c
		} else {
			return nil, fmt.Errorf("%w: no migration record of %q", ErrNotEnrolled, req.VM)
		}
	}
	m.log.Warn("operator accepts an older or moved-away state of this vTPM once", "state", path)
	return &struct{}{}, m.accept(path)
}

// migEvents streams migration events to any peer of the API socket (they carry no secrets).
func (s *Server) migEvents(w http.ResponseWriter, r *http.Request) {
	if _, err := peerFrom(r.Context()); err != nil {
		writeError(w, err)
		return
	}
	m, err := s.migration()
	if err != nil {
		writeError(w, err)
		return
	}
	m.events.serveEvents(r.Context(), w)
}

// Export, Import, Admit and NVInfo are the vTPM process's requests.
func (c *Client) Export(ctx context.Context, req ExportRequest) (*ExportResponse, error) {
	var resp ExportResponse
	return &resp, c.call(ctx, http.MethodPost, pathMigExport, req, &resp)
}

// Import opens migrated blobs.
func (c *Client) Import(ctx context.Context, req ImportRequest) (*ImportResponse, error) {
	var resp ImportResponse
	return &resp, c.call(ctx, http.MethodPost, pathMigImport, req, &resp)
}

// Admit asks whether the vTPM at statePath may run its next command.
func (c *Client) Admit(ctx context.Context, statePath string) error {
	var resp struct{}
	return c.call(ctx, http.MethodPost, pathMigAdmit, StateRequest{StatePath: statePath}, &resp)
}

// NVInfo is the guest's migration index of the vTPM at statePath.
func (c *Client) NVInfo(ctx context.Context, statePath string) (*NVInfoResponse, error) {
	var resp NVInfoResponse
	return &resp, c.call(ctx, http.MethodPost, pathMigNV, StateRequest{StatePath: statePath}, &resp)
}

// History is a VM's moves (operator).
func (c *Client) History(ctx context.Context, vm string) (*HistoryResponse, error) {
	var resp HistoryResponse
	return &resp, c.call(ctx, http.MethodPost, pathMigHistory, HistoryRequest{VM: vm}, &resp)
}

// AcceptMigration lets the next import of an older saved state (or a moved-away vTPM's start)
// through once (operator).
func (c *Client) AcceptMigration(ctx context.Context, vm string) error {
	var resp struct{}
	return c.call(ctx, http.MethodPost, pathMigAccept, HistoryRequest{VM: vm}, &resp)
}

// Events streams the manager's events to f until ctx ends or f returns false.
func (c *Client) Events(ctx context.Context, f func(Event) bool) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://manager"+pathEvents, nil)
	if err != nil {
		return err
	}
	hc := *c.http
	hc.Timeout = 0
	resp, err := hc.Do(req)
	if err != nil {
		return fmt.Errorf("%w at %s: %w", ErrUnavailable, c.Socket, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("manager %s: HTTP %d", pathEvents, resp.StatusCode)
	}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		data, ok := strings.CutPrefix(sc.Text(), "data: ")
		if !ok {
			continue
		}
		var e Event
		if err := json.Unmarshal([]byte(data), &e); err != nil {
			return fmt.Errorf("event: %w", err)
		}
		if !f(e) {
			return nil
		}
	}
	return sc.Err()
}
