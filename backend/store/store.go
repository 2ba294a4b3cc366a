package store

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vtpmd/vtpmd/backend/blob"
	"github.com/vtpmd/vtpmd/emulator"
)

// ErrLocked means another process (vtpmd or swtpm) holds the state lock.
var ErrLocked = errors.New("store: state is locked by another process")

// Options configure a Store.
type Options struct {
	TPM2 bool
	// Mode is the state file mode; with ModeSet it is applied exactly (umask ignored) and
	// existing files are chmod'ed on load, as swtpm's explicit mode= does.
	Mode    uint32
	ModeSet bool
	// Lock enables the state lock (swtpm: on by default for dir://, off for file://).
	Lock bool
	// StateKey encrypts stored blobs (--key).
	StateKey *blob.Key
	// NoFsync skips fsync (benchmarks only; --tpmstate ...,fsync=false).
	NoFsync bool
}

// State is one stored blob, for --print-states.
type State struct {
	Name string
	Size int64
}

// backend is where the blobs physically live.
type backend interface {
	read(name string) ([]byte, error) // fs.ErrNotExist when absent
	write(name string, data []byte) error
	remove(name string) error
	lockPath() string
	close() error
}

// Store is a vTPM's state store. It implements emulator.Store.
type Store struct {
	opts   Options
	be     backend
	lockFD int // -1 when not locked
}

// syncer is implemented by backends that can defer fsync to a later Sync.
type syncer interface {
	deferSync(on bool)
	sync() error
}

// Defer makes writes skip their own fsync until Sync. It is for sequences that answer nobody
// in between (libtpms writes permall several times while it powers on): they pay for one
// fsync of each file and the directory instead of one per write. The rename still makes each
// write atomic; Sync makes them durable.
func (s *Store) Defer() {
	if sy, ok := s.be.(syncer); ok {
		sy.deferSync(true)
	}
}

// Sync makes every write since Defer durable and ends the deferral.
func (s *Store) Sync() error {
	if sy, ok := s.be.(syncer); ok {
		defer sy.deferSync(false)
		return sy.sync()
	}
	return nil
}

// Open opens a state location: "dir://<dir>", "file://<path>", or a bare directory path.
func Open(uri string, o Options) (*Store, error) {
	if o.Mode == 0 {
		o.Mode = 0o640
	}
	s := &Store{opts: o, lockFD: -1}
	switch {
	case strings.HasPrefix(uri, "file://"):
		be, err := openLinear(strings.TrimPrefix(uri, "file://"), o)
		if err != nil {
			return nil, err
		}
		s.be = be
	default:
		dir := strings.TrimPrefix(uri, "dir://")
		if dir == "" {
			return nil, errors.New("store: empty state directory")
		}
		st, err := os.Stat(dir)
		if err != nil {
			return nil, fmt.Errorf("store: state directory %s: %w", dir, err)
		}
		if !st.IsDir() {
			return nil, fmt.Errorf("store: %s is not a directory", dir)
		}
		s.be = &dirBackend{dir: dir, opts: o}
	}
	return s, nil
}

func (s *Store) name(t emulator.StateType) string { return t.Name() }

// Load returns the decoded libtpms blob.
func (s *Store) Load(t emulator.StateType) ([]byte, error) {
	raw, err := s.be.read(s.name(t))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("load %s: %w", t.Name(), emulator.ErrNotExist)
	}
	if err != nil {
		return nil, fmt.Errorf("load %s: %w", t.Name(), err)
	}
	plain, err := blob.Open(raw, s.opts.StateKey)
	if err != nil {
		return nil, fmt.Errorf("load %s state: %w", t.Name(), err)
	}
	return plain, nil
}

// LoadRaw returns the blob as stored (header and TLVs).
func (s *Store) LoadRaw(t emulator.StateType) ([]byte, error) {
	raw, err := s.be.read(s.name(t))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("load %s: %w", t.Name(), emulator.ErrNotExist)
	}
	return raw, err
}

// Store seals and durably writes a blob.
func (s *Store) Store(t emulator.StateType, plain []byte) error {
	sealed, err := blob.Seal(plain, s.opts.StateKey)
	if err != nil {
		return fmt.Errorf("seal %s: %w", t.Name(), err)
	}
	if err := s.be.write(s.name(t), sealed); err != nil {
		return fmt.Errorf("store %s: %w", t.Name(), err)
	}
	return nil
}

// Delete removes a blob; a missing one is an error only when mustExist.
func (s *Store) Delete(t emulator.StateType, mustExist bool) error {
	err := s.be.remove(s.name(t))
	if errors.Is(err, fs.ErrNotExist) {
		if mustExist {
			return fmt.Errorf("delete %s: %w", t.Name(), emulator.ErrNotExist)
		}
		return nil
	}
	return err
}

// States lists the stored blobs with their sizes, in swtpm's order.
func (s *Store) States() ([]State, error) {
	var out []State
	for _, t := range []emulator.StateType{emulator.StatePermanent, emulator.StateVolatile, emulator.StateSave} {
		raw, err := s.be.read(s.name(t))
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, err
		}
		out = append(out, State{Name: t.Name(), Size: int64(len(raw))})
	}
	return out, nil
}

// Lock takes the state lock, retrying every 10 ms up to retries times. Without Options.Lock
// it does nothing.
func (s *Store) Lock(retries int) error {
	if !s.opts.Lock || s.lockFD >= 0 {
		return nil
	}
	path := s.be.lockPath()
	flags := unix.O_WRONLY | unix.O_CREAT | unix.O_NOFOLLOW | unix.O_CLOEXEC
	fd, err := unix.Open(path, flags, 0o660)
	if err != nil {
		return fmt.Errorf("could not open lockfile %s: %w", path, err)
	}
	lk := unix.Flock_t{Type: unix.F_WRLCK, Whence: 0, Start: 0, Len: 0}
	for i := 0; ; i++ {
		err = unix.FcntlFlock(uintptr(fd), unix.F_OFD_SETLK, &lk)
		if err == nil {
			s.lockFD = fd
			return nil
		}
		if i >= retries || (!errors.Is(err, unix.EAGAIN) && !errors.Is(err, unix.EACCES)) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	unix.Close(fd)
	return fmt.Errorf("%w: could not lock %s: %v", ErrLocked, path, err)
}

// Unlock releases the state lock.
func (s *Store) Unlock() {
	if s.lockFD >= 0 {
		unix.Close(s.lockFD)
		s.lockFD = -1
	}
}

// Locked reports whether the lock is held (always true when locking is off).
func (s *Store) Locked() bool { return !s.opts.Lock || s.lockFD >= 0 }

// Close releases the lock and the backend.
func (s *Store) Close() error {
	s.Unlock()
	return s.be.close()
}

// dirBackend is swtpm's directory layout.
type dirBackend struct {
	dir      string
	opts     Options
	deferred bool            // fsync postponed until sync
	dirty    map[string]bool // files renamed into place while deferred
}

func (d *dirBackend) deferSync(on bool) {
	d.deferred = on
	if on && d.dirty == nil {
		d.dirty = map[string]bool{}
	}
}

func (d *dirBackend) sync() error {
	if d.opts.NoFsync {
		return nil
	}
	for p := range d.dirty {
		f, err := os.Open(p)
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				continue
			}
			return err
		}
		err = f.Sync()
		f.Close()
		if err != nil {
			return fmt.Errorf("fsync %s: %w", p, err)
		}
	}
	clear(d.dirty)
	f, err := os.Open(d.dir)
	if err != nil {
		return fmt.Errorf("open state directory: %w", err)
	}
	defer f.Close()
	return f.Sync()
}

func (d *dirBackend) file(name string) string {
	if d.opts.TPM2 {
		return filepath.Join(d.dir, "tpm2-00."+name)
	}
	return filepath.Join(d.dir, "tpm-00."+name)
}

func (d *dirBackend) tmp(name string) string {
	if d.opts.TPM2 {
		return filepath.Join(d.dir, "TMP2-00."+name)
	}
	return filepath.Join(d.dir, "TMP-00."+name)
}

func (d *dirBackend) lockPath() string { return filepath.Join(d.dir, ".lock") }
func (d *dirBackend) close() error     { return nil }

func (d *dirBackend) read(name string) ([]byte, error) {
	p := d.file(name)
	f, err := os.OpenFile(p, os.O_RDONLY|unix.O_NOFOLLOW, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !st.Mode().IsRegular() {
		return nil, fmt.Errorf("%s is not a regular file", p)
	}
	if st.Size() > maxBlob {
		return nil, fmt.Errorf("%s: %d bytes is larger than any TPM state (%d)", p, st.Size(), maxBlob)
	}
	if d.opts.ModeSet && uint32(st.Mode().Perm()) != d.opts.Mode {
		_ = f.Chmod(os.FileMode(d.opts.Mode))
	}
	b := make([]byte, st.Size())
	if _, err := f.ReadAt(b, 0); err != nil && st.Size() > 0 {
		return nil, fmt.Errorf("read %s: %w", p, err)
	}
	return b, nil
}

// maxBlob bounds what is read as one state blob.
const maxBlob = 16 << 20

func (d *dirBackend) write(name string, data []byte) error {
	tmp, final := d.tmp(name), d.file(name)
	if d.opts.ModeSet {
		old := unix.Umask(0)
		defer unix.Umask(old)
	}
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC|unix.O_NOFOLLOW, os.FileMode(d.opts.Mode))
	if err != nil {
		return fmt.Errorf("create %s: %w", tmp, err)
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		os.Remove(tmp)
		return fmt.Errorf("write %s: %w", tmp, err)
	}
	if !d.opts.NoFsync && !d.deferred {
		if err := f.Sync(); err != nil {
			f.Close()
			os.Remove(tmp)
			return fmt.Errorf("fsync %s: %w", tmp, err)
		}
	}
	if err := f.Close(); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("close %s: %w", tmp, err)
	}
	if err := os.Rename(tmp, final); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("rename %s: %w", final, err)
	}
	if d.deferred {
		d.dirty[final] = true
		return nil
	}
	return d.syncDir()
}

func (d *dirBackend) syncDir() error {
	if d.opts.NoFsync || d.deferred {
		return nil
	}
	f, err := os.Open(d.dir)
	if err != nil {
		return fmt.Errorf("open state directory: %w", err)
	}
	defer f.Close()
	if err := f.Sync(); err != nil {
		return fmt.Errorf("fsync state directory %s: %w", d.dir, err)
	}
	return nil
}

func (d *dirBackend) remove(name string) error {
	if err := os.Remove(d.file(name)); err != nil {
		return err
	}
	return d.syncDir()
}
