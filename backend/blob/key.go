package blob

import (
	"crypto/pbkdf2"
	"crypto/sha512"
	"crypto/subtle"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/vtpmd/vtpmd/internal/opts"
)

// Key is an AES key: 16 bytes (aes-cbc, aes-128-cbc) or 32 bytes (aes-256-cbc). Its String
// and GoString never show the key bytes.
type Key struct{ b []byte }

// NewKey copies raw key bytes into a Key.
func NewKey(b []byte) (*Key, error) {
	if len(b) != 16 && len(b) != 32 {
		return nil, fmt.Errorf("key of %d bytes: an AES key has 16 or 32", len(b))
	}
	return &Key{b: append([]byte(nil), b...)}, nil
}

// Len is the key length in bytes (0 for a nil Key).
func (k *Key) Len() int {
	if k == nil {
		return 0
	}
	return len(k.b)
}

// Zero overwrites the key's bytes (a nil key is a no-op): a key is cleared once nothing
// needs it.
func (k *Key) Zero() {
	if k == nil {
		return
	}
	clear(k.b)
}

// Is256 reports an AES-256 key.
func (k *Key) Is256() bool { return k.Len() == 32 }

// Bytes returns a copy of the key.
func (k *Key) Bytes() []byte {
	if k == nil {
		return nil
	}
	return append([]byte(nil), k.b...)
}

// Equal reports whether two keys are the same, in constant time for equal lengths.
func (k *Key) Equal(o *Key) bool {
	if k == nil || o == nil {
		return k == o
	}
	return subtle.ConstantTimeCompare(k.b, o.b) == 1
}

// String describes the key without revealing it.
func (k *Key) String() string {
	if k == nil {
		return "no key"
	}
	return fmt.Sprintf("AES-%d key", bits(len(k.b)))
}

// GoString describes the key without revealing it (%#v).
func (k *Key) GoString() string { return "blob.Key(" + k.String() + ")" }

// KeySpec is a parsed --key / --migration-key option.
type KeySpec struct {
	File    string // file= : raw key file
	FD      int    // fd= : raw key from a file descriptor; -1 = none
	PwdFile string // pwdfile= : passphrase file
	PwdFD   int    // pwdfd= : passphrase from a file descriptor; -1 = none
	Format  string // format= of a raw key: hex (default) or binary
	Mode    string // mode=: aes-cbc, aes-128-cbc (default) or aes-256-cbc
	KDF     string // kdf= for a passphrase: pbkdf2 (default) or sha512
	Remove  bool   // remove: unlink file= / pwdfile= after reading it
}

// KeyLen is the key length in bytes the mode asks for.
func (s *KeySpec) KeyLen() int {
	if s.Mode == "aes-256-cbc" {
		return 32
	}
	return 16
}

// passphrase reports whether the key is derived from a passphrase.
func (s *KeySpec) passphrase() bool { return s.File == "" && s.FD < 0 }

// ParseKeyOption parses a --key or --migration-key option string such as
// "pwdfd=7,mode=aes-256-cbc" or "file=/k,format=binary,remove". Exactly one of file=, fd=,
// pwdfile= and pwdfd= must be given (swtpm accepts several and takes the first of that list).
// format= and mode= are always checked, kdf= only for a passphrase, as swtpm does.
func ParseKeyOption(s string) (*KeySpec, error) {
	set, err := opts.Parse(s, "file", "fd", "pwdfile", "pwdfd", "format", "mode", "kdf", "remove")
	if err != nil {
		return nil, fmt.Errorf("key option: %w", err)
	}
	spec := &KeySpec{
		File:    set.String("file", ""),
		PwdFile: set.String("pwdfile", ""),
		Format:  set.String("format", "hex"),
		Mode:    set.String("mode", "aes-128-cbc"),
		KDF:     set.String("kdf", "pbkdf2"),
		Remove:  set.Bool("remove", false),
	}
	if spec.FD, err = fdOption(set, "fd"); err != nil {
		return nil, err
	}
	if spec.PwdFD, err = fdOption(set, "pwdfd"); err != nil {
		return nil, err
	}
	for _, name := range []string{"file", "pwdfile"} {
		if set.Has(name) && set.String(name, "") == "" {
			return nil, fmt.Errorf("key option: %s= needs a file name", name)
		}
	}
	n := 0
	for _, given := range []bool{spec.File != "", spec.FD >= 0, spec.PwdFile != "", spec.PwdFD >= 0} {
		if given {
			n++
		}
	}
	switch {
	case n == 0:
		return nil, errors.New("key option: either file=, fd=, pwdfile=, or pwdfd= is required")
	case n > 1:
		return nil, errors.New("key option: give only one of file=, fd=, pwdfile= and pwdfd=")
	}
	switch spec.Format {
	case "hex", "binary":
	default:
		return nil, fmt.Errorf("key option: unknown key format '%s'", spec.Format)
	}
	switch spec.Mode {
	case "aes-cbc", "aes-128-cbc", "aes-256-cbc":
	default:
		return nil, fmt.Errorf("key option: unknown encryption mode '%s'", spec.Mode)
	}
	if spec.passphrase() {
		switch spec.KDF {
		case "pbkdf2", "sha512":
		default:
			return nil, fmt.Errorf("key option: unknown kdf '%s'", spec.KDF)
		}
	}
	return spec, nil
}

func fdOption(set *opts.Set, name string) (int, error) {
	if !set.Has(name) {
		return -1, nil
	}
	fd, err := set.Int(name, -1)
	if err != nil {
		return 0, fmt.Errorf("key option: %w", err)
	}
	if fd < 0 {
		return 0, fmt.Errorf("key option: %s=%d is not a file descriptor", name, fd)
	}
	return fd, nil
}

// maxRawKeyInput is how much of a raw key source swtpm reads: "0x", 64 hex digits and one
// more character.
const maxRawKeyInput = 2 + 64 + 1

// maxPassphrase bounds a passphrase source (swtpm reads to EOF without a bound).
const maxPassphrase = 1 << 20

// readSource reads up to limit bytes from the file or the descriptor (which it closes, as
// swtpm does). tooLong reports that the source had more than limit bytes.
func readSource(path string, fd int, limit int) (b []byte, tooLong bool, err error) {
	var f *os.File
	if path != "" {
		if f, err = os.Open(path); err != nil {
			return nil, false, fmt.Errorf("key: %w", err)
		}
	} else {
		if f = os.NewFile(uintptr(fd), fmt.Sprintf("fd %d", fd)); f == nil {
			return nil, false, fmt.Errorf("key: invalid file descriptor %d", fd)
		}
	}
	defer f.Close()
	b, err = io.ReadAll(io.LimitReader(f, int64(limit)+1))
	if err != nil {
		return nil, false, fmt.Errorf("key: read %s: %w", f.Name(), err)
	}
	if len(b) > limit {
		return b[:limit], true, nil
	}
	return b, false, nil
}

// LoadKeyOption parses swtpm's key option string (ParseKeyOption) and loads the key it names
// (LoadKey).
func LoadKeyOption(raw string) (*Key, error) {
	spec, err := ParseKeyOption(raw)
	if err != nil {
		return nil, err
	}
	return LoadKey(spec)
}

// LoadKey reads the key a spec describes, the way swtpm does:
//   - format=hex: up to 67 bytes are read; an optional "0x", then 32 or 64 hex digits that end
//     at the first whitespace or the end of the data (what follows whitespace is ignored); the
//     digit count must match mode= (a 128-bit key with aes-256-cbc is refused).
//   - format=binary: up to 67 bytes are read; more than mode='s key length is refused, and the
//     key is the bytes as read, which must be 16 or 32 (so, as in swtpm, a 16-byte binary key
//     with aes-256-cbc gives AES-128).
//   - pwdfile=/pwdfd=: the whole content up to EOF, a trailing newline included, is the
//     passphrase; kdf=pbkdf2 is PBKDF2-HMAC-SHA512 with salt "swtpm" and 1000 iterations,
//     kdf=sha512 the first bytes of SHA-512(passphrase).
//
// Descriptors are closed after reading. With remove, file= or pwdfile= is unlinked once the
// key was loaded successfully.
func LoadKey(spec *KeySpec) (*Key, error) {
	keylen := spec.KeyLen()
	var k *Key
	var err error
	switch {
	case spec.passphrase():
		var pass []byte
		var tooLong bool
		if pass, tooLong, err = readSource(spec.PwdFile, spec.PwdFD, maxPassphrase); err != nil {
			return nil, err
		}
		if tooLong {
			return nil, fmt.Errorf("key: passphrase longer than %d bytes", maxPassphrase)
		}
		if k, err = DeriveKey(pass, keylen, spec.KDF); err != nil {
			return nil, err
		}
	default:
		var raw []byte
		if raw, _, err = readSource(spec.File, spec.FD, maxRawKeyInput); err != nil {
			return nil, err
		}
		if spec.Format == "binary" {
			k, err = binaryKey(raw, keylen)
		} else {
			k, err = hexKey(raw, keylen, spec.Mode)
		}
		if err != nil {
			return nil, err
		}
	}
	if spec.Remove {
		for _, p := range []string{spec.File, spec.PwdFile} {
			if p == "" {
				continue
			}
			if err := os.Remove(p); err != nil {
				return nil, fmt.Errorf("key: remove= : %w", err)
			}
		}
	}
	return k, nil
}

func binaryKey(raw []byte, keylen int) (*Key, error) {
	if len(raw) > keylen {
		return nil, fmt.Errorf("key: binary key of %d or more bytes is larger than the %d the mode allows", len(raw), keylen)
	}
	if len(raw) != 16 && len(raw) != 32 {
		return nil, fmt.Errorf("key: binary key of %d bytes; it must have 16 or 32", len(raw))
	}
	return NewKey(raw)
}

func hexKey(raw []byte, keylen int, mode string) (*Key, error) {
	s := string(raw)
	if i := strings.IndexByte(s, 0); i >= 0 {
		s = s[:i]
	}
	s = strings.TrimPrefix(s, "0x")
	if i := strings.IndexAny(s, " \t\n\v\f\r"); i >= 0 {
		s = s[:i]
	}
	if len(s) != 32 && len(s) != 64 {
		return nil, fmt.Errorf("key: a hex key has 32 or 64 hex digits (optionally after 0x), found %d characters", len(s))
	}
	b, err := hex.DecodeString(s)
	if err != nil {
		return nil, fmt.Errorf("key: not a hex key: %w", err)
	}
	if len(b) != keylen {
		return nil, fmt.Errorf("key: a %d-bit key was given, but mode %s needs %d bits", bits(len(b)), mode, bits(keylen))
	}
	return NewKey(b)
}

// DeriveKey turns a passphrase (taken whole, newline included, as swtpm does) into a keylen-byte
// key with kdf "pbkdf2" (PBKDF2-HMAC-SHA512, salt "swtpm", 1000 iterations) or "sha512".
func DeriveKey(pass []byte, keylen int, kdf string) (*Key, error) {
	if keylen != 16 && keylen != 32 {
		return nil, fmt.Errorf("key: derive a %d-byte key: must be 16 or 32", keylen)
	}
	switch kdf {
	case "sha512":
		sum := sha512.Sum512(pass)
		return NewKey(sum[:keylen])
	case "pbkdf2", "":
		k, err := pbkdf2.Key(sha512.New, string(pass), []byte("swtpm"), 1000, keylen)
		if err != nil {
			return nil, fmt.Errorf("key: pbkdf2: %w", err)
		}
		return NewKey(k)
	}
	return nil, fmt.Errorf("key: unknown kdf '%s'", kdf)
}
