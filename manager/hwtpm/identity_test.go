package hwtpm

import (
	"bytes"
	"crypto"
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

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
)

// TestIdentityOnSwtpm exercises the whole identity set on one stand-in TPM: EK, AK, quote,
// certify, credential activation and the TPM-resident signer.
func TestIdentityOnSwtpm(t *testing.T) {
	sw := startSwtpm(t)
	tpm := sw.open()
	ctx := testContext(t)

	ek, err := tpm.EndorsementKey(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if ek.Cert != nil {
		t.Errorf("fresh swtpm has an EK certificate: %d bytes", len(ek.Cert))
	}
	ekPub, err := ParsePublic(ek.Public)
	if err != nil {
		t.Fatal(err)
	}
	if name, _ := PublicName(ekPub); !bytes.Equal(name, ek.Name) {
		t.Errorf("EK name %x, computed %x", ek.Name, name)
	}
	// the EK is derived from the endorsement seed: the same again
	if ek2, err := tpm.EndorsementKey(ctx); err != nil || !bytes.Equal(ek2.Public, ek.Public) {
		t.Errorf("EK differs the second time: %v", err)
	}

	ak, err := tpm.CreateAK(ctx)
	if err != nil {
		t.Fatal(err)
	}
	akArea, err := ak.Area()
	if err != nil || !IsAK(akArea) {
		t.Fatalf("AK area %v, IsAK false", err)
	}
	akPub, _ := ak.PublicKey()

	t.Run("quote", func(t *testing.T) {
		extend(t, tpm, 16, "quote me")
		nonce := []byte("nonce-0123456789")
		q, err := tpm.Quote(ctx, ak, []int{16, 0, 16}, nonce)
		if err != nil {
			t.Fatal(err)
		}
		if len(q.PCRs) != 2 || q.PCRs[0] != 0 || q.PCRs[1] != 16 {
			t.Errorf("PCRs %v", q.PCRs)
		}
		att, err := ParseAttest(q.Attest, tpm2.TPMSTAttestQuote)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(att.ExtraData.Buffer, nonce) {
			t.Errorf("extra data %x", att.ExtraData.Buffer)
		}
		info, _ := att.Attested.Quote()
		if !bytes.Equal(info.PCRDigest.Buffer, PCRDigest(q.Values)) {
			t.Error("pcrDigest does not match the values")
		}
		if err := VerifySignature(akPub, q.Attest, q.Signature); err != nil {
			t.Fatal(err)
		}
		bad := bytes.Clone(q.Attest)
		bad[len(bad)-1] ^= 1
		if err := VerifySignature(akPub, bad, q.Signature); !errors.Is(err, ErrSignature) {
			t.Errorf("tampered quote: %v", err)
		}
		if _, err := tpm.Quote(ctx, ak, []int{24}, nil); err == nil {
			t.Error("PCR 24 quoted")
		}
	})

	signKey, err := tpm.CreateSigningKey(ctx)
	if err != nil {
		t.Fatal(err)
	}

	t.Run("certify", func(t *testing.T) {
		a, err := tpm.Certify(ctx, ak, signKey, []byte("q"))
		if err != nil {
			t.Fatal(err)
		}
		att, err := ParseAttest(a.Attest, tpm2.TPMSTAttestCertify)
		if err != nil {
			t.Fatal(err)
		}
		info, _ := att.Attested.Certify()
		name, _ := signKey.Name()
		if !bytes.Equal(info.Name.Buffer, name) {
			t.Errorf("certified name %x, want %x", info.Name.Buffer, name)
		}
		if err := VerifySignature(akPub, a.Attest, a.Signature); err != nil {
			t.Fatal(err)
		}
		// a signing key is not an AK
		if _, err := tpm.Certify(ctx, signKey, ak, nil); !errors.Is(err, ErrBadKey) {
			t.Errorf("certify by a non-AK: %v", err)
		}
	})

	t.Run("activate credential", func(t *testing.T) {
		akName, _ := ak.Name()
		encap, err := tpm2.ImportEncapsulationKey(ekPub)
		if err != nil {
			t.Fatal(err)
		}
		secret := []byte("0123456789abcdef0123456789abcdef")
		blob, enc, err := tpm2.CreateCredential(rand.Reader, encap, akName, secret)
		if err != nil {
			t.Fatal(err)
		}
		got, err := tpm.ActivateCredential(ctx, ak, blob, enc)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, secret) {
			t.Errorf("activated %x", got)
		}
		// made for another key's name: the TPM refuses
		otherName, _ := signKey.Name()
		blob, enc, _ = tpm2.CreateCredential(rand.Reader, encap, otherName, secret)
		if _, err := tpm.ActivateCredential(ctx, ak, blob, enc); !errors.Is(err, ErrCredential) {
			t.Errorf("credential for another name: %v", err)
		}
	})

	t.Run("signer", func(t *testing.T) {
		s, err := tpm.Signer(signKey)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := tpm.Signer(ak); err == nil {
			t.Error("a restricted AK made a signer")
		}
		digest := sha256.Sum256([]byte("hello"))
		sig, err := s.Sign(rand.Reader, digest[:], crypto.SHA256)
		if err != nil {
			t.Fatal(err)
		}
		if !ecdsa.VerifyASN1(s.Public().(*ecdsa.PublicKey), digest[:], sig) {
			t.Fatal("signature does not verify")
		}
		// crypto/x509 uses it as any ECDSA key
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "tpm"},
			NotBefore: time.Now(), NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, s.Public(), s)
		if err != nil {
			t.Fatal(err)
		}
		c, _ := x509.ParseCertificate(der)
		if err := c.CheckSignatureFrom(c); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("wrong TPM", func(t *testing.T) {
		other := startSwtpm(t).open()
		if _, err := other.Quote(ctx, ak, []int{0}, nil); !errors.Is(err, ErrWrongTPM) {
			t.Errorf("AK of another TPM: %v", err)
		}
	})
}

// TestEKCertificateFromNV defines the ECC EK certificate index with a certificate in it (as
// a manufacturer would) and reads it back with the EK.
func TestEKCertificateFromNV(t *testing.T) {
	sw := startSwtpm(t)
	tpm := sw.open()
	ctx := testContext(t)
	if _, err := tpm.EKCertificate(ctx, EKCertIndexECC); !errors.Is(err, ErrNoEKCert) {
		t.Fatalf("no index: %v", err)
	}
	// a real certificate, padded to 800 bytes (two reads) as TPMs often leave it
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "EK"},
		NotBefore: time.Now(), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		t.Fatal(err)
	}
	cert := append(bytes.Clone(der), make([]byte, 800-len(der))...)
	err = tpm.do(ctx, func(tp transport.TPM) error {
		def := tpm2.NVDefineSpace{
			AuthHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)},
			PublicInfo: tpm2.New2B(tpm2.TPMSNVPublic{
				NVIndex: tpm2.TPMHandle(EKCertIndexECC), NameAlg: tpm2.TPMAlgSHA256,
				Attributes: tpm2.TPMANV{OwnerWrite: true, OwnerRead: true, AuthRead: true, NoDA: true, NT: tpm2.TPMNTOrdinary},
				DataSize:   uint16(len(cert)),
			}),
		}
		if _, err := def.Execute(tp); err != nil {
			return err
		}
		for off := 0; off < len(cert); off += 512 {
			end := min(off+512, len(cert))
			if _, err := (tpm2.NVWrite{
				AuthHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)},
				NVIndex:    tpm2.NamedHandle{Handle: tpm2.TPMHandle(EKCertIndexECC), Name: mustNVName(tp, EKCertIndexECC)},
				Data:       tpm2.TPM2BMaxNVBuffer{Buffer: cert[off:end]},
				Offset:     uint16(off),
			}).Execute(tp); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	ek, err := tpm.EndorsementKey(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(ek.Cert, der) {
		t.Fatalf("EK certificate read back: %d bytes", len(ek.Cert))
	}
	if _, ok := ek.Key.(*ecdsa.PublicKey); !ok {
		t.Errorf("the EK with the ECC certificate is a %T", ek.Key)
	}
}

func mustNVName(tp transport.TPM, index uint32) tpm2.TPM2BName {
	r, err := tpm2.NVReadPublic{NVIndex: tpm2.TPMHandle(index)}.Execute(tp)
	if err != nil {
		return tpm2.TPM2BName{}
	}
	return r.NVName
}
