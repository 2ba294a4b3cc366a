package hwtpm

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"encoding/asn1"
	"errors"
	"fmt"
	"io"
	"math/big"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
)

// signTimeout bounds one TPM2_Sign when the caller gives no context (crypto.Signer.Sign).
const signTimeout = 30 * time.Second

// Signer is a crypto.Signer whose private key stays in the TPM: every signature is a
// TPM2_Sign with the key loaded from its wrapped blob. Its Public is an *ecdsa.PublicKey and
// it signs SHA-256 digests (the key's scheme); signatures are ASN.1 ECDSA-Sig-Value, as
// crypto/ecdsa makes them, so crypto/x509 and crypto/tls use it as they use an ECDSA key.
type Signer struct {
	tpm *TPM
	key *Key
	pub *ecdsa.PublicKey
}

// Signer returns a crypto.Signer for a key CreateSigningKey made (on this TPM).
func (t *TPM) Signer(key *Key) (*Signer, error) {
	pub, err := key.Area()
	if err != nil {
		return nil, err
	}
	if !IsResidentSigner(pub) || pub.ObjectAttributes.Restricted {
		return nil, fmt.Errorf("hwtpm: %w: not an unrestricted signing key of a TPM", ErrBadKey)
	}
	k, err := CryptoPublic(pub)
	if err != nil {
		return nil, err
	}
	ek, ok := k.(*ecdsa.PublicKey)
	if !ok {
		return nil, fmt.Errorf("hwtpm: %w: not an ECC key", ErrBadKey)
	}
	return &Signer{tpm: t, key: key, pub: ek}, nil
}

// Public implements crypto.Signer.
func (s *Signer) Public() crypto.PublicKey { return s.pub }

// Sign implements crypto.Signer: digest is a SHA-256 digest (opts.HashFunc() SHA-256); rand
// is not used, the TPM makes its own nonce.
func (s *Signer) Sign(_ io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	ctx, cancel := context.WithTimeout(context.Background(), signTimeout)
	defer cancel()
	return s.SignContext(ctx, digest, opts)
}

// SignContext is Sign bound to ctx.
func (s *Signer) SignContext(ctx context.Context, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	if opts == nil || opts.HashFunc() != crypto.SHA256 || len(digest) != crypto.SHA256.Size() {
		return nil, errors.New("hwtpm: sign: the key signs SHA-256 digests only")
	}
	var sig []byte
	err := s.tpm.do(ctx, func(tp transport.TPM) error {
		return s.tpm.withKeys(ctx, tp, []*Key{s.key}, []func(*tpm2.TPMTPublic) bool{IsResidentSigner}, func(h []tpm2.NamedHandle) error {
			resp, err := tpm2.Sign{
				KeyHandle:  tpm2.AuthHandle{Handle: h[0].Handle, Name: h[0].Name, Auth: tpm2.PasswordAuth(nil)},
				Digest:     tpm2.TPM2BDigest{Buffer: digest},
				InScheme:   tpm2.TPMTSigScheme{Scheme: tpm2.TPMAlgNull},
				Validation: tpm2.TPMTTKHashCheck{Tag: tpm2.TPMSTHashCheck, Hierarchy: tpm2.TPMRHNull},
			}.Execute(tp)
			if err != nil {
				return fmt.Errorf("TPM2_Sign: %w", err)
			}
			e, err := resp.Signature.Signature.ECDSA()
			if err != nil {
				return fmt.Errorf("TPM2_Sign's signature: %w", err)
			}
			sig, err = asn1.Marshal(struct{ R, S *big.Int }{
				new(big.Int).SetBytes(e.SignatureR.Buffer), new(big.Int).SetBytes(e.SignatureS.Buffer)})
			return err
		})
	})
	if err != nil {
		return nil, fmt.Errorf("hwtpm: sign: %w", err)
	}
	return sig, nil
}
