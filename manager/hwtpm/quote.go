package hwtpm

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/rsa"
	"crypto/sha256"
	"errors"
	"fmt"
	"math/big"
	"slices"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
)

// Sentinel errors of the attestation operations and their checks.
var (
	// ErrBadAttest: bytes that should be a TPMS_ATTEST or a TPMT_SIGNATURE are not one, or
	// are not the kind expected.
	ErrBadAttest = errors.New("malformed attestation")
	// ErrSignature: an attestation's signature does not verify with the key.
	ErrSignature = errors.New("attestation signature does not verify")
	// ErrCredential: TPM2_ActivateCredential refused the credential (made for another EK or
	// another key name).
	ErrCredential = errors.New("credential not activated")
)

// maxQualifying is the most qualifying data a TPM takes (the size of a SHA-512 digest is
// safe everywhere; TPM2B_DATA is sizeof(TPMT_HA)).
const maxQualifying = 64

// quoteAttempts bounds how often Quote starts over when a PCR changes between reading the
// PCRs and quoting them.
const quoteAttempts = 3

// Attestation is a structure the TPM made and signed: Attest is the TPMS_ATTEST (the
// contents of TPM2B_ATTEST), Signature the TPMT_SIGNATURE over it, both in the TPM's wire
// encoding.
type Attestation struct {
	Attest    []byte `json:"attest"`
	Signature []byte `json:"signature"`
}

// PCRQuote is a quote and the PCR values it covers.
type PCRQuote struct {
	Attestation
	// PCRs are the quoted SHA-256 PCRs, ascending; Values their values in that order, whose
	// digest is the quote's pcrDigest.
	PCRs   []int    `json:"pcrs"`
	Values [][]byte `json:"values"`
}

// Quote has ak quote the SHA-256 PCRs (0–23) with qualifying data (at most 64 bytes), and
// reads their values: the values returned are the ones quoted (read again when a PCR changes
// in between).
func (t *TPM) Quote(ctx context.Context, ak *Key, pcrs []int, qualifying []byte) (*PCRQuote, error) {
	if len(qualifying) > maxQualifying {
		return nil, fmt.Errorf("hwtpm: quote: %d bytes of qualifying data (at most %d)", len(qualifying), maxQualifying)
	}
	pcrs = slices.Sorted(slices.Values(pcrs))
	pcrs = slices.Compact(pcrs)
	desc := policyDesc{Kind: policyKindPCR, Bank: "sha256", PCRs: pcrs}
	if len(pcrs) == 0 || desc.check() != nil {
		return nil, fmt.Errorf("hwtpm: quote: PCRs %v: SHA-256 PCRs 0 to 23, at least one", pcrs)
	}
	var q *PCRQuote
	err := t.do(ctx, func(tp transport.TPM) error {
		return t.withKeys(ctx, tp, []*Key{ak}, []func(*tpm2.TPMTPublic) bool{IsAK}, func(h []tpm2.NamedHandle) error {
			for range quoteAttempts {
				values, err := desc.readPCRs(tp)
				if err != nil {
					return err
				}
				resp, err := tpm2.Quote{
					SignHandle:     tpm2.AuthHandle{Handle: h[0].Handle, Name: h[0].Name, Auth: tpm2.PasswordAuth(nil)},
					QualifyingData: tpm2.TPM2BData{Buffer: qualifying},
					InScheme:       tpm2.TPMTSigScheme{Scheme: tpm2.TPMAlgNull},
					PCRSelect:      desc.selection(),
				}.Execute(tp)
				if err != nil {
					return fmt.Errorf("TPM2_Quote: %w", err)
				}
				att, err := resp.Quoted.Contents()
				if err != nil {
					return fmt.Errorf("TPM2_Quote's attestation: %w", err)
				}
				info, err := att.Attested.Quote()
				if err != nil {
					return fmt.Errorf("TPM2_Quote's attestation: %w", err)
				}
				if !bytes.Equal(info.PCRDigest.Buffer, PCRDigest(values)) {
					continue // a PCR changed between the read and the quote
				}
				q = &PCRQuote{
					Attestation: Attestation{Attest: tpm2.Marshal(att), Signature: tpm2.Marshal(resp.Signature)},
					PCRs:        pcrs,
					Values:      values,
				}
				return nil
			}
			return fmt.Errorf("PCRs %v kept changing while quoting", pcrs)
		})
	})
	if err != nil {
		return nil, fmt.Errorf("hwtpm: quote: %w", err)
	}
	return q, nil
}

// PCRDigest is a quote's pcrDigest over SHA-256 PCR values: SHA-256 of their concatenation.
func PCRDigest(values [][]byte) []byte {
	h := sha256.New()
	for _, v := range values {
		h.Write(v)
	}
	return h.Sum(nil)
}

// Certify has ak certify that obj is loaded in this TPM (TPM2_Certify): the attestation
// names obj (its name and qualified name) and carries qualifying data. Both keys are this
// TPM's (under its storage key); obj is any key this package made.
func (t *TPM) Certify(ctx context.Context, ak, obj *Key, qualifying []byte) (*Attestation, error) {
	if len(qualifying) > maxQualifying {
		return nil, fmt.Errorf("hwtpm: certify: %d bytes of qualifying data (at most %d)", len(qualifying), maxQualifying)
	}
	var a *Attestation
	err := t.do(ctx, func(tp transport.TPM) error {
		any := func(*tpm2.TPMTPublic) bool { return true }
		return t.withKeys(ctx, tp, []*Key{ak, obj}, []func(*tpm2.TPMTPublic) bool{IsAK, any}, func(h []tpm2.NamedHandle) error {
			resp, err := tpm2.Certify{
				ObjectHandle:   tpm2.AuthHandle{Handle: h[1].Handle, Name: h[1].Name, Auth: tpm2.PasswordAuth(nil)},
				SignHandle:     tpm2.AuthHandle{Handle: h[0].Handle, Name: h[0].Name, Auth: tpm2.PasswordAuth(nil)},
				QualifyingData: tpm2.TPM2BData{Buffer: qualifying},
				InScheme:       tpm2.TPMTSigScheme{Scheme: tpm2.TPMAlgNull},
			}.Execute(tp)
			if err != nil {
				return fmt.Errorf("TPM2_Certify: %w", err)
			}
			att, err := resp.CertifyInfo.Contents()
			if err != nil {
				return fmt.Errorf("TPM2_Certify's attestation: %w", err)
			}
			a = &Attestation{Attest: tpm2.Marshal(att), Signature: tpm2.Marshal(resp.Signature)}
			return nil
		})
	})
	if err != nil {
		return nil, fmt.Errorf("hwtpm: certify: %w", err)
	}
	return a, nil
}

// ActivateCredential recovers the secret a certifying party sealed to this TPM's EK and the
// name of ak (TPM2_MakeCredential, or tpm2.CreateCredential in software): the TPM releases
// it only if ak is loaded in the TPM that holds that EK. credentialBlob is the TPM2B_ID_OBJECT's
// contents and secret the TPM2B_ENCRYPTED_SECRET's. The caller zeroes the result.
func (t *TPM) ActivateCredential(ctx context.Context, ak *Key, credentialBlob, secret []byte) ([]byte, error) {
	var out []byte
	err := t.do(ctx, func(tp transport.TPM) error {
		return t.withKeys(ctx, tp, []*Key{ak}, []func(*tpm2.TPMTPublic) bool{IsAK}, func(h []tpm2.NamedHandle) error {
			ekh, _, err := t.createEK(tp)
			if ekh.Handle != 0 {
				defer t.flush(ctx, ekh.Handle)
			}
			if err != nil {
				return err
			}
			// the EK's policy A: TPM2_PolicySecret(TPM_RH_ENDORSEMENT)
			sess := tpm2.Policy(tpm2.TPMAlgSHA256, 16, func(tp transport.TPM, handle tpm2.TPMISHPolicy, _ tpm2.TPM2BNonce) error {
				_, err := tpm2.PolicySecret{
					AuthHandle:    tpm2.AuthHandle{Handle: tpm2.TPMRHEndorsement, Auth: tpm2.PasswordAuth(nil)},
					PolicySession: handle,
				}.Execute(tp)
				return err
			})
			resp, err := tpm2.ActivateCredential{
				ActivateHandle: tpm2.AuthHandle{Handle: h[0].Handle, Name: h[0].Name, Auth: tpm2.PasswordAuth(nil)},
				KeyHandle:      tpm2.AuthHandle{Handle: ekh.Handle, Name: ekh.Name, Auth: sess},
				CredentialBlob: tpm2.TPM2BIDObject{Buffer: credentialBlob},
				Secret:         tpm2.TPM2BEncryptedSecret{Buffer: secret},
			}.Execute(tp)
			var rc tpm2.TPMRC
			if err != nil && errors.As(err, &rc) && !isResourceError(err) {
				return fmt.Errorf("%w: TPM2_ActivateCredential: %w", ErrCredential, err)
			}
			if err != nil {
				return fmt.Errorf("TPM2_ActivateCredential: %w", err)
			}
			out = resp.CertInfo.Buffer
			return nil
		})
	})
	if err != nil {
		return nil, fmt.Errorf("hwtpm: activate credential: %w", err)
	}
	return out, nil
}

// ParseAttest parses a TPMS_ATTEST from bytes that may be anything, and checks that the TPM
// made it (magic TPM_GENERATED_VALUE) and that it is of type want (TPM_ST_ATTEST_QUOTE,
// TPM_ST_ATTEST_CERTIFY, …) and nothing follows it.
func ParseAttest(b []byte, want tpm2.TPMST) (att *tpm2.TPMSAttest, err error) {
	defer func() {
		if r := recover(); r != nil {
			att, err = nil, fmt.Errorf("hwtpm: %w: TPMS_ATTEST: %v", ErrBadAttest, r)
		}
	}()
	att, err = tpm2.Unmarshal[tpm2.TPMSAttest](b)
	if err != nil {
		return nil, fmt.Errorf("hwtpm: %w: TPMS_ATTEST: %w", ErrBadAttest, err)
	}
	if !bytes.Equal(tpm2.Marshal(att), b) {
		return nil, fmt.Errorf("hwtpm: %w: TPMS_ATTEST has trailing or non-canonical bytes", ErrBadAttest)
	}
	if att.Magic != tpm2.TPMGeneratedValue {
		return nil, fmt.Errorf("hwtpm: %w: not generated by a TPM (magic 0x%08x)", ErrBadAttest, uint32(att.Magic))
	}
	if att.Type != want {
		return nil, fmt.Errorf("hwtpm: %w: attestation type 0x%04x, want 0x%04x", ErrBadAttest, uint16(att.Type), uint16(want))
	}
	return att, nil
}

// ParsePublic parses a TPMT_PUBLIC from bytes that may be anything (no trailing bytes).
func ParsePublic(b []byte) (*tpm2.TPMTPublic, error) {
	pub, err := unmarshalPublic(b)
	if err != nil {
		return nil, fmt.Errorf("hwtpm: %w: TPMT_PUBLIC: %w", ErrBadKey, err)
	}
	if !bytes.Equal(tpm2.Marshal(pub), b) {
		return nil, fmt.Errorf("hwtpm: %w: TPMT_PUBLIC has trailing or non-canonical bytes", ErrBadKey)
	}
	return pub, nil
}

// VerifySignature checks that sig (a TPMT_SIGNATURE: ECDSA, RSASSA or RSAPSS with SHA-256)
// is pub's signature over msg. It returns ErrBadAttest for a signature it cannot parse and
// ErrSignature for one that does not verify.
func VerifySignature(pub crypto.PublicKey, msg, sig []byte) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("hwtpm: %w: TPMT_SIGNATURE: %v", ErrBadAttest, r)
		}
	}()
	s, err := tpm2.Unmarshal[tpm2.TPMTSignature](sig)
	if err != nil {
		return fmt.Errorf("hwtpm: %w: TPMT_SIGNATURE: %w", ErrBadAttest, err)
	}
	digest := sha256.Sum256(msg)
	switch s.SigAlg {
	case tpm2.TPMAlgECDSA:
		e, err := s.Signature.ECDSA()
		if err != nil {
			return fmt.Errorf("hwtpm: %w: %w", ErrBadAttest, err)
		}
		k, ok := pub.(*ecdsa.PublicKey)
		if !ok || e.Hash != tpm2.TPMAlgSHA256 {
			return fmt.Errorf("hwtpm: %w: an ECDSA/SHA-256 signature for a %T", ErrSignature, pub)
		}
		r, sv := new(big.Int).SetBytes(e.SignatureR.Buffer), new(big.Int).SetBytes(e.SignatureS.Buffer)
		if !ecdsa.Verify(k, digest[:], r, sv) {
			return fmt.Errorf("hwtpm: %w", ErrSignature)
		}
		return nil
	case tpm2.TPMAlgRSASSA, tpm2.TPMAlgRSAPSS:
		var rs *tpm2.TPMSSignatureRSA
		if s.SigAlg == tpm2.TPMAlgRSASSA {
			rs, err = s.Signature.RSASSA()
		} else {
			rs, err = s.Signature.RSAPSS()
		}
		if err != nil {
			return fmt.Errorf("hwtpm: %w: %w", ErrBadAttest, err)
		}
		k, ok := pub.(*rsa.PublicKey)
		if !ok || rs.Hash != tpm2.TPMAlgSHA256 {
			return fmt.Errorf("hwtpm: %w: an RSA/SHA-256 signature for a %T", ErrSignature, pub)
		}
		if s.SigAlg == tpm2.TPMAlgRSASSA {
			err = rsa.VerifyPKCS1v15(k, crypto.SHA256, digest[:], rs.Sig.Buffer)
		} else {
			err = rsa.VerifyPSS(k, crypto.SHA256, digest[:], rs.Sig.Buffer, nil)
		}
		if err != nil {
			return fmt.Errorf("hwtpm: %w: %w", ErrSignature, err)
		}
		return nil
	}
	return fmt.Errorf("hwtpm: %w: signature algorithm %v", ErrBadAttest, s.SigAlg)
}
