package store

// What Debian's swtpm 0.7.1 makes of TLVs it does not know, in state files and in migration
// blobs: the experiment behind the state version TLV (blob.TagStateVersion).

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/vtpmd/vtpmd/backend/blob"
	"github.com/vtpmd/vtpmd/emulator"
	"github.com/vtpmd/vtpmd/internal/tpmclient"
)

// unknownTag is a tag swtpm does not know (it uses 1 to 7).
const unknownTag = 0x7674

// tlvAt inserts TLV(tag, val) into a version-2 TLV stream: first, or after the last TLV.
func tlvAt(stream []byte, tag uint16, val []byte, first bool) []byte {
	t := binary.BigEndian.AppendUint16(nil, tag)
	t = binary.BigEndian.AppendUint32(t, uint32(len(val)))
	t = append(t, val...)
	if first {
		return append(t, stream...)
	}
	return append(bytes.Clone(stream), t...)
}

// withBody puts a new body behind a blob's header, fixing totlen.
func withBody(b, body []byte) []byte {
	out := append(bytes.Clone(b[:blob.HeaderSize]), body...)
	binary.BigEndian.PutUint32(out[6:10], uint32(len(out)))
	return out
}

// swtpmEncrypt encrypts a TLV stream the way swtpm does (AES-CBC with key-length padding and
// IV, HMAC-SHA256 with the AES key over ciphertext||IV), independently of package blob.
func swtpmEncrypt(t testing.TB, k *blob.Key, plain []byte, ctTag, ivTag uint16) []byte {
	t.Helper()
	kb := k.Bytes()
	pad := len(kb) - len(plain)%len(kb)
	p := append(bytes.Clone(plain), bytes.Repeat([]byte{byte(pad)}, pad)...)
	iv := make([]byte, len(kb))
	rand.Read(iv)
	c, err := aes.NewCipher(kb)
	if err != nil {
		t.Fatal(err)
	}
	cipher.NewCBCEncrypter(c, iv[:16]).CryptBlocks(p, p)
	m := hmac.New(sha256.New, kb)
	m.Write(p)
	m.Write(iv)
	out := tlvAt(nil, ctTag, p, false)
	out = tlvAt(out, blob.TagHMAC, m.Sum(nil), false)
	return tlvAt(out, ivTag, iv, false)
}

// tlvBody returns the value of the only TLV of a body that has one.
func tlvBody(t testing.TB, b []byte, tag uint16) []byte {
	t.Helper()
	body := b[blob.HeaderSize:]
	if len(body) < 6 || binary.BigEndian.Uint16(body) != tag || int(binary.BigEndian.Uint32(body[2:])) != len(body)-6 {
		t.Fatalf("body is not one TLV %d", tag)
	}
	return body[6:]
}

// swtpmResumes starts Debian's swtpm on a state directory, INITs it and reports whether PCR
// 16 has the value the state carries.
func swtpmResumes(t *testing.T, bins swtpmBins, c fixtureCase, dir string) error {
	t.Helper()
	p := startSwtpm(t, bins, append([]string{"--tpmstate", "dir=" + dir}, c.swtpmKeyArgs(fixtureRoot)...)...)
	defer p.stop()
	if out, err := p.ioctl("-i"); err != nil {
		return fmt.Errorf("INIT: %v: %s (swtpm: %s)", err, out, p.out)
	}
	got, err := tpmclient.PCRRead(p.tpm(), fixturePCR)
	if err != nil {
		return fmt.Errorf("PCR_Read: %v (swtpm: %s)", err, p.out)
	}
	if want := pcrAfterExtend(fixtureDigest(c.Name)); !bytes.Equal(got, want) {
		return fmt.Errorf("PCR %d = %x, want %x", fixturePCR, got, want)
	}
	return nil
}

// TestSwtpmToleratesUnknownTLVInStateFiles: swtpm 0.7.1 loads state files (plain and
// encrypted) with an extra TLV of a tag it does not know, before or after its own; its
// tlv_data_find_tag walks the stream and skips other tags, and its HMAC covers only the
// ciphertext and the IV. Trailing bytes that are not even a TLV are ignored too when they
// follow the TLVs it looks for (it stops at the first match), which package blob refuses.
func TestSwtpmToleratesUnknownTLVInStateFiles(t *testing.T) {
	bins := debianSwtpm(t)
	extra := bytes.Repeat([]byte{0xa5}, 41)
	for _, c := range fixtureCases {
		if c.Linear {
			continue
		}
		for _, edit := range []struct {
			name    string
			body    func([]byte) []byte
			refused bool
		}{
			{"unknown TLV first", func(b []byte) []byte { return tlvAt(b, unknownTag, extra, true) }, false},
			{"unknown TLV last", func(b []byte) []byte { return tlvAt(b, unknownTag, extra, false) }, false},
			{"two unknown TLVs last", func(b []byte) []byte {
				return tlvAt(tlvAt(b, unknownTag, extra, false), unknownTag+1, nil, false)
			}, false},
			{"trailing garbage", func(b []byte) []byte { return append(bytes.Clone(b), 0, 9, 0xff) }, false},
			// the control: a TLV that overruns the blob, in front of swtpm's, stops its search
			{"overrunning TLV first", func(b []byte) []byte {
				return append(binary.BigEndian.AppendUint32([]byte{0x76, 0x74}, uint32(len(b)+1)), b...)
			}, true},
		} {
			t.Run(c.Name+"/"+edit.name, func(t *testing.T) {
				dir := copyFixture(t, c)
				for _, name := range []string{"tpm2-00.permall", "tpm2-00.volatilestate"} {
					p := filepath.Join(dir, name)
					b, err := os.ReadFile(p)
					if err != nil {
						t.Fatal(err)
					}
					if err := os.WriteFile(p, withBody(b, edit.body(b[blob.HeaderSize:])), 0o600); err != nil {
						t.Fatal(err)
					}
				}
				err := swtpmResumes(t, bins, c, dir)
				if edit.refused && err == nil {
					t.Fatal("swtpm resumed state whose TLV stream it cannot walk")
				}
				if !edit.refused && err != nil {
					t.Fatalf("swtpm refused the state: %v", err)
				}
			})
		}
	}
}

// TestSwtpmToleratesUnknownTLVInMigrationBlobs: swtpm 0.7.1's SET_STATEBLOB accepts blobs with
// an extra, unknown TLV in the outer stream (beside TLV 4, or 5/3/7 under a migration key)
// and in the inner one (beside TLV 1, or 2/3/6 under the state key).
func TestSwtpmToleratesUnknownTLVInMigrationBlobs(t *testing.T) {
	bins := debianSwtpm(t)
	extra := bytes.Repeat([]byte{0x5a}, 41)
	for _, c := range fixtureCases {
		if c.Linear {
			continue
		}
		sk, mk := loadFixtureKey(t, c.Key), loadFixtureKey(t, c.MigKey)
		src := mustOpen(t, "dir://"+copyFixture(t, c), Options{TPM2: true, StateKey: sk})
		perm, err := src.Load(emulator.StatePermanent)
		if err != nil {
			t.Fatal(err)
		}
		vol, err := src.Load(emulator.StateVolatile)
		if err != nil {
			t.Fatal(err)
		}
		for _, decrypt := range []bool{true, false} {
			if !decrypt && sk == nil {
				continue
			}
			for _, where := range []string{"outer first", "outer last", "inner first", "inner last"} {
				t.Run(fmt.Sprintf("%s/decrypt=%v/%s", c.Name, decrypt, where), func(t *testing.T) {
					first := where == "outer first" || where == "inner first"
					dst := t.TempDir()
					files := map[string]string{}
					for name, plain := range map[string][]byte{"permanent": perm, "volatile": vol} {
						// the stored form's TLVs, as WrapMigration puts them in TLV 4
						b, _, err := blob.WrapMigration(plain, sk, nil, decrypt)
						if err != nil {
							t.Fatal(err)
						}
						inner := tlvBody(t, b, blob.TagMigrationData)
						if where == "inner first" || where == "inner last" {
							inner = tlvAt(inner, unknownTag, extra, first)
						}
						var outer []byte
						flags := binary.BigEndian.Uint16(b[4:6])
						if mk != nil {
							outer = swtpmEncrypt(t, mk, inner, blob.TagEncryptedMigrationData, blob.TagIVEncryptedMigration)
							flags |= blob.FlagMigrationEncrypted
							if mk.Is256() {
								flags |= blob.FlagMigration256
							}
						} else {
							outer = tlvAt(nil, blob.TagMigrationData, inner, false)
						}
						if where == "outer first" || where == "outer last" {
							outer = tlvAt(outer, unknownTag, extra, first)
						}
						out := withBody(b, outer)
						binary.BigEndian.PutUint16(out[4:6], flags)
						if got, err := blob.UnwrapMigration(out, false, sk, mk); err != nil || !bytes.Equal(got, plain) {
							t.Fatalf("package blob does not read the edited blob: %v", err)
						}
						files[name] = filepath.Join(t.TempDir(), name)
						os.WriteFile(files[name], out, 0o600)
					}
					p := startSwtpm(t, bins, append([]string{"--tpmstate", "dir=" + dst}, c.swtpmKeyArgs(fixtureRoot)...)...)
					p.mustIoctl("--load", "permanent", files["permanent"])
					p.mustIoctl("--load", "volatile", files["volatile"])
					p.mustIoctl("-i")
					got, err := tpmclient.PCRRead(p.tpm(), fixturePCR)
					if err != nil || !bytes.Equal(got, pcrAfterExtend(fixtureDigest(c.Name))) {
						t.Fatalf("swtpm after SET_STATEBLOB: PCR %x, %v (%s)", got, err, p.out)
					}
				})
			}
		}
	}
}
