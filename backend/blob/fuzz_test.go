package blob

import (
	"bytes"
	"encoding/hex"
	"os"
	"path/filepath"
	"testing"
)

// The fuzz keys are the fixture keys, so the seeds recorded from swtpm decode.
var (
	fuzzKey128 = mustHexKey("00112233445566778899aabbccddeeff")                                 // keys/k128.hex
	fuzzKey256 = mustHexKey("00112233445566778899aabbccddeeff0123456789abcdeffedcba9876543210") // keys/k256.hex
)

func mustHexKey(s string) *Key {
	b, err := hex.DecodeString(s)
	if err != nil {
		panic(err)
	}
	k, err := NewKey(b)
	if err != nil {
		panic(err)
	}
	return k
}

// addFixtureSeeds adds the swtpm-recorded files that exist (fuzzing must not need them).
func addFixtureSeeds(f *testing.F, add func([]byte), files ...string) {
	for _, p := range files {
		if b, err := os.ReadFile(filepath.Join(fixtureRoot, p)); err == nil {
			add(b)
		}
	}
}

// FuzzOpen decodes stored state files; useKey selects the AES-256 fixture key.
func FuzzOpen(f *testing.F) {
	s1, _ := Seal(plainBlob[:100], nil)
	s2, _ := Seal(plainBlob[:100], fuzzKey256)
	vk, _ := NewVersionKey(fuzzKey256)
	s3, _ := SealVersioned(plainBlob[:100], fuzzKey256, vk, "permall", Stamp{3, [3]uint64{3, 2, 0}})
	f.Add(s1, false)
	f.Add(s2, true)
	f.Add(s3, true) // swtpm's TLVs and vtpmd's version TLV, which Open skips
	f.Add([]byte{2, 1, 0, 10, 0, 0, 0, 0, 0, 10}, false)
	f.Add([]byte{1, 1, 0, 10, 0, 1, 0, 0, 0, 42, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32}, true)
	// early swtpm releases' files: a libtpms blob without swtpm's header, plain or encrypted
	f.Add(plainBlob[:100], false)
	f.Add(legacyEncrypt(f, fuzzKey256, plainBlob[:100]), true)
	f.Add(s1[:len(s1)-1], false) // a truncated current-format file
	f.Add(s2[:len(s2)-1], true)
	addFixtureSeeds(f, func(b []byte) { f.Add(b, false) }, "plain/tpm2-00.permall", "migkey128/tpm2-00.volatilestate")
	addFixtureSeeds(f, func(b []byte) { f.Add(b, true) }, "aes256-hex/tpm2-00.permall", "aes256-pwd-migkey256/tpm2-00.permall")
	f.Fuzz(func(t *testing.T, data []byte, useKey bool) {
		k := (*Key)(nil)
		if useKey {
			k = fuzzKey256
		}
		orig := bytes.Clone(data)
		plain, err := Open(data, k)
		if !bytes.Equal(orig, data) {
			t.Fatal("Open modified its input")
		}
		if err != nil {
			if e := oneSentinel(err); e != nil {
				t.Fatal(e)
			}
			return
		}
		re, err := Seal(plain, k)
		if err != nil {
			t.Fatal(err)
		}
		if back, err := Open(re, k); err != nil || !bytes.Equal(back, plain) {
			t.Fatalf("re-seal round trip: %v", err)
		}
	})
}

// FuzzOpenVersioned decodes stored state files with their state versions (OpenVersioned,
// StoredStamp) under the AES-128 or AES-256 fixture key, as the blob "permall".
func FuzzOpenVersioned(f *testing.F) {
	for _, k := range []*Key{fuzzKey128, fuzzKey256} {
		vk, _ := NewVersionKey(k)
		s, _ := SealVersioned(plainBlob[:100], k, vk, "permall", Stamp{42, [3]uint64{42, 41, 40}})
		f.Add(s, k.Is256())
		u, _ := Seal(plainBlob[:100], k)
		f.Add(u, k.Is256())
	}
	addFixtureSeeds(f, func(b []byte) { f.Add(b, false) }, "aes128-hex/tpm2-00.permall")
	addFixtureSeeds(f, func(b []byte) { f.Add(b, true) }, "aes256-hex/tpm2-00.volatilestate")
	f.Add(legacyEncrypt(f, fuzzKey128, plainBlob[:100]), false) // an early swtpm's headerless file
	f.Fuzz(func(t *testing.T, data []byte, key256 bool) {
		k := fuzzKey128
		if key256 {
			k = fuzzKey256
		}
		vk, err := NewVersionKey(k)
		if err != nil {
			t.Fatal(err)
		}
		orig := bytes.Clone(data)
		stored, serr := StoredStamp(data, vk, "permall")
		if serr != nil {
			if e := oneSentinel(serr); e != nil {
				t.Fatal(e)
			}
		}
		plain, stamp, err := OpenVersioned(data, k, vk, "permall")
		if !bytes.Equal(orig, data) {
			t.Fatal("OpenVersioned or StoredStamp modified its input")
		}
		if err != nil {
			if e := oneSentinel(err); e != nil {
				t.Fatal(e)
			}
			return
		}
		if serr != nil {
			// only an early swtpm's headerless file may open when its stamp cannot be read
			// (its ciphertext began like a header; StoredStamp has no key to tell)
			if _, _, herr := ParseHeader(data); herr == nil || stamp != (Stamp{}) {
				t.Fatalf("OpenVersioned gives %v, StoredStamp fails: %v", stamp, serr)
			}
		} else if stored != stamp {
			t.Fatalf("OpenVersioned gives %v, StoredStamp %v", stamp, stored)
		}
		if same, err := Open(data, k); err != nil || !bytes.Equal(same, plain) {
			t.Fatalf("Open disagrees with OpenVersioned: %v", err)
		}
		next := stamp
		next.Version = max(next.Version, 1)
		re, err := SealVersioned(plain, k, vk, "permall", next)
		if err != nil {
			t.Fatal(err)
		}
		if back, st, err := OpenVersioned(re, k, vk, "permall"); err != nil || st != next || !bytes.Equal(back, plain) {
			t.Fatalf("re-seal round trip: %v, %v", st, err)
		}
		next.State[2]++
		if err := Restamp(re, vk, "permall", next); err != nil {
			t.Fatal(err)
		}
		if back, st, err := OpenVersioned(re, k, vk, "permall"); err != nil || st != next || !bytes.Equal(back, plain) {
			t.Fatalf("restamp round trip: %v, %v", st, err)
		}
	})
}

// FuzzUnwrapMigration decodes SET_STATEBLOB payloads with the keys of the aes128-migkey256
// fixture (state key AES-128, migration key AES-256).
func FuzzUnwrapMigration(f *testing.F) {
	for _, c := range []struct {
		s, m *Key
		d    bool
	}{{nil, nil, true}, {fuzzKey128, fuzzKey256, false}, {fuzzKey128, fuzzKey256, true}, {nil, fuzzKey256, true}, {fuzzKey128, nil, false}} {
		b, enc, _ := WrapMigration(plainBlob[:64], c.s, c.m, c.d)
		f.Add(b, enc)
	}
	f.Add([]byte{2, 1, 0, 10, 0, 4, 0, 0, 0, 10}, false)
	// headerless blobs (refused, as swtpm's SET_STATEBLOB refuses them), and version-1 blobs
	// around them (read)
	f.Add(plainBlob[:64], false)
	f.Add(legacyEncrypt(f, fuzzKey256, plainBlob[:64]), false)
	f.Add(legacyEncrypt(f, fuzzKey128, plainBlob[:64]), true)
	v1 := finish(FlagMigrationData, plainBlob[:64])
	v1[0] = 1
	f.Add(v1, false)
	v1m := finish(FlagMigrationData|FlagMigrationEncrypted|FlagEncrypted, legacyEncrypt(f, fuzzKey256, legacyEncrypt(f, fuzzKey128, plainBlob[:64])))
	v1m[0] = 1
	f.Add(v1m, false)
	addFixtureSeeds(f, func(b []byte) { f.Add(b, false) }, "plain/permanent.mig", "aes128-migkey256/permanent.mig", "aes128-hex/permanent.mig")
	f.Fuzz(func(t *testing.T, data []byte, enc bool) {
		orig := bytes.Clone(data)
		plain, err := UnwrapMigration(data, enc, fuzzKey128, fuzzKey256)
		if !bytes.Equal(orig, data) {
			t.Fatal("UnwrapMigration modified its input")
		}
		if err != nil {
			if e := oneSentinel(err); e != nil {
				t.Fatal(e)
			}
			return
		}
		if plain == nil {
			return // header-only: clear
		}
		for _, decrypt := range []bool{false, true} {
			b, e, err := WrapMigration(plain, fuzzKey128, fuzzKey256, decrypt)
			if err != nil {
				t.Fatal(err)
			}
			if back, err := UnwrapMigration(b, e, fuzzKey128, fuzzKey256); err != nil || !bytes.Equal(back, plain) {
				t.Fatalf("re-wrap round trip: %v", err)
			}
		}
	})
}

// FuzzParseKeyOption parses --key option strings.
func FuzzParseKeyOption(f *testing.F) {
	for _, s := range []string{"file=/x,mode=aes-256-cbc", "pwdfd=3,kdf=sha512", "fd=4,format=binary,remove", "pwdfile=/p,mode=aes-cbc",
		"file=/a,pwdfile=/b", "pwdfile=/p,kdf=pbkdf2,remove=false", "fd=-1", "file={\"a\":1},mode=aes-128-cbc", ",,file=/k,,"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		spec, err := ParseKeyOption(s)
		if err != nil {
			return
		}
		n := 0
		for _, given := range []bool{spec.File != "", spec.FD >= 0, spec.PwdFile != "", spec.PwdFD >= 0} {
			if given {
				n++
			}
		}
		if n != 1 {
			t.Fatalf("%q: %d key sources accepted", s, n)
		}
		if kl := spec.KeyLen(); kl != 16 && kl != 32 {
			t.Fatalf("key length %d", kl)
		}
		switch spec.Format {
		case "hex", "binary":
		default:
			t.Fatalf("format %q accepted", spec.Format)
		}
		switch spec.Mode {
		case "aes-cbc", "aes-128-cbc", "aes-256-cbc":
		default:
			t.Fatalf("mode %q accepted", spec.Mode)
		}
	})
}
