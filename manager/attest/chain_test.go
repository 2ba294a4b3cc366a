package attest

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"math/big"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/backend/localca"
	"github.com/vtpmd/vtpmd/internal/swtpmtest"
	"github.com/vtpmd/vtpmd/manager/hwtpm"
)

// hostCA is a host's identity made on a stand-in TPM the way the manager makes it: AK, CA key
// certified by it, self-signed root, and a vTPM EK certificate issued with the TPM key.
type hostCA struct {
	tpm             *hwtpm.TPM
	ak, ca          *hwtpm.Key
	akPublic, caPub []byte
	akName          []byte
	certify         hwtpm.Attestation
	root, ekCert    *x509.Certificate
	vtpmEK          *ecdsa.PrivateKey
	signer          *hwtpm.Signer
}

const testVM = "6c3a3f0e-1111-4222-8333-944455566677"

func newHostCA(t *testing.T) *hostCA {
	t.Helper()
	sw := swtpmtest.Start(t)
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	tpm, err := hwtpm.Open(ctx, hwtpm.Spec{Kind: hwtpm.KindSwtpm, Path: sw.Socket})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tpm.Close() })
	h := &hostCA{tpm: tpm}
	if h.ak, err = tpm.CreateAK(ctx); err != nil {
		t.Fatal(err)
	}
	if h.ca, err = tpm.CreateSigningKey(ctx); err != nil {
		t.Fatal(err)
	}
	h.akPublic, h.caPub = h.ak.PublicArea(), h.ca.PublicArea()
	h.akName, _ = h.ak.Name()
	a, err := tpm.Certify(ctx, h.ak, h.ca, localca.HostCACertifyData)
	if err != nil {
		t.Fatal(err)
	}
	h.certify = *a
	if h.signer, err = tpm.Signer(h.ca); err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(7), Subject: pkix.Name{CommonName: "vtpmd host CA test"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(nil, tmpl, tmpl, h.signer.Public(), h.signer)
	if err != nil {
		t.Fatal(err)
	}
	h.root, _ = x509.ParseCertificate(der)
	ca, err := localca.NewWithSigner(h.signer, h.root)
	if err != nil {
		t.Fatal(err)
	}
	attr, _ := localca.HostAttribute{AKName: h.akName, VMUUID: testVM}.Attribute()
	h.vtpmEK, _ = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	ek, err := ca.IssueEK(ctx, localca.EKRequest{PublicKey: &h.vtpmEK.PublicKey, VMID: "vm:" + testVM,
		TPM:        localca.TPMInfo{Family: "2.0", Revision: 164, Manufacturer: "id:00001014", Model: "swtpm", Version: "id:20191023", TPM2: true},
		Attributes: []localca.Attribute{attr}})
	if err != nil {
		t.Fatal(err)
	}
	h.ekCert, _ = x509.ParseCertificate(ek)
	return h
}

func TestChains(t *testing.T) {
	h := newHostCA(t)
	roots := []*x509.Certificate{h.root}

	t.Run("vTPM certificate", func(t *testing.T) {
		r, err := VerifyVTPMCertificate(h.ekCert, nil, roots, VTPMCertExpect{HostAKName: h.akName, VMUUID: testVM})
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(r.Host.AKName, h.akName) || r.Host.VMUUID != testVM || len(r.Proves) == 0 {
			t.Fatalf("%+v", r)
		}
		if _, err := VerifyVTPMCertificate(h.ekCert, nil, roots, VTPMCertExpect{VMUUID: "00000000-0000-4000-8000-000000000000"}); !errors.Is(err, ErrChain) {
			t.Errorf("another VM: %v", err)
		}
		if _, err := VerifyVTPMCertificate(h.ekCert, nil, roots, VTPMCertExpect{HostAKName: []byte{0, 11, 9}}); !errors.Is(err, ErrChain) {
			t.Errorf("another host: %v", err)
		}
		// tampered: one byte of the signed part
		der := bytes.Clone(h.ekCert.Raw)
		i := bytes.Index(der, []byte("virtual TPM"))
		der[i] ^= 0x20
		bad, err := x509.ParseCertificate(der)
		if err == nil {
			if _, err := VerifyVTPMCertificate(bad, nil, roots, VTPMCertExpect{}); !errors.Is(err, ErrChain) {
				t.Errorf("tampered certificate: %v", err)
			}
		}
		// another root
		other := newSelfSigned(t)
		if _, err := VerifyVTPMCertificate(h.ekCert, nil, []*x509.Certificate{other}, VTPMCertExpect{}); !errors.Is(err, ErrChain) {
			t.Errorf("another root: %v", err)
		}
	})

	t.Run("CA residency", func(t *testing.T) {
		r, err := VerifyCAResidency(h.akPublic, h.caPub, h.certify, h.root)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(r.AKName, h.akName) {
			t.Error("wrong AK name")
		}
		bad := h.certify
		bad.Attest = bytes.Clone(bad.Attest)
		bad.Attest[len(bad.Attest)-3] ^= 1
		if _, err := VerifyCAResidency(h.akPublic, h.caPub, bad, h.root); !errors.Is(err, ErrResidency) {
			t.Errorf("tampered certification: %v", err)
		}
		// a certificate over a key the AK did not certify
		if _, err := VerifyCAResidency(h.akPublic, h.caPub, h.certify, newSelfSigned(t)); !errors.Is(err, ErrResidency) {
			t.Errorf("certificate over another key: %v", err)
		}
		// the AK's certification of another key is not one of the CA key
		ctx := t.Context()
		otherKey, _ := h.tpm.CreateSigningKey(ctx)
		a, _ := h.tpm.Certify(ctx, h.ak, otherKey, localca.HostCACertifyData)
		if _, err := VerifyCAResidency(h.akPublic, h.caPub, *a, h.root); !errors.Is(err, ErrResidency) {
			t.Errorf("certification of another key: %v", err)
		}
		// with other qualifying data
		a, _ = h.tpm.Certify(ctx, h.ak, h.ca, []byte("other"))
		if _, err := VerifyCAResidency(h.akPublic, h.caPub, *a, h.root); !errors.Is(err, ErrResidency) {
			t.Errorf("other qualifying data: %v", err)
		}
		// the CA key presented as the AK is refused: not an attestation key
		if _, err := VerifyCAResidency(h.caPub, h.caPub, h.certify, h.root); !errors.Is(err, ErrInput) {
			t.Errorf("a signing key as AK: %v", err)
		}
	})

	t.Run("AK certificate", func(t *testing.T) {
		opKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		op := selfSignedWith(t, opKey)
		akKey, _ := h.ak.PublicKey()
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(9), Subject: pkix.Name{CommonName: "host AK"},
			NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), KeyUsage: x509.KeyUsageDigitalSignature}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, op, akKey, opKey)
		if err != nil {
			t.Fatal(err)
		}
		c, _ := x509.ParseCertificate(der)
		if _, err := VerifyAKCertificate(c, nil, []*x509.Certificate{op}, h.akPublic, time.Time{}); err != nil {
			t.Fatal(err)
		}
		if _, err := VerifyAKCertificate(c, nil, roots, h.akPublic, time.Time{}); !errors.Is(err, ErrChain) {
			t.Errorf("wrong root: %v", err)
		}
		other, _ := h.tpm.CreateAK(t.Context())
		if _, err := VerifyAKCertificate(c, nil, []*x509.Certificate{op}, other.PublicArea(), time.Time{}); !errors.Is(err, ErrChain) {
			t.Errorf("another AK: %v", err)
		}
	})

	t.Run("host-certified vTPM AK", func(t *testing.T) {
		ctx := t.Context()
		vak, _ := h.tpm.CreateAK(ctx) // stands in for the guest's AK
		area := vak.PublicArea()
		sum := sha256.Sum256(area)
		q, err := h.tpm.Quote(ctx, h.ak, []int{0}, sum[:])
		if err != nil {
			t.Fatal(err)
		}
		r, err := VerifyHostCertifiedAK(h.akPublic, area, q.Attestation)
		if err != nil {
			t.Fatal(err)
		}
		if n, _ := vak.Name(); !bytes.Equal(r.AKName, n) {
			t.Error("wrong vTPM AK name")
		}
		if _, err := VerifyHostCertifiedAK(h.akPublic, vak.Public, q.Attestation); err != nil {
			t.Errorf("TPM2B_PUBLIC form: %v", err)
		}
		other, _ := h.tpm.CreateAK(ctx)
		if _, err := VerifyHostCertifiedAK(h.akPublic, other.PublicArea(), q.Attestation); !errors.Is(err, ErrHostVouch) {
			t.Errorf("another vTPM AK: %v", err)
		}
		bad := q.Attestation
		bad.Signature = bytes.Clone(bad.Signature)
		bad.Signature[len(bad.Signature)-1] ^= 1
		if _, err := VerifyHostCertifiedAK(h.akPublic, area, bad); !errors.Is(err, ErrHostVouch) {
			t.Errorf("tampered signature: %v", err)
		}
	})
}

func newSelfSigned(t *testing.T) *x509.Certificate {
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	return selfSignedWith(t, k)
}

func selfSignedWith(t *testing.T, k *ecdsa.PrivateKey) *x509.Certificate {
	t.Helper()
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(3), Subject: pkix.Name{CommonName: "other root"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := x509.ParseCertificate(der)
	return c
}

// FuzzCertPEMs: any bytes given as certificates are read or refused without a panic.
func FuzzCertPEMs(f *testing.F) {
	f.Add([]byte("-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n"))
	f.Add([]byte{0x30, 0x03, 0x02, 0x01, 0x01})
	f.Fuzz(func(t *testing.T, b []byte) {
		cs, err := CertPEMs(b)
		if err == nil && len(b) > 0 && len(cs) == 0 {
			t.Fatal("no certificate and no error")
		}
	})
}
