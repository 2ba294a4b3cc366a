package manager

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"time"
)

const pathAdopt = "/v1/adopt"

// AdoptRequest hands a recovered state key to this host's manager, which seals it under its
// own TPM: the state files stay as they are (they are encrypted with that key).
type AdoptRequest struct {
	StatePath string `json:"state_path"`
	Key       []byte `json:"key"`
	Name      string `json:"name,omitempty"`
	UUID      string `json:"uuid,omitempty"`
	Version   uint64 `json:"version"`
}

// RecoverRequest is `vtpmd manager recover`: the failed host's ledger (copied from its
// manager directory, or a backup), the operator's recovery private key, the vTPM (record ID,
// UUID, name or old state path) and where its state lives now.
type RecoverRequest struct {
	Ledger     string
	PrivateKey string
	VM         string
	StatePath  string
}

// Recover unwraps a vTPM's state key from another host's ledger with the recovery private key
// and hands it to this host's manager. The old ledger's MAC cannot be checked without the old
// TPM; the wrap itself is authenticated (RSA-OAEP with the record's ID as label).
func (c *Client) Recover(ctx context.Context, req RecoverRequest) (*VMStatus, error) {
	rec, err := findRecoverable(req.Ledger, req.VM)
	if err != nil {
		return nil, err
	}
	priv, err := loadRecoveryPrivateKey(req.PrivateKey)
	if err != nil {
		return nil, err
	}
	key, err := rsa.DecryptOAEP(sha256.New(), rand.Reader, priv, rec.Recovery, []byte(recoveryLabel+rec.ID))
	if err != nil {
		return nil, fmt.Errorf("unwrap the state key of %s with the recovery key: %w", rec.label(), err)
	}
	defer clear(key)
	path := req.StatePath
	if path == "" {
		path = rec.StatePath
	}
	var st VMStatus
	err = c.call(ctx, "POST", pathAdopt, AdoptRequest{StatePath: path, Key: key, Name: rec.Name, UUID: rec.UUID, Version: rec.Version}, &st)
	return &st, err
}

func findRecoverable(ledgerPath, vm string) (*vmRecord, error) {
	raw, err := readLimited(ledgerPath, maxLedgerSize)
	if err != nil {
		return nil, fmt.Errorf("old ledger: %w", err)
	}
	var lf ledgerFile
	var l ledger
	if err := json.Unmarshal(raw, &lf); err != nil {
		return nil, fmt.Errorf("old ledger %s: %w", ledgerPath, err)
	}
	if err := json.Unmarshal(lf.Ledger, &l); err != nil {
		return nil, fmt.Errorf("old ledger %s: %w", ledgerPath, err)
	}
	for _, r := range l.VMs {
		if r.ID == vm || r.UUID == vm || r.Name == vm || r.StatePath == vm {
			if len(r.Recovery) == 0 {
				return nil, fmt.Errorf("vTPM %s has no recovery wrap (no recovery key was configured when it was enrolled)", r.label())
			}
			return r, nil
		}
	}
	return nil, fmt.Errorf("no vTPM %q in %s", vm, ledgerPath)
}

func loadRecoveryPrivateKey(path string) (*rsa.PrivateKey, error) {
	raw, err := readLimited(path, 1<<20)
	if err != nil {
		return nil, fmt.Errorf("recovery private key: %w", err)
	}
	b, _ := pem.Decode(raw)
	if b == nil {
		return nil, fmt.Errorf("recovery private key %s: no PEM block", path)
	}
	var k any
	switch b.Type {
	case "PRIVATE KEY":
		k, err = x509.ParsePKCS8PrivateKey(b.Bytes)
	case "RSA PRIVATE KEY":
		k, err = x509.ParsePKCS1PrivateKey(b.Bytes)
	default:
		err = fmt.Errorf("PEM block %q", b.Type)
	}
	if err != nil {
		return nil, fmt.Errorf("recovery private key %s: %w", path, err)
	}
	rk, ok := k.(*rsa.PrivateKey)
	if !ok {
		return nil, errors.New("recovery private key: not an RSA key")
	}
	return rk, nil
}

// adopt seals a recovered state key under this host's TPM and records the vTPM as enrolled.
func (s *Server) adopt(ctx context.Context, p Peer, req *AdoptRequest) (*VMStatus, error) {
	defer clear(req.Key)
	if err := authorizeOperator(p); err != nil {
		return nil, err
	}
	path, err := cleanStatePath(req.StatePath)
	if err != nil {
		return nil, err
	}
	if len(req.Key) != stateKeySize && len(req.Key) != 16 {
		return nil, fmt.Errorf("%w: a state key has 16 or 32 bytes", errBadRequest)
	}
	tpm2, err := stateFamily(path)
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if r := s.ledger.findByPath(path); r != nil {
		return nil, fmt.Errorf("vTPM %s at %s is already enrolled here", r.label(), path)
	}
	sealed, err := s.hw.Seal(ctx, req.Key)
	if err != nil {
		return nil, fmt.Errorf("seal the recovered state key: %w", err)
	}
	rec := &vmRecord{StatePath: path, TPM2: tpm2, Sealed: sealed, Policy: s.hw.PolicyName(), Phase: phaseEnrolled,
		Name: req.Name, UUID: req.UUID, Version: req.Version, Enrolled: time.Now().UTC()}
	rec.ID = recordID(rec.UUID, path)
	if s.cfg.RecoveryKey != nil {
		if rec.Recovery, err = wrapRecovery(s.cfg.RecoveryKey, rec.ID, req.Key); err != nil {
			return nil, err
		}
	}
	if err := s.addRecord(ctx, rec); err != nil {
		return nil, err
	}
	s.log.Warn("adopted a recovered vTPM", "vm", rec.label(), "state", path, "peer_pid", p.PID)
	st := rec.status()
	return &st, nil
}
