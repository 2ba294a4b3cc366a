package store

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/sha256"
	"encoding/binary"
	"os"
	"path/filepath"
	"testing"

	"github.com/vtpmd/vtpmd/backend/blob"
	"github.com/vtpmd/vtpmd/emulator"
)

// legacyEncrypt is an early swtpm release's encrypted state file: AES-CBC with a zero IV over
// SHA256(plain) || plain, padded to the key length, without a header.
func legacyEncrypt(t testing.TB, k *blob.Key, plain []byte) []byte {
	t.Helper()
	sum := sha256.Sum256(plain)
	p := append(sum[:], plain...)
	pad := k.Len() - len(p)%k.Len()
	p = append(p, bytes.Repeat([]byte{byte(pad)}, pad)...)
	c, err := aes.NewCipher(k.Bytes())
	if err != nil {
		t.Fatal(err)
	}
	cipher.NewCBCEncrypter(c, make([]byte, aes.BlockSize)).CryptBlocks(p, p)
	return p
}

// libtpmsLike is testBlob beginning with a zero byte, as libtpms blobs do.
func libtpmsLike(i uint32) []byte {
	b := binary.BigEndian.AppendUint32(nil, i)
	b[0] = 0
	return append(b, testBlob...)
}

// TestHeaderlessStateFiles: state files of early swtpm releases (no swtpm header; plain or
// encrypted the legacy way) load from a directory and from a linear file, as with swtpm
// 0.7.1, versioned stores included; the next write is in the current format.
func TestHeaderlessStateFiles(t *testing.T) {
	k := mustKey(t, 32, 7)
	plain := libtpmsLike(0)
	for _, c := range []struct {
		name string
		o    Options
		data []byte
	}{
		{"plain", Options{TPM2: true}, plain},
		{"aes-256", Options{TPM2: true, StateKey: k}, legacyEncrypt(t, k, plain)},
		{"aes-256 versioned", Options{TPM2: true, StateKey: k, Versioned: true}, legacyEncrypt(t, k, plain)},
		{"tpm 1.2 plain", Options{}, plain},
	} {
		for _, linear := range []bool{false, true} {
			t.Run(c.name+map[bool]string{false: " dir", true: " file"}[linear], func(t *testing.T) {
				dir := t.TempDir()
				uri := dir
				if linear {
					uri = "file://" + filepath.Join(dir, "tpm.img")
					li, _ := ParseLinear(nil)
					if err := li.Put(0, c.data); err != nil {
						t.Fatal(err)
					}
					if err := os.WriteFile(filepath.Join(dir, "tpm.img"), li.Bytes(), 0o600); err != nil {
						t.Fatal(err)
					}
				} else {
					name := "tpm-00.permall"
					if c.o.TPM2 {
						name = "tpm2-00.permall"
					}
					if err := os.WriteFile(filepath.Join(dir, name), c.data, 0o600); err != nil {
						t.Fatal(err)
					}
				}
				s := mustOpen(t, uri, c.o)
				got, v, err := s.LoadVersioned(emulator.StatePermanent)
				if err != nil || v != 0 || !bytes.Equal(got, plain) {
					t.Fatalf("headerless permall: version %d, %v", v, err)
				}
				raw, _ := s.LoadRaw(emulator.StatePermanent)
				if !bytes.Equal(raw, c.data) {
					t.Fatal("loading rewrote the headerless file")
				}
				if err := s.Store(emulator.StatePermanent, got); err != nil {
					t.Fatal(err)
				}
				raw, _ = s.LoadRaw(emulator.StatePermanent)
				h, _, err := blob.ParseHeader(raw)
				wantFlags := uint16(0)
				if c.o.StateKey != nil {
					wantFlags = blob.FlagEncrypted | blob.FlagEncrypted256
				}
				if err != nil || h.Version != blob.Version || h.Flags != wantFlags {
					t.Fatalf("written back as %+v, %v; want the current format, flags %#x", h, err, wantFlags)
				}
				if back, err := s.Load(emulator.StatePermanent); err != nil || !bytes.Equal(back, plain) {
					t.Fatalf("after the write: %v", err)
				}
			})
		}
	}
}

// TestVersionedHeaderlessBeginningLikeAHeader: a versioned store opens a headerless encrypted
// file whose ciphertext begins like swtpm's header (blob.StoredStamp cannot tell it from a
// broken header without the key); a truncated current-format file is still refused.
func TestVersionedHeaderlessBeginningLikeAHeader(t *testing.T) {
	k := mustKey(t, 16, 8)
	var plain, enc []byte
	for i := uint32(0); ; i++ {
		plain = libtpmsLike(i)
		if enc = legacyEncrypt(t, k, plain); enc[0] == 1 || enc[0] == 2 {
			break
		}
	}
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "tpm2-00.permall"), enc, 0o600); err != nil {
		t.Fatal(err)
	}
	s := mustOpen(t, dir, Options{TPM2: true, StateKey: k, Versioned: true})
	if got, err := s.Load(emulator.StatePermanent); err != nil || !bytes.Equal(got, plain) {
		t.Fatalf("headerless file: %v", err)
	}
	s.Close()

	cur, err := blob.Seal(plain, k)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "tpm2-00.permall"), cur[:len(cur)-5], 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(dir, Options{TPM2: true, StateKey: k, Versioned: true}); err == nil {
		t.Fatal("a truncated current-format file was accepted")
	}
}
