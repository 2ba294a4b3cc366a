package manager

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"time"
)

// The manager-to-manager channel: HTTPS with TLS 1.3, both sides presenting their migration
// identity's chain and checking the other's against their trust anchors. The destination
// also checks that the source it reached holds the key that signed the sealed blobs.
const (
	pathPeerRelease = "/v1/peer/release"
	// maxPeerBody bounds a peer's request or answer.
	maxPeerBody = 64 << 10
)

// releaseRequest asks the source manager for a ticket's one-time key.
type releaseRequest struct {
	Ticket string `json:"ticket"`
	// Blobs are the sealed blobs the destination holds (blob type -> SHA-256 of the blob):
	// exactly the ones the ticket exported, or nothing is released.
	Blobs map[string]string `json:"blobs"`
	// StatePath is where the state goes on the destination (for the records).
	StatePath string `json:"state_path"`
	VM        string `json:"vm,omitempty"`
}

// releaseResponse carries the key (once) and the guest index's write authorization.
type releaseResponse struct {
	Key    []byte `json:"key"`
	NVAuth []byte `json:"nv_auth,omitempty"`
}

// peerError is a refusal on the peer channel: the message and the condition's name.
type peerError struct {
	Error string `json:"error"`
	Kind  string `json:"kind"`
}

// peerKinds name the conditions a source answers on the wire.
var peerKinds = []struct {
	err  error
	kind string
}{
	{ErrTicketUnknown, "ticket-unknown"},
	{ErrTicketReleased, "ticket-released"},
	{ErrTicketCancelled, "ticket-cancelled"},
	{ErrBlobSet, "blob-set"},
	{ErrUntrusted, "untrusted"},
}

// serverTLS is the listener's TLS configuration: a client certificate is required and must
// chain to the trust anchors.
func (id *Identity) serverTLS() *tls.Config {
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{id.tlsCertificate()},
		ClientAuth:   tls.RequireAnyClientCert,
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			roots, err := id.roots()
			if err != nil {
				return err
			}
			_, err = peerChain(raw, roots)
			return err
		},
	}
}

// clientTLS is the destination's configuration towards a source whose identity must be want
// (the signer of the sealed blobs), chaining to the trust anchors.
func (id *Identity) clientTLS(want string) *tls.Config {
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{id.tlsCertificate()},
		// the server is checked below against the identity that signed the blobs, which is
		// stronger than a host name (the blob's address is only where to find it)
		InsecureSkipVerify: true,
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			roots, err := id.roots()
			if err != nil {
				return err
			}
			leaf, err := peerChain(raw, roots)
			if err != nil {
				return err
			}
			if publicKeyID(leaf) != want {
				return fmt.Errorf("%w: the manager reached is %s, not the one that sealed the blobs", ErrUntrusted, leaf.Subject)
			}
			return nil
		},
	}
}

// peerChain parses a peer's chain and checks it against roots; it returns the leaf.
func peerChain(raw [][]byte, roots *x509.CertPool) (*x509.Certificate, error) {
	if len(raw) == 0 {
		return nil, fmt.Errorf("%w: no certificate", ErrUntrusted)
	}
	certs := make([]*x509.Certificate, 0, len(raw))
	for _, der := range raw {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			return nil, fmt.Errorf("%w: %w", ErrUntrusted, err)
		}
		certs = append(certs, c)
	}
	if err := verifyChain(certs, roots); err != nil {
		return nil, err
	}
	return certs[0], nil
}

// ServeMigration serves the manager-to-manager channel on ln (TCP) until ctx ends.
func (s *Server) ServeMigration(ctx context.Context, ln net.Listener) error {
	m, err := s.migration()
	if err != nil {
		return err
	}
	if m.cfg.Identity == nil {
		return fmt.Errorf("migration listener: %w", ErrNoIdentity)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("POST "+pathPeerRelease, m.handleRelease)
	srv := s.httpServer(mux)
	srv.TLSConfig = m.cfg.Identity.serverTLS()
	return serveHTTP(ctx, srv, func() error { return srv.ServeTLS(ln, "", "") }, "migration listener")
}

func (m *migration) handleRelease(w http.ResponseWriter, r *http.Request) {
	if r.TLS == nil || len(r.TLS.PeerCertificates) == 0 {
		writePeerError(w, fmt.Errorf("%w: no client certificate", ErrUntrusted))
		return
	}
	peer := r.TLS.PeerCertificates[0]
	var req releaseRequest
	dec := json.NewDecoder(io.LimitReader(r.Body, maxPeerBody))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		writePeerError(w, fmt.Errorf("%w: %w", errBadRequest, err))
		return
	}
	// read to the end, so that the request's context ends when the destination goes away
	io.Copy(io.Discard, io.LimitReader(r.Body, maxPeerBody))
	// the release, once decided, is not cut short by the destination going away; before it
	// is decided, a destination that went away gets nothing
	ctx, cancel := context.WithTimeout(context.WithoutCancel(r.Context()), requestTimeout)
	defer cancel()
	ctx = context.WithValue(ctx, requesterKey{}, r.Context())
	resp, err := m.release(ctx, &req, peer)
	if err != nil {
		writePeerError(w, err)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(resp)
	clear(resp.Key)
	if f, ok := w.(http.Flusher); ok {
		f.Flush()
	}
	m.pause(ctx, StepReleaseSent)
}

func writePeerError(w http.ResponseWriter, err error) {
	e := peerError{Error: err.Error()}
	status := http.StatusInternalServerError
	for _, k := range peerKinds {
		if errors.Is(err, k.err) {
			e.Kind, status = k.kind, http.StatusConflict
			break
		}
	}
	if errors.Is(err, errBadRequest) {
		status = http.StatusBadRequest
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(e)
}

// requestRelease asks the source manager named in the blob for the ticket's key.
func (m *migration) requestRelease(ctx context.Context, first sealedBlob, blobs map[string]string, path string) (*releaseResponse, error) {
	hdr := first.hdr
	if hdr.Source == "" {
		return nil, fmt.Errorf("%w: the source manager (%s) has no migration listener", ErrTicketUnknown, first.signer)
	}
	body, err := json.Marshal(releaseRequest{Ticket: hdr.Ticket, Blobs: blobs, StatePath: path, VM: hdr.VM})
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, m.peerTimeout)
	defer cancel()
	// the vTPM that asked going away (before the source decided) withdraws the request
	if rc, ok := ctx.Value(requesterKey{}).(context.Context); ok {
		defer context.AfterFunc(rc, cancel)()
	}
	tr := &http.Transport{TLSClientConfig: m.cfg.Identity.clientTLS(hdr.SourceID), ForceAttemptHTTP2: false,
		DialContext: (&net.Dialer{Timeout: 5 * time.Second}).DialContext}
	defer tr.CloseIdleConnections()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "https://"+hdr.Source+pathPeerRelease, bytes.NewReader(body))
	if err != nil {
		return nil, err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := (&http.Client{Transport: tr}).Do(req)
	if err != nil {
		// a TLS alert from the source: its handshake refused this host's certificate
		var op *net.OpError
		if errors.As(err, &op) && op.Op == "remote error" {
			return nil, fmt.Errorf("%w: the source manager %s (%s) refused this host's identity: %w", ErrUntrusted, hdr.Source, first.signer, err)
		}
		return nil, fmt.Errorf("reach the source manager %s (%s): %w", hdr.Source, first.signer, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, maxPeerBody))
	if err != nil {
		return nil, fmt.Errorf("source manager %s: %w", hdr.Source, err)
	}
	if resp.StatusCode != http.StatusOK {
		var e peerError
		if json.Unmarshal(data, &e) != nil || e.Error == "" {
			return nil, fmt.Errorf("source manager %s: HTTP %d", hdr.Source, resp.StatusCode)
		}
		for _, k := range peerKinds {
			if k.kind == e.Kind {
				return nil, fmt.Errorf("source manager %s refused: %w", hdr.Source, &remoteError{msg: e.Error, kind: k.err})
			}
		}
		return nil, fmt.Errorf("source manager %s refused: %s", hdr.Source, e.Error)
	}
	var rr releaseResponse
	if err := json.Unmarshal(data, &rr); err != nil {
		return nil, fmt.Errorf("source manager %s: %w", hdr.Source, err)
	}
	clear(data)
	if len(rr.Key) != oneTimeKeySize {
		return nil, fmt.Errorf("source manager %s: a key of %d bytes", hdr.Source, len(rr.Key))
	}
	return &rr, nil
}
