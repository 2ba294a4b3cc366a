package manager

import (
	"bytes"
	"crypto"
	"crypto/aes"
	"crypto/cipher"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/vtpmd/vtpmd/backend/seam"
)

// A sealed migration blob (the envelope) is what leaves a vTPM under a manager in place of
// swtpm's migration blob: QEMU carries it as an opaque blob. Layout (big-endian):
//
//	"VTPMDMIG"  u16 format (1)
//	u32 n  header: n bytes of JSON (envelopeHeader), signed, and the AEAD's associated data
//	u32 n  ciphertext: AES-256-GCM under the ticket's one-time key of swtpm's migration blob
//	u32 n  signature by the source manager's identity key over
//	       SHA-256("vtpmd migration envelope v1\x00" || u32 len(header) || header || SHA-256(ciphertext))
//
// The header names the ticket, the VM, the blob type, the source manager's identity (its
// certificate chain) and migration address, the state version and move count, and the
// SHA-256 of the sealed plaintext. The one-time key never travels with it.
const (
	envelopeFormat   = 1
	envelopeSigLabel = "vtpmd migration envelope v1\x00"
	// maxEnvelopeHeader bounds the header (certificate chains included).
	maxEnvelopeHeader = 64 << 10
	// maxEnvelopeSig bounds the signature (RSA 4096 is 512 bytes).
	maxEnvelopeSig = 1024
	oneTimeKeySize = 32
	gcmNonceSize   = 12
)

// envelopeHeader is the signed header of a sealed blob.
type envelopeHeader struct {
	Format int    `json:"format"`
	Ticket string `json:"ticket"`
	// Type is swtpm's blob type (1 permanent, 2 volatile, 3 savestate).
	Type uint32 `json:"type"`
	VM   string `json:"vm,omitempty"`
	Name string `json:"name,omitempty"`
	// Source is the source manager's migration address (host:port); empty when it has no
	// listener (the blob can then only come back to the same host: a restore).
	Source string `json:"source,omitempty"`
	// SourceID is the hex SHA-256 of the source identity's public key (SubjectPublicKeyInfo).
	SourceID string   `json:"source_id"`
	Chain    [][]byte `json:"chain"`
	// StateVersion is the source manager's record of the vTPM's durable state version.
	StateVersion uint64 `json:"state_version"`
	// Moves is how often the vTPM had moved between hosts before this export.
	Moves uint64 `json:"moves"`
	// Digest is the SHA-256 of the sealed plaintext (swtpm's migration blob).
	Digest  []byte    `json:"digest"`
	Created time.Time `json:"created"`
	Nonce   []byte    `json:"nonce"`
}

// envelope is a parsed sealed blob.
type envelope struct {
	hdr    envelopeHeader
	rawHdr []byte
	ct     []byte
	sig    []byte
}

// Sentinel errors of sealed blobs.
var (
	// ErrEnvelope: a sealed blob that is malformed, altered or truncated.
	ErrEnvelope = errors.New("manager: sealed migration blob malformed or altered")
	// ErrUntrusted: a sealed blob (or a peer) whose identity this host does not trust.
	ErrUntrusted = errors.New("manager: identity not trusted")
)

// sealEnvelope encrypts plain under key for hdr (whose Nonce, Digest and Format it fills)
// and signs it with id.
func sealEnvelope(hdr envelopeHeader, key, plain []byte, id *Identity) ([]byte, error) {
	hdr.Format = envelopeFormat
	hdr.Nonce = make([]byte, gcmNonceSize)
	if _, err := rand.Read(hdr.Nonce); err != nil {
		return nil, err
	}
	d := sha256.Sum256(plain)
	hdr.Digest = d[:]
	rawHdr, err := json.Marshal(hdr)
	if err != nil {
		return nil, err
	}
	aead, err := newGCM(key)
	if err != nil {
		return nil, err
	}
	ct := aead.Seal(nil, hdr.Nonce, plain, rawHdr)
	sig, err := id.Key.Sign(rand.Reader, envelopeDigest(rawHdr, ct), crypto.SHA256)
	if err != nil {
		return nil, fmt.Errorf("sign the sealed blob: %w", err)
	}
	out := make([]byte, 0, len(seam.SealedMagic)+2+12+len(rawHdr)+len(ct)+len(sig))
	out = append(out, seam.SealedMagic...)
	out = binary.BigEndian.AppendUint16(out, envelopeFormat)
	for _, part := range [][]byte{rawHdr, ct, sig} {
		out = binary.BigEndian.AppendUint32(out, uint32(len(part)))
		out = append(out, part...)
	}
	return out, nil
}

func newGCM(key []byte) (cipher.AEAD, error) {
	if len(key) != oneTimeKeySize {
		return nil, fmt.Errorf("one-time key: %d bytes, want %d", len(key), oneTimeKeySize)
	}
	c, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(c)
}

// envelopeDigest is what the source signs.
func envelopeDigest(rawHdr, ct []byte) []byte {
	h := sha256.New()
	h.Write([]byte(envelopeSigLabel))
	h.Write(binary.BigEndian.AppendUint32(nil, uint32(len(rawHdr))))
	h.Write(rawHdr)
	c := sha256.Sum256(ct)
	h.Write(c[:])
	return h.Sum(nil)
}

// parseEnvelope checks a sealed blob's structure (every length before it is used) and decodes
// its header strictly; it neither verifies the signature nor decrypts.
func parseEnvelope(b []byte) (*envelope, error) {
	if !seam.IsSealed(b) {
		return nil, fmt.Errorf("%w: not a sealed blob", ErrEnvelope)
	}
	rest := b[len(seam.SealedMagic):]
	if len(rest) < 2 {
		return nil, fmt.Errorf("%w: truncated", ErrEnvelope)
	}
	if f := binary.BigEndian.Uint16(rest); f != envelopeFormat {
		return nil, fmt.Errorf("%w: format %d, this vtpmd reads %d", ErrEnvelope, f, envelopeFormat)
	}
	rest = rest[2:]
	var parts [3][]byte
	limits := [3]int{maxEnvelopeHeader, 2 * maxBlobSize, maxEnvelopeSig}
	for i := range parts {
		if len(rest) < 4 {
			return nil, fmt.Errorf("%w: truncated", ErrEnvelope)
		}
		n := binary.BigEndian.Uint32(rest)
		rest = rest[4:]
		if uint64(n) > uint64(len(rest)) || uint64(n) > uint64(limits[i]) {
			return nil, fmt.Errorf("%w: truncated or oversized part %d (%d bytes)", ErrEnvelope, i, n)
		}
		parts[i], rest = rest[:n], rest[n:]
	}
	if len(rest) != 0 {
		return nil, fmt.Errorf("%w: %d bytes after the signature", ErrEnvelope, len(rest))
	}
	e := &envelope{rawHdr: parts[0], ct: parts[1], sig: parts[2]}
	dec := json.NewDecoder(bytes.NewReader(e.rawHdr))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&e.hdr); err != nil {
		return nil, fmt.Errorf("%w: header: %w", ErrEnvelope, err)
	}
	if dec.More() {
		return nil, fmt.Errorf("%w: data after the header", ErrEnvelope)
	}
	h := &e.hdr
	switch {
	case h.Format != envelopeFormat:
		return nil, fmt.Errorf("%w: header format %d", ErrEnvelope, h.Format)
	case !validTicketID(h.Ticket):
		return nil, fmt.Errorf("%w: ticket %q", ErrEnvelope, h.Ticket)
	case h.Type < 1 || h.Type > 3:
		return nil, fmt.Errorf("%w: blob type %d", ErrEnvelope, h.Type)
	case len(h.Nonce) != gcmNonceSize, len(h.Digest) != sha256.Size:
		return nil, fmt.Errorf("%w: nonce or digest size", ErrEnvelope)
	case len(h.Chain) == 0 || len(h.Chain) > 8:
		return nil, fmt.Errorf("%w: %d certificates", ErrEnvelope, len(h.Chain))
	case len(e.ct) < 16:
		return nil, fmt.Errorf("%w: ciphertext of %d bytes", ErrEnvelope, len(e.ct))
	}
	return e, nil
}

// maxBlobSize is the largest state blob (socket.MaxStateBlob, swtpm's limit).
const maxBlobSize = 512 << 10

// verify checks the envelope's signature and that its signer chains to roots; it returns the
// signer's certificate. An alteration anywhere in the blob fails here.
func (e *envelope) verify(roots *x509.CertPool) (*x509.Certificate, error) {
	certs := make([]*x509.Certificate, 0, len(e.hdr.Chain))
	for i, der := range e.hdr.Chain {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			return nil, fmt.Errorf("%w: certificate %d: %w", ErrEnvelope, i, err)
		}
		certs = append(certs, c)
	}
	leaf := certs[0]
	if publicKeyID(leaf) != e.hdr.SourceID {
		return nil, fmt.Errorf("%w: the source identity does not match its certificate", ErrEnvelope)
	}
	if err := checkSignature(leaf, envelopeDigest(e.rawHdr, e.ct), e.sig); err != nil {
		return nil, fmt.Errorf("%w: signature: %w", ErrEnvelope, err)
	}
	if err := verifyChain(certs, roots); err != nil {
		return nil, err
	}
	return leaf, nil
}

// open decrypts the envelope with the ticket's key and checks the plaintext's digest.
func (e *envelope) open(key []byte) ([]byte, error) {
	aead, err := newGCM(key)
	if err != nil {
		return nil, err
	}
	plain, err := aead.Open(nil, e.hdr.Nonce, e.ct, e.rawHdr)
	if err != nil {
		return nil, fmt.Errorf("%w: decryption failed", ErrEnvelope)
	}
	if d := sha256.Sum256(plain); !bytes.Equal(d[:], e.hdr.Digest) {
		clear(plain)
		return nil, fmt.Errorf("%w: digest mismatch", ErrEnvelope)
	}
	return plain, nil
}

// verifyChain checks that certs (leaf first) chain to roots.
func verifyChain(certs []*x509.Certificate, roots *x509.CertPool) error {
	if roots == nil {
		return fmt.Errorf("%w: no trust anchors configured", ErrUntrusted)
	}
	inter := x509.NewCertPool()
	for _, c := range certs[1:] {
		inter.AddCert(c)
	}
	if _, err := certs[0].Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		return fmt.Errorf("%w: %s: %w", ErrUntrusted, certs[0].Subject, err)
	}
	return nil
}

// checkSignature verifies a signature over a SHA-256 digest by cert's key (ECDSA ASN.1, RSA
// PKCS#1 v1.5 or PSS).
func checkSignature(cert *x509.Certificate, digest, sig []byte) error {
	switch pub := cert.PublicKey.(type) {
	case *ecdsa.PublicKey:
		if ecdsa.VerifyASN1(pub, digest, sig) {
			return nil
		}
	case *rsa.PublicKey:
		if rsa.VerifyPKCS1v15(pub, crypto.SHA256, digest, sig) == nil ||
			rsa.VerifyPSS(pub, crypto.SHA256, digest, sig, nil) == nil {
			return nil
		}
	default:
		return fmt.Errorf("unsupported key type %T", pub)
	}
	return errors.New("does not verify")
}

// publicKeyID is the hex SHA-256 of a certificate's SubjectPublicKeyInfo: a host identity.
func publicKeyID(c *x509.Certificate) string {
	d := sha256.Sum256(c.RawSubjectPublicKeyInfo)
	return hex.EncodeToString(d[:])
}

// envelopeID is the SHA-256 of a whole sealed blob, as the release request names it.
func envelopeID(b []byte) string {
	d := sha256.Sum256(b)
	return hex.EncodeToString(d[:])
}

func validTicketID(s string) bool {
	if len(s) != 32 {
		return false
	}
	_, err := hex.DecodeString(s)
	return err == nil
}
