package blob

import (
	"crypto/pbkdf2"
	"crypto/sha512"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/vtpmd/vtpmd/internal/opts"
)

// Key is an AES key: 16 bytes (aes-128-cbc) or 32 bytes (aes-256-cbc).
type Key struct{ b []byte }

// NewKey wraps raw key bytes.
func NewKey(b []byte) (*Key, error) {
	if len(b) != 16 && len(b) != 32 {
		return nil, fmt.Errorf("key of %d bytes: must be 16 or 32", len(b))
	}
	return &Key{b: append([]byte(nil), b...)}, nil
}

// Is256 reports an AES-256 key.
func (k *Key) Is256() bool { return k != nil && len(k.b) == 32 }

// Bytes returns a copy of the key.
func (k *Key) Bytes() []byte { return append([]byte(nil), k.b...) }

// KeySpec is a parsed --key / --migration-key option.
type KeySpec struct {
	File, PwdFile string
	FD, PwdFD     int    // -1 when absent
	Format        string // hex (default) or binary
	Mode          string // aes-cbc, aes-128-cbc (default) or aes-256-cbc
	KDF           string // pbkdf2 (default) or sha512
	Remove        bool
}

// KeyLen is the key length the mode asks for.
func (s *KeySpec) KeyLen() int {
	if s.Mode == "aes-256-cbc" {
		return 32
	}
	return 16
}

// ParseKeyOption parses a --key or --migration-key option string.
func ParseKeyOption(raw string) (*KeySpec, error) {
	set, err := opts.Parse(raw, "file", "fd", "pwdfile", "pwdfd", "format", "mode", "kdf", "remove")
	if err != nil {
		return nil, err
	}
	s := &KeySpec{File: set.String("file", ""), PwdFile: set.String("pwdfile", ""),
		Format: set.String("format", "hex"), Mode: set.String("mode", "aes-128-cbc"),
		KDF: set.String("kdf", "pbkdf2"), Remove: set.Bool("remove", false)}
	if s.FD, err = set.Int("fd", -1); err != nil {
		return nil, err
	}
	if s.PwdFD, err = set.Int("pwdfd", -1); err != nil {
		return nil, err
	}
	n := 0
	for _, given := range []bool{s.File != "", s.FD >= 0, s.PwdFile != "", s.PwdFD >= 0} {
		if given {
			n++
		}
	}
	if n != 1 {
		return nil, errors.New("exactly one of file=, fd=, pwdfile= or pwdfd= is required")
	}
	switch s.Mode {
	case "aes-cbc", "aes-128-cbc", "aes-256-cbc":
	default:
		return nil, fmt.Errorf("unsupported cipher mode '%s'", s.Mode)
	}
	switch s.Format {
	case "hex", "binary":
	default:
		return nil, fmt.Errorf("unsupported key format '%s'", s.Format)
	}
	switch s.KDF {
	case "pbkdf2", "sha512":
	default:
		return nil, fmt.Errorf("unsupported key derivation function '%s'", s.KDF)
	}
	return s, nil
}

// maxKeyInput bounds how much of a key or passphrase source is read.
const maxKeyInput = 64 << 10

func readSource(path string, fd int) ([]byte, error) {
	var f *os.File
	if path != "" {
		var err error
		if f, err = os.Open(path); err != nil {
			return nil, fmt.Errorf("could not open key file: %w", err)
		}
	} else {
		f = os.NewFile(uintptr(fd), "key")
		if f == nil {
			return nil, fmt.Errorf("invalid file descriptor %d", fd)
		}
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxKeyInput+1))
	if err != nil {
		return nil, fmt.Errorf("read key material: %w", err)
	}
	if len(b) > maxKeyInput {
		return nil, fmt.Errorf("key material larger than %d bytes", maxKeyInput)
	}
	return b, nil
}

// LoadKey reads the key a spec describes: a raw key (hex or binary) or a passphrase turned
// into a key with PBKDF2-HMAC-SHA512 (salt "swtpm", 1000 iterations) or SHA-512.
func LoadKey(s *KeySpec) (*Key, error) {
	keylen := s.KeyLen()
	if s.PwdFile != "" || s.PwdFD >= 0 {
		pass, err := readSource(s.PwdFile, s.PwdFD)
		if err != nil {
			return nil, err
		}
		if s.Remove && s.PwdFile != "" {
			os.Remove(s.PwdFile)
		}
		return DeriveKey(pass, keylen, s.KDF)
	}
	raw, err := readSource(s.File, s.FD)
	if err != nil {
		return nil, err
	}
	if s.Remove && s.File != "" {
		os.Remove(s.File)
	}
	if s.Format == "binary" {
		if len(raw) < keylen {
			return nil, fmt.Errorf("binary key has %d bytes, %s needs %d", len(raw), s.Mode, keylen)
		}
		return NewKey(raw[:keylen])
	}
	h := strings.TrimRight(string(raw), " \t\r\n")
	h = strings.TrimPrefix(strings.TrimPrefix(h, "0x"), "0X")
	if len(h) != 32 && len(h) != 64 {
		return nil, fmt.Errorf("hex key must have 32 or 64 hex digits, found %d characters", len(h))
	}
	if len(h) != 2*keylen {
		return nil, fmt.Errorf("a %d-bit key was given, but mode %s needs %d bits", len(h)*4, s.Mode, keylen*8)
	}
	b, err := hex.DecodeString(h)
	if err != nil {
		return nil, fmt.Errorf("key is not valid hex: %w", err)
	}
	return NewKey(b)
}

// DeriveKey turns a passphrase (taken whole, newline included, as swtpm does) into a key.
func DeriveKey(pass []byte, keylen int, kdf string) (*Key, error) {
	if kdf == "sha512" {
		sum := sha512.Sum512(pass)
		return NewKey(sum[:keylen])
	}
	k, err := pbkdf2.Key(sha512.New, string(pass), []byte("swtpm"), 1000, keylen)
	if err != nil {
		return nil, fmt.Errorf("derive key: %w", err)
	}
	return NewKey(k)
}
