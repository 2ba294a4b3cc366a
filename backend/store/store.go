package store

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vtpmd/vtpmd/backend/blob"
	"github.com/vtpmd/vtpmd/emulator"
	"github.com/vtpmd/vtpmd/internal/atomicfile"
)

var (
	// ErrLocked is wrapped when another process (vtpmd or swtpm) holds the state lock.
	ErrLocked = errors.New("state is locked by another process")
	// ErrClosed is returned by every method after Close.
	ErrClosed = errors.New("store closed")
	// ErrRollback is wrapped when a versioned store's newest blob is older than
	// Options.MinVersion: the state was rolled back (or deleted).
	ErrRollback = errors.New("state is older than the version expected (rollback)")
)

// DefaultMode is the state file mode when Options.Mode is 0 (swtpm's default).
const DefaultMode = 0o640

// Options configure a Store.
type Options struct {
	// TPM2 selects the TPM 2 file names (tpm2-00.*); otherwise TPM 1.2's (tpm-00.*).
	TPM2 bool
	// Mode is the mode of created state files (0 means DefaultMode), subject to the umask.
	// With ModeSet it is applied exactly (swtpm's explicit mode=): created files get it
	// regardless of the umask and loaded files are chmod'ed to it.
	Mode    uint32
	ModeSet bool
	// Lock enables the state lock (swtpm: on by default for dir://, off for file://).
	Lock bool
	// StateKey encrypts stored blobs (--key); nil stores them in the clear.
	StateKey *blob.Key
	// NoFsync skips every fsync (benchmarks and tests only; a crash may then lose writes).
	NoFsync bool

	// Versioned stamps every blob written with a state version (blob.SealVersioned): the next
	// number of a counter that only grows, authenticated with StateKey, which Versioned
	// needs. Open, and Lock once it holds the lock, read the versions stored and continue
	// the counter from the highest. See the package comment.
	Versioned bool
	// MinVersion, with Versioned, is the host manager's record of the last durable write:
	// Open and Lock refuse, with an error wrapping ErrRollback and without changing anything,
	// state whose newest blob is older, no state at all, and state that is not whole (a blob
	// other than the version the newest one was written beside). 0 accepts any state.
	MinVersion uint64
	// OnWrite, with Versioned, is told of each blob made durable and its version: after the
	// write is durable, before Store (or Sync) returns, with the store's mutex held (it must
	// not call the Store). An error fails the Store or Sync; the blob stays written.
	OnWrite func(t emulator.StateType, version uint64) error
}

// State is one stored blob, for --print-states.
type State struct {
	Name string
	Size int64 // stored size, swtpm header included
}

// backend is where the blobs physically live.
type backend interface {
	read(name string) ([]byte, error) // fs.ErrNotExist when absent
	size(name string) (int64, error)  // stored size; fs.ErrNotExist when absent
	// apply makes the changes, in order, atomically per blob and durably as a whole before
	// it returns (one fsync per file and directory touched). Deleting a missing blob is not
	// an error.
	apply(changes []change) error
	loaded(name string) error // called after a successful Load (file mode fix-ups)
	// prepare is swtpm's backend preparation when a store is opened: file:// formats a store
	// without the magic (formatted reports it); dir:// has nothing to do.
	prepare() (formatted bool, err error)
	lockFile() (path string, flags int, perm uint32, block bool) // block: may be a block device
	String() string
}

// change is one blob write (data) or deletion (del). A versioned write carries the stamp it
// was sealed with (final once it is written).
type change struct {
	name  string
	data  []byte
	del   bool
	t     emulator.StateType
	stamp blob.Stamp
}

// Store is a vTPM's state store in swtpm's layout and formats. It implements emulator.Store
// and is safe for concurrent use.
type Store struct {
	mu      sync.Mutex
	opts    Options
	be      backend
	lockFD  int // -1 when not locked
	closed  bool
	pending map[string]change // writes held back between Defer and Sync; nil when not deferred
	// formatted: Open formatted a file:// store without the magic (see Formatted)
	formatted bool

	versions // with Options.Versioned (see version.go)
}

// Open opens a state location: "dir://<dir>", "file://<file-or-block-device>", or a bare
// directory path. The directory (or the file's directory) must exist. Open does not take the
// lock. It changes nothing on disk but what swtpm changes when it opens its backend: a file://
// store without swtpm's magic (a file that does not exist, an empty or foreign file, a zeroed
// block device) is formatted as a new, empty linear store, durably (Formatted reports it).
func Open(uri string, o Options) (*Store, error) {
	if o.Mode == 0 {
		o.Mode = DefaultMode
	}
	if o.Mode > 0o777 {
		return nil, fmt.Errorf("store: mode %#o is not a permission mode", o.Mode)
	}
	if err := checkVersioning(o); err != nil {
		return nil, err
	}
	s := &Store{opts: o, lockFD: -1}
	var err error
	switch {
	case strings.HasPrefix(uri, "file://"):
		s.be, err = openLinear(strings.TrimPrefix(uri, "file://"), o)
	case strings.Contains(uri, "://") && !strings.HasPrefix(uri, "dir://"):
		err = fmt.Errorf("store: unsupported backend URI %q (want dir:// or file://)", uri)
	default:
		s.be, err = openDir(strings.TrimPrefix(uri, "dir://"), o)
	}
	if err != nil {
		return nil, err
	}
	if s.formatted, err = s.be.prepare(); err != nil {
		return nil, err
	}
	if o.StateKey != nil {
		if s.versionKey, err = blob.NewVersionKey(o.StateKey); err != nil {
			return nil, fmt.Errorf("store: %w", err)
		}
	}
	if o.Versioned {
		if err := s.readVersionsLocked(); err != nil {
			s.versionKey.Zero()
			return nil, err
		}
	}
	return s, nil
}

// String names the location, e.g. "dir:///var/lib/swtpm/x".
func (s *Store) String() string { return s.be.String() }

// Formatted reports whether Open formatted the location as a new, empty linear store, where
// swtpm says FormatNotice.
func (s *Store) Formatted() bool { return s.formatted }

// FormatNotice is what swtpm says when it formats a linear store as it opens it (on stderr, or
// in its --log file): "Formatting '<uri>' as new linear NVRAM store".
func (s *Store) FormatNotice() string {
	return fmt.Sprintf("Formatting '%s' as new linear NVRAM store", s.be)
}

func blobName(t emulator.StateType) (string, error) {
	switch t {
	case emulator.StatePermanent, emulator.StateVolatile, emulator.StateSave:
		return t.Name(), nil
	}
	return "", fmt.Errorf("store: unknown state type %d", int(t))
}

func (s *Store) begin(t emulator.StateType) (string, error) {
	if s.closed {
		return "", ErrClosed
	}
	return blobName(t)
}

// Load returns the libtpms blob (blob.Open of the stored bytes with Options.StateKey). A
// missing blob gives an error wrapping emulator.ErrNotExist; bad data an error wrapping one of
// package blob's sentinels. A failed Load changes nothing on disk; a successful one applies
// swtpm's mode fix-ups (chmod to an explicit mode; owner write added).
func (s *Store) Load(t emulator.StateType) ([]byte, error) {
	plain, _, err := s.LoadVersioned(t)
	return plain, err
}

// LoadVersioned is Load that also returns the blob's state version: 0 for a blob without one
// (written by swtpm, or without Versioned) and for every blob of a store without a state key;
// for a write held back by Defer, the version it would take if it were written now (Sync
// numbers it when it writes it). With a state key, a blob whose version does not
// authenticate (tampered, or moved from another blob) is refused with an error wrapping
// blob.ErrVersionAuth, which is a blob.ErrDecrypt, whether or not the store is Versioned.
func (s *Store) LoadVersioned(t emulator.StateType) ([]byte, uint64, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	name, err := s.begin(t)
	if err != nil {
		return nil, 0, err
	}
	raw, fromDisk, err := s.readLocked(name)
	if err != nil {
		return nil, 0, err
	}
	var plain []byte
	var stamp blob.Stamp
	if s.versionKey != nil {
		plain, stamp, err = blob.OpenVersioned(raw, s.opts.StateKey, s.versionKey, name)
	} else {
		plain, err = blob.Open(raw, s.opts.StateKey)
	}
	if err != nil {
		return nil, 0, fmt.Errorf("load %s from %s: %w", name, s.be, err)
	}
	if fromDisk {
		if err := s.be.loaded(name); err != nil {
			return nil, 0, fmt.Errorf("load %s from %s: %w", name, s.be, err)
		}
	}
	return plain, stamp.Version, nil
}

// readLocked returns the stored bytes, from the pending writes while deferred.
func (s *Store) readLocked(name string) (raw []byte, fromDisk bool, err error) {
	if c, ok := s.pending[name]; ok {
		if c.del {
			return nil, false, fmt.Errorf("load %s from %s: deleted: %w", name, s.be, emulator.ErrNotExist)
		}
		return bytes.Clone(c.data), false, nil
	}
	raw, err = s.be.read(name)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, false, fmt.Errorf("load %s from %s: %w", name, s.be, emulator.ErrNotExist)
	}
	if err != nil {
		return nil, false, fmt.Errorf("load %s: %w", name, err)
	}
	return raw, true, nil
}

// existsLocked reports whether a blob is stored (or pending).
func (s *Store) existsLocked(name string) (bool, error) {
	if c, ok := s.pending[name]; ok {
		return !c.del, nil
	}
	_, err := s.be.size(name)
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	return err == nil, err
}

// LoadRaw returns the blob as stored (swtpm header and TLVs), without decoding it.
func (s *Store) LoadRaw(t emulator.StateType) ([]byte, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	name, err := s.begin(t)
	if err != nil {
		return nil, err
	}
	raw, _, err := s.readLocked(name)
	return raw, err
}

// Store seals the libtpms blob (blob.Seal with Options.StateKey; blob.SealVersioned with the
// next version when Versioned) and writes it durably: when Store returns nil the new blob
// survives a crash (unless NoFsync or Defer is in effect), and a crash before that leaves the
// previous blob (see the package comment for file://).
func (s *Store) Store(t emulator.StateType, plain []byte) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	name, err := s.begin(t)
	if err != nil {
		return err
	}
	c := change{name: name, t: t}
	if s.opts.Versioned {
		c.data, c.stamp, err = s.sealVersionedLocked(name, plain)
	} else {
		c.data, err = blob.Seal(plain, s.opts.StateKey)
	}
	if err != nil {
		return fmt.Errorf("store %s: %w", name, err)
	}
	if s.pending != nil {
		s.pending[name] = c
		return nil
	}
	if err := s.commitLocked([]change{c}); err != nil {
		return fmt.Errorf("store %s: %w", name, err)
	}
	return nil
}

// commitLocked makes changes durable (see backend.apply), through the version bookkeeping
// when the store is versioned.
func (s *Store) commitLocked(changes []change) error {
	if s.opts.Versioned {
		return s.commitVersionedLocked(changes)
	}
	return s.be.apply(changes)
}

// Delete removes a blob; a missing one is an error (wrapping emulator.ErrNotExist) only when
// mustExist.
func (s *Store) Delete(t emulator.StateType, mustExist bool) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	name, err := s.begin(t)
	if err != nil {
		return err
	}
	exists, err := s.existsLocked(name)
	if err != nil {
		return fmt.Errorf("delete %s: %w", name, err)
	}
	if !exists {
		if mustExist {
			return fmt.Errorf("delete %s from %s: %w", name, s.be, emulator.ErrNotExist)
		}
		return nil
	}
	c := change{name: name, del: true, t: t}
	if s.pending != nil {
		s.pending[name] = c
		return nil
	}
	if err := s.commitLocked([]change{c}); err != nil {
		return fmt.Errorf("delete %s: %w", name, err)
	}
	return nil
}

// States lists the stored blobs with their stored sizes, in swtpm's order (permall,
// volatilestate, savestate), for --print-states. It needs no lock and changes nothing.
func (s *Store) States() ([]State, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, ErrClosed
	}
	var out []State
	for _, name := range blobNames {
		if c, ok := s.pending[name]; ok {
			if !c.del {
				out = append(out, State{Name: name, Size: int64(len(c.data))})
			}
			continue
		}
		n, err := s.be.size(name)
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("states of %s: %w", s.be, err)
		}
		out = append(out, State{Name: name, Size: n})
	}
	return out, nil
}

// blobNames are the blobs in swtpm's order.
var blobNames = []string{"permall", "volatilestate", "savestate"}

// Defer holds writes and deletions back until Sync, for sequences that answer nobody in
// between (libtpms may write permall several times while it powers on). Load, LoadRaw, Delete
// and States see the held-back changes. Nothing reaches the disk before Sync, so a crash
// during the sequence leaves the previous state intact; Sync then writes each blob once, with
// the usual atomic, durable replacement.
func (s *Store) Defer() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.pending == nil {
		s.pending = map[string]change{}
	}
}

// Sync writes the changes held back since Defer (atomically per blob, durably before it
// returns) and ends the deferral. On error the changes not yet written are dropped, so a
// later Load sees what is on disk.
func (s *Store) Sync() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	pending := s.pending
	s.pending = nil
	if s.closed {
		return ErrClosed
	}
	var changes []change
	for _, name := range blobNames {
		if c, ok := pending[name]; ok {
			changes = append(changes, c)
		}
	}
	if len(changes) == 0 {
		return nil
	}
	if err := s.commitLocked(changes); err != nil {
		return fmt.Errorf("sync %s: %w", s.be, err)
	}
	return nil
}

// Lock takes the state lock, trying retries more times 10 ms apart. The lock is an
// open-file-description (OFD) write lock on <dir>/.lock (file://: on the file itself), which
// conflicts with the classic fcntl lock swtpm takes there. The lock file is created (mode
// 0660, subject to the umask) and never deleted; one that is not a regular file (a FIFO, a
// device; a symbolic link is not followed) is refused at once (ErrNotRegular). Without
// Options.Lock, Lock does nothing. When another process holds the lock the error wraps
// ErrLocked and names the lock file.
func (s *Store) Lock(retries int) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return ErrClosed
	}
	if !s.opts.Lock || s.lockFD >= 0 {
		return nil
	}
	path, flags, perm, block := s.be.lockFile()
	fd, _, err := openFile(path, flags|unix.O_CREAT, perm, false, block)
	if err != nil {
		return fmt.Errorf("store: could not open lock file %s: %w", path, err)
	}
	lk := unix.Flock_t{Type: unix.F_WRLCK, Whence: 0, Start: 0, Len: 0}
	for i := 0; ; i++ {
		err = unix.FcntlFlock(uintptr(fd), unix.F_OFD_SETLK, &lk)
		if err == nil {
			s.lockFD = fd
			if s.opts.Versioned {
				// another process may have written since Open: continue from what is there
				if err := s.readVersionsLocked(); err != nil {
					s.unlockLocked()
					return err
				}
			}
			return nil
		}
		busy := errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EACCES)
		if !busy || i >= retries {
			unix.Close(fd)
			if busy {
				return fmt.Errorf("store: could not lock %s after %d retries: %w", path, retries, ErrLocked)
			}
			return fmt.Errorf("store: could not lock %s: %w", path, err)
		}
		s.mu.Unlock()
		time.Sleep(10 * time.Millisecond)
		s.mu.Lock()
		if s.closed {
			unix.Close(fd)
			return ErrClosed
		}
	}
}

// Unlock releases the state lock (the lock file stays).
func (s *Store) Unlock() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.unlockLocked()
}

func (s *Store) unlockLocked() {
	if s.lockFD >= 0 {
		unix.Close(s.lockFD)
		s.lockFD = -1
	}
}

// Locked reports whether the lock is held (always true when locking is off).
func (s *Store) Locked() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return !s.opts.Lock || s.lockFD >= 0
}

// Close releases the lock. Further calls fail with ErrClosed; Close itself may be repeated.
func (s *Store) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.unlockLocked()
	s.closed = true
	s.versionKey.Zero()
	return nil
}

// testHook, when set by tests, is told about each durability step (atomicfile's "fsync",
// "rename" and "fsync-dir", and "write-in-place") with the path concerned.
var testHook func(op, path string)

func hook(op, path string) {
	if testHook != nil {
		testHook(op, path)
	}
}

// fsyncDir fsyncs a directory, making the renames apply did in it durable.
func fsyncDir(dir string, noFsync bool) error {
	if noFsync {
		return nil
	}
	hook(atomicfile.StepFsyncDir, dir)
	return atomicfile.SyncDir(dir)
}
