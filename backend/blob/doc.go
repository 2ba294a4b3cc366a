// Package blob reads and writes swtpm's state blob format byte for byte, so that state files
// and migration blobs move between swtpm and vtpmd in both directions.
//
// # Format
//
// A blob is a 10-byte big-endian header followed by a body:
//
//	u8 version (2)  u8 min_version (1)  u16 hdrsize (10)  u16 flags  u32 totlen (whole blob)
//
// Flags: 0x01 encrypted with the state key, 0x02 encrypted with the migration key, 0x04
// migration data, 0x08 the state key is 256 bits, 0x10 the migration key is 256 bits. A
// version-2 body is a stream of TLVs (u16 tag, u32 length, value): 1 data, 2 encrypted data,
// 3 HMAC, 4 migration data, 5 encrypted migration data, 6 and 7 the IVs of 2 and 5.
//
//   - Stored file (Seal, Open): header + TLV(1, libtpms blob); with a state key (--key)
//     header(0x01, |0x08) + TLV(2, ciphertext) TLV(3, HMAC) TLV(6, IV).
//   - Migration blob (WrapMigration, UnwrapMigration; GET/SET_STATEBLOB): header(|0x04) +
//     TLV(4, inner), or with a migration key (--migration-key) header(|0x02, |0x10) + TLV(5)
//     TLV(3) TLV(7) encrypting inner, where inner is the stored form's TLV stream.
//
// Encryption is swtpm's: AES-CBC with a 16- or 32-byte key, PKCS#7-style padding to a multiple
// of the key length (16 or 32 bytes, not the AES block size), a fresh random IV as long as the
// key of which the first 16 bytes are the CBC IV, and HMAC-SHA256 keyed with the AES key over
// ciphertext || IV. Version-1 (legacy) bodies are read: the raw blob, or AES-CBC with a zero
// IV over SHA256(data) || data.
//
// Early swtpm releases stored state files without the header: the libtpms blob itself, or,
// with a state key, a version-1 body (AES-CBC, zero IV, SHA256(data) || data, padded to the
// key length). Like swtpm 0.7.1 (SWTPM_NVRAM_LoadData), Open and OpenVersioned read a stored
// file whose header check fails as such a headerless file: with a key the hash then decides;
// without one the data goes to libtpms as it is, except data that begins with a header
// version (1 or 2), which no libtpms blob does (they begin with a zero byte): that is a
// broken current-format file, refused for its header as libtpms would refuse it. A
// truncated or tampered current-format file is therefore still refused, with the header
// problem in the error. Files written back are always in the current format, as swtpm writes
// them. SET_STATEBLOB blobs must have the header (swtpm's SWTPM_NVRAM_SetStateBlob checks it
// and stops); version-1 ones are read.
//
// # State versions
//
// With a state key, vtpmd can stamp a stored file with a state version (SealVersioned,
// Restamp, OpenVersioned, StoredStamp): a u64 that the store makes grow with every durable
// write, so that an older copy of the state can be told from the current one. The Stamp also
// holds the versions of the state's three blobs (permall, volatilestate, savestate) as they
// are once this blob is written, so the newest blob says what the others must be. It rides
// in a fourth TLV after swtpm's three, tag TagStateVersion (0x7674), value (65 bytes)
//
//	u8 format (1)  u64 version  3 x u64 state  HMAC-SHA256(vk, u8 format || u8 len(name) || name || u64 version || 3 x u64 state || swtpm HMAC)
//
// where vk is HKDF-SHA256 of the state key (no salt, info "vtpmd state version key"), name
// the blob's name, and swtpm HMAC the 32 bytes of TLV 3, swtpm's HMAC over ciphertext || IV.
// Through it the stamp is bound to this very ciphertext: it can be neither changed nor moved
// to another blob, another blob type or another key's state (ErrVersionAuth, a kind of
// ErrDecrypt). swtpm's own HMAC does not cover it (it covers only ciphertext and IV), and
// swtpm skips TLVs it does not know: Debian's swtpm 0.7.1 loads stamped files with the same
// key, and drops the stamp when it rewrites them. A file without the TLV (swtpm's, or vtpmd's
// without versioning) has version 0; stripping the TLV therefore only ever lowers a blob's
// version. Plain (unencrypted) files never carry a version, and neither do migration blobs.
//
// Keys come from --key / --migration-key option strings (ParseKeyOption, LoadKey): raw keys
// in hex or binary, or passphrases turned into keys with PBKDF2-HMAC-SHA512 (salt "swtpm",
// 1000 iterations) or SHA-512, exactly as swtpm derives them.
//
// # Guarantees
//
// Decoders check every length before slicing, verify the HMAC in constant time before they
// decrypt, never panic on any input, and return errors that say what was wrong and wrap one
// sentinel, which callers map to swtpm's control-channel results: ErrKeyNotFound (0x0d),
// ErrDecrypt (0x21), ErrKeyLength (0x28), ErrHeaderSize (0x2b), ErrVersion (0x2e),
// ErrMalformed (0x03). Where swtpm answers TPM_FAIL for a structural problem (a missing TLV,
// a ciphertext that is not whole AES blocks) this package says ErrMalformed; for a legacy
// blob whose hash does not match (swtpm's SWTPM_CheckHash) it says ErrLegacyHash, a kind of
// ErrDecrypt that callers map to TPM_FAIL as swtpm answers. Decoding is
// stricter than swtpm in one way: the whole TLV stream must be well formed, not only the TLVs
// up to the one looked for.
//
// As in swtpm, Open with a state key assumes the data is encrypted (it does not trust the
// header's 0x01 flag), and UnwrapMigration accepts plain blobs even when keys are configured
// ("upgrade to encryption"), never the reverse.
package blob
