package blob

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"testing"
)

func key(t testing.TB, n int, fill byte) *Key {
	k, err := NewKey(bytes.Repeat([]byte{fill}, n))
	if err != nil {
		t.Fatal(err)
	}
	return k
}

var plainBlob = bytes.Repeat([]byte("libtpms state "), 97)

func TestSealOpenRoundTrip(t *testing.T) {
	for _, tt := range []struct {
		name string
		k    *Key
		size int // expected sealed size
	}{
		{"plain", nil, 10 + 6 + len(plainBlob)},
		{"aes-128", key(t, 16, 1), -1},
		{"aes-256", key(t, 32, 2), -1},
	} {
		t.Run(tt.name, func(t *testing.T) {
			s, err := Seal(plainBlob, tt.k)
			if err != nil {
				t.Fatal(err)
			}
			if tt.size > 0 && len(s) != tt.size {
				t.Fatalf("sealed size %d, want %d", len(s), tt.size)
			}
			got, err := Open(s, tt.k)
			if err != nil || !bytes.Equal(got, plainBlob) {
				t.Fatalf("Open: %v", err)
			}
			if tt.k == nil {
				return
			}
			// ciphertext is padded to the key length, IV TLV is key-length long
			h, body, _ := ParseHeader(s)
			tl, _ := parseTLVs(body)
			if len(tl[tagEncryptedData])%len(tt.k.b) != 0 || len(tl[tagIVEncryptedData]) != len(tt.k.b) || len(tl[tagHMAC]) != 32 {
				t.Fatalf("TLV sizes %d/%d/%d", len(tl[tagEncryptedData]), len(tl[tagIVEncryptedData]), len(tl[tagHMAC]))
			}
			if h.Flags&FlagEncrypted == 0 || (h.Flags&FlagEncrypted256 != 0) != tt.k.Is256() {
				t.Fatalf("flags %#x", h.Flags)
			}
		})
	}
}

func TestOpenRefusesBadInput(t *testing.T) {
	k128, k256, other := key(t, 16, 1), key(t, 32, 2), key(t, 32, 3)
	sealed, _ := Seal(plainBlob, k256)
	plain, _ := Seal(plainBlob, nil)
	tests := []struct {
		name string
		data []byte
		k    *Key
		want error
	}{
		{"wrong key", sealed, other, ErrDecrypt},
		{"wrong key length", sealed, k128, ErrKeyLength},
		{"encrypted without key", sealed, nil, ErrKeyNotFound},
		{"plain with key", plain, k256, ErrDecrypt},
		{"header only claims more", plain[:20], nil, ErrMalformed},
		{"short", plain[:5], nil, ErrMalformed},
		{"min version 3", func() []byte { b := bytes.Clone(plain); b[1] = 3; return b }(), nil, ErrVersion},
		{"hdrsize 12", func() []byte { b := bytes.Clone(plain); b[3] = 12; return b }(), nil, ErrHeaderSize},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := Open(tt.data, tt.k); !errors.Is(err, tt.want) {
				t.Fatalf("err = %v, want %v", err, tt.want)
			}
		})
	}
	// every truncation and every single bit flip of an encrypted blob is refused
	for n := 0; n < len(sealed); n++ {
		if _, err := Open(sealed[:n], k256); err == nil {
			t.Fatalf("truncation to %d accepted", n)
		}
	}
	for i := 0; i < len(sealed); i++ {
		b := bytes.Clone(sealed)
		b[i] ^= 0x10
		if got, err := Open(b, k256); err == nil && !bytes.Equal(got, plainBlob) {
			t.Fatalf("bit flip at %d accepted with different content", i)
		} else if err == nil && i >= 10 {
			t.Fatalf("bit flip at %d in the body accepted", i)
		}
	}
}

func TestMigrationBlobs(t *testing.T) {
	sk, mk := key(t, 32, 4), key(t, 32, 5)
	for _, tt := range []struct {
		name      string
		sk, mk    *Key
		decrypt   bool
		wantFlags uint16
		innerEnc  bool
	}{
		{"no keys", nil, nil, true, 0x04, false},
		{"both keys, not decrypted", sk, mk, false, 0x1f, true},
		{"both keys, decrypted", sk, mk, true, 0x16, false},
		{"state key only, decrypted", sk, nil, true, 0x04, false},
		{"migration key only", nil, mk, true, 0x16, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			b, enc, err := WrapMigration(plainBlob, tt.sk, tt.mk, tt.decrypt)
			if err != nil {
				t.Fatal(err)
			}
			h, _, _ := ParseHeader(b)
			if h.Flags != tt.wantFlags || enc != tt.innerEnc {
				t.Fatalf("flags %#x enc %v, want %#x %v", h.Flags, enc, tt.wantFlags, tt.innerEnc)
			}
			got, err := UnwrapMigration(b, enc, tt.sk, tt.mk)
			if err != nil || !bytes.Equal(got, plainBlob) {
				t.Fatalf("unwrap: %v", err)
			}
			if tt.mk != nil {
				if _, err := UnwrapMigration(b, enc, tt.sk, nil); !errors.Is(err, ErrKeyNotFound) {
					t.Fatalf("unwrap without migration key: %v", err)
				}
				if _, err := UnwrapMigration(b, enc, tt.sk, key(t, 32, 9)); !errors.Is(err, ErrDecrypt) {
					t.Fatalf("unwrap with wrong migration key: %v", err)
				}
			}
		})
	}
	// a plain blob is accepted even when a migration key is configured ("upgrade")
	b, _, _ := WrapMigration(plainBlob, nil, nil, true)
	if got, err := UnwrapMigration(b, false, nil, mk); err != nil || !bytes.Equal(got, plainBlob) {
		t.Fatalf("plain blob with migration key configured: %v", err)
	}
	if got, err := UnwrapMigration(b[:10], false, nil, nil); err == nil && got != nil {
		t.Fatal("header-only blob should clear")
	}
}

func TestLoadKey(t *testing.T) {
	dir := t.TempDir()
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		os.WriteFile(p, []byte(content), 0o600)
		return p
	}
	hex128 := write("k128", "0x000102030405060708090a0b0c0d0e0f\n")
	hex256 := write("k256", "000102030405060708090a0b0c0d0e0f000102030405060708090a0b0c0d0e0f")
	pwd := write("pwd", "secret\n")
	tests := []struct {
		opt    string
		len    int
		errSub string
	}{
		{"file=" + hex128, 16, ""},
		{"file=" + hex128 + ",mode=aes-256-cbc", 0, "needs 256 bits"},
		{"file=" + hex256 + ",mode=aes-256-cbc", 32, ""},
		{"pwdfile=" + pwd, 16, ""},
		{"pwdfile=" + pwd + ",mode=aes-256-cbc,kdf=sha512", 32, ""},
		{"file=" + hex128 + ",pwdfile=" + pwd, 0, "exactly one"},
		{"file=" + hex128 + ",mode=des", 0, "unsupported cipher"},
		{"file=/nonexistent", 0, "could not open"},
		{"bogus=1", 0, "unknown option"},
	}
	for _, tt := range tests {
		t.Run(tt.opt, func(t *testing.T) {
			spec, err := ParseKeyOption(tt.opt)
			var k *Key
			if err == nil {
				k, err = LoadKey(spec)
			}
			if tt.errSub != "" {
				if err == nil || !bytes.Contains([]byte(err.Error()), []byte(tt.errSub)) {
					t.Fatalf("err = %v, want %q", err, tt.errSub)
				}
				return
			}
			if err != nil || len(k.b) != tt.len {
				t.Fatalf("key %v err %v", k, err)
			}
		})
	}
	// PBKDF2 of the whole file, newline included: the known swtpm derivation
	k, _ := DeriveKey([]byte("secret\n"), 16, "pbkdf2")
	k2, _ := DeriveKey([]byte("secret"), 16, "pbkdf2")
	if bytes.Equal(k.b, k2.b) {
		t.Fatal("trailing newline must be part of the passphrase")
	}
}

func FuzzOpen(f *testing.F) {
	k := key(f, 32, 7)
	s1, _ := Seal(plainBlob[:100], nil)
	s2, _ := Seal(plainBlob[:100], k)
	f.Add(s1, false)
	f.Add(s2, true)
	f.Add([]byte{2, 1, 0, 10, 0, 0, 0, 0, 0, 10}, false)
	f.Fuzz(func(t *testing.T, data []byte, useKey bool) {
		kk := (*Key)(nil)
		if useKey {
			kk = k
		}
		plain, err := Open(data, kk)
		if err != nil {
			return
		}
		re, err := Seal(plain, kk)
		if err != nil {
			t.Fatal(err)
		}
		if back, err := Open(re, kk); err != nil || !bytes.Equal(back, plain) {
			t.Fatalf("round trip: %v", err)
		}
	})
}

func FuzzUnwrapMigration(f *testing.F) {
	sk, mk := key(f, 16, 1), key(f, 32, 2)
	for _, c := range []struct {
		s, m *Key
		d    bool
	}{{nil, nil, true}, {sk, mk, false}, {sk, mk, true}, {nil, mk, true}} {
		b, _, _ := WrapMigration(plainBlob[:64], c.s, c.m, c.d)
		f.Add(b, !c.d && c.s != nil)
	}
	f.Fuzz(func(t *testing.T, data []byte, enc bool) {
		plain, err := UnwrapMigration(data, enc, sk, mk)
		if err != nil || plain == nil {
			return
		}
		b, e, err := WrapMigration(plain, sk, mk, false)
		if err != nil {
			t.Fatal(err)
		}
		if back, err := UnwrapMigration(b, e, sk, mk); err != nil || !bytes.Equal(back, plain) {
			t.Fatalf("round trip: %v", err)
		}
	})
}

func FuzzParseKeyOption(f *testing.F) {
	for _, s := range []string{"file=/x,mode=aes-256-cbc", "pwdfd=3,kdf=sha512", "fd=4,format=binary,remove", "pwdfile=/p,mode=aes-cbc"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		spec, err := ParseKeyOption(s)
		if err != nil {
			return
		}
		if kl := spec.KeyLen(); kl != 16 && kl != 32 {
			t.Fatalf("key length %d", kl)
		}
	})
}
