package manager

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/vtpmd/vtpmd/backend/store"
	"github.com/vtpmd/vtpmd/internal/atomicfile"
	"github.com/vtpmd/vtpmd/internal/opts"
	"github.com/vtpmd/vtpmd/internal/proc"
)

// stateKeySize is the size of a vTPM's state key: AES-256, swtpm's aes-256-cbc.
const stateKeySize = 32

// key answers an instance's request for its state key (and enrols a new vTPM when
// auto-enrolment is on).
func (s *Server) key(ctx context.Context, p Peer, req *KeyRequest) (*KeyResponse, error) {
	path, err := s.instancePath(p, req.StatePath)
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	rec := s.ledger.findByPath(path)
	if rec == nil {
		if !req.Fresh || !s.cfg.AutoEnroll {
			return nil, fmt.Errorf("%w: %s", ErrNotEnrolled, path)
		}
		return s.enrollFresh(ctx, path, req.TPM2)
	}
	if req.Fresh && s.cfg.AutoEnroll && rec.Phase == phaseEnrolled && manufactures(p) && !hasState(path) {
		return s.reenrollFresh(ctx, rec, path, req.TPM2)
	}
	if rec.Phase != phaseEnrolled {
		return nil, rec.incomplete()
	}
	key, err := s.hw.Unseal(ctx, rec.Sealed)
	if err != nil {
		return nil, fmt.Errorf("unseal the state key of vTPM %s: %w", rec.label(), err)
	}
	min := rec.Version
	if rec.AcceptOnce {
		s.log.Warn("accepting whatever state version the vTPM has (operator override)", "vm", rec.label(), "recorded", rec.Version)
		min = 0
	}
	rec.LastSeen = time.Now().UTC()
	return &KeyResponse{VM: rec.label(), Key: key, Version: min}, nil
}

// enrollFresh seals a new key for a vTPM without state.
func (s *Server) enrollFresh(ctx context.Context, path string, tpm2 bool) (*KeyResponse, error) {
	rec, key, err := s.newRecord(ctx, path, tpm2)
	if err != nil {
		return nil, err
	}
	rec.Phase = phaseEnrolled
	if err := s.addRecord(ctx, rec); err != nil {
		clear(key)
		return nil, err
	}
	s.log.Info("enrolled a new vTPM", "vm", rec.label(), "state", path)
	return &KeyResponse{VM: rec.label(), Key: key}, nil
}

// reenrollFresh replaces the record of a vTPM whose state is gone by a new one, with a new
// key, for the new vTPM being manufactured at its path (mu held). libvirt removes a transient
// domain's vTPM state when it stops, and undefine --tpm removes a persistent one's; the next
// start with the same UUID makes a new vTPM there with swtpm_setup. A new key (not the old one
// with its version reset) keeps every copy of the old state undecryptable, so none can be
// rolled in; the old key is dropped (a ledger backup and the recovery key still recover it).
func (s *Server) reenrollFresh(ctx context.Context, old *vmRecord, path string, tpm2 bool) (*KeyResponse, error) {
	rec, key, err := s.newRecord(ctx, path, tpm2)
	if err != nil {
		return nil, err
	}
	rec.Phase = phaseEnrolled
	delete(s.ledger.VMs, old.ID)
	s.ledger.VMs[rec.ID] = rec
	if err := s.store.save(ctx, s.ledger); err != nil {
		delete(s.ledger.VMs, rec.ID)
		s.ledger.VMs[old.ID] = old
		clear(key)
		return nil, err
	}
	s.log.Warn("the state of an enrolled vTPM is gone and a new vTPM is being made in its place: enrolled it with a new key, the old key is dropped",
		"vm", rec.label(), "state", path, "old_version", old.Version, "old_enrolled", old.Enrolled)
	return &KeyResponse{VM: rec.label(), Key: key}, nil
}

// manufactures reports whether the peer is vtpmd setup (swtpm_setup), which makes a new vTPM;
// the peer was authorized for its state path already (it runs vtpmd).
func manufactures(p Peer) bool {
	info, err := proc.Inspect(p.PID)
	if err != nil || len(info.Args) == 0 {
		return false
	}
	return filepath.Base(info.Args[0]) == "swtpm_setup" || len(info.Args) > 1 && info.Args[1] == "setup"
}

// hasState reports whether the state at path holds any blob (TPM 2 or 1.2), or cannot be read.
func hasState(path string) bool {
	for _, tpm2 := range []bool{true, false} {
		st, err := store.Open(storeURI(path), store.Options{TPM2: tpm2})
		if err != nil {
			return true
		}
		states, err := st.States()
		st.Close()
		if err != nil || len(states) > 0 {
			return true
		}
	}
	return false
}

// newRecord makes a fresh state key, sealed to the hardware TPM and wrapped to the recovery
// key, and a record naming the VM from the registry.
func (s *Server) newRecord(ctx context.Context, path string, tpm2 bool) (*vmRecord, []byte, error) {
	key := make([]byte, stateKeySize)
	if _, err := rand.Read(key); err != nil {
		return nil, nil, err
	}
	sealed, err := s.hw.Seal(ctx, key)
	if err != nil {
		clear(key)
		return nil, nil, fmt.Errorf("seal a state key: %w", err)
	}
	rec := &vmRecord{StatePath: path, TPM2: tpm2, Sealed: sealed, Policy: s.hw.PolicyName(), Enrolled: time.Now().UTC()}
	if vm := s.vmOfPath(path); vm != nil {
		rec.UUID, rec.Name = vm.UUID, vm.Name
	}
	rec.ID = recordID(rec.UUID, path)
	if s.cfg.RecoveryKey != nil {
		if rec.Recovery, err = wrapRecovery(s.cfg.RecoveryKey, rec.ID, key); err != nil {
			clear(key)
			return nil, nil, err
		}
	}
	return rec, key, nil
}

// version records the state version an instance made durable. Versions only grow.
func (s *Server) version(ctx context.Context, p Peer, req *VersionReport) (*VMStatus, error) {
	path, err := s.instancePath(p, req.StatePath)
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	rec, err := s.ledger.enrolled(path)
	if err != nil {
		return nil, err
	}
	if req.Version > rec.Version || rec.AcceptOnce {
		old, accept := rec.Version, rec.AcceptOnce
		rec.Version, rec.AcceptOnce = req.Version, false
		if err := s.store.save(ctx, s.ledger); err != nil {
			rec.Version, rec.AcceptOnce = old, accept
			return nil, err
		}
	}
	rec.LastSeen = time.Now().UTC()
	st := rec.status()
	return &st, nil
}

// addRecord adds a record to the ledger durably (mu held); on failure the ledger is as before.
func (s *Server) addRecord(ctx context.Context, rec *vmRecord) error {
	s.ledger.VMs[rec.ID] = rec
	if err := s.store.save(ctx, s.ledger); err != nil {
		delete(s.ledger.VMs, rec.ID)
		return err
	}
	return nil
}

// instancePath is the clean state path of an instance's request, once the peer is known to
// be the process serving it.
func (s *Server) instancePath(p Peer, statePath string) (string, error) {
	path, err := cleanStatePath(statePath)
	if err != nil {
		return "", err
	}
	return path, authorizeInstance(p, path, s.cfg.InstanceExe)
}

// authorizeInstance lets a request through only from the process that serves the state at
// path: it runs vtpmd (exe), its command line names that state, and it runs as root or as the
// owner of that state. Processes of one uid can trace each other, so the uid is the real
// boundary; the rest keeps other programs of that uid from asking by mistake.
func authorizeInstance(p Peer, path, exe string) error {
	info, err := proc.Inspect(p.PID)
	if err != nil {
		return fmt.Errorf("%w: peer pid %d: %w", ErrForbidden, p.PID, err)
	}
	if !sameFile(info.Exe, exe) {
		return fmt.Errorf("%w: pid %d runs %s, not %s", ErrForbidden, p.PID, info.Exe, exe)
	}
	if statePathOfArgs(info.Args) != path {
		return fmt.Errorf("%w: pid %d does not serve %s", ErrForbidden, p.PID, path)
	}
	if p.UID == 0 {
		return nil
	}
	fi, err := os.Stat(path)
	if err != nil {
		return fmt.Errorf("%w: %w", ErrForbidden, err)
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); !ok || int(st.Uid) != p.UID {
		return fmt.Errorf("%w: uid %d does not own %s", ErrForbidden, p.UID, path)
	}
	return nil
}

func sameFile(a, b string) bool {
	fa, err := os.Stat(a)
	if err != nil {
		return false
	}
	fb, err := os.Stat(b)
	return err == nil && os.SameFile(fa, fb)
}

// statePathOfArgs finds the state location in a vtpmd/swtpm socket command line
// (--tpmstate dir=PATH or backend-uri=dir://PATH|file://PATH), or in a vtpmd setup /
// swtpm_setup one (--tpmstate or --tpm-state PATH, dir://PATH or file://PATH).
func statePathOfArgs(args []string) string {
	for i, a := range args {
		var v string
		switch {
		case (a == "--tpmstate" || a == "--tpm-state") && i+1 < len(args):
			v = args[i+1]
		case strings.HasPrefix(a, "--tpmstate="), strings.HasPrefix(a, "--tpm-state="):
			_, v, _ = strings.Cut(a, "=")
		default:
			continue
		}
		if !strings.Contains(v, "=") { // swtpm_setup: a path or a URI
			if clean, err := cleanStatePath(strings.TrimPrefix(strings.TrimPrefix(v, "dir://"), "file://")); err == nil {
				return clean
			}
			continue
		}
		set, err := opts.Parse(v, "dir", "backend-uri", "mode", "lock", "backup", "fsync")
		if err != nil {
			return ""
		}
		p := set.String("dir", "")
		if u := set.String("backend-uri", ""); u != "" {
			p = strings.TrimPrefix(strings.TrimPrefix(u, "dir://"), "file://")
		}
		if clean, err := cleanStatePath(p); err == nil {
			return clean
		}
	}
	return ""
}

// cleanStatePath is the absolute, clean form of a state location (a directory or a linear
// file), with symbolic links in its parents resolved, so that one vTPM has one name.
func cleanStatePath(p string) (string, error) {
	if p == "" || !filepath.IsAbs(p) {
		return "", fmt.Errorf("%w: state path %q must be absolute", errBadRequest, p)
	}
	p = filepath.Clean(p)
	if dir, err := filepath.EvalSymlinks(filepath.Dir(p)); err == nil {
		p = filepath.Join(dir, filepath.Base(p))
	}
	return p, nil
}

func (s *Server) vmOfPath(path string) *struct{ UUID, Name string } {
	recs, _ := s.cfg.Registry.List()
	for _, r := range recs {
		if r.StateDir != "" {
			if c, err := cleanStatePath(r.StateDir); err == nil && c == path {
				return &struct{ UUID, Name string }{r.UUID, r.Name}
			}
		}
	}
	return nil
}

// wrapRecovery encrypts a state key to the operator's recovery key (RSA-OAEP, SHA-256, the
// record's ID as label, so a wrap cannot be moved to another record).
func wrapRecovery(pub *rsa.PublicKey, id string, key []byte) ([]byte, error) {
	b, err := rsa.EncryptOAEP(sha256.New(), rand.Reader, pub, key, []byte(recoveryLabel+id))
	if err != nil {
		return nil, fmt.Errorf("wrap the state key to the recovery key: %w", err)
	}
	return b, nil
}

const recoveryLabel = "vtpmd recovery v1 "

func atomicWrite(path string, data []byte) error {
	return atomicfile.Write(path, data, atomicfile.Options{Perm: 0o600, ExactPerm: true})
}

// incomplete is the error for a record whose enrolment or unenrolment was interrupted.
func (r *vmRecord) incomplete() error {
	verb := map[string]string{phaseEnrolling: "enroll", phaseUnenrolling: "unenroll"}[r.Phase]
	return fmt.Errorf("%w: vTPM %s is %s: run 'vtpmd manager %s %s' again", ErrIncomplete, r.label(), r.Phase, verb, r.ID)
}

func (r *vmRecord) label() string {
	if r.Name != "" {
		return r.Name + " (" + r.ID + ")"
	}
	return r.ID
}

func (r *vmRecord) status() VMStatus {
	return VMStatus{ID: r.ID, Name: r.Name, UUID: r.UUID, StatePath: r.StatePath, Sealed: len(r.Sealed) > 0,
		Phase: r.Phase, Policy: r.Policy, Version: r.Version, LastSeen: r.LastSeen, Recovery: len(r.Recovery) > 0}
}
