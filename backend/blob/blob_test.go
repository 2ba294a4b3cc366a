package blob

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"
)

// fixtureRoot holds blobs written by Debian's swtpm 0.7.1, recorded by the store package's
// TestGenerateSwtpmFixtures.
const fixtureRoot = "../store/testdata/swtpm-0.7.1"

func key(t testing.TB, n int, fill byte) *Key {
	t.Helper()
	k, err := NewKey(bytes.Repeat([]byte{fill}, n))
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// plainBlob stands in for a libtpms blob; 1299 bytes is the size of a fresh TPM 2 permall.
var plainBlob = func() []byte {
	b := make([]byte, 1299)
	for i := range b {
		b[i] = byte(i*7 + i>>8)
	}
	return b
}()

var sentinels = []error{ErrKeyNotFound, ErrDecrypt, ErrKeyLength, ErrHeaderSize, ErrVersion, ErrMalformed}

// oneSentinel checks that err wraps exactly one of the package's sentinels.
func oneSentinel(err error) error {
	n := 0
	for _, s := range sentinels {
		if errors.Is(err, s) {
			n++
		}
	}
	if n != 1 {
		return fmt.Errorf("error %q wraps %d sentinels", err, n)
	}
	return nil
}

type tlv struct {
	tag uint16
	val []byte
}

// tlvList parses a TLV stream keeping order and duplicates (independent of parseTLVs).
func tlvList(t testing.TB, b []byte) []tlv {
	t.Helper()
	var out []tlv
	for len(b) > 0 {
		if len(b) < 6 {
			t.Fatalf("trailing %d bytes", len(b))
		}
		n := binary.BigEndian.Uint32(b[2:])
		if uint64(n) > uint64(len(b)-6) {
			t.Fatalf("TLV overruns")
		}
		out = append(out, tlv{binary.BigEndian.Uint16(b), b[6 : 6+n]})
		b = b[6+n:]
	}
	return out
}

func tags(l []tlv) []uint16 {
	var out []uint16
	for _, x := range l {
		out = append(out, x.tag)
	}
	return out
}

// independentDecrypt decrypts the (ct, hmac, iv) TLVs the way the reference describes swtpm,
// written out again here without the package's helpers.
func independentDecrypt(t testing.TB, k []byte, l []tlv) []byte {
	t.Helper()
	if len(l) != 3 || len(l[1].val) != 32 || len(l[2].val) != len(k) {
		t.Fatalf("want ct, 32-byte HMAC, %d-byte IV TLVs; got %d TLVs", len(k), len(l))
	}
	ct, sum, iv := l[0].val, l[1].val, l[2].val
	m := hmac.New(sha256.New, k)
	m.Write(ct)
	m.Write(iv)
	if !bytes.Equal(m.Sum(nil), sum) {
		t.Fatal("HMAC over ciphertext||IV keyed with the AES key does not match")
	}
	if len(ct)%len(k) != 0 {
		t.Fatalf("ciphertext of %d bytes is not padded to the key length %d", len(ct), len(k))
	}
	block, _ := aes.NewCipher(k)
	p := make([]byte, len(ct))
	cipher.NewCBCDecrypter(block, iv[:16]).CryptBlocks(p, ct)
	pad := int(p[len(p)-1])
	if pad < 1 || pad > len(k) || !bytes.Equal(p[len(p)-pad:], bytes.Repeat([]byte{byte(pad)}, pad)) {
		t.Fatalf("padding %d is not PKCS#7 to the key length", pad)
	}
	return p[:len(p)-pad]
}

func TestSealFormat(t *testing.T) {
	for _, n := range []int{0, 1, 15, 16, 17, 31, 32, 33, 1299} {
		for _, k := range []*Key{nil, key(t, 16, 1), key(t, 32, 2)} {
			t.Run(fmt.Sprintf("%d bytes %v", n, k), func(t *testing.T) {
				plain := plainBlob[:n]
				s, err := Seal(plain, k)
				if err != nil {
					t.Fatal(err)
				}
				wantFlags := map[int]uint16{0: 0, 16: 0x01, 32: 0x09}[k.Len()]
				hdr := []byte{2, 1, 0, 10, 0, byte(wantFlags), 0, 0, 0, 0}
				binary.BigEndian.PutUint32(hdr[6:], uint32(len(s)))
				if !bytes.Equal(s[:10], hdr) {
					t.Fatalf("header % x, want % x", s[:10], hdr)
				}
				l := tlvList(t, s[10:])
				if k == nil {
					if fmt.Sprint(tags(l)) != "[1]" || !bytes.Equal(l[0].val, plain) || len(s) != 16+n {
						t.Fatalf("plain blob: tags %v, %d bytes", tags(l), len(s))
					}
				} else {
					if fmt.Sprint(tags(l)) != "[2 3 6]" {
						t.Fatalf("tags %v, want [2 3 6]", tags(l))
					}
					// padding to the key length, not the block size: 16 bytes of plain get
					// 16 bytes of padding with an AES-256 key
					if want := n + k.Len() - n%k.Len(); len(l[0].val) != want {
						t.Fatalf("ciphertext %d bytes, want %d", len(l[0].val), want)
					}
					if got := independentDecrypt(t, k.b, l); !bytes.Equal(got, plain) {
						t.Fatal("independent decryption gives other data")
					}
				}
				got, err := Open(s, k)
				if err != nil || !bytes.Equal(got, plain) {
					t.Fatalf("Open: %v", err)
				}
			})
		}
	}
	// fresh IV per seal
	k := key(t, 16, 3)
	a, _ := Seal(plainBlob, k)
	b, _ := Seal(plainBlob, k)
	if bytes.Equal(a, b) {
		t.Fatal("two seals of the same data are identical: IV not fresh")
	}
}

// craftEncrypted builds ct/HMAC/IV TLVs with chosen padded plaintext and IV (nil: no IV TLV,
// zero IV), with a valid HMAC, to reach the checks behind the HMAC.
func craftEncrypted(k []byte, padded, iv []byte, ctTag, ivTag uint16) []byte {
	block, _ := aes.NewCipher(k)
	ivb := make([]byte, 16)
	copy(ivb, iv)
	ct := make([]byte, len(padded)-len(padded)%16)
	cipher.NewCBCEncrypter(block, ivb).CryptBlocks(ct, padded[:len(ct)])
	ct = append(ct, padded[len(ct):]...) // a partial block stays as is
	m := hmac.New(sha256.New, k)
	m.Write(ct)
	m.Write(iv)
	out := appendTLV(nil, ctTag, ct)
	out = appendTLV(out, TagHMAC, m.Sum(nil))
	if iv != nil {
		out = appendTLV(out, ivTag, iv)
	}
	return out
}

func padTo(p []byte, n int) []byte {
	pad := n - len(p)%n
	return append(bytes.Clone(p), bytes.Repeat([]byte{byte(pad)}, pad)...)
}

func TestOpenRefusesBadInput(t *testing.T) {
	k16, k32 := key(t, 16, 1), key(t, 32, 2)
	sealed32, _ := Seal(plainBlob, k32)
	plain, _ := Seal(plainBlob, nil)
	mod := func(b []byte, f func([]byte)) []byte { b = bytes.Clone(b); f(b); return b }
	enc := func(body []byte, flags uint16) []byte { return finish(flags, body) }
	iv16 := bytes.Repeat([]byte{9}, 16)
	tests := []struct {
		name string
		data []byte
		k    *Key
		want error
	}{
		{"empty", nil, nil, ErrMalformed},
		{"shorter than header", plain[:9], nil, ErrMalformed},
		{"totlen too small", mod(plain, func(b []byte) { b[9]-- }), nil, ErrMalformed},
		{"totlen too large", append(bytes.Clone(plain), 0), nil, ErrMalformed},
		{"min_version 3", mod(plain, func(b []byte) { b[1] = 3 }), nil, ErrVersion},
		{"version 3", mod(plain, func(b []byte) { b[0] = 3 }), nil, ErrVersion},
		{"version 0", mod(plain, func(b []byte) { b[0] = 0 }), nil, ErrVersion},
		{"hdrsize 12", mod(plain, func(b []byte) { b[3] = 12 }), nil, ErrHeaderSize},
		{"TLV length overruns", mod(plain, func(b []byte) { b[15]++ }), nil, ErrMalformed},
		{"truncated TLV header", enc([]byte{0, 1, 0}, 0), nil, ErrMalformed},
		{"no data TLV", enc(appendTLV(nil, 9, []byte("x")), 0), nil, ErrMalformed},
		{"encrypted, no key", sealed32, nil, ErrKeyNotFound},
		{"encrypted TLV but flags say plain, no key", mod(sealed32, func(b []byte) { b[5] = 0 }), nil, ErrKeyNotFound},
		{"plain, key configured", plain, k32, ErrDecrypt},
		{"wrong key", sealed32, key(t, 32, 3), ErrDecrypt},
		{"wrong key length", sealed32, k16, ErrKeyLength},
		{"HMAC TLV short", enc(append(appendTLV(nil, 2, make([]byte, 32)), appendTLV(nil, 3, make([]byte, 31))...), 9), k32, ErrMalformed},
		{"no HMAC TLV", enc(appendTLV(nil, 2, make([]byte, 32)), 9), k32, ErrMalformed},
		{"ciphertext not whole blocks", enc(craftEncrypted(k16.b, append(padTo(plainBlob[:20], 16), 1, 2, 3), iv16, 2, 6), 1), k16, ErrMalformed},
		{"ciphertext shorter than the key", enc(craftEncrypted(k32.b, padTo(nil, 16), bytes.Repeat([]byte{1}, 32), 2, 6), 9), k32, ErrDecrypt},
		{"IV shorter than the key", enc(craftEncrypted(k32.b, padTo(plainBlob[:40], 32), iv16, 2, 6), 9), k32, ErrDecrypt},
		{"padding 0", enc(craftEncrypted(k16.b, append(bytes.Clone(plainBlob[:31]), 0), iv16, 2, 6), 1), k16, ErrDecrypt},
		{"padding > key length", enc(craftEncrypted(k16.b, append(bytes.Clone(plainBlob[:31]), 17), iv16, 2, 6), 1), k16, ErrDecrypt},
		{"padding bytes differ", enc(craftEncrypted(k16.b, append(bytes.Clone(plainBlob[:30]), 1, 2), iv16, 2, 6), 1), k16, ErrDecrypt},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := Open(tt.data, tt.k)
			if !errors.Is(err, tt.want) {
				t.Fatalf("Open = %d bytes, %v; want %v", len(got), err, tt.want)
			}
			if err := oneSentinel(err); err != nil {
				t.Fatal(err)
			}
			t.Log(err)
		})
	}
	// what old writers produced is still read: no IV TLV (zero IV, HMAC over ct only), and
	// swtpm's "first 32 bytes of the HMAC TLV" comparison
	b := enc(craftEncrypted(k16.b, padTo(plainBlob[:50], 16), nil, 2, 6), 1)
	if got, err := Open(b, k16); err != nil || !bytes.Equal(got, plainBlob[:50]) {
		t.Fatalf("blob without IV TLV: %v", err)
	}
}

func TestLegacyVersion1(t *testing.T) {
	k := key(t, 32, 5)
	data := plainBlob[:333]
	v1 := func(body []byte, flags uint16) []byte {
		b := finish(flags, body)
		b[0] = 1
		return b
	}
	if got, err := Open(v1(data, 0), nil); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("plain v1: %v", err)
	}
	sum := sha256.Sum256(data)
	padded := padTo(append(sum[:], data...), 32)
	block, _ := aes.NewCipher(k.b)
	ct := make([]byte, len(padded))
	cipher.NewCBCEncrypter(block, make([]byte, 16)).CryptBlocks(ct, padded)
	if got, err := Open(v1(ct, 1), k); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("encrypted v1: %v", err)
	}
	if _, err := Open(v1(ct, 1), key(t, 32, 6)); !errors.Is(err, ErrDecrypt) {
		t.Fatalf("encrypted v1, wrong key: %v", err)
	}
	flipped := bytes.Clone(ct)
	flipped[100] ^= 1
	if _, err := Open(v1(flipped, 1), k); !errors.Is(err, ErrDecrypt) {
		t.Fatalf("encrypted v1, tampered: %v", err)
	}
	// a version-1 migration blob carries the inner data raw
	if got, err := UnwrapMigration(v1(data, FlagMigrationData), false, nil, nil); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("v1 migration blob: %v", err)
	}
}

// flipExpect says what a single bit flip at byte i of a blob may give. ok: decodes to the same
// data; errs: the sentinels allowed.
type flipExpect struct {
	ok   bool
	errs []error
}

// tlvHeaderBytes marks the TLV header bytes of a body (offsets relative to the blob).
func tlvHeaderBytes(t testing.TB, b []byte, base int, m map[int]bool) {
	for off := 0; off < len(b); {
		for j := 0; j < 6; j++ {
			m[base+off+j] = true
		}
		off += 6 + int(binary.BigEndian.Uint32(b[off+2:]))
	}
}

// checkEveryFlip flips every bit of every byte of b and decodes it with dec.
func checkEveryFlip(t *testing.T, b, want []byte, dec func([]byte) ([]byte, error), expect func(i int, bit byte) flipExpect) {
	t.Helper()
	for i := range b {
		for bit := byte(1); bit != 0; bit <<= 1 {
			c := bytes.Clone(b)
			c[i] ^= bit
			got, err := dec(c)
			e := expect(i, bit)
			if err == nil {
				if !e.ok || !bytes.Equal(got, want) {
					t.Fatalf("flip of bit %#02x at byte %d accepted (same data: %v)", bit, i, bytes.Equal(got, want))
				}
				continue
			}
			if err := oneSentinel(err); err != nil {
				t.Fatalf("byte %d bit %#02x: %v", i, bit, err)
			}
			matched := false
			for _, s := range e.errs {
				matched = matched || errors.Is(err, s)
			}
			if !matched {
				t.Fatalf("flip of bit %#02x at byte %d: %v, want one of %v", bit, i, err, e.errs)
			}
		}
	}
}

// legacyErrs are the errors of the headerless reading that Open with a key falls back to when
// swtpm's header check fails (openHeaderless): the legacy decryption's.
var legacyErrs = []error{ErrMalformed, ErrDecrypt}

func TestEveryBitFlipOfSealedBlob(t *testing.T) {
	for _, k := range []*Key{key(t, 16, 1), key(t, 32, 2)} {
		t.Run(k.String(), func(t *testing.T) {
			s, _ := Seal(plainBlob, k)
			hdrs := map[int]bool{}
			tlvHeaderBytes(t, s[10:], 10, hdrs)
			checkEveryFlip(t, s, plainBlob, func(b []byte) ([]byte, error) { return Open(b, k) }, func(i int, bit byte) flipExpect {
				switch {
				case i == 0:
					return flipExpect{errs: []error{ErrVersion}}
				case i == 1: // min_version 1 -> 0 is still readable
					return flipExpect{ok: bit == 1, errs: legacyErrs}
				case i == 2 || i == 3:
					return flipExpect{errs: legacyErrs}
				case i == 5 && bit == FlagEncrypted256:
					return flipExpect{errs: []error{ErrKeyLength}}
				case i == 4 || i == 5: // other flags are not consulted by Open with a key
					return flipExpect{ok: true}
				case i < 10:
					return flipExpect{errs: legacyErrs}
				case hdrs[i]:
					return flipExpect{errs: []error{ErrMalformed, ErrDecrypt}}
				}
				return flipExpect{errs: []error{ErrDecrypt}} // ciphertext, HMAC or IV
			})
		})
	}
}

func TestEveryBitFlipOfMigrationBlob(t *testing.T) {
	sk, mk := key(t, 16, 1), key(t, 32, 2)
	b, enc, err := WrapMigration(plainBlob, sk, mk, false)
	if err != nil || !enc {
		t.Fatal(err)
	}
	hdrs := map[int]bool{}
	tlvHeaderBytes(t, b[10:], 10, hdrs)
	checkEveryFlip(t, b, plainBlob, func(c []byte) ([]byte, error) { return UnwrapMigration(c, enc, sk, mk) }, func(i int, bit byte) flipExpect {
		switch {
		case i == 0:
			return flipExpect{errs: []error{ErrVersion}}
		case i == 1:
			return flipExpect{ok: bit == 1, errs: []error{ErrVersion}}
		case i == 2 || i == 3:
			return flipExpect{errs: []error{ErrHeaderSize}}
		case i == 5 && bit == FlagMigrationEncrypted: // looks unencrypted: no TLV 4
			return flipExpect{errs: []error{ErrMalformed}}
		case i == 5 && (bit == FlagEncrypted256 || bit == FlagMigration256):
			return flipExpect{errs: []error{ErrKeyLength}}
		case i == 4 || i == 5: // 0x01 is implied by innerEncrypted; 0x04 is not consulted
			return flipExpect{ok: true}
		case i < 10:
			return flipExpect{errs: []error{ErrMalformed}}
		case hdrs[i]:
			return flipExpect{errs: []error{ErrMalformed, ErrDecrypt}}
		}
		return flipExpect{errs: []error{ErrDecrypt}}
	})
}

func TestEveryTruncation(t *testing.T) {
	sk, mk := key(t, 16, 1), key(t, 32, 2)
	for _, c := range []struct {
		name   string
		dec    func([]byte) ([]byte, error)
		blob   func() []byte
		legacy bool // a cut header sends it to the headerless reading (ErrDecrypt possible)
	}{
		{"plain", func(b []byte) ([]byte, error) { return Open(b, nil) }, func() []byte { b, _ := Seal(plainBlob, nil); return b }, false},
		{"aes-128", func(b []byte) ([]byte, error) { return Open(b, sk) }, func() []byte { b, _ := Seal(plainBlob, sk); return b }, true},
		{"aes-256", func(b []byte) ([]byte, error) { return Open(b, mk) }, func() []byte { b, _ := Seal(plainBlob, mk); return b }, true},
		{"migration", func(b []byte) ([]byte, error) { return UnwrapMigration(b, true, sk, mk) }, func() []byte {
			b, _, _ := WrapMigration(plainBlob, sk, mk, false)
			return b
		}, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			b := c.blob()
			for n := 0; n < len(b); n++ {
				_, err := c.dec(b[:n])
				if oneSentinel(err) != nil || !errors.Is(err, ErrMalformed) && !(c.legacy && errors.Is(err, ErrDecrypt)) {
					t.Fatalf("truncated to %d of %d bytes: %v", n, len(b), err)
				}
			}
			// a consistent header does not help: the TLVs are cut
			for _, n := range []int{11, 16, 100, len(b) - 1} {
				c2 := bytes.Clone(b[:n])
				binary.BigEndian.PutUint32(c2[6:], uint32(n))
				if _, err := c.dec(c2); err == nil || oneSentinel(err) != nil {
					t.Fatalf("truncated to %d with totlen fixed: %v", n, err)
				}
			}
		})
	}
}

func TestMigrationMatrix(t *testing.T) {
	keys := []*Key{nil, key(t, 16, 1), key(t, 32, 2)}
	other := map[int]*Key{16: key(t, 16, 7), 32: key(t, 32, 8)}
	for _, sk := range keys {
		for _, mk := range keys {
			for _, decrypt := range []bool{false, true} {
				name := fmt.Sprintf("state %v, migration %v, decrypt %v", sk, mk, decrypt)
				t.Run(name, func(t *testing.T) {
					b, enc, err := WrapMigration(plainBlob, sk, mk, decrypt)
					if err != nil {
						t.Fatal(err)
					}
					wantEnc := sk != nil && !decrypt
					flags := uint16(FlagMigrationData)
					if wantEnc {
						flags |= FlagEncrypted
						if sk.Is256() {
							flags |= FlagEncrypted256
						}
					}
					if mk != nil {
						flags |= FlagMigrationEncrypted
						if mk.Is256() {
							flags |= FlagMigration256
						}
					}
					h, body, err := ParseHeader(b)
					if err != nil || h.Flags != flags || enc != wantEnc {
						t.Fatalf("flags %#02x enc %v err %v; want %#02x %v", h.Flags, enc, err, flags, wantEnc)
					}
					outer := tlvList(t, body)
					var inner []byte
					if mk != nil {
						if fmt.Sprint(tags(outer)) != "[5 3 7]" {
							t.Fatalf("outer tags %v", tags(outer))
						}
						inner = independentDecrypt(t, mk.b, outer)
					} else {
						if fmt.Sprint(tags(outer)) != "[4]" {
							t.Fatalf("outer tags %v", tags(outer))
						}
						inner = outer[0].val
					}
					in := tlvList(t, inner)
					if wantEnc {
						if got := independentDecrypt(t, sk.b, in); !bytes.Equal(got, plainBlob) {
							t.Fatal("inner data differs")
						}
					} else if fmt.Sprint(tags(in)) != "[1]" || !bytes.Equal(in[0].val, plainBlob) {
						t.Fatalf("inner tags %v", tags(in))
					}
					for _, flag := range []bool{enc, false} { // the header flag suffices
						if got, err := UnwrapMigration(b, flag, sk, mk); err != nil || !bytes.Equal(got, plainBlob) {
							t.Fatalf("unwrap (flag %v): %v", flag, err)
						}
					}
					if mk != nil {
						if _, err := UnwrapMigration(b, enc, sk, nil); !errors.Is(err, ErrKeyNotFound) {
							t.Fatalf("no migration key: %v", err)
						}
						if _, err := UnwrapMigration(b, enc, sk, other[mk.Len()]); !errors.Is(err, ErrDecrypt) {
							t.Fatalf("wrong migration key: %v", err)
						}
						if _, err := UnwrapMigration(b, enc, sk, other[48-mk.Len()]); !errors.Is(err, ErrKeyLength) {
							t.Fatalf("migration key of the other length: %v", err)
						}
					}
					if wantEnc {
						if _, err := UnwrapMigration(b, enc, nil, mk); !errors.Is(err, ErrKeyNotFound) {
							t.Fatalf("no state key: %v", err)
						}
						if _, err := UnwrapMigration(b, enc, other[sk.Len()], mk); !errors.Is(err, ErrDecrypt) {
							t.Fatalf("wrong state key: %v", err)
						}
					} else if sk == nil {
						// "upgrade": plain inner data is accepted when a state key is set
						if got, err := UnwrapMigration(b, false, other[16], mk); err != nil || !bytes.Equal(got, plainBlob) {
							t.Fatalf("plain inner data with a state key configured: %v", err)
						}
					}
					if mk == nil {
						// and a plain outer layer with a migration key configured
						if got, err := UnwrapMigration(b, enc, sk, other[32]); err != nil || !bytes.Equal(got, plainBlob) {
							t.Fatalf("plain migration blob with a migration key configured: %v", err)
						}
					}
				})
			}
		}
	}
}

func TestUnwrapSpecialCases(t *testing.T) {
	sk := key(t, 16, 1)
	// a header-only blob clears (swtpm: TPMLIB_SetState(NULL))
	if got, err := UnwrapMigration(finish(FlagMigrationData, nil), false, nil, nil); err != nil || got != nil {
		t.Fatalf("header-only blob: %v %v", got, err)
	}
	// a stored-file blob is not a migration blob: swtpm looks for TLV 4
	stored, _ := Seal(plainBlob, nil)
	if _, err := UnwrapMigration(stored, false, nil, nil); !errors.Is(err, ErrMalformed) {
		t.Fatalf("stored blob as migration blob: %v", err)
	}
	// innerEncrypted claimed, but the inner data is plain
	b, _, _ := WrapMigration(plainBlob, nil, nil, true)
	if _, err := UnwrapMigration(b, true, sk, nil); !errors.Is(err, ErrDecrypt) {
		t.Fatalf("plain inner data claimed encrypted: %v", err)
	}
	if _, err := UnwrapMigration(b, true, nil, nil); !errors.Is(err, ErrKeyNotFound) {
		t.Fatalf("encrypted claim without a state key: %v", err)
	}
}

// fixture describes one state directory recorded from Debian's swtpm 0.7.1.
type fixture struct {
	name, key, migKey   string
	permFlags, migFlags uint16
	haveVolatile        bool
}

var fixtures = []fixture{
	{name: "plain", permFlags: 0x00, migFlags: 0x04, haveVolatile: true},
	{name: "aes128-hex", key: "file=keys/k128.hex", permFlags: 0x01, migFlags: 0x04, haveVolatile: true},
	{name: "aes256-hex", key: "file=keys/k256.hex,mode=aes-256-cbc", permFlags: 0x09, migFlags: 0x04, haveVolatile: true},
	{name: "aes256-pwd-migkey256", key: "pwdfile=keys/pwd,mode=aes-256-cbc", migKey: "pwdfile=keys/mpwd,mode=aes-256-cbc", permFlags: 0x09, migFlags: 0x16, haveVolatile: true},
	{name: "aes128-sha512", key: "pwdfile=keys/pwd,kdf=sha512", permFlags: 0x01, migFlags: 0x04, haveVolatile: true},
	{name: "migkey128", migKey: "file=keys/k128.hex", permFlags: 0x00, migFlags: 0x06, haveVolatile: true},
	{name: "aes128-migkey256", key: "file=keys/k128.hex", migKey: "file=keys/k256.hex,mode=aes-256-cbc", permFlags: 0x01, migFlags: 0x16, haveVolatile: true},
}

func fixtureKey(t testing.TB, opt string) *Key {
	t.Helper()
	if opt == "" {
		return nil
	}
	kind, rest, _ := bytes.Cut([]byte(opt), []byte("="))
	spec, err := ParseKeyOption(string(kind) + "=" + filepath.Join(fixtureRoot, string(rest)))
	if err != nil {
		t.Fatal(err)
	}
	k, err := LoadKey(spec)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func readFixture(t testing.TB, name, file string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(fixtureRoot, name, file))
	if err != nil {
		t.Fatalf("fixture: %v", err)
	}
	return b
}

// TestSwtpmFixtures decodes state files and GET_STATEBLOB blobs written by Debian's swtpm.
func TestSwtpmFixtures(t *testing.T) {
	for _, f := range fixtures {
		t.Run(f.name, func(t *testing.T) {
			sk, mk := fixtureKey(t, f.key), fixtureKey(t, f.migKey)
			perm := readFixture(t, f.name, "tpm2-00.permall")
			h, _, err := ParseHeader(perm)
			if err != nil || h.Flags != f.permFlags || h.Version != 2 || h.MinVersion != 1 {
				t.Fatalf("permall header %+v %v", h, err)
			}
			plain, err := Open(perm, sk)
			if err != nil {
				t.Fatalf("swtpm's permall: %v", err)
			}
			if f.haveVolatile {
				if _, err := Open(readFixture(t, f.name, "tpm2-00.volatilestate"), sk); err != nil {
					t.Fatalf("swtpm's volatilestate: %v", err)
				}
			}
			mig := readFixture(t, f.name, "permanent.mig")
			if h, _, _ := ParseHeader(mig); h.Flags != f.migFlags {
				t.Fatalf("GET_STATEBLOB flags %#02x, want %#02x", h.Flags, f.migFlags)
			}
			got, err := UnwrapMigration(mig, false, sk, mk)
			if err != nil || !bytes.Equal(got, plain) {
				t.Fatalf("GET_STATEBLOB(permanent) does not unwrap to the stored permall: %v", err)
			}
			// our own encoding of the same data decodes to the same
			re, _ := Seal(plain, sk)
			if back, err := Open(re, sk); err != nil || !bytes.Equal(back, plain) {
				t.Fatal(err)
			}
			// refusals on real data
			if sk != nil {
				if _, err := Open(perm, nil); !errors.Is(err, ErrKeyNotFound) {
					t.Fatalf("no key: %v", err)
				}
				if _, err := Open(perm, key(t, sk.Len(), 0x5a)); !errors.Is(err, ErrDecrypt) {
					t.Fatalf("wrong key: %v", err)
				}
				if _, err := Open(perm, key(t, 48-sk.Len(), 0x5a)); !errors.Is(err, ErrKeyLength) {
					t.Fatalf("wrong key length: %v", err)
				}
			} else if _, err := Open(perm, key(t, 16, 0x5a)); !errors.Is(err, ErrDecrypt) {
				t.Fatalf("plain state with a key: %v", err)
			}
			if mk != nil {
				if _, err := UnwrapMigration(mig, false, sk, nil); !errors.Is(err, ErrKeyNotFound) {
					t.Fatalf("no migration key: %v", err)
				}
				if _, err := UnwrapMigration(mig, false, sk, key(t, mk.Len(), 0x5a)); !errors.Is(err, ErrDecrypt) {
					t.Fatalf("wrong migration key: %v", err)
				}
			}
		})
	}
	// GET_STATEBLOB(volatile) as recorded
	for _, f := range []fixture{fixtures[0], fixtures[3]} {
		if _, err := UnwrapMigration(readFixture(t, f.name, "volatile.mig"), false, fixtureKey(t, f.key), fixtureKey(t, f.migKey)); err != nil {
			t.Fatalf("%s volatile.mig: %v", f.name, err)
		}
	}
}
