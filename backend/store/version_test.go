package store

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vtpmd/vtpmd/backend/blob"
	"github.com/vtpmd/vtpmd/emulator"
)

// written is what OnWrite was told.
type written struct {
	t emulator.StateType
	v uint64
}

// recorder is an OnWrite that remembers its calls and fails while fail is set.
type recorder struct {
	calls []written
	fail  error
}

func (r *recorder) onWrite(t emulator.StateType, v uint64) error {
	r.calls = append(r.calls, written{t, v})
	return r.fail
}

// versionedLocations are a directory and a linear file, each new.
func versionedLocations(t *testing.T) map[string]string {
	return map[string]string{
		"dir":  "dir://" + t.TempDir(),
		"file": "file://" + filepath.Join(t.TempDir(), "tpm2.img"),
	}
}

func versionOfFile(t testing.TB, s *Store, st emulator.StateType) uint64 {
	t.Helper()
	_, v, err := s.LoadVersioned(st)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// TestVersionGrowsAcrossTypesAndReopen: every write of any blob type takes the next version;
// a reopened store continues from the highest stored; OnWrite hears each durable write.
func TestVersionGrowsAcrossTypesAndReopen(t *testing.T) {
	for _, keyLen := range []int{16, 32} {
		for where, uri := range versionedLocations(t) {
			t.Run(fmt.Sprintf("%s/AES-%d", where, 8*keyLen), func(t *testing.T) {
				k := mustKey(t, keyLen, 9)
				rec := &recorder{}
				s := mustOpen(t, uri, Options{TPM2: true, StateKey: k, Versioned: true, OnWrite: rec.onWrite})
				if s.Version() != 0 {
					t.Fatalf("new store at version %d", s.Version())
				}
				steps := []struct {
					t    emulator.StateType
					data []byte
				}{
					{emulator.StatePermanent, testBlob},
					{emulator.StateVolatile, testBlob[:300]},
					{emulator.StatePermanent, testBlob[:1000]},
					{emulator.StateSave, testBlob[:10]},
					{emulator.StateVolatile, testBlob[:301]},
				}
				var want []written
				for i, st := range steps {
					if err := s.Store(st.t, st.data); err != nil {
						t.Fatal(err)
					}
					want = append(want, written{st.t, uint64(i + 1)})
					if s.Version() != uint64(i+1) {
						t.Fatalf("after write %d: Version %d", i+1, s.Version())
					}
				}
				if fmt.Sprint(rec.calls) != fmt.Sprint(want) {
					t.Fatalf("OnWrite calls %v, want %v", rec.calls, want)
				}
				for st, v := range map[emulator.StateType]uint64{emulator.StatePermanent: 3, emulator.StateSave: 4, emulator.StateVolatile: 5} {
					plain, got, err := s.LoadVersioned(st)
					if err != nil || got != v {
						t.Fatalf("%s: version %d, %v; want %d", st.Name(), got, err, v)
					}
					if p2, _ := s.Load(st); !bytes.Equal(p2, plain) {
						t.Fatal("Load and LoadVersioned differ")
					}
				}
				s.Close()

				again := mustOpen(t, uri, Options{TPM2: true, StateKey: k, Versioned: true})
				if again.Version() != 5 {
					t.Fatalf("reopened at version %d, want 5", again.Version())
				}
				// deleting the newest blob first rewrites the newest other one with version 6
				if err := again.Delete(emulator.StateVolatile, true); err != nil {
					t.Fatal(err)
				}
				if v := versionOfFile(t, again, emulator.StateSave); v != 6 || again.Version() != 6 {
					t.Fatalf("after deleting the newest blob: savestate version %d, Version %d", v, again.Version())
				}
				if err := again.Store(emulator.StatePermanent, testBlob); err != nil {
					t.Fatal(err)
				}
				if v := versionOfFile(t, again, emulator.StatePermanent); v != 7 {
					t.Fatalf("first write after reopening: version %d, want 7", v)
				}
				// the store without versioning reads the versions too, and writes none
				plainStore := mustOpen(t, uri, Options{TPM2: true, StateKey: k})
				if v := versionOfFile(t, plainStore, emulator.StateSave); v != 6 || plainStore.Version() != 0 {
					t.Fatalf("unversioned store: savestate version %d, Version %d", v, plainStore.Version())
				}
				if err := plainStore.Store(emulator.StateSave, testBlob); err != nil {
					t.Fatal(err)
				}
				if v := versionOfFile(t, plainStore, emulator.StateSave); v != 0 {
					t.Fatalf("unversioned write has version %d", v)
				}
			})
		}
	}
}

// TestVersionedDeferSync: held-back writes are numbered when Sync writes them, in the order it
// writes them (no numbers skipped); each stamp names the blobs written before it; deletions
// come last; OnWrite hears of each write after Sync made it durable.
func TestVersionedDeferSync(t *testing.T) {
	rec := &recorder{}
	dir := t.TempDir()
	k := mustKey(t, 16, 1)
	s := mustOpen(t, dir, Options{TPM2: true, StateKey: k, Versioned: true, OnWrite: rec.onWrite})
	s.Store(emulator.StatePermanent, testBlob) // 1
	s.Store(emulator.StateVolatile, testBlob)  // 2
	s.Defer()
	s.Store(emulator.StateVolatile, testBlob[:7])
	s.Store(emulator.StatePermanent, testBlob[:8])
	s.Store(emulator.StatePermanent, testBlob[:9])
	if v := versionOfFile(t, s, emulator.StatePermanent); v != 3 {
		t.Fatalf("held-back permall shows version %d, want 3 (what it would take now)", v)
	}
	if len(rec.calls) != 2 || s.Version() != 2 {
		t.Fatalf("before Sync: OnWrite %v, Version %d", rec.calls, s.Version())
	}
	if err := s.Sync(); err != nil {
		t.Fatal(err)
	}
	want := []written{{emulator.StatePermanent, 1}, {emulator.StateVolatile, 2}, {emulator.StatePermanent, 3}, {emulator.StateVolatile, 4}}
	if fmt.Sprint(rec.calls) != fmt.Sprint(want) || s.Version() != 4 {
		t.Fatalf("OnWrite %v, want %v; Version %d", rec.calls, want, s.Version())
	}
	for st, v := range map[emulator.StateType]uint64{emulator.StatePermanent: 3, emulator.StateVolatile: 4} {
		if got := versionOfFile(t, s, st); got != v {
			t.Fatalf("%s: version %d, want %d", st.Name(), got, v)
		}
	}
	// a batch that writes one blob and deletes another: the write first, then the deletion
	s.Defer()
	s.Delete(emulator.StateVolatile, true)
	s.Store(emulator.StateSave, testBlob)
	if err := s.Sync(); err != nil {
		t.Fatal(err)
	}
	if v := versionOfFile(t, s, emulator.StateSave); v != 5 || s.Version() != 5 {
		t.Fatalf("savestate version %d, Version %d", v, s.Version())
	}
	if _, err := s.Load(emulator.StateVolatile); !errors.Is(err, emulator.ErrNotExist) {
		t.Fatalf("volatilestate: %v", err)
	}
	// a batch that only deletes: the newest remaining blob carries the next version
	s.Defer()
	s.Delete(emulator.StateSave, true)
	if err := s.Sync(); err != nil {
		t.Fatal(err)
	}
	if v := versionOfFile(t, s, emulator.StatePermanent); v != 6 || s.Version() != 6 {
		t.Fatalf("permall version %d, Version %d", v, s.Version())
	}
	if last := rec.calls[len(rec.calls)-1]; last != (written{emulator.StatePermanent, 6}) {
		t.Fatalf("last OnWrite %v", last)
	}
	if got, _ := s.Load(emulator.StatePermanent); !bytes.Equal(got, testBlob[:9]) {
		t.Fatal("the rewritten permall has other data")
	}
	mustOpen(t, dir, Options{TPM2: true, StateKey: k, Versioned: true, MinVersion: 6})
}

// TestVersionedCrashPoints: at every durable step of every write and deletion (each rename,
// each directory fsync), the state on disk opens with the version OnWrite had last been told
// of as the record: a crash never makes current state look rolled back.
func TestVersionedCrashPoints(t *testing.T) {
	dir := t.TempDir()
	k := mustKey(t, 32, 4)
	var record uint64
	type snapshot struct {
		dir    string
		record uint64
		step   string
	}
	var snaps []snapshot
	testHook = func(op, path string) {
		if op == "rename" || op == "fsync-dir" {
			d := t.TempDir()
			copyDir(t, dir, d)
			snaps = append(snaps, snapshot{d, record, op + " " + filepath.Base(path)})
		}
	}
	defer func() { testHook = nil }()
	s := mustOpen(t, dir, Options{TPM2: true, StateKey: k, Versioned: true,
		OnWrite: func(_ emulator.StateType, v uint64) error { record = max(record, v); return nil }})
	s.Store(emulator.StatePermanent, testBlob)
	s.Store(emulator.StateVolatile, testBlob)
	s.Defer()
	s.Store(emulator.StateSave, testBlob)
	s.Store(emulator.StateVolatile, testBlob)
	s.Store(emulator.StatePermanent, testBlob)
	s.Sync()
	s.Delete(emulator.StateVolatile, true) // the newest
	s.Defer()
	s.Delete(emulator.StateSave, true)
	s.Store(emulator.StateVolatile, testBlob)
	s.Sync()
	s.Defer()
	s.Delete(emulator.StateVolatile, true)
	s.Store(emulator.StatePermanent, testBlob)
	s.Sync()
	if len(snaps) < 12 {
		t.Fatalf("only %d crash points", len(snaps))
	}
	for _, sn := range snaps {
		o, err := Open(sn.dir, Options{TPM2: true, StateKey: k, Versioned: true, MinVersion: sn.record})
		if err != nil {
			t.Fatalf("crash after %s (record %d): %v", sn.step, sn.record, err)
		}
		o.Close()
	}
	// deleting every blob leaves nothing to carry the version: the state is gone, which a
	// record refuses like any other rollback
	testHook = nil
	s.Delete(emulator.StatePermanent, true)
	if _, err := Open(dir, Options{TPM2: true, StateKey: k, Versioned: true, MinVersion: record}); !errors.Is(err, ErrRollback) {
		t.Fatalf("all state deleted: %v", err)
	}
}

// TestOnWriteErrorFailsTheWrite: the blob is durable, the error is the caller's.
func TestOnWriteErrorFailsTheWrite(t *testing.T) {
	boom := errors.New("manager unreachable")
	rec := &recorder{fail: boom}
	s := mustOpen(t, t.TempDir(), Options{TPM2: true, StateKey: mustKey(t, 32, 1), Versioned: true, OnWrite: rec.onWrite})
	if err := s.Store(emulator.StatePermanent, testBlob); !errors.Is(err, boom) {
		t.Fatalf("Store: %v", err)
	}
	if v := versionOfFile(t, s, emulator.StatePermanent); v != 1 || s.Version() != 1 {
		t.Fatalf("written version %d, Version %d", v, s.Version())
	}
	s.Defer()
	s.Store(emulator.StateVolatile, testBlob)
	if err := s.Sync(); !errors.Is(err, boom) {
		t.Fatalf("Sync: %v", err)
	}
	rec.fail = nil
	if err := s.Store(emulator.StatePermanent, testBlob); err != nil || s.Version() != 3 {
		t.Fatalf("Store: %v, Version %d", err, s.Version())
	}
}

// TestVersionOptionsRefused: options that could not take effect are refused by Open.
func TestVersionOptionsRefused(t *testing.T) {
	dir := t.TempDir()
	nop := func(emulator.StateType, uint64) error { return nil }
	for _, c := range []struct {
		name string
		o    Options
	}{
		{"versioned without a state key", Options{Versioned: true}},
		{"MinVersion without Versioned", Options{StateKey: mustKey(t, 16, 1), MinVersion: 3}},
		{"OnWrite without Versioned", Options{StateKey: mustKey(t, 16, 1), OnWrite: nop}},
	} {
		if _, err := Open(dir, c.o); err == nil {
			t.Errorf("%s: opened", c.name)
		}
	}
}

// rollbackFixture writes versions 1..5 into a directory and returns it with a copy taken at
// version 3 (permall 3, volatilestate 2).
func rollbackFixture(t *testing.T, k *blob.Key) (dir, old string) {
	t.Helper()
	dir = t.TempDir()
	s := mustOpen(t, dir, Options{TPM2: true, StateKey: k, Versioned: true})
	s.Store(emulator.StatePermanent, testBlob) // 1
	s.Store(emulator.StateVolatile, testBlob)  // 2
	s.Store(emulator.StatePermanent, testBlob) // 3
	old = t.TempDir()
	copyDir(t, dir, old)
	s.Store(emulator.StatePermanent, testBlob) // 4
	s.Store(emulator.StateVolatile, testBlob)  // 5
	s.Close()
	return dir, old
}

func copyFile(t testing.TB, from, to string) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, b, 0o640); err != nil {
		t.Fatal(err)
	}
}

func copyDir(t testing.TB, from, to string) {
	t.Helper()
	ents, err := os.ReadDir(from)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		if !e.Type().IsRegular() {
			continue
		}
		b, err := os.ReadFile(filepath.Join(from, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(to, e.Name()), b, 0o640); err != nil {
			t.Fatal(err)
		}
	}
}

// TestRollbackRefused: with MinVersion (the manager's record), Open refuses state whose newest
// blob is older, or state that is partly older (a blob other than the one the newest was
// written beside), names what it found and what it expected, and changes nothing. Without a
// record (MinVersion 0) it accepts any state.
func TestRollbackRefused(t *testing.T) {
	k := mustKey(t, 32, 5)
	current, old := rollbackFixture(t, k)
	empty := t.TempDir()
	// permall of the copy next to the current volatilestate
	oldPerm := t.TempDir()
	copyDir(t, current, oldPerm)
	copyFile(t, filepath.Join(old, "tpm2-00.permall"), filepath.Join(oldPerm, "tpm2-00.permall"))
	// permall rewritten without a version (by swtpm, or vtpmd without versioning)
	stripped := t.TempDir()
	copyDir(t, current, stripped)
	st := mustOpen(t, stripped, Options{TPM2: true, StateKey: k})
	st.Store(emulator.StatePermanent, testBlob)
	st.Close()
	// volatilestate deleted, a later write, then the deleted one put back
	resurrected := t.TempDir()
	copyDir(t, current, resurrected)
	rs := mustOpen(t, resurrected, Options{TPM2: true, StateKey: k, Versioned: true})
	rs.Delete(emulator.StateVolatile, true)     // permall 6
	rs.Store(emulator.StatePermanent, testBlob) // 7
	rs.Close()
	copyFile(t, filepath.Join(current, "tpm2-00.volatilestate"), filepath.Join(resurrected, "tpm2-00.volatilestate"))
	for _, c := range []struct {
		name    string
		dir     string
		min     uint64
		refused bool
		msg     []string
	}{
		{"current state, record current", current, 5, false, nil},
		{"current state, record behind (a report was lost)", current, 4, false, nil},
		{"current state, no record", current, 0, false, nil},
		{"old copy, record current", old, 5, true, []string{"version 3 (permall)", "version 5 or newer"}},
		{"old copy, no record", old, 0, false, nil},
		{"state deleted, record current", empty, 5, true, []string{"holds no state", "version 5 or newer"}},
		{"new vTPM", empty, 0, false, nil},
		{"old permall beside current volatilestate", oldPerm, 5, true,
			[]string{"permall", "is version 3, but volatilestate (version 5, the newest) was written when it was version 4"}},
		{"old permall beside current volatilestate, no record", oldPerm, 0, false, nil},
		{"permall without a version beside current volatilestate", stripped, 5, true,
			[]string{"permall", "is version 0, but volatilestate (version 5, the newest) was written when it was version 4"}},
		{"deleted volatilestate put back", resurrected, 7, true,
			[]string{"volatilestate", "is version 5, but permall (version 7, the newest) was written when it was absent or without a version"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			before := hashDir(t, c.dir)
			s, err := Open(c.dir, Options{TPM2: true, StateKey: k, Versioned: true, MinVersion: c.min})
			if c.refused {
				if !errors.Is(err, ErrRollback) {
					t.Fatalf("Open: %v, want ErrRollback", err)
				}
				for _, m := range append(c.msg, c.dir) {
					if !strings.Contains(err.Error(), m) {
						t.Fatalf("%q does not say %q", err, m)
					}
				}
			} else {
				if err != nil {
					t.Fatal(err)
				}
				s.Close()
			}
			if hashDir(t, c.dir) != before {
				t.Fatal("Open changed the state")
			}
		})
	}
}

// TestVersionTamperRefused: a version TLV changed or moved from another blob is refused by
// Open (versioned) and by Load (with the state key), as blob.ErrVersionAuth, a decryption
// error; the files stay as they are.
func TestVersionTamperRefused(t *testing.T) {
	k := mustKey(t, 16, 7)
	for _, c := range []struct {
		name string
		edit func(t *testing.T, current, old string)
	}{
		{"version raised", func(t *testing.T, current, _ string) {
			p := filepath.Join(current, "tpm2-00.permall")
			b, _ := os.ReadFile(p)
			binary.BigEndian.PutUint64(b[len(b)-40:], 1000)
			os.WriteFile(p, b, 0o640)
		}},
		{"newer version TLV on an older permall", func(t *testing.T, current, old string) {
			cur, _ := os.ReadFile(filepath.Join(current, "tpm2-00.permall"))
			prev, _ := os.ReadFile(filepath.Join(old, "tpm2-00.permall"))
			copy(prev[len(prev)-47:], cur[len(cur)-47:])
			os.WriteFile(filepath.Join(current, "tpm2-00.permall"), prev, 0o640)
		}},
		{"volatilestate's version TLV on permall", func(t *testing.T, current, _ string) {
			perm, _ := os.ReadFile(filepath.Join(current, "tpm2-00.permall"))
			vol, _ := os.ReadFile(filepath.Join(current, "tpm2-00.volatilestate"))
			copy(perm[len(perm)-47:], vol[len(vol)-47:])
			os.WriteFile(filepath.Join(current, "tpm2-00.permall"), perm, 0o640)
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			current, old := rollbackFixture(t, k)
			c.edit(t, current, old)
			before := hashDir(t, current)
			if _, err := Open(current, Options{TPM2: true, StateKey: k, Versioned: true}); !errors.Is(err, blob.ErrVersionAuth) || !errors.Is(err, blob.ErrDecrypt) {
				t.Fatalf("Open: %v", err)
			}
			s := mustOpen(t, current, Options{TPM2: true, StateKey: k})
			if _, err := s.Load(emulator.StatePermanent); !errors.Is(err, blob.ErrVersionAuth) || !strings.Contains(err.Error(), "permall") {
				t.Fatalf("Load: %v", err)
			}
			if hashDir(t, current) != before {
				t.Fatal("a refused load changed the state")
			}
		})
	}
	// a whole older blob (its own version) is not tampered: it is a rollback, which
	// MinVersion catches (TestRollbackRefused); stripping the version makes it version 0
	current, old := rollbackFixture(t, k)
	copyDir(t, old, current)
	if s := mustOpen(t, current, Options{TPM2: true, StateKey: k, Versioned: true}); s.Version() != 3 {
		t.Fatalf("old copy: Version %d", s.Version())
	}
}

// TestUnversionedStateCountsAsZero: state written by Debian's swtpm has no versions: a
// versioned store opens it at version 0, loads it, and numbers its first write 1.
func TestUnversionedStateCountsAsZero(t *testing.T) {
	for _, c := range fixtureCases {
		if c.Key == "" {
			continue
		}
		t.Run(c.Name, func(t *testing.T) {
			dir := copyFixture(t, c)
			k := loadFixtureKey(t, c.Key)
			s := mustOpen(t, c.uri(dir), Options{TPM2: true, StateKey: k, Versioned: true})
			if s.Version() != 0 {
				t.Fatalf("Version %d", s.Version())
			}
			for _, st := range []emulator.StateType{emulator.StatePermanent, emulator.StateVolatile} {
				if _, v, err := s.LoadVersioned(st); err != nil || v != 0 {
					t.Fatalf("%s: version %d, %v", st.Name(), v, err)
				}
			}
			perm, _ := s.Load(emulator.StatePermanent)
			if err := s.Store(emulator.StatePermanent, perm); err != nil {
				t.Fatal(err)
			}
			if v := versionOfFile(t, s, emulator.StatePermanent); v != 1 {
				t.Fatalf("first versioned write: %d", v)
			}
		})
	}
}

// TestLockContinuesFromOtherWriters: versions written by another process between Open and
// Lock are seen when the lock is taken, so the counter never repeats a number.
func TestLockContinuesFromOtherWriters(t *testing.T) {
	dir := t.TempDir()
	k := mustKey(t, 32, 3)
	next := mustOpen(t, dir, Options{TPM2: true, StateKey: k, Versioned: true, Lock: true})
	prev := mustOpen(t, dir, Options{TPM2: true, StateKey: k, Versioned: true, Lock: true})
	if err := prev.Lock(0); err != nil {
		t.Fatal(err)
	}
	for range 4 {
		prev.Store(emulator.StatePermanent, testBlob)
	}
	prev.Close()
	if err := next.Lock(0); err != nil {
		t.Fatal(err)
	}
	if next.Version() != 4 {
		t.Fatalf("Version after Lock: %d", next.Version())
	}
	next.Store(emulator.StateVolatile, testBlob)
	if v := versionOfFile(t, next, emulator.StateVolatile); v != 5 {
		t.Fatalf("first write under the lock: version %d", v)
	}
	// a rollback between Open and Lock is refused by Lock, which then holds no lock
	next.Close()
	s := mustOpen(t, dir, Options{TPM2: true, StateKey: k, Versioned: true, Lock: true, MinVersion: 5})
	os.Remove(filepath.Join(dir, "tpm2-00.volatilestate"))
	if err := s.Lock(0); !errors.Is(err, ErrRollback) || s.Locked() {
		t.Fatalf("Lock after a rollback: %v (locked %v)", err, s.Locked())
	}
}

// TestVersionedFilesStaySwtpmFiles: the versioned file is swtpm's encrypted file plus one
// TLV; plain stores are unchanged (no version without a key).
func TestVersionedFilesStaySwtpmFiles(t *testing.T) {
	dir := t.TempDir()
	k := mustKey(t, 16, 2)
	s := mustOpen(t, dir, Options{TPM2: true, StateKey: k, Versioned: true})
	s.Store(emulator.StatePermanent, testBlob)
	raw, _ := os.ReadFile(filepath.Join(dir, "tpm2-00.permall"))
	h, body, err := blob.ParseHeader(raw)
	if err != nil || h.Flags != blob.FlagEncrypted {
		t.Fatalf("header %+v %v", h, err)
	}
	var tags []uint16
	for len(body) >= 6 {
		tags = append(tags, binary.BigEndian.Uint16(body))
		body = body[6+binary.BigEndian.Uint32(body[2:]):]
	}
	if fmt.Sprint(tags) != fmt.Sprint([]uint16{2, 3, 6, blob.TagStateVersion}) {
		t.Fatalf("TLVs %v", tags)
	}
	if got, err := blob.Open(raw, k); err != nil || !bytes.Equal(got, testBlob) {
		t.Fatalf("swtpm's decoding: %v", err)
	}
	plainDir := t.TempDir()
	p := mustOpen(t, plainDir, Options{TPM2: true})
	p.Store(emulator.StatePermanent, testBlob)
	want, _ := blob.Seal(testBlob, nil)
	if got, _ := os.ReadFile(filepath.Join(plainDir, "tpm2-00.permall")); !bytes.Equal(got, want) {
		t.Fatal("a plain store's file is not swtpm's bytes")
	}
}
