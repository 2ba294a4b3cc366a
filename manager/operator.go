package manager

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sort"
	"syscall"

	"github.com/vtpmd/vtpmd/backend/blob"
	"github.com/vtpmd/vtpmd/backend/store"
	"github.com/vtpmd/vtpmd/emulator"
	"github.com/vtpmd/vtpmd/internal/proc"
)

// Operator requests need root: they change which key protects a VM's state.
func authorizeOperator(p Peer) error {
	if p.UID != 0 {
		return fmt.Errorf("%w: uid %d is not root", ErrForbidden, p.UID)
	}
	return nil
}

func (s *Server) status(_ context.Context, p Peer, _ *struct{}) (*Status, error) {
	if err := authorizeOperator(p); err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	st := &Status{TPM: s.hw.Describe(), Counter: s.ledger.Counter}
	for _, r := range s.ledger.VMs {
		st.VMs = append(st.VMs, r.status())
	}
	sort.Slice(st.VMs, func(i, j int) bool { return st.VMs[i].StatePath < st.VMs[j].StatePath })
	return st, nil
}

// enroll seals a new key for an existing vTPM and re-encrypts its state in place. Every step
// is durable before the next: the sealed key is recorded (phase enrolling) before any file
// changes, each file is replaced atomically, and the record says enrolled only when all are.
// An interrupted enrolment is finished by running it again.
func (s *Server) enroll(ctx context.Context, p Peer, req *VMRequest) (*VMStatus, error) {
	if err := authorizeOperator(p); err != nil {
		return nil, err
	}
	path, err := s.resolveVM(req.VM)
	if err != nil {
		return nil, err
	}
	from, err := loadSourceKey(req.Source)
	if err != nil {
		return nil, err
	}
	defer from.Zero()
	s.mu.Lock()
	defer s.mu.Unlock()
	rec := s.ledger.findByPath(path)
	if rec != nil && rec.Phase != phaseEnrolling {
		return nil, fmt.Errorf("vTPM %s is already %s", rec.label(), rec.Phase)
	}
	tpm2, err := stateFamily(path)
	if err != nil {
		return nil, err
	}
	// before the record changes: a refused request must leave the vTPM able to start
	if err := checkIdle(path, tpm2); err != nil {
		return nil, err
	}
	var key []byte
	if rec == nil {
		if rec, key, err = s.newRecord(ctx, path, tpm2); err != nil {
			return nil, err
		}
		rec.Phase = phaseEnrolling
		if err := s.addRecord(ctx, rec); err != nil {
			clear(key)
			return nil, err
		}
	} else if key, err = s.hw.Unseal(ctx, rec.Sealed); err != nil {
		return nil, fmt.Errorf("unseal the state key of vTPM %s: %w", rec.label(), err)
	}
	to, err := blob.NewKey(key)
	clear(key)
	if err != nil {
		return nil, err
	}
	defer to.Zero()
	if err := reencrypt(path, tpm2, from, to); err != nil {
		return nil, fmt.Errorf("enrol vTPM %s: %w (run enroll again to finish)", rec.label(), err)
	}
	rec.Phase = phaseEnrolled
	if err := s.store.save(ctx, s.ledger); err != nil {
		return nil, err
	}
	s.log.Info("enrolled", "vm", rec.label(), "state", path)
	st := rec.status()
	return &st, nil
}

// unenroll decrypts a vTPM's state back to plain files (or to the --key given as Source) and
// forgets its key.
func (s *Server) unenroll(ctx context.Context, p Peer, req *VMRequest) (*VMStatus, error) {
	if err := authorizeOperator(p); err != nil {
		return nil, err
	}
	path, err := s.resolveVM(req.VM)
	if err != nil {
		return nil, err
	}
	to, err := loadSourceKey(req.Source)
	if err != nil {
		return nil, err
	}
	defer to.Zero()
	s.mu.Lock()
	defer s.mu.Unlock()
	rec, err := s.ledger.enrolled(path)
	if err != nil {
		return nil, err
	}
	if err := checkIdle(path, rec.TPM2); err != nil {
		return nil, err
	}
	key, err := s.hw.Unseal(ctx, rec.Sealed)
	if err != nil {
		return nil, fmt.Errorf("unseal the state key of vTPM %s: %w", rec.label(), err)
	}
	from, err := blob.NewKey(key)
	clear(key)
	if err != nil {
		return nil, err
	}
	defer from.Zero()
	if rec.Phase != phaseUnenrolling {
		rec.Phase = phaseUnenrolling
		if err := s.store.save(ctx, s.ledger); err != nil {
			return nil, err
		}
	}
	if err := reencrypt(path, rec.TPM2, from, to); err != nil {
		return nil, fmt.Errorf("unenrol vTPM %s: %w (run unenroll again to finish)", rec.label(), err)
	}
	delete(s.ledger.VMs, rec.ID)
	if err := s.store.save(ctx, s.ledger); err != nil {
		return nil, err
	}
	s.log.Info("unenrolled", "vm", rec.label(), "state", path)
	st := rec.status()
	st.Phase, st.Sealed = "unenrolled", false
	return &st, nil
}

// accept is the operator's override after a refused rollback: the next start is let through
// whatever its version, and that version becomes the record.
func (s *Server) accept(ctx context.Context, p Peer, req *VMRequest) (*VMStatus, error) {
	if err := authorizeOperator(p); err != nil {
		return nil, err
	}
	path, err := s.resolveVM(req.VM)
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	rec, err := s.ledger.enrolled(path)
	if err != nil {
		return nil, err
	}
	rec.AcceptOnce = true
	if err := s.store.save(ctx, s.ledger); err != nil {
		rec.AcceptOnce = false
		return nil, err
	}
	s.log.Warn("operator accepts the next start of this vTPM whatever its state version", "vm", rec.label(), "recorded", rec.Version, "peer_pid", p.PID)
	st := rec.status()
	return &st, nil
}

// resolveVM maps a registry UUID or name, a record ID, or a state path to a state path.
func (s *Server) resolveVM(vm string) (string, error) {
	if vm == "" {
		return "", fmt.Errorf("%w: no VM named", errBadRequest)
	}
	if vm[0] == '/' {
		return cleanStatePath(vm)
	}
	s.mu.Lock()
	for _, r := range s.ledger.VMs {
		if r.ID == vm || r.UUID == vm || r.Name == vm {
			s.mu.Unlock()
			return r.StatePath, nil
		}
	}
	s.mu.Unlock()
	recs, _ := s.cfg.Registry.List()
	for _, r := range recs {
		if (r.UUID == vm || r.Name == vm) && r.StateDir != "" {
			return cleanStatePath(r.StateDir)
		}
	}
	return "", fmt.Errorf("%w: no VM %q in the registry or the ledger (name a state directory instead)", errBadRequest, vm)
}

func loadSourceKey(opt string) (*blob.Key, error) {
	if opt == "" {
		return nil, nil
	}
	k, err := blob.LoadKeyOption(opt)
	if err != nil {
		return nil, fmt.Errorf("%w: key %w", errBadRequest, err)
	}
	return k, nil
}

// stateFamily tells TPM 2 from TPM 1.2 state by its files.
func stateFamily(path string) (bool, error) {
	for _, tpm2 := range []bool{true, false} {
		st, err := store.Open(storeURI(path), store.Options{TPM2: tpm2})
		if err != nil {
			return false, err
		}
		states, err := st.States()
		st.Close()
		if err == nil && len(states) > 0 {
			return tpm2, nil
		}
	}
	return false, fmt.Errorf("%w: no TPM state at %s", errBadRequest, path)
}

func storeURI(path string) string {
	if fi, err := os.Stat(path); err == nil && fi.Mode().IsRegular() {
		return "file://" + path
	}
	return "dir://" + path
}

// checkIdle refuses a state that a vTPM serves: a running instance names it, or its lock is
// held. enroll and unenroll check it before they change the record, since a record left
// enrolling or unenrolling stops the vTPM's next start; reencrypt checks again under the lock.
func checkIdle(path string, tpm2 bool) error {
	if len(proc.FindInstances("dir", path)) > 0 {
		return errInUse(path)
	}
	st, err := store.Open(storeURI(path), store.Options{TPM2: tpm2, Lock: true})
	if err != nil {
		return err
	}
	defer st.Close()
	if err := st.Lock(0); err != nil {
		return fmt.Errorf("%s is in use (its lock is held): stop the VM first: %w", path, err)
	}
	return nil
}

func errInUse(path string) error {
	return fmt.Errorf("%s is in use by a running vTPM: stop the VM first", path)
}

// reencrypt rewrites every blob of the state at path from key `from` to key `to` (either nil:
// plain), under the state lock, keeping each file's owner and mode. A blob that already opens
// with `to` is left alone, so an interrupted run is finished by running it again.
func reencrypt(path string, tpm2 bool, from, to *blob.Key) error {
	if len(proc.FindInstances("dir", path)) > 0 {
		return errInUse(path)
	}
	uri := storeURI(path)
	src, err := store.Open(uri, store.Options{TPM2: tpm2, StateKey: from, Lock: true})
	if err != nil {
		return err
	}
	defer src.Close()
	if err := src.Lock(0); err != nil {
		return fmt.Errorf("%s is in use (its lock is held): stop the VM first: %w", path, err)
	}
	dst, err := store.Open(uri, store.Options{TPM2: tpm2, StateKey: to})
	if err != nil {
		return err
	}
	defer dst.Close()
	owner := ownerOf(path)
	for _, t := range []emulator.StateType{emulator.StatePermanent, emulator.StateVolatile, emulator.StateSave} {
		if b, err := dst.Load(t); err == nil {
			clear(b)
			continue
		}
		plain, err := src.Load(t)
		if errors.Is(err, emulator.ErrNotExist) {
			continue
		}
		if err != nil {
			return fmt.Errorf("read %s: %w", t.Name(), err)
		}
		err = dst.Store(t, plain)
		clear(plain)
		if err != nil {
			return fmt.Errorf("write %s: %w", t.Name(), err)
		}
	}
	return owner.restore(path)
}

type fileOwner struct {
	uid, gid int
	ok       bool
}

func ownerOf(path string) fileOwner {
	fi, err := os.Stat(path)
	if err != nil {
		return fileOwner{}
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	return fileOwner{int(st.Uid), int(st.Gid), ok}
}

// restore gives the state files back to the owner of the state directory (the manager runs
// as root; the vTPM as tss or qemu).
func (o fileOwner) restore(path string) error {
	if !o.ok || os.Getuid() != 0 {
		return nil
	}
	if fi, err := os.Stat(path); err == nil && fi.Mode().IsRegular() {
		return os.Chown(path, o.uid, o.gid)
	}
	entries, err := os.ReadDir(path)
	if err != nil {
		return err
	}
	for _, e := range entries {
		if e.Type().IsRegular() {
			if err := os.Lchown(path+"/"+e.Name(), o.uid, o.gid); err != nil {
				return err
			}
		}
	}
	return nil
}
