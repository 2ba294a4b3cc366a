package store

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/vtpmd/vtpmd/backend/blob"
	"github.com/vtpmd/vtpmd/emulator"
)

func entries(t testing.TB, img []byte) [linearEntries]LinearEntry {
	t.Helper()
	e, fresh, err := ParseLinearHeader(img, int64(len(img)))
	if err != nil || fresh {
		t.Fatalf("header: fresh=%v %v", fresh, err)
	}
	return e
}

// sized returns plain data that seals (without a key) to exactly n bytes.
func sized(n int) []byte { return bytes.Repeat([]byte{byte(n)}, n-16) }

// TestLinearLayoutLikeSwtpm replays swtpm's allocation: sections of the next power of two
// appended in write order, a blob that outgrows its section moved to the end, deletion
// compacting the rest.
func TestLinearLayoutLikeSwtpm(t *testing.T) {
	img := filepath.Join(t.TempDir(), "tpm.img")
	s := mustOpen(t, "file://"+img, Options{TPM2: true})
	// the sizes of the swtpm fixture: permall 1315, volatilestate 8986 bytes stored
	s.Store(emulator.StatePermanent, sized(1315))
	s.Store(emulator.StateVolatile, sized(8986))
	raw, _ := os.ReadFile(img)
	if len(raw) != 18624 {
		t.Fatalf("image %d bytes, swtpm made 18624", len(raw))
	}
	fix, err := os.ReadFile(filepath.Join(fixtureRoot, "linear-plain", "tpm2.img"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(raw[:linearHeaderSize], fix[:linearHeaderSize]) {
		t.Fatalf("header differs from swtpm's for the same blob sizes:\n% x\n% x", raw[:48], fix[:48])
	}
	e := entries(t, raw)
	if e[0] != (LinearEntry{192, 1315, 2048}) || e[1] != (LinearEntry{2240, 8986, 16384}) {
		t.Fatalf("entries %v", e[:3])
	}
	// same size class: rewritten in its section
	s.Store(emulator.StatePermanent, sized(2000))
	e = entries(t, mustRead(t, img))
	if e[0] != (LinearEntry{192, 2000, 2048}) || e[1].Offset != 2240 {
		t.Fatalf("in-section rewrite: %v", e[:3])
	}
	// outgrows its section: removed (volatile moves forward) and appended
	s.Store(emulator.StatePermanent, sized(3000))
	raw = mustRead(t, img)
	e = entries(t, raw)
	if e[1] != (LinearEntry{192, 8986, 16384}) || e[0] != (LinearEntry{192 + 16384, 3000, 4096}) || len(raw) != 192+16384+4096 {
		t.Fatalf("regrowth: %v, %d bytes", e[:3], len(raw))
	}
	// deletion compacts and shrinks
	s.Delete(emulator.StateVolatile, true)
	raw = mustRead(t, img)
	e = entries(t, raw)
	if e[1] != (LinearEntry{}) || e[0] != (LinearEntry{192, 3000, 4096}) || len(raw) != 192+4096 {
		t.Fatalf("after delete: %v, %d bytes", e[:3], len(raw))
	}
	if got, err := s.Load(emulator.StatePermanent); err != nil || !bytes.Equal(got, sized(3000)) {
		t.Fatalf("compaction damaged permall: %v", err)
	}
	s.Store(emulator.StateSave, sized(100))
	if st, _ := s.States(); fmt.Sprint(st) != "[{permall 3000} {savestate 100}]" {
		t.Fatalf("States = %v", st)
	}
}

func mustRead(t testing.TB, p string) []byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestLinearFormatting(t *testing.T) {
	dir := t.TempDir()
	// an empty file and a file without the magic are formatted when the store is opened, as
	// swtpm formats them: the header replaces the first 192 bytes, the size is kept (an empty
	// file grows to the header), the mode too; loads write nothing more
	for _, content := range [][]byte{nil, bytes.Repeat([]byte("junk"), 100)} {
		img := filepath.Join(dir, "img")
		os.WriteFile(img, content, 0o600)
		os.Chmod(img, 0o604)
		s := mustOpen(t, "file://"+img, Options{TPM2: true})
		if !s.Formatted() || s.FormatNotice() != "Formatting 'file://"+img+"' as new linear NVRAM store" {
			t.Fatalf("Formatted %v, %q", s.Formatted(), s.FormatNotice())
		}
		formatted := mustRead(t, img)
		want := make([]byte, max(len(content), linearHeaderSize))
		copy(want, content)
		newLinearHeader(want)
		if len(content) > 9 {
			want[9] = content[9] // swtpm keeps the padding byte after the version
		}
		if !bytes.Equal(formatted, want) {
			t.Fatalf("formatted store:\n% x\nwant\n% x", formatted, want)
		}
		if st, _ := os.Stat(img); st.Mode().Perm() != 0o604 {
			t.Fatalf("formatting changed the mode to %o", st.Mode().Perm())
		}
		if _, err := s.Load(emulator.StatePermanent); !errors.Is(err, emulator.ErrNotExist) {
			t.Fatalf("load from a new store: %v", err)
		}
		if st, err := s.States(); err != nil || len(st) != 0 {
			t.Fatalf("States: %v %v", st, err)
		}
		if err := s.Delete(emulator.StatePermanent, false); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(mustRead(t, img), formatted) {
			t.Fatal("loading from a new store wrote to it")
		}
		if again := mustOpen(t, "file://"+img, Options{TPM2: true}); again.Formatted() {
			t.Fatal("a formatted store was formatted again")
		}
		if err := s.Store(emulator.StatePermanent, testBlob); err != nil {
			t.Fatal(err)
		}
		if got, err := s.Load(emulator.StatePermanent); err != nil || !bytes.Equal(got, testBlob) {
			t.Fatal(err)
		}
	}
	// a store file that does not exist is created when the store is opened: 192 bytes, the
	// header alone, with the store's mode
	img := filepath.Join(dir, "new.img")
	s := mustOpen(t, "file://"+img, Options{TPM2: true, Mode: 0o600, ModeSet: true})
	want := make([]byte, linearHeaderSize)
	newLinearHeader(want)
	if st, err := os.Stat(img); err != nil || st.Mode().Perm() != 0o600 || !s.Formatted() || !bytes.Equal(mustRead(t, img), want) {
		t.Fatalf("created store: %v", err)
	}
	if err := s.Store(emulator.StateVolatile, testBlob); err != nil {
		t.Fatal(err)
	}
	// a directory store has nothing to format
	if d := mustOpen(t, dir, Options{TPM2: true}); d.Formatted() {
		t.Fatal("a directory was formatted")
	}
}

func TestLinearReplacementKeepsModeOwnerLabel(t *testing.T) {
	img := filepath.Join(t.TempDir(), "img")
	os.WriteFile(img, nil, 0o604)
	os.Chmod(img, 0o604)
	s := mustOpen(t, "file://"+img, Options{TPM2: true})
	s.Store(emulator.StatePermanent, testBlob)
	if st, _ := os.Stat(img); st.Mode().Perm() != 0o604 {
		t.Fatalf("mode %o after a replacing write, want the store's 604", st.Mode().Perm())
	}
	if _, err := os.Stat(img + ".tmp"); !os.IsNotExist(err) {
		t.Fatal("temporary file left behind")
	}
	// owner and security label carried over to the replacement (needs root)
	if os.Geteuid() != 0 {
		t.Skip("owner and security attributes need root")
	}
	if err := unix.Setxattr(img, "security.vtpmdtest", []byte("label"), 0); err != nil {
		t.Skipf("security xattrs not supported here: %v", err)
	}
	os.Chown(img, 4321, 4322)
	st0, _ := os.Stat(img)
	if err := s.Store(emulator.StateVolatile, testBlob); err != nil {
		t.Fatal(err)
	}
	st1, _ := os.Stat(img)
	if os.SameFile(st0, st1) {
		t.Fatal("not replaced: the test does not test the replacement")
	}
	sys := st1.Sys().(*syscall.Stat_t)
	buf := make([]byte, 16)
	n, err := unix.Getxattr(img, "security.vtpmdtest", buf)
	if sys.Uid != 4321 || sys.Gid != 4322 || err != nil || string(buf[:n]) != "label" || st1.Mode().Perm() != 0o604 {
		t.Fatalf("replacement: owner %d:%d, label %q %v, mode %o", sys.Uid, sys.Gid, buf[:n], err, st1.Mode().Perm())
	}
}

// TestLinearBadHeaders: every inconsistent header is refused on load, and nothing is written.
func TestLinearBadHeaders(t *testing.T) {
	img := filepath.Join(t.TempDir(), "img")
	s := mustOpen(t, "file://"+img, Options{TPM2: true, StateKey: mustKey(t, 16, 1)})
	s.Store(emulator.StatePermanent, sized(1315))
	s.Store(emulator.StateVolatile, sized(8986))
	good := mustRead(t, img)
	put := func(b []byte, off int, v uint32) []byte {
		b = bytes.Clone(b)
		binary.LittleEndian.PutUint32(b[off:], v)
		return b
	}
	for _, c := range []struct {
		name string
		img  []byte
		want error
	}{
		{"magic but truncated header", good[:100], ErrLinearHeader},
		{"version 2", func() []byte { b := bytes.Clone(good); b[8] = 2; return b }(), ErrLinearHeader},
		{"header size 200", func() []byte { b := bytes.Clone(good); b[10] = 200; return b }(), ErrLinearHeader},
		{"offset inside the header", put(good, 12, 100), ErrLinearHeader},
		{"data beyond the end", put(good, 16, 1<<20), ErrLinearHeader},
		{"data longer than section", put(good, 16, 4000), ErrLinearHeader},
		{"section beyond the end", put(good, 20, 1<<30), ErrLinearHeader},
		{"sections overlap", put(good, 24, 1000), ErrLinearHeader},
		{"unused entry beyond the end", put(put(good, 12+12*9, 1<<24), 12+12*9+8, 16), ErrLinearHeader},
		{"file truncated", good[:5000], ErrLinearHeader},
		{"blob tampered", func() []byte { b := bytes.Clone(good); b[300] ^= 1; return b }(), blob.ErrDecrypt},
		{"blob length changed", put(good, 16, 1314), blob.ErrMalformed},
	} {
		t.Run(c.name, func(t *testing.T) {
			os.WriteFile(img, c.img, 0o640)
			before := hashDir(t, filepath.Dir(img))
			_, err := s.Load(emulator.StatePermanent)
			if !errors.Is(err, c.want) {
				t.Fatalf("load: %v, want %v", err, c.want)
			}
			if errors.Is(c.want, ErrLinearHeader) {
				if err := s.Store(emulator.StatePermanent, testBlob); !errors.Is(err, ErrLinearHeader) {
					t.Fatalf("store over a bad header: %v", err)
				}
				if err := s.Delete(emulator.StateVolatile, false); !errors.Is(err, ErrLinearHeader) {
					t.Fatalf("delete in a bad store: %v", err)
				}
			}
			if hashDir(t, filepath.Dir(img)) != before {
				t.Fatal("the store was changed")
			}
		})
	}
}

// TestLinearFixedSize runs the block-device path (in place, never resized) on a regular file.
func TestLinearFixedSize(t *testing.T) {
	img := filepath.Join(t.TempDir(), "dev")
	const size = 32 << 10
	os.WriteFile(img, make([]byte, size), 0o600)
	s := mustOpen(t, "file://"+img, Options{TPM2: true})
	lb := s.be.(*linearBackend)
	lb.fixed = size
	var ops []string
	testHook = func(op, path string) { ops = append(ops, op) }
	defer func() { testHook = nil }()
	if err := s.Store(emulator.StatePermanent, sized(1315)); err != nil {
		t.Fatal(err)
	}
	if err := s.Store(emulator.StateVolatile, sized(8986)); err != nil {
		t.Fatal(err)
	}
	if ops[0] != "write-in-place" {
		t.Fatalf("ops %v", ops)
	}
	raw := mustRead(t, img)
	if len(raw) != size {
		t.Fatalf("device resized to %d", len(raw))
	}
	if e := entries(t, raw); e[0] != (LinearEntry{192, 1315, 2048}) || e[1] != (LinearEntry{2240, 8986, 16384}) {
		t.Fatalf("entries %v", e[:2])
	}
	// 192 + 2048 + 16384 + 16384 > 32 KiB: the device is too small; nothing changes
	before := mustRead(t, img)
	if err := s.Store(emulator.StateSave, sized(9000)); err == nil {
		t.Fatal("store beyond the device accepted")
	}
	if !bytes.Equal(mustRead(t, img), before) {
		t.Fatal("failed store changed the device")
	}
	// compaction in place: the device keeps its size, the header shrinks the used part
	if err := s.Delete(emulator.StatePermanent, true); err != nil {
		t.Fatal(err)
	}
	raw = mustRead(t, img)
	if e := entries(t, raw); e[0] != (LinearEntry{}) || e[1] != (LinearEntry{192, 8986, 16384}) || len(raw) != size {
		t.Fatalf("after delete: %v, %d bytes", e[:2], len(raw))
	}
	if got, err := s.Load(emulator.StateVolatile); err != nil || !bytes.Equal(got, sized(8986)) {
		t.Fatalf("volatile after compaction: %v", err)
	}
}

// FuzzLinearHeader parses linear store images and replays swtpm's operations on them.
func FuzzLinearHeader(f *testing.F) {
	li, _ := ParseLinear(nil)
	li.Put(0, []byte{1, 2, 3})
	li.Put(1, bytes.Repeat([]byte{4}, 100))
	f.Add(bytes.Clone(li.Bytes()))
	f.Add([]byte("nilmptws"))
	f.Add([]byte{})
	for _, p := range []string{"linear-plain/tpm2.img", "linear-aes256/tpm2.img"} {
		if b, err := os.ReadFile(filepath.Join(fixtureRoot, p)); err == nil {
			f.Add(b)
		}
	}
	f.Fuzz(func(t *testing.T, img []byte) {
		p, err := ParseLinear(img)
		if err != nil {
			if !errors.Is(err, ErrLinearHeader) {
				t.Fatalf("error without ErrLinearHeader: %v", err)
			}
			return
		}
		// the image re-parses to the same blobs
		q, err := ParseLinear(p.Bytes())
		if err != nil {
			t.Fatalf("re-parse: %v", err)
		}
		var blobs [3][]byte
		for i := range blobs {
			a, okA := p.Get(i)
			b, okB := q.Get(i)
			if okA != okB || !bytes.Equal(a, b) {
				t.Fatalf("entry %d differs after re-parse", i)
			}
			blobs[i] = a
		}
		// rewriting, growing and removing one blob keeps the others and a valid header
		for i := range blobs {
			q, _ := ParseLinear(p.Bytes())
			grown := append(bytes.Clone(blobs[i]), make([]byte, len(blobs[i])+1)...)
			if err := q.Put(i, grown); err != nil {
				continue // the image grew beyond the bound
			}
			if err := q.Remove((i + 1) % 3); err != nil {
				t.Fatal(err)
			}
			r, err := ParseLinear(q.Bytes())
			if err != nil {
				t.Fatalf("after put/remove: %v", err)
			}
			if got, _ := r.Get(i); !bytes.Equal(got, grown) {
				t.Fatalf("entry %d lost", i)
			}
			j := (i + 2) % 3
			got, ok := r.Get(j)
			if ok != (blobs[j] != nil) || !bytes.Equal(got, blobs[j]) {
				t.Fatalf("entry %d changed by operations on others", j)
			}
		}
	})
}

// TestLinearFormatFixedSize: a zeroed block device is formatted in place when opened (the
// header written, the size kept), and only once.
func TestLinearFormatFixedSize(t *testing.T) {
	img := filepath.Join(t.TempDir(), "dev")
	const size = 8 << 10
	os.WriteFile(img, make([]byte, size), 0o600)
	lb := &linearBackend{path: img, opts: Options{TPM2: true, Mode: DefaultMode}, fixed: size}
	var ops []string
	testHook = func(op, path string) { ops = append(ops, op) }
	defer func() { testHook = nil }()
	if formatted, err := lb.prepare(); err != nil || !formatted {
		t.Fatalf("prepare: %v %v", formatted, err)
	}
	want := make([]byte, size)
	newLinearHeader(want)
	if raw := mustRead(t, img); !bytes.Equal(raw, want) {
		t.Fatalf("formatted device: % x", raw[:16])
	}
	if len(ops) == 0 || ops[0] != "write-in-place" {
		t.Fatalf("ops %v", ops)
	}
	if formatted, err := lb.prepare(); err != nil || formatted {
		t.Fatalf("second prepare: %v %v", formatted, err)
	}
}
