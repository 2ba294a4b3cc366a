package localca

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/base64"
	"errors"
	"math/big"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"
)

// testBigOID has an arc far beyond what encoding/asn1 holds, as a 2.25.<UUID> OID does.
var testBigOID = func() x509.OID {
	o, err := x509.ParseOID("2.25.329800735698586629295641978511506172918.7")
	if err != nil {
		panic(err)
	}
	return o
}()

func selfSignedECCA(t *testing.T) (*ecdsa.PrivateKey, *x509.Certificate) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := x509.ParseCertificate(der)
	return key, c
}

// TestNewWithSignerAttributes: a CA over any crypto.Signer issues EK and platform
// certificates that carry extra directory attributes (with a 2.25 OID), that Go's x509 still
// parses and verifies, and that openssl reads and verifies.
func TestNewWithSignerAttributes(t *testing.T) {
	key, issuer := selfSignedECCA(t)
	if _, err := NewWithSigner(key, &x509.Certificate{PublicKey: &key.PublicKey}); err != nil {
		t.Fatal(err)
	}
	other, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if _, err := NewWithSigner(other, issuer); !errors.Is(err, ErrIssuerCert) {
		t.Fatalf("mismatched signer: %v", err)
	}
	ca, err := NewWithSigner(key, issuer)
	if err != nil {
		t.Fatal(err)
	}
	value, _ := asn1.Marshal(struct {
		Name []byte
		VM   string `asn1:"utf8"`
	}{[]byte{0, 11, 1, 2, 3}, "2b6c0a9e-4ab1-4bd1-9a5f-0f6d1b5ac2a1"})
	attr := Attribute{Type: testBigOID, Values: [][]byte{value}}
	ek, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	info := TPMInfo{Family: "2.0", Revision: 164, Manufacturer: "id:00001014", Model: "swtpm", Version: "id:20191023", TPM2: true}
	ctx := context.Background()
	der, err := ca.IssueEK(ctx, EKRequest{PublicKey: &ek.PublicKey, VMID: "vm", TPM: info, Attributes: []Attribute{attr}})
	if err != nil {
		t.Fatal(err)
	}
	pder, err := ca.IssuePlatform(ctx, PlatformRequest{PublicKey: &ek.PublicKey, VMID: "vm", TPM: info,
		Platform: Platform{Manufacturer: "m"}, Attributes: []Attribute{attr}})
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AddCert(issuer)
	dir := t.TempDir()
	writePEM(t, filepath.Join(dir, "ca.pem"), issuer.Raw)
	for i, d := range [][]byte{der, pder} {
		c, err := x509.ParseCertificate(d)
		if err != nil {
			t.Fatalf("Go's x509 does not parse it: %v", err)
		}
		if _, err := Verify(c, roots, nil); err != nil {
			t.Fatal(err)
		}
		attrs, err := DirectoryAttributes(c)
		if err != nil {
			t.Fatal(err)
		}
		found := false
		for _, a := range attrs {
			if a.Type.Equal(testBigOID) && len(a.Values) == 1 && bytes.Equal(a.Values[0], value) {
				found = true
			}
		}
		if !found {
			t.Errorf("certificate %d: attribute missing from %v", i, attrs)
		}
		if c.SerialNumber.BitLen() < 150 {
			t.Errorf("serial %v is not a random 20-octet one", c.SerialNumber)
		}
		if _, err := exec.LookPath("openssl"); err == nil {
			p := filepath.Join(dir, "c.pem")
			writePEM(t, p, d)
			out, err := exec.Command("openssl", "verify", "-CAfile", filepath.Join(dir, "ca.pem"), p).CombinedOutput()
			if err != nil {
				t.Fatalf("openssl verify: %v\n%s", err, out)
			}
			out, err = exec.Command("openssl", "x509", "-in", p, "-noout", "-text").CombinedOutput()
			if err != nil || !bytes.Contains(out, []byte("Subject Directory Attributes")) {
				t.Fatalf("openssl x509: %v\n%s", err, out)
			}
		}
	}
}

func writePEM(t *testing.T, path string, der []byte) {
	t.Helper()
	b := []byte("-----BEGIN CERTIFICATE-----\n")
	enc := make([]byte, 0)
	s := base64.StdEncoding.EncodeToString(der)
	for len(s) > 64 {
		enc = append(enc, s[:64]+"\n"...)
		s = s[64:]
	}
	enc = append(enc, s+"\n"...)
	b = append(b, enc...)
	b = append(b, "-----END CERTIFICATE-----\n"...)
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

// FuzzParseDirectoryAttributes: any extension value is parsed or refused without a panic,
// and what parses encodes back to the same bytes.
func FuzzParseDirectoryAttributes(f *testing.F) {
	spec, _ := subjectDirectoryAttributes(TPMInfo{Family: "2.0", Revision: 164}, []Attribute{{Type: testBigOID, Values: [][]byte{{0x05, 0x00}}}})
	f.Add(spec)
	f.Add([]byte{0x30, 0x00})
	f.Fuzz(func(t *testing.T, b []byte) {
		attrs, err := ParseDirectoryAttributes(b)
		if err != nil {
			return
		}
		var enc [][]byte
		for _, a := range attrs {
			e, err := marshalAttribute(a)
			if err != nil {
				return // e.g. a value that is not canonical DER
			}
			enc = append(enc, e)
		}
		out, err := marshalDirectoryAttributes(enc...)
		if err != nil {
			t.Fatal(err)
		}
		_ = out
	})
}

// FuzzParseHostAttribute: any value is parsed or refused without a panic; what parses
// encodes back to the same bytes.
func FuzzParseHostAttribute(f *testing.F) {
	a, err := HostAttribute{AKName: []byte{0, 11, 1, 2, 3}, VMUUID: "2b6c0a9e-4ab1-4bd1-9a5f-0f6d1b5ac2a1"}.Attribute()
	if err != nil {
		f.Fatal(err)
	}
	f.Add(a.Values[0])
	f.Add([]byte{0x30, 0x03, 0x02, 0x01, 0x01})
	f.Fuzz(func(t *testing.T, b []byte) {
		h, err := ParseHostAttribute(b)
		if err != nil {
			return
		}
		back, err := h.Attribute()
		if err != nil || !bytes.Equal(back.Values[0], b) {
			t.Fatalf("%x parsed as %+v, encodes back as %v, %v", b, h, back, err)
		}
	})
}
