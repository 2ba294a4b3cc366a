package blob

import (
	"bytes"
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"slices"
	"strings"
	"testing"
)

func versionKey(t testing.TB, k *Key) *VersionKey {
	t.Helper()
	vk, err := NewVersionKey(k)
	if err != nil {
		t.Fatal(err)
	}
	return vk
}

// withTLVs re-encodes a blob with the TLV list edited by edit.
func withTLVs(t testing.TB, b []byte, edit func([]tlv) []tlv) []byte {
	t.Helper()
	h, body, err := ParseHeader(b)
	if err != nil {
		t.Fatal(err)
	}
	var out []byte
	for _, x := range edit(tlvList(t, body)) {
		out = appendTLV(out, x.tag, x.val)
	}
	return finish(h.Flags, out)
}

// replaceTLV swaps the value of the first TLV with tag.
func replaceTLV(tag uint16, val []byte) func([]tlv) []tlv {
	return func(l []tlv) []tlv {
		for i := range l {
			if l[i].tag == tag {
				l[i].val = val
				return l
			}
		}
		return append(l, tlv{tag, val})
	}
}

func tlvValue(t testing.TB, b []byte, tag uint16) []byte {
	t.Helper()
	for _, x := range tlvList(t, b[HeaderSize:]) {
		if x.tag == tag {
			return x.val
		}
	}
	t.Fatalf("no TLV %d", tag)
	return nil
}

// TestSealVersionedFormat: swtpm's encrypted file, then TLV 0x7674 = format 1, the stamp
// (version and state), and an HMAC that an independent computation (HKDF-SHA256 of the state
// key, over format, name, stamp and swtpm's HMAC) reproduces; OpenVersioned, StoredStamp and
// plain Open all read it.
func TestSealVersionedFormat(t *testing.T) {
	for _, c := range []struct {
		keyLen int
		n      int
		name   string
		stamp  Stamp
	}{
		{16, 1299, "permall", Stamp{1, [3]uint64{1, 0, 0}}},
		{32, 1299, "permall", Stamp{2, [3]uint64{2, 1, 0}}},
		{16, 0, "volatilestate", Stamp{1 << 40, [3]uint64{1<<40 - 1, 1 << 40, 7}}},
		{32, 31, "savestate", Stamp{math.MaxUint64, [3]uint64{3, 0, math.MaxUint64}}},
		{32, 4096, "", Stamp{Version: 7}},
	} {
		t.Run(fmt.Sprintf("%d-bit %d bytes %s %v", 8*c.keyLen, c.n, c.name, c.stamp), func(t *testing.T) {
			k := key(t, c.keyLen, 0x42)
			vk := versionKey(t, k)
			plain := bytes.Repeat(plainBlob, 4)[:c.n]
			s, err := SealVersioned(plain, k, vk, c.name, c.stamp)
			if err != nil {
				t.Fatal(err)
			}
			unversioned, _ := Seal(plain, k)
			if !bytes.Equal(s[:6], unversioned[:6]) || int(binary.BigEndian.Uint32(s[6:10])) != len(s) {
				t.Fatalf("header % x, Seal's % x", s[:10], unversioned[:10])
			}
			l := tlvList(t, s[HeaderSize:])
			if fmt.Sprint(tags(l)) != fmt.Sprint([]uint16{TagEncryptedData, TagHMAC, TagIVEncryptedData, TagStateVersion}) {
				t.Fatalf("tags %v", tags(l))
			}
			if len(s) != len(unversioned)+6+65 {
				t.Fatalf("%d bytes, Seal makes %d: the version costs %d, want 71", len(s), len(unversioned), len(s)-len(unversioned))
			}
			v := l[3].val
			if v[0] != 1 || binary.BigEndian.Uint64(v[1:9]) != c.stamp.Version {
				t.Fatalf("version TLV % x", v[:9])
			}
			for i, want := range c.stamp.State {
				if got := binary.BigEndian.Uint64(v[9+8*i:]); got != want {
					t.Fatalf("state[%d] = %d, want %d", i, got, want)
				}
			}
			vkey, _ := hkdf.Key(sha256.New, k.Bytes(), nil, "vtpmd state version key", 32)
			m := hmac.New(sha256.New, vkey)
			m.Write([]byte{1, byte(len(c.name))})
			m.Write([]byte(c.name))
			m.Write(v[1:33])
			m.Write(l[1].val)
			if !hmac.Equal(m.Sum(nil), v[33:]) {
				t.Fatal("the version HMAC is not HMAC-SHA256(HKDF(key), format||len||name||stamp||swtpm HMAC)")
			}
			if got := independentDecrypt(t, k.b, l[:3]); !bytes.Equal(got, plain) {
				t.Fatal("swtpm's three TLVs do not decrypt independently")
			}
			got, stamp, err := OpenVersioned(s, k, vk, c.name)
			if err != nil || !bytes.Equal(got, plain) || stamp != c.stamp {
				t.Fatalf("OpenVersioned: stamp %v, %v", stamp, err)
			}
			if stamp, err := StoredStamp(s, vk, c.name); err != nil || stamp != c.stamp {
				t.Fatalf("StoredStamp: %v, %v", stamp, err)
			}
			if got, err := Open(s, k); err != nil || !bytes.Equal(got, plain) {
				t.Fatalf("Open (which skips the version, as swtpm does): %v", err)
			}
		})
	}
}

// TestRestamp: a held-back blob gets its final stamp in place; the result is what
// SealVersioned would have made with it, apart from the IV.
func TestRestamp(t *testing.T) {
	k := key(t, 16, 8)
	vk := versionKey(t, k)
	s, _ := SealVersioned(plainBlob, k, vk, "volatilestate", Stamp{Version: 1})
	ct := bytes.Clone(s[:len(s)-65])
	final := Stamp{12, [3]uint64{11, 12, 0}}
	if err := Restamp(s, vk, "volatilestate", final); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(s[:len(s)-65], ct) {
		t.Fatal("Restamp changed more than the version TLV's value")
	}
	if got, stamp, err := OpenVersioned(s, k, vk, "volatilestate"); err != nil || stamp != final || !bytes.Equal(got, plainBlob) {
		t.Fatalf("restamped: %v, %v", stamp, err)
	}
	unversioned, _ := Seal(plainBlob, k)
	for _, c := range []struct {
		name  string
		blob  []byte
		stamp Stamp
	}{
		{"unversioned blob", unversioned, final},
		{"version 0", s, Stamp{}},
		{"version TLV not last", withTLVs(t, s, func(l []tlv) []tlv { return append(l, tlv{99, []byte{1}}) }), final},
		{"not a blob", []byte{1, 2, 3}, final},
	} {
		before := bytes.Clone(c.blob)
		if err := Restamp(c.blob, vk, "volatilestate", c.stamp); err == nil {
			t.Errorf("%s: restamped", c.name)
		}
		if !bytes.Equal(before, c.blob) {
			t.Errorf("%s: a refused Restamp changed the blob", c.name)
		}
	}
	if err := Restamp(s, nil, "volatilestate", final); err == nil {
		t.Error("restamped without a version key")
	}
}

func TestSealVersionedRefusesBadArguments(t *testing.T) {
	k := key(t, 16, 1)
	vk := versionKey(t, k)
	for _, c := range []struct {
		name    string
		k       *Key
		vk      *VersionKey
		blob    string
		version uint64
	}{
		{"no state key", nil, vk, "permall", 1},
		{"no version key", k, nil, "permall", 1},
		{"version 0", k, vk, "permall", 0},
		{"name too long", k, vk, strings.Repeat("x", 256), 1},
	} {
		if _, err := SealVersioned(plainBlob, c.k, c.vk, c.blob, Stamp{Version: c.version}); err == nil {
			t.Errorf("%s: sealed", c.name)
		}
	}
	if _, err := NewVersionKey(nil); err == nil {
		t.Error("a version key without a state key")
	}
	if _, _, err := OpenVersioned(nil, nil, vk, "permall"); err == nil {
		t.Error("OpenVersioned without a state key")
	}
	if _, err := StoredStamp(nil, nil, "permall"); err == nil {
		t.Error("StoredStamp without a version key")
	}
}

// TestVersionRefusals: a version that was changed, moved from another blob (another
// ciphertext, another name, another key) or is not of a format this package writes is
// refused; a changed ciphertext under an intact version is refused by swtpm's HMAC.
func TestVersionRefusals(t *testing.T) {
	k := key(t, 32, 3)
	vk := versionKey(t, k)
	perm9, _ := SealVersioned(plainBlob, k, vk, "permall", Stamp{9, [3]uint64{9, 8, 0}})
	perm10, _ := SealVersioned(plainBlob, k, vk, "permall", Stamp{10, [3]uint64{10, 8, 0}})
	vol11, _ := SealVersioned(plainBlob[:500], k, vk, "volatilestate", Stamp{11, [3]uint64{10, 11, 0}})
	otherKey := key(t, 32, 4)
	other, _ := SealVersioned(plainBlob, otherKey, versionKey(t, otherKey), "permall", Stamp{Version: 12})
	v := tlvValue(t, perm9, TagStateVersion)
	bumped := bytes.Clone(v)
	binary.BigEndian.PutUint64(bumped[1:9], 1000)

	for _, c := range []struct {
		name        string
		blob        []byte
		want        error // nil: opens
		wantVersion uint64
		storedErr   bool // StoredStamp refuses it too
	}{
		{"intact", perm9, nil, 9, false},
		{"version number raised", withTLVs(t, perm9, replaceTLV(TagStateVersion, bumped)), ErrVersionAuth, 0, true},
		{"state vector changed", withTLVs(t, perm9, replaceTLV(TagStateVersion, slices.Concat(v[:20], []byte{v[20] ^ 4}, v[21:]))), ErrVersionAuth, 0, true},
		{"version HMAC changed", withTLVs(t, perm9, replaceTLV(TagStateVersion, append(bytes.Clone(v[:64]), v[64]^1))), ErrVersionAuth, 0, true},
		{"newer version of the same blob moved onto an older one", withTLVs(t, perm9, replaceTLV(TagStateVersion, tlvValue(t, perm10, TagStateVersion))), ErrVersionAuth, 0, true},
		{"version of another blob type", withTLVs(t, perm9, replaceTLV(TagStateVersion, tlvValue(t, vol11, TagStateVersion))), ErrVersionAuth, 0, true},
		{"version of another key's blob", withTLVs(t, perm9, replaceTLV(TagStateVersion, tlvValue(t, other, TagStateVersion))), ErrVersionAuth, 0, true},
		{"whole blob under another key", other, ErrDecrypt, 0, true},
		{"volatilestate stored as permall", vol11, ErrVersionAuth, 0, true},
		{"older ciphertext under a newer version", withTLVs(t, perm10, func(l []tlv) []tlv {
			l[0].val = tlvValue(t, perm9, TagEncryptedData)
			return l
		}), ErrDecrypt, 10, false},
		{"format 2", withTLVs(t, perm9, replaceTLV(TagStateVersion, append([]byte{2}, v[1:]...))), ErrVersion, 0, true},
		{"short", withTLVs(t, perm9, replaceTLV(TagStateVersion, v[:64])), ErrMalformed, 0, true},
		{"format 1 of the size without the state vector", withTLVs(t, perm9, replaceTLV(TagStateVersion, v[:41])), ErrMalformed, 0, true},
		{"long", withTLVs(t, perm9, replaceTLV(TagStateVersion, append(bytes.Clone(v), 0))), ErrMalformed, 0, true},
		{"empty", withTLVs(t, perm9, replaceTLV(TagStateVersion, nil)), ErrMalformed, 0, true},
		{"no HMAC to bind to", withTLVs(t, perm9, func(l []tlv) []tlv { return append(l[:1], l[2:]...) }), ErrMalformed, 0, true},
		{"version stripped: an unversioned blob", withTLVs(t, perm9, func(l []tlv) []tlv { return l[:3] }), nil, 0, false},
		{"second version TLV ignored (the first wins, as in swtpm)", withTLVs(t, perm9, func(l []tlv) []tlv {
			return append(l, tlv{TagStateVersion, bumped})
		}), nil, 9, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			got, stamp, err := OpenVersioned(c.blob, k, vk, "permall")
			if c.want == nil {
				if err != nil || !bytes.Equal(got, plainBlob) || stamp.Version != c.wantVersion {
					t.Fatalf("stamp %v, %v; want version %d", stamp, err, c.wantVersion)
				}
			} else {
				if !errors.Is(err, c.want) {
					t.Fatalf("%v, want %v", err, c.want)
				}
				if e := oneSentinel(err); e != nil {
					t.Fatal(e)
				}
			}
			stored, serr := StoredStamp(c.blob, vk, "permall")
			if c.storedErr != (serr != nil) || (serr == nil && stored.Version != c.wantVersion) {
				t.Fatalf("StoredStamp: %v, %v", stored, serr)
			}
		})
	}
	// a wrong key length is refused as Open refuses it, not as a bad version
	if _, _, err := OpenVersioned(perm9, key(t, 16, 3), vk, "permall"); !errors.Is(err, ErrKeyLength) {
		t.Fatalf("AES-128 key for AES-256 data: %v", err)
	}
	// ErrVersionAuth is a decryption error for everyone who maps ErrDecrypt
	if !errors.Is(ErrVersionAuth, ErrDecrypt) {
		t.Fatal("ErrVersionAuth does not wrap ErrDecrypt")
	}
}

// TestEveryBitFlipOfVersionedBlob: no flipped bit of a versioned blob opens to other data or
// another version.
func TestEveryBitFlipOfVersionedBlob(t *testing.T) {
	k := key(t, 16, 5)
	vk := versionKey(t, k)
	want := Stamp{77, [3]uint64{77, 76, 0}}
	s, _ := SealVersioned(plainBlob[:200], k, vk, "permall", want)
	hdrs := map[int]bool{}
	tlvHeaderBytes(t, s[10:], 10, hdrs)
	versionAt := len(s) - 65
	checkEveryFlip(t, s, plainBlob[:200], func(b []byte) ([]byte, error) {
		plain, stamp, err := OpenVersioned(b, k, vk, "permall")
		// only a changed tag of the version TLV may lose the stamp (an unversioned blob)
		lost := stamp == Stamp{} && !bytes.Equal(b[versionAt-6:versionAt-4], s[versionAt-6:versionAt-4])
		if err == nil && stamp != want && !lost {
			t.Fatalf("a flipped bit gives stamp %v", stamp)
		}
		return plain, err
	}, func(i int, bit byte) flipExpect {
		switch {
		case i == 0:
			return flipExpect{errs: []error{ErrVersion}}
		case i == 1: // min_version 1 -> 0 is still readable; with a key, a header swtpm
			// refuses sends it to the headerless reading, whose error counts (openHeaderless)
			return flipExpect{ok: bit == 1, errs: []error{ErrMalformed, ErrDecrypt}}
		case i == 2 || i == 3:
			return flipExpect{errs: []error{ErrMalformed, ErrDecrypt}}
		case i == 5 && bit == FlagEncrypted256:
			return flipExpect{errs: []error{ErrKeyLength}}
		case i == 4 || i == 5:
			return flipExpect{ok: true}
		case i < 10:
			return flipExpect{errs: []error{ErrMalformed, ErrDecrypt}}
		case hdrs[i]:
			// a changed tag makes a TLV unknown (a missing version reads as none, if the
			// rest holds) or turns it into another one
			return flipExpect{ok: i >= versionAt-6, errs: []error{ErrMalformed, ErrDecrypt, ErrVersion}}
		case i == versionAt:
			return flipExpect{errs: []error{ErrVersion}}
		case i > versionAt:
			return flipExpect{errs: []error{ErrVersionAuth}}
		}
		// ciphertext or IV: swtpm's HMAC; swtpm's HMAC itself: the version is bound to it
		return flipExpect{errs: []error{ErrDecrypt}}
	})
}

// TestOpenVersionedReadsSwtpmFiles: files written by Debian's swtpm have no version: they
// open with version 0 to the same data as Open gives.
func TestOpenVersionedReadsSwtpmFiles(t *testing.T) {
	for _, f := range fixtures {
		sk := fixtureKey(t, f.key)
		if sk == nil {
			continue
		}
		t.Run(f.name, func(t *testing.T) {
			vk := versionKey(t, sk)
			for _, file := range []string{"tpm2-00.permall", "tpm2-00.volatilestate"} {
				b := readFixture(t, f.name, file)
				want, err := Open(b, sk)
				if err != nil {
					t.Fatal(err)
				}
				got, stamp, err := OpenVersioned(b, sk, vk, strings.TrimPrefix(file, "tpm2-00."))
				if err != nil || stamp != (Stamp{}) || !bytes.Equal(got, want) {
					t.Fatalf("%s: stamp %v, %v", file, stamp, err)
				}
				if stamp, err := StoredStamp(b, vk, "permall"); err != nil || stamp != (Stamp{}) {
					t.Fatalf("%s: StoredStamp %v, %v", file, stamp, err)
				}
			}
		})
	}
	// legacy version-1 files have no version either
	k := key(t, 16, 6)
	legacy := finish(FlagEncrypted, nil)
	legacy[0] = 1
	if st, err := StoredStamp(legacy, versionKey(t, k), "permall"); err != nil || st != (Stamp{}) {
		t.Fatalf("version-1 blob: %v, %v", st, err)
	}
}

func TestVersionKeyDoesNotLeak(t *testing.T) {
	k := key(t, 16, 0x61)
	vk := versionKey(t, k)
	raw := append([]byte(nil), vk.b...)
	for _, s := range []string{vk.String(), fmt.Sprintf("%v %+v %#v %s", vk, vk, vk, vk)} {
		if strings.Contains(s, fmt.Sprintf("%x", raw)) || strings.Contains(s, string(raw)) || strings.Contains(s, "61616161") {
			t.Fatalf("version key shown: %q", s)
		}
	}
	vk.Zero()
	if !bytes.Equal(vk.b, make([]byte, len(raw))) {
		t.Fatal("Zero left key bytes")
	}
	(*VersionKey)(nil).Zero()
}
