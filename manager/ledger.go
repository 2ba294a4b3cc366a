package manager

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"github.com/vtpmd/vtpmd/internal/atomicfile"
)

// Phases of an enrolled vTPM's record.
const (
	phaseEnrolling   = "enrolling"   // key sealed; state files being re-encrypted
	phaseEnrolled    = "enrolled"    // every state file is encrypted with the sealed key
	phaseUnenrolling = "unenrolling" // state files being decrypted; the record goes when done
)

// vmRecord is the manager's record of one enrolled vTPM.
type vmRecord struct {
	ID        string          `json:"id"`
	Name      string          `json:"name,omitempty"`
	UUID      string          `json:"uuid,omitempty"`
	StatePath string          `json:"state_path"`
	TPM2      bool            `json:"tpm2"`
	Phase     string          `json:"phase"`
	Sealed    json.RawMessage `json:"sealed"`
	// Recovery is the state key wrapped to the operator's recovery public key (RSA-OAEP).
	Recovery []byte `json:"recovery,omitempty"`
	Policy   string `json:"policy"`
	// Version is the highest state version the vTPM reported durable.
	Version uint64 `json:"version"`
	// AcceptOnce lets the next start through whatever its version (vtpmd manager accept).
	AcceptOnce bool      `json:"accept_once,omitempty"`
	Enrolled   time.Time `json:"enrolled"`
	LastSeen   time.Time `json:"last_seen,omitzero"`
}

// ledger is every record, with the hardware counter value its last write carried.
type ledger struct {
	Counter uint64               `json:"counter"`
	VMs     map[string]*vmRecord `json:"vms"`
}

// ledgerFile is the ledger as stored: its JSON and an HMAC over it with a key that only the
// hardware TPM can unseal, so it cannot be edited off-line.
type ledgerFile struct {
	Ledger json.RawMessage `json:"ledger"`
	MAC    []byte          `json:"mac"`
}

// Counter is the hardware monotonic counter that dates the ledger.
type Counter interface {
	Increment(ctx context.Context) (uint64, error)
	Read(ctx context.Context) (uint64, error)
}

// ledgerStore reads and writes the ledger in the manager's directory.
type ledgerStore struct {
	path    string
	macKey  []byte
	counter Counter
	// behind says that a save failed after it asked for an increment, so the ledger on disk
	// may be one behind the hardware counter: the next save must not increment again (two
	// behind is a rollback at the next start). Guarded by the caller (Server.mu).
	behind bool
	// base is the hardware counter's value when the manager directory was made (sealed with
	// the ledger key): a missing ledger is a new one while the counter is at most base+1 (a
	// first save cut short); past that, a ledger existed and was removed: a rollback.
	base uint64
}

// saveTimeout bounds a save once it has begun: it is not cut short by the request that caused
// it going away, since an increment cut short may still have counted.
const saveTimeout = 30 * time.Second

const ledgerName = "ledger.json"

// maxLedgerSize bounds the ledger read back from disk.
const maxLedgerSize = 64 << 20

func (s *ledgerStore) mac(b []byte) []byte {
	m := hmac.New(sha256.New, s.macKey)
	m.Write([]byte("vtpmd manager ledger v1\x00"))
	m.Write(b)
	return m.Sum(nil)
}

// load reads the ledger and checks it against the hardware counter. A missing ledger is a new
// one only while the counter has not moved past the directory's base (and one save), and is
// written at once. The counter may be one ahead of the ledger: a crash between a save's increment and
// its write loses that last change (never acknowledged), which is the window the design
// accepts; more is a rollback.
//
// A ledger found one behind is stamped with the counter's value, without an increment, before
// it is used: the next save's increment must start from a ledger that matches the counter, or
// a second crash in the same window (the ledger then two behind) would be refused as a
// rollback and the manager would not start again. For the same reason a new ledger is
// written before the first save: a first save cut after its increment would otherwise leave
// no ledger and a counter past 1.
func (s *ledgerStore) load(ctx context.Context) (*ledger, error) {
	hw, err := s.counter.Read(ctx)
	if err != nil {
		return nil, fmt.Errorf("read hardware counter: %w", err)
	}
	raw, err := readLimited(s.path, maxLedgerSize)
	if errors.Is(err, fs.ErrNotExist) {
		if hw > s.base+1 {
			return nil, fmt.Errorf("%w: %s is missing but the counter is at %d (base %d)", ErrLedgerRollback, s.path, hw, s.base)
		}
		l := &ledger{Counter: hw, VMs: map[string]*vmRecord{}}
		if err := s.write(l); err != nil {
			return nil, err
		}
		return l, nil
	}
	if err != nil {
		return nil, err
	}
	var lf ledgerFile
	if err := json.Unmarshal(raw, &lf); err != nil {
		return nil, fmt.Errorf("ledger %s: %w", s.path, err)
	}
	if !hmac.Equal(lf.MAC, s.mac(lf.Ledger)) {
		return nil, fmt.Errorf("ledger %s: authentication failed (edited, or from another TPM)", s.path)
	}
	var l ledger
	if err := json.Unmarshal(lf.Ledger, &l); err != nil {
		return nil, fmt.Errorf("ledger %s: %w", s.path, err)
	}
	if l.VMs == nil {
		l.VMs = map[string]*vmRecord{}
	}
	if l.Counter != hw && l.Counter+1 != hw {
		return nil, fmt.Errorf("%w: %s carries counter %d, the TPM's counter is %d", ErrLedgerRollback, s.path, l.Counter, hw)
	}
	if l.Counter != hw {
		l.Counter = hw
		if err := s.write(&l); err != nil {
			return nil, err
		}
	}
	return &l, nil
}

// save increments the hardware counter, then writes the ledger with the new value durably.
// The ledger on disk is never more than one behind the counter: after a save that failed once
// it had asked for an increment (which may have counted: a TPM command cut short, a write
// that failed), the next save reads the counter and writes the ledger with its value instead
// of incrementing again.
func (s *ledgerStore) save(ctx context.Context, l *ledger) error {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), saveTimeout)
	defer cancel()
	var c uint64
	var err error
	if s.behind {
		if c, err = s.counter.Read(ctx); err != nil {
			return fmt.Errorf("read hardware counter: %w", err)
		}
	} else {
		s.behind = true
		if c, err = s.counter.Increment(ctx); err != nil {
			return fmt.Errorf("increment hardware counter: %w", err)
		}
	}
	l.Counter = c
	if err := s.write(l); err != nil {
		return err
	}
	s.behind = false
	return nil
}

// write writes the ledger as it is, counter included, atomically and durably.
func (s *ledgerStore) write(l *ledger) error {
	body, err := json.Marshal(l)
	if err != nil {
		return err
	}
	out, err := json.Marshal(ledgerFile{Ledger: body, MAC: s.mac(body)})
	if err != nil {
		return err
	}
	if err := atomicfile.Write(s.path, out, atomicfile.Options{Perm: 0o600, ExactPerm: true}); err != nil {
		return fmt.Errorf("write ledger: %w", err)
	}
	return nil
}

func readLimited(path string, limit int64) ([]byte, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|syscallNoFollow, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !fi.Mode().IsRegular() || fi.Size() > limit {
		return nil, fmt.Errorf("%s: not a regular file of at most %d bytes", path, limit)
	}
	b := make([]byte, fi.Size())
	if _, err := f.ReadAt(b, 0); err != nil && fi.Size() > 0 {
		return nil, err
	}
	return b, nil
}

// findByPath returns the record of the vTPM at statePath.
func (l *ledger) findByPath(statePath string) *vmRecord {
	for _, r := range l.VMs {
		if r.StatePath == statePath {
			return r
		}
	}
	return nil
}

// enrolled returns the record of the vTPM at statePath, or ErrNotEnrolled.
func (l *ledger) enrolled(statePath string) (*vmRecord, error) {
	if r := l.findByPath(statePath); r != nil {
		return r, nil
	}
	return nil, fmt.Errorf("%w: %s", ErrNotEnrolled, statePath)
}

// recordID names a vTPM: its VM's UUID when known, else a digest of its state path.
func recordID(uuid, statePath string) string {
	if uuid != "" {
		return uuid
	}
	h := sha256.Sum256([]byte(filepath.Clean(statePath)))
	return fmt.Sprintf("path-%x", h[:8])
}
