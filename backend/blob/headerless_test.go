package blob

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"testing"
)

// legacyEncrypt is how early swtpm releases encrypted a state file, which they stored without
// a header: AES-CBC with a zero IV over SHA256(plain) || plain, padded to the key length.
// Written out independently of decryptLegacy.
func legacyEncrypt(t testing.TB, k *Key, plain []byte) []byte {
	t.Helper()
	sum := sha256.Sum256(plain)
	p := padTo(append(sum[:], plain...), k.Len())
	c, err := aes.NewCipher(k.Bytes())
	if err != nil {
		t.Fatal(err)
	}
	cipher.NewCBCEncrypter(c, make([]byte, aes.BlockSize)).CryptBlocks(p, p)
	return p
}

// TestHeaderlessFiles: state files of early swtpm releases, a libtpms blob stored without
// swtpm's header (plain, or encrypted the legacy way), open as swtpm 0.7.1 opens them.
func TestHeaderlessFiles(t *testing.T) {
	k16, k32 := key(t, 16, 1), key(t, 32, 2)
	raw := plainBlob // a libtpms blob begins with a zero byte
	if raw[0] != 0 {
		t.Fatal("plainBlob must begin like a libtpms blob")
	}
	if got, err := Open(raw, nil); err != nil || !bytes.Equal(got, raw) {
		t.Fatalf("plain headerless file: %v", err)
	}
	for _, k := range []*Key{k16, k32} {
		enc := legacyEncrypt(t, k, raw)
		if got, err := Open(enc, k); err != nil || !bytes.Equal(got, raw) {
			t.Fatalf("%v: encrypted headerless file: %v", k, err)
		}
		vk := versionKey(t, k)
		if got, st, err := OpenVersioned(enc, k, vk, "permall"); err != nil || st != (Stamp{}) || !bytes.Equal(got, raw) {
			t.Fatalf("%v: OpenVersioned of an encrypted headerless file: %v %v", k, st, err)
		}
		if enc[0] != 1 && enc[0] != 2 {
			if st, err := StoredStamp(enc, vk, "permall"); err != nil || st != (Stamp{}) {
				t.Fatalf("%v: StoredStamp of an encrypted headerless file: %v %v", k, st, err)
			}
		}
		// what swtpm refuses: another key, the plain file with a key, a changed bit
		other := key(t, k.Len(), 9)
		if _, err := Open(enc, other); !errors.Is(err, ErrDecrypt) || oneSentinel(err) != nil {
			t.Fatalf("%v: wrong key: %v", k, err)
		}
		if _, err := Open(raw, k); err == nil || oneSentinel(err) != nil {
			t.Fatalf("%v: plain headerless file with a key: %v", k, err)
		}
		for _, i := range []int{0, 15, 16, len(enc) / 2, len(enc) - 1} {
			c := bytes.Clone(enc)
			c[i] ^= 0x40
			if _, err := Open(c, k); err == nil || oneSentinel(err) != nil {
				t.Fatalf("%v: bit flipped at %d: %v", k, i, err)
			}
		}
		if _, err := Open(enc[:len(enc)-k.Len()], k); err == nil || oneSentinel(err) != nil {
			t.Fatalf("%v: truncated: %v", k, err)
		}
		// a change before the last blocks leaves the padding intact: the hash catches it, and
		// swtpm answers TPM_FAIL there (ErrLegacyHash), not TPM_DECRYPT_ERROR
		c := bytes.Clone(enc)
		c[40] ^= 1
		if _, err := Open(c, k); !errors.Is(err, ErrLegacyHash) || !errors.Is(err, ErrDecrypt) || oneSentinel(err) != nil {
			t.Fatalf("%v: tampered: %v", k, err)
		}
	}
	// a key of the other length fails on padding or hash, as in swtpm (no key-length flag)
	if _, err := Open(legacyEncrypt(t, k32, raw), k16); !errors.Is(err, ErrDecrypt) {
		t.Fatalf("AES-256 file, AES-128 key: %v", err)
	}
}

// TestHeaderlessEncryptedBeginningLikeAHeader: the ciphertext of a headerless file may begin
// with 1 or 2 like swtpm's header; Open and OpenVersioned read it all the same, StoredStamp,
// which has no state key, cannot tell it from a broken header.
func TestHeaderlessEncryptedBeginningLikeAHeader(t *testing.T) {
	k := key(t, 16, 3)
	var plain, enc []byte
	for i := 0; ; i++ {
		plain = append(binary.BigEndian.AppendUint32(nil, uint32(i)), plainBlob[:300]...)
		plain[0] = 0
		if enc = legacyEncrypt(t, k, plain); enc[0] == 1 || enc[0] == 2 {
			break
		}
		if i > 100000 {
			t.Fatal("no ciphertext beginning with 1 or 2")
		}
	}
	if got, err := Open(enc, k); err != nil || !bytes.Equal(got, plain) {
		t.Fatalf("Open: %v", err)
	}
	vk := versionKey(t, k)
	if got, st, err := OpenVersioned(enc, k, vk, "permall"); err != nil || st != (Stamp{}) || !bytes.Equal(got, plain) {
		t.Fatalf("OpenVersioned: %v", err)
	}
	if _, err := StoredStamp(enc, vk, "permall"); !errors.Is(err, ErrMalformed) {
		t.Fatalf("StoredStamp: %v", err)
	}
}

// TestBrokenCurrentFilesStayRefused: a truncated or tampered file of the current format is
// not taken for a headerless one. Without a key it begins with the header's version, which no
// libtpms blob does, and is refused for its header; with a key the headerless reading fails
// its hash, and the error names the header problem too.
func TestBrokenCurrentFilesStayRefused(t *testing.T) {
	k := key(t, 32, 4)
	for _, sk := range []*Key{nil, k} {
		s, _ := Seal(plainBlob, sk)
		for _, b := range [][]byte{
			s[:len(s)-1], s[:len(s)/2], s[:HeaderSize+3], s[:3],
			append(bytes.Clone(s), 0),
			func() []byte { c := bytes.Clone(s); c[7]++; return c }(),
			func() []byte { c := bytes.Clone(s); c[1] = 3; return c }(),
		} {
			_, err := Open(b, sk)
			if err == nil || oneSentinel(err) != nil {
				t.Fatalf("key %v, %d bytes: %v", sk, len(b), err)
			}
			if sk == nil && !errors.Is(err, ErrMalformed) && !errors.Is(err, ErrVersion) {
				t.Fatalf("no key, %d bytes: %v", len(b), err)
			}
			if sk != nil && len(b) >= HeaderSize && !bytes.Contains([]byte(err.Error()), []byte("no valid swtpm header")) {
				t.Fatalf("key, %d bytes: the error does not name the header: %v", len(b), err)
			}
		}
	}
}

// TestSetStateBlobRefusesHeaderless: SET_STATEBLOB takes no headerless blob, with or without a
// migration key (swtpm's SWTPM_NVRAM_SetStateBlob checks the header and stops).
func TestSetStateBlobRefusesHeaderless(t *testing.T) {
	sk, mk := key(t, 16, 1), key(t, 32, 2)
	for _, b := range [][]byte{plainBlob, legacyEncrypt(t, sk, plainBlob), legacyEncrypt(t, mk, plainBlob)} {
		for _, keys := range [][2]*Key{{nil, nil}, {sk, nil}, {nil, mk}, {sk, mk}} {
			for _, enc := range []bool{false, true} {
				if _, err := UnwrapMigration(b, enc, keys[0], keys[1]); !errors.Is(err, ErrMalformed) || oneSentinel(err) != nil {
					t.Fatalf("headerless SET_STATEBLOB blob accepted or misreported: %v", err)
				}
			}
		}
	}
}

// TestHeaderlessSwtpmFixture: swtpm's own permall without its header (what an early release
// stored) opens to the same libtpms blob.
func TestHeaderlessSwtpmFixture(t *testing.T) {
	perm := readFixture(t, "plain", "tpm2-00.permall")
	want, err := Open(perm, nil)
	if err != nil {
		t.Fatal(err)
	}
	raw := perm[HeaderSize+tlvHeaderSize:]
	if got, err := Open(raw, nil); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("headerless swtpm permall: %v", err)
	}
	k := fixtureKey(t, "file=keys/k256.hex,mode=aes-256-cbc")
	if got, err := Open(legacyEncrypt(t, k, raw), k); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("legacy-encrypted swtpm permall: %v", err)
	}
}
