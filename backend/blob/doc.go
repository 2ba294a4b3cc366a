// Package blob reads and writes swtpm's state blob format byte for byte, so that state moves
// between swtpm and vtpmd in both directions.
//
// A blob is a 10-byte big-endian header (version 2, min_version 1, hdrsize 10, flags, total
// length) followed by TLVs (u16 tag, u32 length, value). Stored files carry the libtpms blob in
// TLV 1, or, with a state key (--key), AES-CBC ciphertext (TLV 2), an HMAC-SHA256 over
// ciphertext||IV keyed with the same AES key (TLV 3) and the IV (TLV 6). As in swtpm, padding is
// PKCS#7-style to a multiple of the key length (16 or 32 bytes), and the IV TLV is key-length
// long (its first 16 bytes are the CBC IV). Migration blobs (GET/SET_STATEBLOB) set flag 0x04
// and wrap that inner TLV stream in TLV 4, or encrypt it with the migration key into TLVs 5, 3
// and 7.
//
// Every decoder checks lengths before it slices, verifies the HMAC (in constant time) before it
// decrypts, and reports what was wrong with a sentinel error callers map to swtpm's result
// codes. Nothing here panics on any input.
package blob
