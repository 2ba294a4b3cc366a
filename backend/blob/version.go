package blob

import (
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/binary"
	"fmt"
)

// TagStateVersion is vtpmd's TLV in a stored, encrypted blob: the blob's Stamp. It is not one
// of swtpm's tags (1 to 7); swtpm skips it, and drops it when it rewrites the file.
const TagStateVersion = 0x7674 // "vt"

// Stamp is what a versioned blob carries: its version, and the versions of the state's three
// blobs (permall, volatilestate, savestate, in that order; 0 for a blob that is absent or has
// no version) as they are once this blob is written, its own slot holding Version. The
// newest blob of a state thus says what the others must be, which tells a partly rolled back
// state from a current one.
type Stamp struct {
	Version uint64
	State   [3]uint64
}

// The version TLV's value (format 1): u8 format, u64 version, 3 x u64 state, HMAC-SHA256
// under the VersionKey over
//
//	u8 format || u8 len(name) || name || u64 version || 3 x u64 state || the blob's swtpm HMAC
//
// where name is the blob's name (permall, volatilestate, savestate) and swtpm's HMAC is the
// 32 bytes of TLV 3, which cover the ciphertext and the IV under the state key.
const (
	versionFormat  = 1
	stampSize      = 8 + 3*8
	versionTLVSize = 1 + stampSize + hmacSize
	// versionKeyInfo separates the version key from the state key (HKDF-SHA256 info).
	versionKeyInfo = "vtpmd state version key"
)

// VersionKey authenticates the state versions of stored blobs. It is derived from the state
// key (NewVersionKey), so it is neither the AES key nor swtpm's HMAC key. Its String and
// GoString never show the key bytes.
type VersionKey struct{ b []byte }

// NewVersionKey derives the version key of a state key: HKDF-SHA256 with the state key as the
// secret, no salt, and the info "vtpmd state version key", 32 bytes.
func NewVersionKey(stateKey *Key) (*VersionKey, error) {
	if stateKey == nil {
		return nil, fmt.Errorf("state blob: a state version needs a state key")
	}
	b, err := hkdf.Key(sha256.New, stateKey.b, nil, versionKeyInfo, sha256.Size)
	if err != nil {
		return nil, fmt.Errorf("state blob: derive the version key: %w", err)
	}
	return &VersionKey{b: b}, nil
}

// Zero overwrites the key's bytes (a nil key is a no-op).
func (k *VersionKey) Zero() {
	if k != nil {
		clear(k.b)
	}
}

// String describes the key without revealing it.
func (k *VersionKey) String() string {
	if k == nil {
		return "no version key"
	}
	return "state version key"
}

// GoString describes the key without revealing it (%#v).
func (k *VersionKey) GoString() string { return "blob.VersionKey(" + k.String() + ")" }

// appendStamp appends the stamp's 32 bytes.
func appendStamp(dst []byte, st Stamp) []byte {
	dst = binary.BigEndian.AppendUint64(dst, st.Version)
	for _, v := range st.State {
		dst = binary.BigEndian.AppendUint64(dst, v)
	}
	return dst
}

// parseStamp reads the stamp's 32 bytes.
func parseStamp(b []byte) Stamp {
	st := Stamp{Version: binary.BigEndian.Uint64(b)}
	for i := range st.State {
		st.State[i] = binary.BigEndian.Uint64(b[8+8*i:])
	}
	return st
}

// mac appends the version MAC of a format-1 version TLV to dst.
func (k *VersionKey) mac(dst []byte, name string, stamp []byte, swtpmMAC []byte) []byte {
	h := hmac.New(sha256.New, k.b)
	h.Write([]byte{versionFormat, byte(len(name))})
	h.Write([]byte(name))
	h.Write(stamp)
	h.Write(swtpmMAC[:hmacSize])
	return h.Sum(dst)
}

// checkStampArgs refuses what no version TLV is made for: a blob name longer than 255 bytes,
// and version 0, which means "no version".
func checkStampArgs(name string, st Stamp) error {
	if len(name) > 255 {
		return fmt.Errorf("state blob: blob name of %d bytes is too long for a version", len(name))
	}
	if st.Version == 0 {
		return fmt.Errorf("state blob: version 0 means no version; versions start at 1")
	}
	return nil
}

// SealVersioned is Seal with a state key and a Stamp: header(0x01, |0x08) + TLV(2) TLV(3)
// TLV(6), as swtpm writes the file, then TLV(TagStateVersion) carrying the stamp,
// authenticated with vk and bound to this blob's ciphertext (through swtpm's HMAC) and to its
// name, so it can be neither forged nor moved to another blob. Debian's swtpm loads the result
// with the same key. The stamp's version must not be 0.
func SealVersioned(plain []byte, stateKey *Key, vk *VersionKey, name string, stamp Stamp) ([]byte, error) {
	if stateKey == nil || vk == nil {
		return nil, fmt.Errorf("state blob: a state version needs a state key and its version key")
	}
	if err := checkStampArgs(name, stamp); err != nil {
		return nil, err
	}
	out := make([]byte, HeaderSize, HeaderSize+innerSize(len(plain), stateKey)+tlvHeaderSize+versionTLVSize)
	out, flags, swtpmMAC, err := innerTLVs(out, plain, stateKey)
	if err != nil {
		return nil, err
	}
	out = binary.BigEndian.AppendUint16(out, TagStateVersion)
	out = binary.BigEndian.AppendUint32(out, versionTLVSize)
	out = append(out, versionFormat)
	at := len(out)
	out = appendStamp(out, stamp)
	out = vk.mac(out, name, out[at:], swtpmMAC)
	putHeader(out, flags)
	return out, nil
}

// Restamp replaces, in place, the stamp of a blob made by SealVersioned with vk and name (its
// last TLV is the version TLV): the store gives held-back writes their final stamps when it
// writes them. Nothing is decrypted or re-encrypted.
func Restamp(sealed []byte, vk *VersionKey, name string, stamp Stamp) error {
	if vk == nil {
		return fmt.Errorf("state blob: a state version needs a version key")
	}
	if err := checkStampArgs(name, stamp); err != nil {
		return err
	}
	h, body, err := ParseHeader(sealed)
	if err != nil {
		return err
	}
	tl, err := parseTLVs(body)
	if err != nil {
		return err
	}
	at := len(sealed) - versionTLVSize
	v, ok := tl[TagStateVersion]
	swtpmMAC, okMAC := tl[TagHMAC]
	if h.Version != 2 || !ok || len(v) != versionTLVSize || &v[0] != &sealed[at] || v[0] != versionFormat || !okMAC || len(swtpmMAC) < hmacSize {
		return fail(ErrMalformed, "not a blob made by SealVersioned (its last TLV is not a format-%d version)", versionFormat)
	}
	stampAt := at + 1
	appendStamp(sealed[stampAt:stampAt], stamp)
	vk.mac(sealed[stampAt+stampSize:stampAt+stampSize], name, sealed[stampAt:stampAt+stampSize], swtpmMAC)
	return nil
}

// OpenVersioned is Open with a state key that also returns the blob's Stamp: the zero Stamp
// for a blob without one (as swtpm writes them). A stamp that does not authenticate with vk
// (tampered, or moved from another blob) is refused with ErrVersionAuth before anything is
// decrypted; the ciphertext it is bound to is then checked by swtpm's HMAC, as in Open.
func OpenVersioned(data []byte, stateKey *Key, vk *VersionKey, name string) ([]byte, Stamp, error) {
	if stateKey == nil || vk == nil {
		return nil, Stamp{}, fmt.Errorf("state blob: a state version needs a state key and its version key")
	}
	h, body, err := ParseHeader(data)
	if err != nil {
		plain, err := openHeaderless(data, stateKey, err) // an early swtpm's file, or refused
		return plain, Stamp{}, err
	}
	if h.Version != 2 {
		plain, err := decrypt(stateKey, body, h, stateLayer) // version 1 (legacy), or refused
		return plain, Stamp{}, err
	}
	tl, err := parseTLVs(body)
	if err != nil {
		return nil, Stamp{}, err
	}
	// what Open refuses before it looks at the HMAC is refused first, for the same result
	if _, _, err := checkEncrypted(stateKey, tl, h, stateLayer); err != nil {
		return nil, Stamp{}, err
	}
	stamp, err := versionOf(tl, vk, name)
	if err != nil {
		return nil, Stamp{}, err
	}
	plain, err := decryptTLVs(stateKey, tl, h, stateLayer)
	if err != nil {
		return nil, Stamp{}, err
	}
	return plain, stamp, nil
}

// StoredStamp returns the authenticated Stamp of a stored blob without decrypting it: the
// zero Stamp for a blob without one (written by swtpm, a legacy version-1 blob, or data
// without a valid header that may be an early swtpm's headerless file, which OpenVersioned
// reads or refuses). It checks the stamp against swtpm's HMAC as stored, not the ciphertext
// against that HMAC: a blob whose ciphertext was changed reports its stamp here and is
// refused by OpenVersioned. Data that begins like a broken header is refused with the header
// error; without the state key it cannot tell the rare headerless file whose ciphertext
// begins the same way, which OpenVersioned reads (a caller with the key may ask it).
func StoredStamp(data []byte, vk *VersionKey, name string) (Stamp, error) {
	if vk == nil {
		return Stamp{}, fmt.Errorf("state blob: a state version needs a version key")
	}
	h, body, err := ParseHeader(data)
	if err != nil {
		if len(data) > 0 && !looksLikeHeader(data) {
			return Stamp{}, nil // an early swtpm's headerless file (OpenVersioned decides)
		}
		return Stamp{}, err
	}
	if h.Version != 2 {
		return Stamp{}, nil
	}
	tl, err := parseTLVs(body)
	if err != nil {
		return Stamp{}, err
	}
	return versionOf(tl, vk, name)
}

// versionOf authenticates the version TLV of a parsed version-2 body (the zero Stamp when
// there is none).
func versionOf(tl map[uint16][]byte, vk *VersionKey, name string) (Stamp, error) {
	v, ok := tl[TagStateVersion]
	if !ok {
		return Stamp{}, nil
	}
	if len(v) == 0 {
		return Stamp{}, fail(ErrMalformed, "empty state version TLV")
	}
	if v[0] != versionFormat {
		return Stamp{}, fail(ErrVersion, "state version TLV of format %d (this vtpmd reads format %d)", v[0], versionFormat)
	}
	if len(v) != versionTLVSize {
		return Stamp{}, fail(ErrMalformed, "state version TLV of %d bytes, format %d has %d", len(v), versionFormat, versionTLVSize)
	}
	if len(name) > 255 {
		return Stamp{}, fmt.Errorf("state blob: blob name of %d bytes is too long for a version", len(name))
	}
	swtpmMAC, ok := tl[TagHMAC]
	if !ok || len(swtpmMAC) < hmacSize {
		return Stamp{}, fail(ErrMalformed, "a state version, but no HMAC (TLV %d) of %d bytes to bind it to", TagHMAC, hmacSize)
	}
	stamp := v[1 : 1+stampSize]
	var want [hmacSize]byte
	if subtle.ConstantTimeCompare(vk.mac(want[:0], name, stamp, swtpmMAC), v[1+stampSize:]) != 1 {
		return Stamp{}, fail(ErrVersionAuth, "the state version of %s does not authenticate: tampered, moved from another blob, or another key", name)
	}
	st := parseStamp(stamp)
	if st.Version == 0 {
		return Stamp{}, fail(ErrMalformed, "state version TLV with version 0")
	}
	return st, nil
}
