package registry

import (
	"context"
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

	"github.com/vtpmd/vtpmd/internal/atomicfile"
	"github.com/vtpmd/vtpmd/internal/uuidstr"
)

// DefaultDir is where the registry keeps one JSON file per VM.
const DefaultDir = "/var/lib/vtpmd/registry"

// DirEnv names the environment variable that overrides the registry directory (for tests and
// manual runs; libvirt runs hooks with a sanitized environment, so installed hooks get
// --registry baked in instead).
const DirEnv = "VTPMD_REGISTRY"

// maxEvents bounds a record's history; the oldest events are dropped first.
const maxEvents = 500

// maxRecordSize bounds a registry file read back from disk.
const maxRecordSize = 4 << 20

// Sentinel errors.
var (
	// ErrNotFound is returned when a VM has no registry record.
	ErrNotFound = errors.New("no registry record")
	// ErrLocked is returned when the registry lock cannot be had within lockTimeout.
	ErrLocked = errors.New("registry busy")
	// ErrBadUUID is returned for a record key that is not a UUID.
	ErrBadUUID = errors.New("registry key is not a UUID")
)

// lockTimeout bounds the wait for the registry lock.
var lockTimeout = 10 * time.Second

// Registry is a directory of VM records.
type Registry struct {
	Dir string
	now func() time.Time
}

// New returns the registry in dir ("" means $VTPMD_REGISTRY, else DefaultDir).
func New(dir string) *Registry {
	if dir == "" {
		dir = os.Getenv(DirEnv)
	}
	if dir == "" {
		dir = DefaultDir
	}
	return &Registry{Dir: filepath.Clean(dir), now: func() time.Time { return time.Now().UTC() }}
}

func (r *Registry) path(uuid string) (string, error) {
	if !uuidstr.Valid(uuid) {
		if len(uuid) > 64 {
			uuid = uuid[:64] + "..."
		}
		return "", fmt.Errorf("%w: %q", ErrBadUUID, uuid)
	}
	return filepath.Join(r.Dir, strings.ToLower(uuid)+".json"), nil
}

// lock takes the registry's exclusive lock; the returned func releases it. It waits at most
// lockTimeout, or until ctx ends: a hook must not hang libvirt because another process sits on
// the lock.
func (r *Registry) lock(ctx context.Context) (func(), error) {
	if err := os.MkdirAll(r.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("registry: %w", err)
	}
	f, err := os.OpenFile(filepath.Join(r.Dir, ".lock"), os.O_RDWR|os.O_CREATE|syscall.O_NOFOLLOW, 0o600)
	if err != nil {
		return nil, fmt.Errorf("registry lock: %w", err)
	}
	deadline := time.NewTimer(lockTimeout)
	defer deadline.Stop()
	retry := time.NewTicker(5 * time.Millisecond)
	defer retry.Stop()
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			return func() { f.Close() }, nil
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) && !errors.Is(err, syscall.EINTR) {
			f.Close()
			return nil, fmt.Errorf("registry lock: %w", err)
		}
		select {
		case <-deadline.C:
			f.Close()
			return nil, fmt.Errorf("%w: registry %s locked for more than %v", ErrLocked, r.Dir, lockTimeout)
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("registry lock: %w", ctx.Err())
		case <-retry.C:
		}
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
func (r *Registry) Update(ctx context.Context, uuid string, fn func(*Record) error) (*Record, error) {
	p, err := r.path(uuid)
	if err != nil {
		return nil, err
	}
	unlock, err := r.lock(ctx)
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
	if err := atomicfile.Write(p, append(data, '\n'), atomicfile.Options{Perm: 0o600, ExactPerm: true}); err != nil {
		return nil, fmt.Errorf("registry: %w", err)
	}
	return rec, nil
}

// Append adds one event (timestamped now unless it has a time) and applies fn, if any, to the
// record.
func (r *Registry) Append(ctx context.Context, uuid string, ev Event, fn func(*Record)) (*Record, error) {
	return r.Update(ctx, uuid, func(rec *Record) error {
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
		if !strings.HasSuffix(n, ".json") || !uuidstr.Valid(strings.TrimSuffix(n, ".json")) {
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
