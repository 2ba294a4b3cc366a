package hwtpm

import (
	"bytes"
	"context"
	"crypto"
	"encoding/asn1"
	"errors"
	"fmt"
	"slices"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
)

// Sentinel errors of the identity operations.
var (
	// ErrBadKey: a key blob is malformed, is not the kind of key asked for, or does not load.
	ErrBadKey = errors.New("malformed or unusable key blob")
	// ErrNoEKCert: the TPM holds no EK certificate at the standard NV indices.
	ErrNoEKCert = errors.New("no EK certificate in the TPM's NV")
)

// Standard NV indices of the EK certificates (TCG EK Credential Profile, low range).
const (
	EKCertIndexRSA uint32 = 0x01c00002
	EKCertIndexECC uint32 = 0x01c0000a
)

// maxEKCert bounds an EK certificate read from NV.
const maxEKCert = 4096

// EK is the TPM's endorsement key: the TCG's standard EK template (RSA-2048 or ECC P-256,
// policy A: TPM2_PolicySecret(TPM_RH_ENDORSEMENT)) created with TPM2_CreatePrimary in the
// endorsement hierarchy, so it is the key the manufacturer's certificate names.
type EK struct {
	// Public is its TPMT_PUBLIC; Name its name (nameAlg ‖ digest of Public).
	Public []byte
	Name   []byte
	// Key is the public key (*rsa.PublicKey or *ecdsa.PublicKey).
	Key crypto.PublicKey
	// Cert is the DER certificate from NV (EKCertIndexRSA or EKCertIndexECC), without the
	// padding some TPMs leave after it; nil when the TPM has none for this EK.
	Cert []byte
}

// Key is a key made by this TPM under its storage key: its public area and its private area
// as the TPM wrapped it (TPM2B_PUBLIC and TPM2B_PRIVATE, as tpm2-tools writes them), and the
// storage key's name. The private part is only usable inside this TPM; the clear key never
// leaves it. It marshals to JSON with the field names below.
type Key struct {
	Public     []byte `json:"public"`
	Private    []byte `json:"private"`
	StorageKey []byte `json:"storage_key"`
}

// Area is the key's TPMT_PUBLIC, checked to parse.
func (k *Key) Area() (*tpm2.TPMTPublic, error) {
	if k == nil {
		return nil, fmt.Errorf("hwtpm: %w: nil", ErrBadKey)
	}
	b, ok := unwrap2B(k.Public)
	if !ok {
		return nil, fmt.Errorf("hwtpm: %w: public area is not a TPM2B_PUBLIC", ErrBadKey)
	}
	pub, err := unmarshalPublic(b)
	if err != nil {
		return nil, fmt.Errorf("hwtpm: %w: public area: %w", ErrBadKey, err)
	}
	return pub, nil
}

// PublicArea is the key's TPMT_PUBLIC bytes (Public without its size).
func (k *Key) PublicArea() []byte {
	b, _ := unwrap2B(k.Public)
	return slices.Clone(b)
}

// Name is the key's TPM name (nameAlg ‖ H(TPMT_PUBLIC)).
func (k *Key) Name() ([]byte, error) {
	pub, err := k.Area()
	if err != nil {
		return nil, err
	}
	return PublicName(pub)
}

// PublicKey is the key's public key (*ecdsa.PublicKey for the keys this package makes).
func (k *Key) PublicKey() (crypto.PublicKey, error) {
	pub, err := k.Area()
	if err != nil {
		return nil, err
	}
	return CryptoPublic(pub)
}

// PublicName is the TPM name of a public area.
func PublicName(pub *tpm2.TPMTPublic) ([]byte, error) {
	n, err := tpm2.ObjectName(pub)
	if err != nil {
		return nil, fmt.Errorf("hwtpm: name of a public area: %w", err)
	}
	return slices.Clone(n.Buffer), nil
}

// CryptoPublic is the Go public key of an RSA or ECC public area.
func CryptoPublic(pub *tpm2.TPMTPublic) (k crypto.PublicKey, err error) {
	defer func() {
		if r := recover(); r != nil {
			k, err = nil, fmt.Errorf("hwtpm: %w: public key: %v", ErrBadKey, r)
		}
	}()
	switch pub.Type {
	case tpm2.TPMAlgRSA:
		parms, err := pub.Parameters.RSADetail()
		if err != nil {
			return nil, fmt.Errorf("hwtpm: %w: %w", ErrBadKey, err)
		}
		u, err := pub.Unique.RSA()
		if err != nil {
			return nil, fmt.Errorf("hwtpm: %w: %w", ErrBadKey, err)
		}
		k, err := tpm2.RSAPub(parms, u)
		if err != nil {
			return nil, fmt.Errorf("hwtpm: %w: %w", ErrBadKey, err)
		}
		return k, nil
	case tpm2.TPMAlgECC:
		parms, err := pub.Parameters.ECCDetail()
		if err != nil {
			return nil, fmt.Errorf("hwtpm: %w: %w", ErrBadKey, err)
		}
		u, err := pub.Unique.ECC()
		if err != nil {
			return nil, fmt.Errorf("hwtpm: %w: %w", ErrBadKey, err)
		}
		k, err := tpm2.ECDSAPub(parms, u)
		if err != nil {
			return nil, fmt.Errorf("hwtpm: %w: %w", ErrBadKey, err)
		}
		return k, nil
	}
	return nil, fmt.Errorf("hwtpm: %w: key type %v", ErrBadKey, pub.Type)
}

// akTemplate is the attestation key: a restricted ECDSA P-256/SHA-256 signing key that the
// TPM made and keeps (fixedTPM, fixedParent, sensitiveDataOrigin). Restricted, it signs only
// what the TPM itself produced (quotes, certifications) or digests the TPM hashed and found
// not to start with TPM_GENERATED_VALUE, so nobody can forge an attestation with it.
var akTemplate = tpm2.TPMTPublic{
	Type:    tpm2.TPMAlgECC,
	NameAlg: tpm2.TPMAlgSHA256,
	ObjectAttributes: tpm2.TPMAObject{
		FixedTPM: true, FixedParent: true, SensitiveDataOrigin: true, UserWithAuth: true,
		Restricted: true, SignEncrypt: true, NoDA: true,
	},
	Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgECC, &tpm2.TPMSECCParms{
		Scheme: tpm2.TPMTECCScheme{Scheme: tpm2.TPMAlgECDSA,
			Details: tpm2.NewTPMUAsymScheme(tpm2.TPMAlgECDSA, &tpm2.TPMSSigSchemeECDSA{HashAlg: tpm2.TPMAlgSHA256})},
		CurveID: tpm2.TPMECCNistP256,
	}),
}

// signingTemplate is a general-purpose signing key: unrestricted ECDSA P-256/SHA-256, made
// in and kept by the TPM. It signs any digest (a certificate, a TLS handshake).
var signingTemplate = func() tpm2.TPMTPublic {
	t := akTemplate
	t.ObjectAttributes.Restricted = false
	return t
}()

// CreateAK makes a new attestation key under the storage key (see akTemplate).
func (t *TPM) CreateAK(ctx context.Context) (*Key, error) {
	k, err := t.createKey(ctx, akTemplate)
	if err != nil {
		return nil, fmt.Errorf("hwtpm: create an attestation key: %w", err)
	}
	return k, nil
}

// CreateSigningKey makes a new unrestricted ECDSA P-256 signing key under the storage key;
// Signer signs with it.
func (t *TPM) CreateSigningKey(ctx context.Context) (*Key, error) {
	k, err := t.createKey(ctx, signingTemplate)
	if err != nil {
		return nil, fmt.Errorf("hwtpm: create a signing key: %w", err)
	}
	return k, nil
}

func (t *TPM) createKey(ctx context.Context, template tpm2.TPMTPublic) (*Key, error) {
	var k *Key
	err := t.do(ctx, func(tp transport.TPM) error {
		return t.withStorageKey(ctx, tp, func(sk *storageKey) error {
			resp, err := tpm2.Create{
				ParentHandle: tpm2.AuthHandle{Handle: sk.handle, Name: sk.name, Auth: tpm2.PasswordAuth(nil)},
				InPublic:     tpm2.New2B(template),
			}.Execute(tp)
			if err != nil {
				return fmt.Errorf("TPM2_Create: %w", err)
			}
			k = &Key{Public: tpm2.Marshal(resp.OutPublic), Private: tpm2.Marshal(resp.OutPrivate), StorageKey: slices.Clone(sk.name.Buffer)}
			return nil
		})
	})
	return k, err
}

// IsAK reports whether pub is an attestation key as CreateAK makes them: a restricted
// signing key that the TPM made and cannot export.
func IsAK(pub *tpm2.TPMTPublic) bool {
	a := pub.ObjectAttributes
	return a.FixedTPM && a.FixedParent && a.SensitiveDataOrigin && a.Restricted && a.SignEncrypt && !a.Decrypt
}

// IsResidentSigner reports whether pub is a signing key that the TPM made and cannot export
// (as CreateSigningKey makes them), restricted or not.
func IsResidentSigner(pub *tpm2.TPMTPublic) bool {
	a := pub.ObjectAttributes
	return a.FixedTPM && a.FixedParent && a.SensitiveDataOrigin && a.SignEncrypt && !a.Decrypt
}

// loadKey loads k under the storage key sk (both in tp). The caller flushes the result.
func (t *TPM) loadKey(tp transport.TPM, sk *storageKey, k *Key, want func(*tpm2.TPMTPublic) bool) (tpm2.NamedHandle, error) {
	if k == nil {
		return tpm2.NamedHandle{}, fmt.Errorf("%w: nil", ErrBadKey)
	}
	if !bytes.Equal(sk.name.Buffer, k.StorageKey) {
		return tpm2.NamedHandle{}, fmt.Errorf("%w: %w", ErrBadKey, ErrWrongTPM)
	}
	pub, err := k.Area()
	if err != nil {
		return tpm2.NamedHandle{}, err
	}
	if !want(pub) {
		return tpm2.NamedHandle{}, fmt.Errorf("%w: not the kind of key needed here", ErrBadKey)
	}
	priv, ok := unwrap2B(k.Private)
	if !ok || len(priv) == 0 {
		return tpm2.NamedHandle{}, fmt.Errorf("%w: private area is not a TPM2B_PRIVATE", ErrBadKey)
	}
	pubBytes, _ := unwrap2B(k.Public)
	resp, err := tpm2.Load{
		ParentHandle: tpm2.AuthHandle{Handle: sk.handle, Name: sk.name, Auth: tpm2.PasswordAuth(nil)},
		InPrivate:    tpm2.TPM2BPrivate{Buffer: priv},
		InPublic:     tpm2.BytesAs2B[tpm2.TPMTPublic](pubBytes),
	}.Execute(tp)
	if isResourceError(err) {
		return tpm2.NamedHandle{}, fmt.Errorf("load a key: the TPM is out of object memory: %w", err)
	}
	if err != nil {
		return tpm2.NamedHandle{}, fmt.Errorf("%w: the storage key does not load it: %w", ErrBadKey, err)
	}
	return tpm2.NamedHandle{Handle: resp.ObjectHandle, Name: resp.Name}, nil
}

// withKeys runs op with keys loaded (in order) and the storage key already flushed again, so
// an operation on two keys holds two objects. It flushes them after.
func (t *TPM) withKeys(ctx context.Context, tp transport.TPM, keys []*Key, want []func(*tpm2.TPMTPublic) bool, op func([]tpm2.NamedHandle) error) error {
	handles := make([]tpm2.NamedHandle, 0, len(keys))
	defer func() {
		for _, h := range handles {
			t.flush(ctx, h.Handle)
		}
	}()
	err := t.withStorageKey(ctx, tp, func(sk *storageKey) error {
		for i, k := range keys {
			h, err := t.loadKey(tp, sk, k, want[i])
			if err != nil {
				return err
			}
			handles = append(handles, h)
		}
		return nil
	})
	if err != nil {
		return err
	}
	return op(handles)
}

// EndorsementKey creates the TPM's EK with the standard template and reads its certificate.
// The EK whose certificate the TPM holds is chosen (RSA-2048 first, as most TPMs ship it);
// a TPM without a certificate gets the ECC P-256 EK (quicker to derive), else RSA-2048.
func (t *TPM) EndorsementKey(ctx context.Context) (*EK, error) {
	var ek *EK
	err := t.do(ctx, func(tp transport.TPM) error {
		h, e, err := t.createEK(tp)
		if err != nil {
			return err
		}
		t.flush(ctx, h.Handle)
		ek = e
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("hwtpm: endorsement key: %w", err)
	}
	return ek, nil
}

// createEK loads the EK (the caller flushes it) and reads its certificate.
func (t *TPM) createEK(tp transport.TPM) (tpm2.NamedHandle, *EK, error) {
	type choice struct {
		template tpm2.TPMTPublic
		index    uint32
	}
	rsa := choice{tpm2.RSAEKTemplate, EKCertIndexRSA}
	ecc := choice{tpm2.ECCEKTemplate, EKCertIndexECC}
	order := []choice{ecc, rsa}
	var cert []byte
	if c, err := readNV(tp, EKCertIndexRSA, maxEKCert); err == nil {
		order, cert = []choice{rsa}, trimDER(c)
	} else if c, err := readNV(tp, EKCertIndexECC, maxEKCert); err == nil {
		order, cert = []choice{ecc}, trimDER(c)
	}
	var errs []error
	for _, c := range order {
		resp, err := tpm2.CreatePrimary{
			PrimaryHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHEndorsement, Auth: tpm2.PasswordAuth(nil)},
			InPublic:      tpm2.New2B(c.template),
		}.Execute(tp)
		if err != nil {
			errs = append(errs, fmt.Errorf("TPM2_CreatePrimary (endorsement, %v): %w", c.template.Type, err))
			if isAuthError(err) {
				break
			}
			continue
		}
		h := tpm2.NamedHandle{Handle: resp.ObjectHandle, Name: resp.Name}
		pub, err := resp.OutPublic.Contents()
		if err != nil {
			return h, nil, fmt.Errorf("EK public area: %w", err)
		}
		key, err := CryptoPublic(pub)
		if err != nil {
			return h, nil, err
		}
		return h, &EK{Public: tpm2.Marshal(pub), Name: slices.Clone(resp.Name.Buffer), Key: key, Cert: cert}, nil
	}
	return tpm2.NamedHandle{}, nil, errors.Join(errs...)
}

// EKCertificate reads the DER certificate at an EK certificate NV index (ErrNoEKCert when
// the index is not defined).
func (t *TPM) EKCertificate(ctx context.Context, index uint32) ([]byte, error) {
	var cert []byte
	err := t.do(ctx, func(tp transport.TPM) error {
		var err error
		cert, err = readNV(tp, index, maxEKCert)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("hwtpm: EK certificate at NV 0x%08x: %w", index, err)
	}
	return cert, nil
}

// readNV reads a whole NV index (at most limit bytes), with the owner's authorization and
// else the index's own (both empty). An EK certificate index may hold trailing padding after
// the DER; it is returned as read.
func readNV(tp transport.TPM, index uint32, limit int) ([]byte, error) {
	pubResp, err := tpm2.NVReadPublic{NVIndex: tpm2.TPMHandle(index)}.Execute(tp)
	if errors.Is(err, tpm2.TPMRCHandle) {
		return nil, ErrNoEKCert
	}
	if err != nil {
		return nil, fmt.Errorf("TPM2_NV_ReadPublic: %w", err)
	}
	nvPub, err := pubResp.NVPublic.Contents()
	if err != nil {
		return nil, fmt.Errorf("NV public area: %w", err)
	}
	size := int(nvPub.DataSize)
	if size == 0 || size > limit {
		return nil, fmt.Errorf("NV index holds %d bytes (at most %d expected)", size, limit)
	}
	nv := tpm2.NamedHandle{Handle: tpm2.TPMHandle(index), Name: pubResp.NVName}
	var lastErr error
	for _, auth := range []tpm2.TPMHandle{tpm2.TPMRHOwner, tpm2.TPMHandle(index)} {
		out := make([]byte, 0, size)
		authHandle := tpm2.AuthHandle{Handle: auth, Auth: tpm2.PasswordAuth(nil)}
		if auth == tpm2.TPMHandle(index) {
			authHandle.Name = pubResp.NVName
		}
		for len(out) < size {
			chunk := min(size-len(out), 512) // below every TPM's MAX_NV_BUFFER_SIZE
			resp, err := tpm2.NVRead{AuthHandle: authHandle, NVIndex: nv, Size: uint16(chunk), Offset: uint16(len(out))}.Execute(tp)
			if err != nil {
				lastErr = fmt.Errorf("TPM2_NV_Read: %w", err)
				break
			}
			if len(resp.Data.Buffer) == 0 {
				lastErr = errors.New("TPM2_NV_Read returned nothing")
				break
			}
			out = append(out, resp.Data.Buffer...)
		}
		if len(out) >= size {
			return out[:size], nil
		}
	}
	return nil, lastErr
}

// trimDER cuts the padding after a DER element (an EK certificate index is often larger than
// the certificate); bytes that do not start with one are returned as they are.
func trimDER(b []byte) []byte {
	var v asn1.RawValue
	if _, err := asn1.Unmarshal(b, &v); err != nil {
		return b
	}
	return v.FullBytes
}
