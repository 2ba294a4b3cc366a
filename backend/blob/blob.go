package blob

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
)

// Sentinel errors. Every error returned by this package for bad input wraps exactly one of
// the first six (ErrVersionAuth, ErrNotEncrypted and ErrLegacyHash are kinds of ErrDecrypt);
// the comment names the swtpm control-channel result a caller answers with.
var (
	// ErrKeyNotFound: the data is encrypted and the key it needs is not configured
	// (TPM_KEYNOTFOUND, 0x0d).
	ErrKeyNotFound = errors.New("key not found")
	// ErrDecrypt: HMAC mismatch, bad padding or a bad IV, i.e. a wrong key or tampered data;
	// also unencrypted data where a state key is configured (TPM_DECRYPT_ERROR, 0x21).
	ErrDecrypt = errors.New("decryption failed")
	// ErrKeyLength: the header's 256-bit-key flag does not match the configured key
	// (TPM_BAD_KEY_PROPERTY, 0x28).
	ErrKeyLength = errors.New("wrong key length")
	// ErrHeaderSize: the header's size field is not 10 (TPM_BAD_DATASIZE, 0x2b).
	ErrHeaderSize = errors.New("bad header size")
	// ErrVersion: the blob's min_version is above 2, or its version is neither 1 nor 2
	// (TPM_BAD_VERSION, 0x2e).
	ErrVersion = errors.New("unsupported version")
	// ErrMalformed: truncated, total length mismatch, missing or truncated TLVs, bad sizes
	// (TPM_BAD_PARAMETER, 0x03).
	ErrMalformed = errors.New("malformed")

	// ErrVersionAuth: a stored blob's state version (TagStateVersion) does not authenticate
	// with the state key: tampered, moved from another blob, or written with another key. It
	// is a kind of ErrDecrypt: an error that wraps it wraps ErrDecrypt too (and no other of
	// the sentinels above), so callers that map ErrDecrypt map it alike.
	ErrVersionAuth = fmt.Errorf("state version authentication failed: %w", ErrDecrypt)
	// ErrNotEncrypted: unencrypted data where a key is configured. A kind of ErrDecrypt
	// (0x21 on SET_STATEBLOB), but swtpm's state callback answers TPM_FAIL for it (no HMAC),
	// which libtpms 1.2 passes on as CMD_INIT's result.
	ErrNotEncrypted = fmt.Errorf("data not encrypted: %w", ErrDecrypt)
	// ErrLegacyHash: a version-1 or headerless (early swtpm) encrypted blob decrypts to valid
	// padding, but its SHA-256 does not match: a wrong key or tampered data. A kind of
	// ErrDecrypt, but swtpm answers TPM_FAIL for it (SWTPM_CheckHash), on CMD_INIT (libtpms
	// 1.2 passes it on) and on SET_STATEBLOB alike, not TPM_DECRYPT_ERROR.
	ErrLegacyHash = fmt.Errorf("legacy hash mismatch: %w", ErrDecrypt)
)

// blobError says what was wrong with a blob and wraps one sentinel.
type blobError struct {
	msg      string
	sentinel error
}

func (e *blobError) Error() string { return "state blob: " + e.msg + ": " + e.sentinel.Error() }
func (e *blobError) Unwrap() error { return e.sentinel }

// fail builds an error that says what was wrong and wraps the sentinel.
func fail(sentinel error, format string, a ...any) error {
	return &blobError{msg: fmt.Sprintf(format, a...), sentinel: sentinel}
}

// Header flags (swtpm's BLOB_FLAG_*).
const (
	FlagEncrypted          = 0x01 // data encrypted with the state key
	FlagMigrationEncrypted = 0x02 // data encrypted with the migration key
	FlagMigrationData      = 0x04 // a migration blob (GET/SET_STATEBLOB)
	FlagEncrypted256       = 0x08 // the state key is 256 bits
	FlagMigration256       = 0x10 // the migration key is 256 bits
)

// TLV tags (swtpm's TAG_*).
const (
	TagData                   = 1
	TagEncryptedData          = 2
	TagHMAC                   = 3
	TagMigrationData          = 4
	TagEncryptedMigrationData = 5
	TagIVEncryptedData        = 6
	TagIVEncryptedMigration   = 7
)

const (
	// HeaderSize is the size of the blob header.
	HeaderSize = 10
	// Version is the header version written; MinVersion the min_version written.
	Version    = 2
	MinVersion = 1

	tlvHeaderSize = 6
	hmacSize      = sha256.Size
	// maxPlain bounds what Seal and WrapMigration accept. libtpms blobs are below 128 KiB
	// (TPM_ALLOC_MAX); anything near the u32 TLV length limit is a caller bug.
	maxPlain = 64 << 20
)

// Header is a parsed blob header.
type Header struct {
	Version, MinVersion uint8
	HeaderSize          uint16
	Flags               uint16
	TotalLength         uint32
}

// ParseHeader checks a blob's header against the blob's length, in swtpm's order (length,
// total length, min_version, header size), and returns it with the body that follows it.
func ParseHeader(b []byte) (Header, []byte, error) {
	if len(b) < HeaderSize {
		return Header{}, nil, fail(ErrMalformed, "%d bytes is shorter than the %d-byte header", len(b), HeaderSize)
	}
	h := Header{
		Version:     b[0],
		MinVersion:  b[1],
		HeaderSize:  binary.BigEndian.Uint16(b[2:4]),
		Flags:       binary.BigEndian.Uint16(b[4:6]),
		TotalLength: binary.BigEndian.Uint32(b[6:10]),
	}
	if uint64(h.TotalLength) != uint64(len(b)) {
		return Header{}, nil, fail(ErrMalformed, "totlen %d != length %d", h.TotalLength, len(b))
	}
	if h.MinVersion > Version {
		return Header{}, nil, fail(ErrVersion, "min_version %d > %d (written by a newer swtpm)", h.MinVersion, Version)
	}
	if h.HeaderSize != HeaderSize {
		return Header{}, nil, fail(ErrHeaderSize, "hdrsize %d != %d", h.HeaderSize, HeaderSize)
	}
	return h, b[HeaderSize:], nil
}

func appendHeader(dst []byte, flags uint16, total int) []byte {
	dst = append(dst, Version, MinVersion)
	dst = binary.BigEndian.AppendUint16(dst, HeaderSize)
	dst = binary.BigEndian.AppendUint16(dst, flags)
	return binary.BigEndian.AppendUint32(dst, uint32(total))
}

// putHeader writes the header into the first HeaderSize bytes of a whole blob.
func putHeader(blob []byte, flags uint16) {
	appendHeader(blob[:0], flags, len(blob))
}

func appendTLV(dst []byte, tag uint16, v []byte) []byte {
	dst = binary.BigEndian.AppendUint16(dst, tag)
	dst = binary.BigEndian.AppendUint32(dst, uint32(len(v)))
	return append(dst, v...)
}

// parseTLVs splits a TLV stream and indexes it by tag; the first occurrence of a tag wins, as
// in swtpm's tlv_data_find_tag. Unlike swtpm, the whole stream must be well formed.
func parseTLVs(b []byte) (map[uint16][]byte, error) {
	m := map[uint16][]byte{}
	for off := 0; off < len(b); {
		if len(b)-off < tlvHeaderSize {
			return nil, fail(ErrMalformed, "truncated TLV header at body offset %d (%d bytes left)", off, len(b)-off)
		}
		tag := binary.BigEndian.Uint16(b[off:])
		n := binary.BigEndian.Uint32(b[off+2:])
		off += tlvHeaderSize
		if uint64(n) > uint64(len(b)-off) {
			return nil, fail(ErrMalformed, "TLV tag %d claims %d bytes, %d remain", tag, n, len(b)-off)
		}
		if _, dup := m[tag]; !dup {
			m[tag] = b[off : off+int(n)]
		}
		off += int(n)
	}
	return m, nil
}

func finish(flags uint16, body []byte) []byte {
	out := make([]byte, HeaderSize, HeaderSize+len(body))
	out = append(out, body...)
	putHeader(out, flags)
	return out
}

// encryptedSize is the length of encryptTLVs' output for n bytes of plain data under a key
// of kl bytes.
func encryptedSize(n, kl int) int {
	return 3*tlvHeaderSize + n + kl - n%kl + hmacSize + kl
}

// encryptTLVs appends TLV(ctTag, ciphertext) TLV(3, HMAC) TLV(ivTag, IV) for plain under k to
// dst, and returns the HMAC it wrote (a part of the result). As swtpm does, it pads
// PKCS#7-style to a multiple of the key length (not the AES block size), draws a fresh
// key-length IV of which the first 16 bytes are the CBC IV, and keys an HMAC-SHA256 over
// ciphertext||IV with the AES key itself. The ciphertext is made in place, in dst.
func encryptTLVs(dst []byte, k *Key, plain []byte, ctTag, ivTag uint16) (out, mac []byte, err error) {
	kl := len(k.b)
	block, err := aes.NewCipher(k.b)
	if err != nil {
		return nil, nil, fmt.Errorf("state blob: %w", err)
	}
	pad := kl - len(plain)%kl
	dst = slices.Grow(dst, encryptedSize(len(plain), kl))
	dst = binary.BigEndian.AppendUint16(dst, ctTag)
	dst = binary.BigEndian.AppendUint32(dst, uint32(len(plain)+pad))
	ctAt := len(dst)
	dst = append(dst, plain...)
	for range pad {
		dst = append(dst, byte(pad))
	}
	ct := dst[ctAt:]
	// the IV goes last; it is drawn into its place first
	ivAt := len(dst) + 2*tlvHeaderSize + hmacSize
	iv := dst[ivAt : ivAt+kl]
	if _, err := rand.Read(iv); err != nil {
		return nil, nil, fmt.Errorf("state blob: random IV: %w", err)
	}
	cipher.NewCBCEncrypter(block, iv[:aes.BlockSize]).CryptBlocks(ct, ct)
	h := hmac.New(sha256.New, k.b)
	h.Write(ct)
	h.Write(iv)
	dst = binary.BigEndian.AppendUint16(dst, TagHMAC)
	dst = binary.BigEndian.AppendUint32(dst, hmacSize)
	macAt := len(dst)
	dst = h.Sum(dst)
	dst = binary.BigEndian.AppendUint16(dst, ivTag)
	dst = binary.BigEndian.AppendUint32(dst, uint32(kl))
	return dst[:len(dst)+kl], dst[macAt : macAt+hmacSize], nil
}

// layer names the key a decryption step uses, for error messages.
type layer struct {
	key              string // "state key" or "migration key"
	ctTag, ivTag     uint16
	dataTag, flag256 uint16
}

var (
	stateLayer     = layer{"state key", TagEncryptedData, TagIVEncryptedData, TagData, FlagEncrypted256}
	migrationLayer = layer{"migration key", TagEncryptedMigrationData, TagIVEncryptedMigration, TagMigrationData, FlagMigration256}
)

func bits(n int) int { return 8 * n }

// decrypt verifies and decrypts body (a TLV stream for header version 2, raw ciphertext for
// version 1) with k, following swtpm's SWTPM_NVRAM_DecryptData.
func decrypt(k *Key, body []byte, h Header, l layer) ([]byte, error) {
	switch h.Version {
	case 1:
		return decryptLegacy(k, body, l)
	case 2:
	default:
		return nil, fail(ErrVersion, "header version %d is neither 1 nor 2", h.Version)
	}
	tl, err := parseTLVs(body)
	if err != nil {
		return nil, err
	}
	return decryptTLVs(k, tl, h, l)
}

// checkEncrypted checks, in swtpm's order, that a parsed version-2 body holds data encrypted
// with a key of k's length, and returns the ciphertext and the HMAC TLV.
func checkEncrypted(k *Key, tl map[uint16][]byte, h Header, l layer) (ct, sum []byte, err error) {
	ct, okCT := tl[l.ctTag]
	sum, okMAC := tl[TagHMAC]
	if _, plain := tl[l.dataTag]; plain && !okCT {
		return nil, nil, fail(ErrNotEncrypted, "the data is not encrypted (TLV %d), but a %s is configured", l.dataTag, l.key)
	}
	want := 16
	if h.Flags&l.flag256 != 0 {
		want = 32
	}
	if want != len(k.b) {
		return nil, nil, fail(ErrKeyLength, "the data needs a %d-bit %s, the configured one has %d bits", bits(want), l.key, bits(len(k.b)))
	}
	if !okCT || !okMAC {
		return nil, nil, fail(ErrMalformed, "encrypted data (TLV %d) or HMAC (TLV %d) missing", l.ctTag, TagHMAC)
	}
	if len(sum) < hmacSize {
		return nil, nil, fail(ErrMalformed, "HMAC TLV of %d bytes, need %d", len(sum), hmacSize)
	}
	return ct, sum, nil
}

// decryptTLVs is decrypt of a parsed version-2 body.
func decryptTLVs(k *Key, tl map[uint16][]byte, h Header, l layer) ([]byte, error) {
	ct, sum, err := checkEncrypted(k, tl, h, l)
	if err != nil {
		return nil, err
	}
	iv, hasIV := tl[l.ivTag] // writers before swtpm 0.5 had no IV TLV: zero IV, HMAC over ct only
	mac := hmac.New(sha256.New, k.b)
	mac.Write(ct)
	if hasIV {
		mac.Write(iv)
	}
	// swtpm compares the first 32 bytes of the HMAC TLV; so do we, in constant time.
	if subtle.ConstantTimeCompare(mac.Sum(nil), sum[:hmacSize]) != 1 {
		return nil, fail(ErrDecrypt, "HMAC mismatch: wrong %s or tampered data", l.key)
	}
	if !hasIV {
		iv = nil
	}
	return cbcDecrypt(k, ct, iv, l)
}

// cbcDecrypt undoes encryptTLVs' AES-CBC and key-length padding. iv nil means a zero IV.
func cbcDecrypt(k *Key, ct, iv []byte, l layer) ([]byte, error) {
	kl := len(k.b)
	if len(ct) < kl {
		return nil, fail(ErrDecrypt, "ciphertext of %d bytes is shorter than the %d-bit %s", len(ct), bits(kl), l.key)
	}
	if iv != nil && len(iv) != kl {
		return nil, fail(ErrDecrypt, "IV of %d bytes, the %d-bit %s needs %d", len(iv), bits(kl), l.key, kl)
	}
	if len(ct)%aes.BlockSize != 0 {
		return nil, fail(ErrMalformed, "ciphertext of %d bytes is not a multiple of the AES block size", len(ct))
	}
	block, err := aes.NewCipher(k.b)
	if err != nil {
		return nil, fmt.Errorf("state blob: %w", err)
	}
	ivb := make([]byte, aes.BlockSize)
	if iv != nil {
		copy(ivb, iv)
	}
	plain := make([]byte, len(ct))
	cipher.NewCBCDecrypter(block, ivb).CryptBlocks(plain, ct)
	pad := int(plain[len(plain)-1])
	if pad == 0 || pad > kl {
		return nil, fail(ErrDecrypt, "bad padding length %d after decryption with the %s", pad, l.key)
	}
	for _, c := range plain[len(plain)-pad:] {
		if int(c) != pad {
			return nil, fail(ErrDecrypt, "bad padding after decryption with the %s", l.key)
		}
	}
	return plain[:len(plain)-pad], nil
}

// decryptLegacy reads a version-1 encrypted body: AES-CBC with a zero IV over
// SHA256(data) || data, padded like version 2. No key-length flag exists in version 1.
func decryptLegacy(k *Key, body []byte, l layer) ([]byte, error) {
	plain, err := cbcDecrypt(k, body, nil, l)
	if err != nil {
		return nil, err
	}
	if len(plain) < sha256.Size {
		return nil, fail(ErrDecrypt, "version-1 data of %d bytes has no room for its hash (wrong %s?)", len(plain), l.key)
	}
	sum := sha256.Sum256(plain[sha256.Size:])
	if subtle.ConstantTimeCompare(sum[:], plain[:sha256.Size]) != 1 {
		return nil, fail(ErrLegacyHash, "version-1 hash mismatch: wrong %s or tampered data", l.key)
	}
	return plain[sha256.Size:], nil
}

// plainData extracts unencrypted data: the whole body for version 1, the dataTag TLV for 2.
// haveKey says whether the layer's key is configured (for the error when the data turns out
// to be encrypted).
func plainData(body []byte, h Header, l layer, haveKey bool) ([]byte, error) {
	switch h.Version {
	case 1:
		return append([]byte(nil), body...), nil
	case 2:
	default:
		return nil, fail(ErrVersion, "header version %d is neither 1 nor 2", h.Version)
	}
	tl, err := parseTLVs(body)
	if err != nil {
		return nil, err
	}
	d, ok := tl[l.dataTag]
	if !ok {
		if _, enc := tl[l.ctTag]; enc {
			if haveKey {
				return nil, fail(ErrMalformed, "the data is encrypted (TLV %d), but the header flags 0x%02x say it is not", l.ctTag, h.Flags)
			}
			return nil, fail(ErrKeyNotFound, "the data is encrypted with a %s (TLV %d), but none is configured", l.key, l.ctTag)
		}
		return nil, fail(ErrMalformed, "no data TLV (tag %d)", l.dataTag)
	}
	return append([]byte(nil), d...), nil
}

// innerSize is the length of innerTLVs' output for n bytes of plain data.
func innerSize(n int, stateKey *Key) int {
	if stateKey == nil {
		return tlvHeaderSize + n
	}
	return encryptedSize(n, stateKey.Len())
}

// innerTLVs appends the stored form's TLV stream to dst: plain, or encrypted with stateKey.
// It returns the header flags that say which, and the HMAC of encrypted data (nil for plain).
func innerTLVs(dst, plain []byte, stateKey *Key) (out []byte, flags uint16, mac []byte, err error) {
	if len(plain) > maxPlain {
		return nil, 0, nil, fail(ErrMalformed, "%d bytes of state is more than the %d this format is used for", len(plain), maxPlain)
	}
	if stateKey == nil {
		return appendTLV(dst, TagData, plain), 0, nil, nil
	}
	if dst, mac, err = encryptTLVs(dst, stateKey, plain, TagEncryptedData, TagIVEncryptedData); err != nil {
		return nil, 0, nil, err
	}
	flags = FlagEncrypted
	if stateKey.Is256() {
		flags |= FlagEncrypted256
	}
	return dst, flags, mac, nil
}

// Seal encodes a libtpms blob as swtpm stores it in a file: header + TLV(1, plain), or with a
// state key header(flags 0x01, |0x08 for AES-256) + TLV(2) TLV(3) TLV(6).
func Seal(plain []byte, stateKey *Key) ([]byte, error) {
	out := make([]byte, HeaderSize, HeaderSize+innerSize(len(plain), stateKey))
	out, flags, _, err := innerTLVs(out, plain, stateKey)
	if err != nil {
		return nil, err
	}
	putHeader(out, flags)
	return out, nil
}

// Open decodes a stored state file to the libtpms blob. As swtpm does, when stateKey is set
// the data must be encrypted with it (the header's encrypted flag is not consulted); when it
// is nil the data must be plain. Version-1 (legacy) bodies are read too, and so are the
// headerless files of early swtpm releases (see openHeaderless).
func Open(data []byte, stateKey *Key) ([]byte, error) {
	h, body, err := ParseHeader(data)
	if err != nil {
		return openHeaderless(data, stateKey, err)
	}
	if stateKey == nil {
		if h.Flags&FlagEncrypted != 0 {
			return nil, fail(ErrKeyNotFound, "the data is encrypted (flags 0x%02x), but no state key is configured", h.Flags)
		}
		return plainData(body, h, stateLayer, false)
	}
	return decrypt(stateKey, body, h, stateLayer)
}

// openHeaderless reads a stored file whose header check failed (hdrErr) the way swtpm 0.7.1's
// SWTPM_NVRAM_LoadData does: as a file written before swtpm had its blob header, whose whole
// content is a version-1 payload. Without a state key that is the libtpms blob itself; with
// one it is AES-CBC with a zero IV over SHA256(blob) || blob, padded to the key length
// (decryptLegacy), which the hash authenticates. Stored files only: SET_STATEBLOB refuses a
// blob without a header, as swtpm does.
//
// Without a key swtpm hands data of any shape to libtpms, which refuses what is not its own.
// libtpms blobs begin with a zero byte (the high byte of their format version), swtpm's
// header with its version, 1 or 2: unencrypted data that begins with 1 or 2 is a broken (for
// example truncated) current-format file, which libtpms would refuse; it is refused here with
// hdrErr, which says what is wrong with it. With a key the headerless reading is tried
// whatever the data looks like (ciphertext may begin with any byte), and its failure is the
// error, as in swtpm, with what was wrong with the header in its message.
func openHeaderless(data []byte, stateKey *Key, hdrErr error) ([]byte, error) {
	if stateKey == nil {
		if len(data) == 0 || looksLikeHeader(data) {
			return nil, hdrErr
		}
		return bytes.Clone(data), nil
	}
	plain, err := decryptLegacy(stateKey, data, stateLayer)
	if err == nil {
		return plain, nil
	}
	var he, le *blobError
	if errors.As(hdrErr, &he) && errors.As(err, &le) {
		return nil, fail(le.sentinel, "no valid swtpm header (%s), and as an early swtpm's headerless file: %s", he.msg, le.msg)
	}
	return nil, err
}

// looksLikeHeader reports whether data begins like swtpm's blob header (version 1 or 2) rather
// than like a libtpms blob (a zero byte).
func looksLikeHeader(data []byte) bool {
	return len(data) > 0 && (data[0] == 1 || data[0] == 2)
}

// WrapMigration builds the GET_STATEBLOB form of a libtpms blob: header(flags |0x04) around
// TLV(4, inner), or with migKey TLV(5) TLV(3) TLV(7) encrypting inner. inner is the stored
// form's TLV stream: re-encrypted with stateKey unless decrypt is set (innerEncrypted reports
// it; the caller answers PTM_STATE_FLAG_ENCRYPTED), plain otherwise.
func WrapMigration(plain []byte, stateKey, migKey *Key, decrypt bool) (blob []byte, innerEncrypted bool, err error) {
	sk := stateKey
	if decrypt {
		sk = nil
	}
	if migKey == nil {
		// TLV(4) holds the inner stream: build it in place
		out := make([]byte, HeaderSize+tlvHeaderSize, HeaderSize+tlvHeaderSize+innerSize(len(plain), sk))
		out, flags, _, err := innerTLVs(out, plain, sk)
		if err != nil {
			return nil, false, err
		}
		binary.BigEndian.PutUint16(out[HeaderSize:], TagMigrationData)
		binary.BigEndian.PutUint32(out[HeaderSize+2:], uint32(len(out)-HeaderSize-tlvHeaderSize))
		putHeader(out, flags|FlagMigrationData)
		return out, sk != nil, nil
	}
	inner, flags, _, err := innerTLVs(make([]byte, 0, innerSize(len(plain), sk)), plain, sk)
	if err != nil {
		return nil, false, err
	}
	out := make([]byte, HeaderSize, HeaderSize+encryptedSize(len(inner), migKey.Len()))
	if out, _, err = encryptTLVs(out, migKey, inner, TagEncryptedMigrationData, TagIVEncryptedMigration); err != nil {
		return nil, false, err
	}
	flags |= FlagMigrationData | FlagMigrationEncrypted
	if migKey.Is256() {
		flags |= FlagMigration256
	}
	putHeader(out, flags)
	return out, sk != nil, nil
}

// UnwrapMigration decodes a SET_STATEBLOB blob to the libtpms blob, following swtpm's
// SWTPM_NVRAM_SetStateBlob: with flag 0x02 the migration key decrypts TLV 5 (ErrKeyNotFound
// without one), else TLV 4 is taken, so a plain blob is accepted even when a migration key is
// configured; then, if innerEncrypted (the request's PTM_STATE_FLAG_ENCRYPTED) or flag 0x01 is
// set, the state key decrypts TLV 2, else TLV 1 is taken. A blob with an empty body (only a
// header) yields nil, nil: the caller clears the cached state as for a zero-length blob.
func UnwrapMigration(blob []byte, innerEncrypted bool, stateKey, migKey *Key) ([]byte, error) {
	h, body, err := ParseHeader(blob)
	if err != nil {
		return nil, err
	}
	if len(body) == 0 {
		return nil, nil
	}
	var inner []byte
	if h.Flags&FlagMigrationEncrypted != 0 {
		if migKey == nil {
			return nil, fail(ErrKeyNotFound, "the blob is encrypted with a migration key (flags 0x%02x), but none is configured", h.Flags)
		}
		if inner, err = decrypt(migKey, body, h, migrationLayer); err != nil {
			return nil, err
		}
	} else if inner, err = plainData(body, h, migrationLayer, migKey != nil); err != nil {
		return nil, err
	}
	if innerEncrypted || h.Flags&FlagEncrypted != 0 {
		if stateKey == nil {
			return nil, fail(ErrKeyNotFound, "the inner data is encrypted with a state key (flags 0x%02x), but none is configured", h.Flags)
		}
		return decrypt(stateKey, inner, h, stateLayer)
	}
	return plainData(inner, h, stateLayer, stateKey != nil)
}
