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

// TestSealVersionedFormat: swtpm's encrypted file, then TLV 0x7674 = format 1, the version,
// and an HMAC that an independent computation (HKDF-SHA256 of the state key, over format,
// name, version and swtpm's HMAC) reproduces; OpenVersioned, StoredVersion and plain Open all
// read it.
func TestSealVersionedFormat(t *testing.T) {
	for _, c := range []struct {
		keyLen  int
		n       int
		name    string
		version uint64
	}{
		{16, 1299, "permall", 1},
		{32, 1299, "permall", 2},
		{16, 0, "volatilestate", 1 << 40},
		{32, 31, "savestate", math.MaxUint64},
		{32, 4096, "", 7},
	} {
		t.Run(fmt.Sprintf("%d-bit %d bytes %s v%d", 8*c.keyLen, c.n, c.name, c.version), func(t *testing.T) {
			k := key(t, c.keyLen, 0x42)
			vk := versionKey(t, k)
			plain := bytes.Repeat(plainBlob, 4)[:c.n]
			s, err := SealVersioned(plain, k, vk, c.name, c.version)
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
			if len(s) != len(unversioned)+6+41 {
				t.Fatalf("%d bytes, Seal makes %d: the version costs %d, want 47", len(s), len(unversioned), len(s)-len(unversioned))
			}
			v := l[3].val
			if v[0] != 1 || binary.BigEndian.Uint64(v[1:9]) != c.version {
				t.Fatalf("version TLV % x", v[:9])
			}
			vkey, _ := hkdf.Key(sha256.New, k.Bytes(), nil, "vtpmd state version key", 32)
			m := hmac.New(sha256.New, vkey)
			m.Write([]byte{1, byte(len(c.name))})
			m.Write([]byte(c.name))
			m.Write(v[1:9])
			m.Write(l[1].val)
			if !hmac.Equal(m.Sum(nil), v[9:]) {
				t.Fatal("the version HMAC is not HMAC-SHA256(HKDF(key), format||len||name||version||swtpm HMAC)")
			}
			if got := independentDecrypt(t, k.b, l[:3]); !bytes.Equal(got, plain) {
				t.Fatal("swtpm's three TLVs do not decrypt independently")
			}
			got, version, err := OpenVersioned(s, k, vk, c.name)
			if err != nil || !bytes.Equal(got, plain) || version != c.version {
				t.Fatalf("OpenVersioned: version %d, %v", version, err)
			}
			if version, err := StoredVersion(s, vk, c.name); err != nil || version != c.version {
				t.Fatalf("StoredVersion: %d, %v", version, err)
			}
			if got, err := Open(s, k); err != nil || !bytes.Equal(got, plain) {
				t.Fatalf("Open (which skips the version, as swtpm does): %v", err)
			}
		})
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
		if _, err := SealVersioned(plainBlob, c.k, c.vk, c.blob, c.version); err == nil {
			t.Errorf("%s: sealed", c.name)
		}
	}
	if _, err := NewVersionKey(nil); err == nil {
		t.Error("a version key without a state key")
	}
	if _, _, err := OpenVersioned(nil, nil, vk, "permall"); err == nil {
		t.Error("OpenVersioned without a state key")
	}
	if _, err := StoredVersion(nil, nil, "permall"); err == nil {
		t.Error("StoredVersion without a version key")
	}
}

// TestVersionRefusals: a version that was changed, moved from another blob (another
// ciphertext, another name, another key) or is not of a format this package writes is
// refused; a changed ciphertext under an intact version is refused by swtpm's HMAC.
func TestVersionRefusals(t *testing.T) {
	k := key(t, 32, 3)
	vk := versionKey(t, k)
	perm9, _ := SealVersioned(plainBlob, k, vk, "permall", 9)
	perm10, _ := SealVersioned(plainBlob, k, vk, "permall", 10)
	vol11, _ := SealVersioned(plainBlob[:500], k, vk, "volatilestate", 11)
	otherKey := key(t, 32, 4)
	other, _ := SealVersioned(plainBlob, otherKey, versionKey(t, otherKey), "permall", 12)
	v := tlvValue(t, perm9, TagStateVersion)
	bumped := bytes.Clone(v)
	binary.BigEndian.PutUint64(bumped[1:9], 1000)

	for _, c := range []struct {
		name        string
		blob        []byte
		want        error // nil: opens
		wantVersion uint64
		storedErr   bool // StoredVersion refuses it too
	}{
		{"intact", perm9, nil, 9, false},
		{"version number raised", withTLVs(t, perm9, replaceTLV(TagStateVersion, bumped)), ErrVersionAuth, 0, true},
		{"version HMAC changed", withTLVs(t, perm9, replaceTLV(TagStateVersion, append(bytes.Clone(v[:40]), v[40]^1))), ErrVersionAuth, 0, true},
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
		{"short", withTLVs(t, perm9, replaceTLV(TagStateVersion, v[:40])), ErrMalformed, 0, true},
		{"long", withTLVs(t, perm9, replaceTLV(TagStateVersion, append(bytes.Clone(v), 0))), ErrMalformed, 0, true},
		{"empty", withTLVs(t, perm9, replaceTLV(TagStateVersion, nil)), ErrMalformed, 0, true},
		{"no HMAC to bind to", withTLVs(t, perm9, func(l []tlv) []tlv { return append(l[:1], l[2:]...) }), ErrMalformed, 0, true},
		{"version stripped: an unversioned blob", withTLVs(t, perm9, func(l []tlv) []tlv { return l[:3] }), nil, 0, false},
		{"second version TLV ignored (the first wins, as in swtpm)", withTLVs(t, perm9, func(l []tlv) []tlv {
			return append(l, tlv{TagStateVersion, bumped})
		}), nil, 9, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			got, version, err := OpenVersioned(c.blob, k, vk, "permall")
			if c.want == nil {
				if err != nil || !bytes.Equal(got, plainBlob) || version != c.wantVersion {
					t.Fatalf("version %d, %v; want version %d", version, err, c.wantVersion)
				}
			} else {
				if !errors.Is(err, c.want) {
					t.Fatalf("%v, want %v", err, c.want)
				}
				if e := oneSentinel(err); e != nil {
					t.Fatal(e)
				}
			}
			stored, serr := StoredVersion(c.blob, vk, "permall")
			if c.storedErr != (serr != nil) || (serr == nil && stored != c.wantVersion) {
				t.Fatalf("StoredVersion: %d, %v", stored, serr)
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
	s, _ := SealVersioned(plainBlob[:200], k, vk, "permall", 77)
	hdrs := map[int]bool{}
	tlvHeaderBytes(t, s[10:], 10, hdrs)
	versionAt := len(s) - 41
	checkEveryFlip(t, s, plainBlob[:200], func(b []byte) ([]byte, error) {
		plain, version, err := OpenVersioned(b, k, vk, "permall")
		// only a changed tag of the version TLV may lose the version (an unversioned blob)
		lost := version == 0 && !bytes.Equal(b[versionAt-6:versionAt-4], s[versionAt-6:versionAt-4])
		if err == nil && version != 77 && !lost {
			t.Fatalf("a flipped bit gives version %d", version)
		}
		return plain, err
	}, func(i int, bit byte) flipExpect {
		switch {
		case i == 0:
			return flipExpect{errs: []error{ErrVersion}}
		case i == 1:
			return flipExpect{ok: bit == 1, errs: []error{ErrVersion}}
		case i == 2 || i == 3:
			return flipExpect{errs: []error{ErrHeaderSize}}
		case i == 5 && bit == FlagEncrypted256:
			return flipExpect{errs: []error{ErrKeyLength}}
		case i == 4 || i == 5:
			return flipExpect{ok: true}
		case i < 10:
			return flipExpect{errs: []error{ErrMalformed}}
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
				got, version, err := OpenVersioned(b, sk, vk, strings.TrimPrefix(file, "tpm2-00."))
				if err != nil || version != 0 || !bytes.Equal(got, want) {
					t.Fatalf("%s: version %d, %v", file, version, err)
				}
				if version, err := StoredVersion(b, vk, "permall"); err != nil || version != 0 {
					t.Fatalf("%s: StoredVersion %d, %v", file, version, err)
				}
			}
		})
	}
	// legacy version-1 files have no version either
	k := key(t, 16, 6)
	legacy := finish(FlagEncrypted, nil)
	legacy[0] = 1
	if v, err := StoredVersion(legacy, versionKey(t, k), "permall"); err != nil || v != 0 {
		t.Fatalf("version-1 blob: %d, %v", v, err)
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
