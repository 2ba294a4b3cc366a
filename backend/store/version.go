package store

import (
	"errors"
	"fmt"
	"io/fs"
	"math"
	"slices"

	"github.com/vtpmd/vtpmd/backend/blob"
	"github.com/vtpmd/vtpmd/emulator"
)

// versions is a Store's state version bookkeeping (Options.Versioned); the Store's mutex
// guards it.
type versions struct {
	// versionKey authenticates state versions (nil without a state key).
	versionKey *blob.VersionKey
	// version is the highest version known durable: found on disk or written since.
	version uint64
	// issued is the highest version given to a written blob; the next write takes issued+1.
	// It never goes back, not even when a write fails.
	issued uint64
	// onDisk are the versions of the stored blobs in blobNames' order (0: absent, or no
	// version), what the next write's stamp says of the others; present says which exist.
	onDisk  [3]uint64
	present [3]bool
	// stale says a write failed, so onDisk and present may be wrong: the next write reads
	// the stamps from disk again.
	stale bool
}

// stateTypes are the state types of blobNames, in that order.
var stateTypes = [3]emulator.StateType{emulator.StatePermanent, emulator.StateVolatile, emulator.StateSave}

// checkVersioning refuses version options that could not take effect.
func checkVersioning(o Options) error {
	switch {
	case o.Versioned && o.StateKey == nil:
		return errors.New("store: versioned state needs a state key (the version is authenticated with it)")
	case !o.Versioned && o.MinVersion != 0:
		return errors.New("store: MinVersion needs Versioned")
	case !o.Versioned && o.OnWrite != nil:
		return errors.New("store: OnWrite needs Versioned")
	}
	return nil
}

// Version is the state version of the newest blob known durable: the highest found by Open
// (or Lock), or the last one written since. It is 0 for a store without Versioned, and for
// state without versions (written by swtpm, or by vtpmd without versioning).
func (s *Store) Version() uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.version
}

// readVersionsLocked reads and authenticates the stamp of every stored blob and continues the
// counter from the highest version. With Options.MinVersion it refuses, wrapping ErrRollback,
// state whose newest blob is older than MinVersion, and state that is not whole: another
// blob that is not the version the newest one was written beside (absent is fine: deleted
// since).
func (s *Store) readVersionsLocked() error {
	var stamps [3]blob.Stamp
	var present [3]bool
	newest := -1
	for i, name := range blobNames {
		raw, err := s.be.read(name)
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return fmt.Errorf("store: read the state version of %s: %w", name, err)
		}
		if stamps[i], err = blob.StoredStamp(raw, s.versionKey, name); err != nil {
			// an early swtpm's headerless file whose ciphertext begins like a header: no version
			if _, _, lerr := blob.OpenVersioned(raw, s.opts.StateKey, s.versionKey, name); lerr != nil {
				return fmt.Errorf("store: state version of %s in %s: %w", name, s.be, err)
			}
		}
		present[i] = true
		if newest < 0 || stamps[i].Version > stamps[newest].Version {
			newest = i
		}
	}
	if min := s.opts.MinVersion; min > 0 {
		if newest < 0 {
			return fmt.Errorf("store: %s holds no state, but state of version %d or newer is expected: %w", s.be, min, ErrRollback)
		}
		top := stamps[newest]
		if top.Version < min {
			return fmt.Errorf("store: the newest state in %s is version %d (%s), but version %d or newer is expected: %w",
				s.be, top.Version, blobNames[newest], min, ErrRollback)
		}
		for i := range blobNames {
			if i == newest || !present[i] || stamps[i].Version == top.State[i] {
				continue
			}
			was := fmt.Sprintf("version %d", top.State[i])
			if top.State[i] == 0 {
				was = "absent or without a version"
			}
			return fmt.Errorf("store: %s in %s is version %d, but %s (version %d, the newest) was written when it was %s: %w",
				blobNames[i], s.be, stamps[i].Version, blobNames[newest], top.Version, was, ErrRollback)
		}
	}
	for i := range blobNames {
		s.onDisk[i] = stamps[i].Version // 0 when absent
		s.version = max(s.version, stamps[i].Version)
	}
	s.present = present
	s.issued = max(s.issued, s.version)
	s.stale = false
	return nil
}

// nextStampLocked is the stamp of a write of blob i that takes the next version, given the
// versions on disk before it.
func (s *Store) nextStampLocked(i int, before [3]uint64) (blob.Stamp, error) {
	if s.issued == math.MaxUint64 {
		return blob.Stamp{}, errors.New("the state version counter is exhausted")
	}
	st := blob.Stamp{Version: s.issued + 1, State: before}
	st.State[i] = st.Version
	return st, nil
}

// sealVersionedLocked seals a blob with the stamp it gets if it is written now, alone. A
// write held back by Defer keeps it until Sync gives it its final one.
func (s *Store) sealVersionedLocked(name string, plain []byte) ([]byte, blob.Stamp, error) {
	stamp, err := s.nextStampLocked(slices.Index(blobNames, name), s.onDisk)
	if err != nil {
		return nil, blob.Stamp{}, err
	}
	sealed, err := blob.SealVersioned(plain, s.opts.StateKey, s.versionKey, name, stamp)
	if err != nil {
		return nil, blob.Stamp{}, err
	}
	return sealed, stamp, nil
}

// commitVersionedLocked makes changes of a versioned store durable so that at every instant
// of a crash the stored state is whole (the newest blob's stamp names the others) and its
// newest version is no lower than any version OnWrite was told of:
//
//   - writes first, each taking the next version, its stamp naming the blobs as they are
//     once the writes before it are done (deletions not yet);
//   - a deletion without a write in the same batch first rewrites the newest other blob with
//     the next version (the same data, a fresh stamp), so deleting the newest blob does not
//     make the state look older than recorded;
//   - then the deletions, with their own fsync.
//
// OnWrite then hears of each write, in order. A blob deleted and then restored from a copy is
// caught by the next write's stamp (which says it is absent), not before.
func (s *Store) commitVersionedLocked(changes []change) error {
	if s.stale {
		if err := s.readVersionsLocked(); err != nil {
			return err
		}
	}
	var writes, dels []change
	deletesPresent := false
	for _, c := range changes {
		if c.del {
			dels = append(dels, c)
			deletesPresent = deletesPresent || s.present[slices.Index(blobNames, c.name)]
		} else {
			writes = append(writes, c)
		}
	}
	if len(writes) == 0 && deletesPresent {
		touch, err := s.touchLocked(dels)
		if err != nil {
			return err
		}
		if touch != nil {
			writes = append(writes, *touch)
		}
	}
	onDisk, present := s.onDisk, s.present
	for k := range writes {
		c := &writes[k]
		i := slices.Index(blobNames, c.name)
		stamp, err := s.nextStampLocked(i, onDisk)
		if err != nil {
			return err
		}
		if stamp != c.stamp { // held back, or the versions moved since it was sealed
			if err := blob.Restamp(c.data, s.versionKey, c.name, stamp); err != nil {
				return err
			}
			c.stamp = stamp
		}
		s.issued, onDisk, present[i] = stamp.Version, stamp.State, true
	}
	if len(writes) > 0 {
		if err := s.be.apply(writes); err != nil {
			s.stale = true
			return err
		}
		s.onDisk, s.present = onDisk, present
	}
	var delErr error
	if len(dels) > 0 {
		if delErr = s.be.apply(dels); delErr != nil {
			s.stale = true
		} else {
			for _, c := range dels {
				i := slices.Index(blobNames, c.name)
				s.onDisk[i], s.present[i] = 0, false
			}
		}
	}
	for _, c := range writes {
		s.version = max(s.version, c.stamp.Version)
	}
	if s.opts.OnWrite != nil {
		for _, c := range writes {
			if err := s.opts.OnWrite(c.t, c.stamp.Version); err != nil {
				return errors.Join(delErr, fmt.Errorf("%s version %d is durable, but recording it failed: %w", c.name, c.stamp.Version, err))
			}
		}
	}
	return delErr
}

// touchLocked makes the rewrite of the newest stored blob that is not deleted: the same data
// under a new stamp. It is nil when no other blob is stored.
func (s *Store) touchLocked(dels []change) (*change, error) {
	j := -1
	for i, name := range blobNames {
		deleted := slices.ContainsFunc(dels, func(c change) bool { return c.name == name })
		if s.present[i] && !deleted && (j < 0 || s.onDisk[i] > s.onDisk[j]) {
			j = i
		}
	}
	if j < 0 {
		return nil, nil
	}
	name := blobNames[j]
	raw, err := s.be.read(name)
	if err != nil {
		return nil, fmt.Errorf("read %s to carry the state version: %w", name, err)
	}
	plain, _, err := blob.OpenVersioned(raw, s.opts.StateKey, s.versionKey, name)
	if err != nil {
		return nil, fmt.Errorf("read %s to carry the state version: %w", name, err)
	}
	defer clear(plain)
	sealed, stamp, err := s.sealVersionedLocked(name, plain)
	if err != nil {
		return nil, err
	}
	return &change{name: name, data: sealed, t: stateTypes[j], stamp: stamp}, nil
}
