package libvirt

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"
)

// DefaultRegistryDir is where the hook keeps one JSON file per VM.
const DefaultRegistryDir = "/var/lib/vtpmd/registry"

// RegistryEnv overrides the registry directory (for tests and manual runs; libvirt runs hooks
// with a sanitized environment, so installed hooks get --registry baked in instead).
const RegistryEnv = "VTPMD_REGISTRY"

// maxEvents bounds a record's history; the oldest events are dropped first.
const maxEvents = 500

// maxRecordSize bounds a registry file read back from disk.
const maxRecordSize = 4 << 20

// ErrNotFound is returned when a VM has no registry record.
var ErrNotFound = errors.New("no registry record")

// ErrLocked is returned when the registry lock cannot be had within lockTimeout.
var ErrLocked = errors.New("registry busy")

// lockTimeout bounds the wait for the registry lock.
var lockTimeout = 10 * time.Second

// Record is everything the registry knows about one VM's vTPM.
type Record struct {
	UUID     string      `json:"uuid"`
	Name     string      `json:"name"`
	Backend  BackendType `json:"backend"`
	Model    string      `json:"model,omitempty"`
	Version  string      `json:"version,omitempty"`
	StateDir string      `json:"state_dir,omitempty"`
	Socket   string      `json:"socket,omitempty"`
	// PID is the vTPM process last seen for the VM (0 when it is known to be stopped).
	PID int `json:"pid,omitempty"`
	// Exe is /proc/PID/exe of that process when it was recorded.
	Exe        string    `json:"exe,omitempty"`
	Policy     *Policy   `json:"policy,omitempty"`
	Persistent bool      `json:"persistent_state,omitempty"`
	Updated    time.Time `json:"updated"`
	Events     []Event   `json:"events"`
}

// Event is one lifecycle step seen by the hook.
type Event struct {
	Time   time.Time `json:"time"`
	Op     string    `json:"op"`
	SubOp  string    `json:"subop,omitempty"`
	PID    int       `json:"pid,omitempty"`
	Detail string    `json:"detail,omitempty"`
	Error  string    `json:"error,omitempty"`
}

// Registry is a directory of VM records.
type Registry struct {
	Dir string
	now func() time.Time
}

// NewRegistry returns the registry in dir ("" means $VTPMD_REGISTRY, else DefaultRegistryDir).
func NewRegistry(dir string) *Registry {
	if dir == "" {
		dir = os.Getenv(RegistryEnv)
	}
	if dir == "" {
		dir = DefaultRegistryDir
	}
	return &Registry{Dir: filepath.Clean(dir), now: func() time.Time { return time.Now().UTC() }}
}

func (r *Registry) path(uuid string) (string, error) {
	if !ValidUUID(uuid) {
		return "", fmt.Errorf("%w: registry key %q is not a UUID", ErrInvalid, truncate(uuid, 64))
	}
	return filepath.Join(r.Dir, strings.ToLower(uuid)+".json"), nil
}

// lock takes the registry's exclusive lock; the returned func releases it.
func (r *Registry) lock() (func(), error) {
	if err := os.MkdirAll(r.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("registry: %w", err)
	}
	f, err := os.OpenFile(filepath.Join(r.Dir, ".lock"), os.O_RDWR|os.O_CREATE|syscall.O_NOFOLLOW, 0o600)
	if err != nil {
		return nil, fmt.Errorf("registry lock: %w", err)
	}
	// Bounded: a hook must not hang libvirt because another process sits on the lock.
	deadline := time.Now().Add(lockTimeout)
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			return func() { f.Close() }, nil
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) && !errors.Is(err, syscall.EINTR) {
			f.Close()
			return nil, fmt.Errorf("registry lock: %w", err)
		}
		if time.Now().After(deadline) {
			f.Close()
			return nil, fmt.Errorf("%w: registry %s locked for more than %v", ErrLocked, r.Dir, lockTimeout)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// Get reads the record of uuid.
func (r *Registry) Get(uuid string) (*Record, error) {
	p, err := r.path(uuid)
	if err != nil {
		return nil, err
	}
	return readRecord(p)
}

func readRecord(p string) (*Record, error) {
	f, err := os.OpenFile(p, os.O_RDONLY|syscall.O_NOFOLLOW, 0)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%w: %s", ErrNotFound, filepath.Base(p))
	}
	if err != nil {
		return nil, fmt.Errorf("registry: %w", err)
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, maxRecordSize+1))
	if err != nil {
		return nil, fmt.Errorf("registry: read %s: %w", p, err)
	}
	if len(data) > maxRecordSize {
		return nil, fmt.Errorf("registry: %s larger than %d bytes", p, maxRecordSize)
	}
	var rec Record
	if err := json.Unmarshal(data, &rec); err != nil {
		return nil, fmt.Errorf("registry: decode %s: %w", p, err)
	}
	return &rec, nil
}

// Update applies fn to the record of uuid (a fresh one when none exists) under the registry
// lock and writes the result atomically.
func (r *Registry) Update(uuid string, fn func(*Record) error) (*Record, error) {
	p, err := r.path(uuid)
	if err != nil {
		return nil, err
	}
	unlock, err := r.lock()
	if err != nil {
		return nil, err
	}
	defer unlock()
	rec, err := readRecord(p)
	if errors.Is(err, ErrNotFound) {
		rec, err = &Record{UUID: strings.ToLower(uuid)}, nil
	}
	if err != nil {
		return nil, err
	}
	if err := fn(rec); err != nil {
		return nil, err
	}
	if n := len(rec.Events); n > maxEvents {
		rec.Events = append([]Event(nil), rec.Events[n-maxEvents:]...)
	}
	rec.Updated = r.now()
	data, err := json.MarshalIndent(rec, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("registry: encode: %w", err)
	}
	if err := writeFileAtomic(p, append(data, '\n'), 0o600); err != nil {
		return nil, fmt.Errorf("registry: %w", err)
	}
	return rec, nil
}

// Append adds one event (timestamped now) and applies fn, if any, to the record.
func (r *Registry) Append(uuid string, ev Event, fn func(*Record)) (*Record, error) {
	return r.Update(uuid, func(rec *Record) error {
		if fn != nil {
			fn(rec)
		}
		if ev.Time.IsZero() {
			ev.Time = r.now()
		}
		rec.Events = append(rec.Events, ev)
		return nil
	})
}

// List returns all records, sorted by name then UUID. Unreadable files are reported in errs.
func (r *Registry) List() ([]*Record, []error) {
	entries, err := os.ReadDir(r.Dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, []error{fmt.Errorf("registry: %w", err)}
	}
	var recs []*Record
	var errs []error
	for _, e := range entries {
		n := e.Name()
		if !strings.HasSuffix(n, ".json") || !ValidUUID(strings.TrimSuffix(n, ".json")) {
			continue
		}
		rec, err := readRecord(filepath.Join(r.Dir, n))
		if err != nil {
			errs = append(errs, err)
			continue
		}
		recs = append(recs, rec)
	}
	sort.Slice(recs, func(i, j int) bool {
		if recs[i].Name != recs[j].Name {
			return recs[i].Name < recs[j].Name
		}
		return recs[i].UUID < recs[j].UUID
	})
	return recs, errs
}

// writeFileAtomic replaces p with data: temp file in the same directory, fsync, rename,
// directory fsync.
func writeFileAtomic(p string, data []byte, perm fs.FileMode) error {
	dir := filepath.Dir(p)
	f, err := os.CreateTemp(dir, "."+filepath.Base(p)+".tmp-*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	ok := false
	defer func() {
		if !ok {
			f.Close()
			os.Remove(tmp)
		}
	}()
	if _, err := f.Write(data); err != nil {
		return err
	}
	if err := f.Chmod(perm); err != nil {
		return err
	}
	if err := f.Sync(); err != nil {
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp, p); err != nil {
		return err
	}
	ok = true
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
