package blob

import (
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/binary"
	"fmt"
)

// TagStateVersion is vtpmd's TLV in a stored, encrypted blob: the blob's state version. It is
// not one of swtpm's tags (1 to 7); swtpm skips it, and drops it when it rewrites the file.
const TagStateVersion = 0x7674 // "vt"

// The version TLV's value (format 1): u8 format, u64 version, HMAC-SHA256 under the
// VersionKey over
//
//	u8 format || u8 len(name) || name || u64 version || the blob's swtpm HMAC (32 bytes)
//
// where name is the blob's name (permall, volatilestate, savestate) and swtpm's HMAC is that
// of TLV 3, which covers the ciphertext and the IV under the state key.
const (
	versionFormat  = 1
	versionTLVSize = 1 + 8 + hmacSize
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

// mac is the version MAC of the version TLV's value (format 1), appended to dst.
func (k *VersionKey) mac(dst []byte, name string, version uint64, swtpmMAC []byte) []byte {
	h := hmac.New(sha256.New, k.b)
	var pre [2]byte
	pre[0], pre[1] = versionFormat, byte(len(name))
	h.Write(pre[:])
	h.Write([]byte(name))
	var v [8]byte
	binary.BigEndian.PutUint64(v[:], version)
	h.Write(v[:])
	h.Write(swtpmMAC[:hmacSize])
	return h.Sum(dst)
}

// checkVersionArgs refuses what no version TLV is made for: a blob name longer than 255
// bytes, and version 0, which means "no version".
func checkVersionArgs(name string, version uint64) error {
	if len(name) > 255 {
		return fmt.Errorf("state blob: blob name of %d bytes is too long for a version", len(name))
	}
	if version == 0 {
		return fmt.Errorf("state blob: version 0 means no version; versions start at 1")
	}
	return nil
}

// SealVersioned is Seal with a state key and a state version: header(0x01, |0x08) + TLV(2)
// TLV(3) TLV(6), as swtpm writes the file, then TLV(TagStateVersion) carrying the version,
// authenticated with vk and bound to this blob's ciphertext (through swtpm's HMAC) and to its
// name, so it can be neither forged nor moved to another blob. Debian's swtpm loads the result
// with the same key. version must not be 0.
func SealVersioned(plain []byte, stateKey *Key, vk *VersionKey, name string, version uint64) ([]byte, error) {
	if stateKey == nil || vk == nil {
		return nil, fmt.Errorf("state blob: a state version needs a state key and its version key")
	}
	if err := checkVersionArgs(name, version); err != nil {
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
	out = binary.BigEndian.AppendUint64(out, version)
	out = vk.mac(out, name, version, swtpmMAC)
	putHeader(out, flags)
	return out, nil
}

// OpenVersioned is Open with a state key that also returns the blob's state version: 0 for a
// blob without one (as swtpm writes them). A version that does not authenticate with vk
// (tampered, or moved from another blob) is refused with ErrVersionAuth before anything is
// decrypted; the ciphertext it is bound to is then checked by swtpm's HMAC, as in Open.
func OpenVersioned(data []byte, stateKey *Key, vk *VersionKey, name string) ([]byte, uint64, error) {
	if stateKey == nil || vk == nil {
		return nil, 0, fmt.Errorf("state blob: a state version needs a state key and its version key")
	}
	h, body, err := ParseHeader(data)
	if err != nil {
		return nil, 0, err
	}
	if h.Version != 2 {
		plain, err := decrypt(stateKey, body, h, stateLayer) // version 1 (legacy), or refused
		return plain, 0, err
	}
	tl, err := parseTLVs(body)
	if err != nil {
		return nil, 0, err
	}
	// what Open refuses before it looks at the HMAC is refused first, for the same result
	if _, _, err := checkEncrypted(stateKey, tl, h, stateLayer); err != nil {
		return nil, 0, err
	}
	version, err := versionOf(tl, vk, name)
	if err != nil {
		return nil, 0, err
	}
	plain, err := decryptTLVs(stateKey, tl, h, stateLayer)
	if err != nil {
		return nil, 0, err
	}
	return plain, version, nil
}

// StoredVersion returns the authenticated state version of a stored blob without decrypting
// it: 0 for a blob without one (written by swtpm, or a legacy version-1 blob). It checks the
// version against swtpm's HMAC as stored, not the ciphertext against that HMAC: a blob whose
// ciphertext was changed reports its version here and is refused by OpenVersioned.
func StoredVersion(data []byte, vk *VersionKey, name string) (uint64, error) {
	if vk == nil {
		return 0, fmt.Errorf("state blob: a state version needs a version key")
	}
	h, body, err := ParseHeader(data)
	if err != nil {
		return 0, err
	}
	if h.Version != 2 {
		return 0, nil
	}
	tl, err := parseTLVs(body)
	if err != nil {
		return 0, err
	}
	return versionOf(tl, vk, name)
}

// versionOf authenticates the version TLV of a parsed version-2 body (0 when there is none).
func versionOf(tl map[uint16][]byte, vk *VersionKey, name string) (uint64, error) {
	v, ok := tl[TagStateVersion]
	if !ok {
		return 0, nil
	}
	if len(v) == 0 || v[0] != versionFormat {
		if len(v) > 0 {
			return 0, fail(ErrVersion, "state version TLV of format %d (this vtpmd reads format %d)", v[0], versionFormat)
		}
		return 0, fail(ErrMalformed, "empty state version TLV")
	}
	if len(v) != versionTLVSize {
		return 0, fail(ErrMalformed, "state version TLV of %d bytes, format %d has %d", len(v), versionFormat, versionTLVSize)
	}
	if len(name) > 255 {
		return 0, fmt.Errorf("state blob: blob name of %d bytes is too long for a version", len(name))
	}
	swtpmMAC, ok := tl[TagHMAC]
	if !ok || len(swtpmMAC) < hmacSize {
		return 0, fail(ErrMalformed, "a state version, but no HMAC (TLV %d) of %d bytes to bind it to", TagHMAC, hmacSize)
	}
	version := binary.BigEndian.Uint64(v[1:9])
	var want [hmacSize]byte
	if subtle.ConstantTimeCompare(vk.mac(want[:0], name, version, swtpmMAC), v[9:]) != 1 {
		return 0, fail(ErrVersionAuth, "the state version of %s does not authenticate: tampered, moved from another blob, or another key", name)
	}
	if version == 0 {
		return 0, fail(ErrMalformed, "state version TLV with version 0")
	}
	return version, nil
}
