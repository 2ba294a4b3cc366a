package manager

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"math/big"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/internal/swtpmtest"
)

// operatorCA writes a self-signed operator CA (ECDSA P-256) as PEM files.
func operatorCA(t *testing.T) (certPath, keyPath string, cert *x509.Certificate, key *ecdsa.PrivateKey) {
	t.Helper()
	key, _ = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "operator root"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(48 * time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ = x509.ParseCertificate(der)
	dir := t.TempDir()
	certPath, keyPath = filepath.Join(dir, "ca.pem"), filepath.Join(dir, "ca-key.pem")
	kb, _ := x509.MarshalPKCS8PrivateKey(key)
	os.WriteFile(certPath, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600)
	os.WriteFile(keyPath, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kb}), 0o600)
	return certPath, keyPath, cert, key
}

// TestCertifyHost: the privacy-CA flow over the API certifies the AK and the CA key; the
// manager then issues under the operator's certificate and its TLS chain reaches the
// operator's root. Certificates over other keys, or a CA certificate under another name, are
// refused; a credential that is not the host's is not activated; a process that does not
// serve a vTPM gets no vTPM certificate.
func TestCertifyHost(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("operator requests need root")
	}
	m := startManager(t, swtpmtest.Start(t), t.TempDir(), nil)
	ctx := t.Context()
	certPath, keyPath, op, opKey := operatorCA(t)
	res, err := CertifyHost(ctx, CertifyHostConfig{Socket: m.sock, CACert: certPath, CAKey: keyPath})
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Checked) < 2 {
		t.Errorf("checked: %v", res.Checked)
	}
	id, err := m.srv.HostIdentity()
	if err != nil {
		t.Fatal(err)
	}
	ak, err := x509.ParseCertificate(id.AKCert)
	if err != nil || ak.CheckSignatureFrom(op) != nil {
		t.Fatalf("AK certificate: %v", err)
	}
	ca, err := x509.ParseCertificate(id.CACert)
	if err != nil || ca.CheckSignatureFrom(op) != nil || !ca.IsCA {
		t.Fatalf("CA certificate: %v", err)
	}
	// TLS: the chain carries the operator-issued CA certificate and verifies to the operator
	cert, err := m.srv.TLSCertificate()
	if err != nil {
		t.Fatal(err)
	}
	if len(cert.Certificate) != 2 {
		t.Fatalf("TLS chain of %d certificates", len(cert.Certificate))
	}
	roots := x509.NewCertPool()
	roots.AddCert(op)
	inter := x509.NewCertPool()
	inter.AddCert(ca)
	if _, err := cert.Leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		t.Fatal(err)
	}
	pool, _ := m.srv.TrustedCAs()
	tlsHandshake(t, cert, pool)

	cl := m.client()
	// an AK certificate over another key
	other, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(5), Subject: pkix.Name{CommonName: "x"}, NotBefore: time.Now(), NotAfter: time.Now().Add(time.Hour)}
	bad, _ := x509.CreateCertificate(rand.Reader, tmpl, op, &other.PublicKey, opKey)
	if _, err := cl.SetHostCertificates(ctx, HostCertificates{AKCert: bad, AKChain: [][]byte{op.Raw}}); !errors.Is(err, ErrBadCertificate) {
		t.Errorf("AK certificate over another key: %v", err)
	}
	// a CA certificate over the CA key but under another name
	caPub := ca.PublicKey
	tmpl = &x509.Certificate{SerialNumber: big.NewInt(6), Subject: pkix.Name{CommonName: "another name"}, NotBefore: time.Now(),
		NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	bad, _ = x509.CreateCertificate(rand.Reader, tmpl, op, caPub, opKey)
	if _, err := cl.SetHostCertificates(ctx, HostCertificates{CACert: bad, CAChain: [][]byte{op.Raw}}); !errors.Is(err, ErrBadCertificate) {
		t.Errorf("CA certificate under another name: %v", err)
	}
	// the right certificate without its chain
	if _, err := cl.SetHostCertificates(ctx, HostCertificates{CACert: id.CACert}); !errors.Is(err, ErrBadCertificate) {
		t.Errorf("CA certificate without a chain: %v", err)
	}
	// a credential not made for this host
	if _, err := cl.ActivateCredential(ctx, ActivateRequest{CredentialBlob: make([]byte, 40), Secret: make([]byte, 64)}); err == nil {
		t.Error("a garbage credential was activated")
	}
	// the test process serves no vTPM
	if _, err := cl.VTPMCertificate(ctx, VTPMCertRequest{StatePath: t.TempDir(), Kind: "ek"}); !errors.Is(err, ErrForbidden) {
		t.Errorf("vTPM certificate for a non-vTPM peer: %v", err)
	}
	// a vTPM AK quote needs a public area
	if _, err := cl.CertifyVTPMAK(ctx, AKCertifyRequest{AKPublic: []byte{1, 2, 3}}); err == nil {
		t.Error("a vTPM AK quote over garbage")
	}
}
