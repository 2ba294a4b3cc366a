package blob

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
)

// Sentinel errors, each matching one swtpm result code.
var (
	// ErrKeyNotFound: the blob is encrypted and no matching key is configured (TPM_KEYNOTFOUND).
	ErrKeyNotFound = errors.New("state blob: encrypted, but no key is configured")
	// ErrDecrypt: HMAC mismatch or bad padding, i.e. a wrong key or tampered data (TPM_DECRYPT_ERROR).
	ErrDecrypt = errors.New("state blob: integrity check failed (wrong key or tampered data)")
	// ErrKeyLength: the blob's 256-bit-key flag does not match the key (TPM_BAD_KEY_PROPERTY).
	ErrKeyLength = errors.New("state blob: key length does not match the blob")
	// ErrHeaderSize: header size field is not 10 (TPM_BAD_DATASIZE).
	ErrHeaderSize = errors.New("state blob: bad header size")
	// ErrVersion: the blob needs a newer reader (TPM_BAD_VERSION).
	ErrVersion = errors.New("state blob: unsupported format version")
	// ErrMalformed: truncated, wrong total length, missing or bad TLVs (TPM_BAD_PARAMETER).
	ErrMalformed = errors.New("state blob: malformed")
)

// Header flags.
const (
	FlagEncrypted          = 0x01 // BLOB_FLAG_ENCRYPTED
	FlagMigrationEncrypted = 0x02 // BLOB_FLAG_MIGRATION_ENCRYPTED
	FlagMigrationData      = 0x04 // BLOB_FLAG_MIGRATION_DATA
	FlagEncrypted256       = 0x08 // BLOB_FLAG_ENCRYPTED_256BIT_KEY
	FlagMigration256       = 0x10 // BLOB_FLAG_MIGRATION_256BIT_KEY
)

// TLV tags.
const (
	tagData                   = 1
	tagEncryptedData          = 2
	tagHMAC                   = 3
	tagMigrationData          = 4
	tagEncryptedMigrationData = 5
	tagIVEncryptedData        = 6
	tagIVEncryptedMigration   = 7
)

const (
	headerSize     = 10
	blobVersion    = 2
	blobMinVersion = 1
)

// Header is a parsed blob header.
type Header struct {
	Version, MinVersion uint8
	Flags               uint16
}

// ParseHeader checks a blob's header against its length and returns it with the body.
func ParseHeader(b []byte) (Header, []byte, error) {
	if len(b) < headerSize {
		return Header{}, nil, fmt.Errorf("%w: %d bytes is shorter than the %d-byte header", ErrMalformed, len(b), headerSize)
	}
	h := Header{Version: b[0], MinVersion: b[1], Flags: binary.BigEndian.Uint16(b[4:6])}
	if tot := binary.BigEndian.Uint32(b[6:10]); uint64(tot) != uint64(len(b)) {
		return Header{}, nil, fmt.Errorf("%w: header total length %d != blob length %d", ErrMalformed, tot, len(b))
	}
	if h.MinVersion > blobVersion {
		return Header{}, nil, fmt.Errorf("%w: needs version %d, this reader has %d", ErrVersion, h.MinVersion, blobVersion)
	}
	if hs := binary.BigEndian.Uint16(b[2:4]); hs != headerSize {
		return Header{}, nil, fmt.Errorf("%w: %d", ErrHeaderSize, hs)
	}
	return h, b[headerSize:], nil
}

func appendHeader(dst []byte, flags uint16, total int) []byte {
	dst = append(dst, blobVersion, blobMinVersion)
	dst = binary.BigEndian.AppendUint16(dst, headerSize)
	dst = binary.BigEndian.AppendUint16(dst, flags)
	return binary.BigEndian.AppendUint32(dst, uint32(total))
}

func appendTLV(dst []byte, tag uint16, v []byte) []byte {
	dst = binary.BigEndian.AppendUint16(dst, tag)
	dst = binary.BigEndian.AppendUint32(dst, uint32(len(v)))
	return append(dst, v...)
}

// parseTLVs splits a TLV stream; the first occurrence of a tag wins.
func parseTLVs(b []byte) (map[uint16][]byte, error) {
	m := map[uint16][]byte{}
	for off := 0; off < len(b); {
		if len(b)-off < 6 {
			return nil, fmt.Errorf("%w: truncated TLV header at offset %d", ErrMalformed, off)
		}
		tag := binary.BigEndian.Uint16(b[off:])
		n := binary.BigEndian.Uint32(b[off+2:])
		off += 6
		if uint64(n) > uint64(len(b)-off) {
			return nil, fmt.Errorf("%w: TLV %d claims %d bytes, %d remain", ErrMalformed, tag, n, len(b)-off)
		}
		if _, dup := m[tag]; !dup {
			m[tag] = b[off : off+int(n)]
		}
		off += int(n)
	}
	return m, nil
}

func finish(flags uint16, body []byte) []byte {
	out := make([]byte, 0, headerSize+len(body))
	out = appendHeader(out, flags, headerSize+len(body))
	return append(out, body...)
}

// encryptTLVs returns ct, hmac and iv TLVs (tags given) for plain under k.
func encryptTLVs(k *Key, plain []byte, ctTag, ivTag uint16) ([]byte, error) {
	iv := make([]byte, len(k.b))
	if _, err := rand.Read(iv); err != nil {
		return nil, fmt.Errorf("state blob: random IV: %w", err)
	}
	block, err := aes.NewCipher(k.b)
	if err != nil {
		return nil, err
	}
	pad := len(k.b) - len(plain)%len(k.b)
	ct := make([]byte, len(plain)+pad)
	copy(ct, plain)
	for i := len(plain); i < len(ct); i++ {
		ct[i] = byte(pad)
	}
	cipher.NewCBCEncrypter(block, iv[:aes.BlockSize]).CryptBlocks(ct, ct)
	mac := hmac.New(sha256.New, k.b)
	mac.Write(ct)
	mac.Write(iv)
	var out []byte
	out = appendTLV(out, ctTag, ct)
	out = appendTLV(out, tagHMAC, mac.Sum(nil))
	return appendTLV(out, ivTag, iv), nil
}

// decryptTLVs verifies and decrypts the ciphertext in tlvs.
func decryptTLVs(k *Key, tlvs map[uint16][]byte, ctTag, ivTag uint16) ([]byte, error) {
	ct, ok1 := tlvs[ctTag]
	sum, ok2 := tlvs[tagHMAC]
	iv, ok3 := tlvs[ivTag]
	if !ok1 || !ok2 {
		return nil, fmt.Errorf("%w: encrypted data or HMAC TLV missing", ErrMalformed)
	}
	if !ok3 {
		iv = make([]byte, aes.BlockSize) // very old writers used an all-zero IV and no IV TLV
	}
	if len(iv) < aes.BlockSize {
		return nil, fmt.Errorf("%w: IV of %d bytes", ErrMalformed, len(iv))
	}
	mac := hmac.New(sha256.New, k.b)
	mac.Write(ct)
	if ok3 {
		mac.Write(iv)
	}
	if !hmac.Equal(mac.Sum(nil), sum) {
		return nil, ErrDecrypt
	}
	if len(ct) == 0 || len(ct)%aes.BlockSize != 0 {
		return nil, fmt.Errorf("%w: ciphertext of %d bytes", ErrMalformed, len(ct))
	}
	block, err := aes.NewCipher(k.b)
	if err != nil {
		return nil, err
	}
	plain := make([]byte, len(ct))
	cipher.NewCBCDecrypter(block, iv[:aes.BlockSize]).CryptBlocks(plain, ct)
	pad := int(plain[len(plain)-1])
	if pad < 1 || pad > len(k.b) || pad > len(plain) || !bytes.Equal(plain[len(plain)-pad:], bytes.Repeat([]byte{byte(pad)}, pad)) {
		return nil, fmt.Errorf("%w: bad padding", ErrDecrypt)
	}
	return plain[:len(plain)-pad], nil
}

// innerTLVs is the stored form's TLV stream: plain, or encrypted with stateKey.
func innerTLVs(plain []byte, stateKey *Key) ([]byte, uint16, error) {
	if stateKey == nil {
		return appendTLV(nil, tagData, plain), 0, nil
	}
	tl, err := encryptTLVs(stateKey, plain, tagEncryptedData, tagIVEncryptedData)
	if err != nil {
		return nil, 0, err
	}
	flags := uint16(FlagEncrypted)
	if stateKey.Is256() {
		flags |= FlagEncrypted256
	}
	return tl, flags, nil
}

// openInner decodes the stored form's TLV stream.
func openInner(body []byte, flags uint16, encrypted bool, stateKey *Key) ([]byte, error) {
	tlvs, err := parseTLVs(body)
	if err != nil {
		return nil, err
	}
	if !encrypted {
		d, ok := tlvs[tagData]
		if !ok {
			if _, enc := tlvs[tagEncryptedData]; enc {
				return nil, ErrKeyNotFound
			}
			return nil, fmt.Errorf("%w: no data TLV", ErrMalformed)
		}
		return append([]byte(nil), d...), nil
	}
	if stateKey == nil {
		return nil, ErrKeyNotFound
	}
	if (flags&FlagEncrypted256 != 0) != stateKey.Is256() {
		return nil, fmt.Errorf("%w: blob needs a %d-bit key, got %d-bit", ErrKeyLength, map[bool]int{true: 256, false: 128}[flags&FlagEncrypted256 != 0], 8*len(stateKey.b))
	}
	return decryptTLVs(stateKey, tlvs, tagEncryptedData, tagIVEncryptedData)
}

// Seal encodes a libtpms blob as a stored state file.
func Seal(plain []byte, stateKey *Key) ([]byte, error) {
	body, flags, err := innerTLVs(plain, stateKey)
	if err != nil {
		return nil, err
	}
	return finish(flags, body), nil
}

// Open decodes a stored state file. When stateKey is set the file must be encrypted with it,
// as swtpm assumes.
func Open(data []byte, stateKey *Key) ([]byte, error) {
	h, body, err := ParseHeader(data)
	if err != nil {
		return nil, err
	}
	if h.Version == 1 {
		return openLegacy(body, stateKey)
	}
	if stateKey == nil && h.Flags&FlagEncrypted != 0 {
		return nil, ErrKeyNotFound
	}
	if stateKey != nil && h.Flags&FlagEncrypted == 0 {
		return nil, fmt.Errorf("%w: the state is not encrypted, but a state key is configured", ErrDecrypt)
	}
	return openInner(body, h.Flags, stateKey != nil, stateKey)
}

// openLegacy reads version-1 bodies: the raw blob, or AES-CBC (zero IV) of SHA256(data)||data.
func openLegacy(body []byte, stateKey *Key) ([]byte, error) {
	if stateKey == nil {
		return append([]byte(nil), body...), nil
	}
	if len(body) == 0 || len(body)%aes.BlockSize != 0 {
		return nil, fmt.Errorf("%w: legacy ciphertext of %d bytes", ErrMalformed, len(body))
	}
	block, err := aes.NewCipher(stateKey.b)
	if err != nil {
		return nil, err
	}
	plain := make([]byte, len(body))
	cipher.NewCBCDecrypter(block, make([]byte, aes.BlockSize)).CryptBlocks(plain, body)
	if pad := int(plain[len(plain)-1]); pad >= 1 && pad <= aes.BlockSize && pad <= len(plain) {
		plain = plain[:len(plain)-pad]
	}
	if len(plain) < sha256.Size {
		return nil, ErrDecrypt
	}
	sum := sha256.Sum256(plain[sha256.Size:])
	if !hmac.Equal(sum[:], plain[:sha256.Size]) {
		return nil, ErrDecrypt
	}
	return plain[sha256.Size:], nil
}

// WrapMigration builds the GET_STATEBLOB form of a libtpms blob. Unless decrypt is set the
// inner data stays encrypted with stateKey (innerEncrypted reports it); with migKey the whole
// inner stream is encrypted with it.
func WrapMigration(plain []byte, stateKey, migKey *Key, decrypt bool) ([]byte, bool, error) {
	sk := stateKey
	if decrypt {
		sk = nil
	}
	inner, flags, err := innerTLVs(plain, sk)
	if err != nil {
		return nil, false, err
	}
	flags |= FlagMigrationData
	var body []byte
	if migKey != nil {
		body, err = encryptTLVs(migKey, inner, tagEncryptedMigrationData, tagIVEncryptedMigration)
		if err != nil {
			return nil, false, err
		}
		flags |= FlagMigrationEncrypted
		if migKey.Is256() {
			flags |= FlagMigration256
		}
	} else {
		body = appendTLV(nil, tagMigrationData, inner)
	}
	return finish(flags, body), sk != nil, nil
}

// UnwrapMigration decodes a SET_STATEBLOB blob to the libtpms blob. innerEncrypted is the
// request's PTM_STATE_FLAG_ENCRYPTED. An empty body (header only) yields nil.
func UnwrapMigration(b []byte, innerEncrypted bool, stateKey, migKey *Key) ([]byte, error) {
	h, body, err := ParseHeader(b)
	if err != nil {
		return nil, err
	}
	if len(body) == 0 {
		return nil, nil
	}
	if h.Version == 1 {
		return openLegacy(body, stateKey)
	}
	tlvs, err := parseTLVs(body)
	if err != nil {
		return nil, err
	}
	var inner []byte
	switch {
	case h.Flags&FlagMigrationEncrypted != 0:
		if migKey == nil {
			return nil, fmt.Errorf("%w: blob is encrypted with a migration key", ErrKeyNotFound)
		}
		if (h.Flags&FlagMigration256 != 0) != migKey.Is256() {
			return nil, fmt.Errorf("%w: migration key", ErrKeyLength)
		}
		if inner, err = decryptTLVs(migKey, tlvs, tagEncryptedMigrationData, tagIVEncryptedMigration); err != nil {
			return nil, fmt.Errorf("migration key: %w", err)
		}
	default:
		var ok bool
		if inner, ok = tlvs[tagMigrationData]; !ok {
			// a stored-file blob (no migration wrapping) is accepted as is
			inner = body
		}
	}
	enc := innerEncrypted || h.Flags&FlagEncrypted != 0
	return openInner(inner, h.Flags, enc, stateKey)
}
