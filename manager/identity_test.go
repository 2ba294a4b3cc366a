package manager

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"errors"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"

	"github.com/vtpmd/vtpmd/backend/localca"
	"github.com/vtpmd/vtpmd/internal/swtpmtest"
	"github.com/vtpmd/vtpmd/manager/hwtpm"
)

// newIdentityServer opens a manager Server (no API socket) on a stand-in hardware TPM.
func newIdentityServer(t *testing.T, hw *swtpmtest.TPM, dir string) *Server {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	h, err := OpenHardware(ctx, hw.Spec(), "none", 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	s, err := New(ctx, Config{Dir: dir, InstanceExe: "/bin/true"}, h)
	if err != nil {
		t.Fatal(err)
	}
	if s.identity == nil {
		t.Fatal("no host identity on a hwtpm hardware")
	}
	return s
}

// TestHostIdentity: the identity is made on first start and kept across restarts; the AK
// quotes, the CA key's residency proof and root verify, the TLS certificate chains to the
// root and its key signs a real TLS handshake; and identity.json holds no clear key.
func TestHostIdentity(t *testing.T) {
	hw, dir := swtpmtest.Start(t), t.TempDir()
	s := newIdentityServer(t, hw, dir)
	id, err := s.HostIdentity()
	if err != nil {
		t.Fatal(err)
	}
	ctx := t.Context()

	// the AK's name is its public area's
	akPub, err := hwtpm.ParsePublic(id.AKPublic)
	if err != nil {
		t.Fatal(err)
	}
	if n, _ := hwtpm.PublicName(akPub); !bytes.Equal(n, id.AKName) || !hwtpm.IsAK(akPub) {
		t.Fatalf("AK name %x vs %x, IsAK %v", n, id.AKName, hwtpm.IsAK(akPub))
	}
	akKey, _ := hwtpm.CryptoPublic(akPub)

	// a quote verifies with the AK and carries the qualifying data
	nonce := sha256.Sum256([]byte("fresh"))
	q, err := s.HostQuote(ctx, nonce[:], []int{0, 1, 7})
	if err != nil {
		t.Fatal(err)
	}
	att, err := hwtpm.ParseAttest(q.Attest, tpm2.TPMSTAttestQuote)
	if err != nil || !bytes.Equal(att.ExtraData.Buffer, nonce[:]) {
		t.Fatalf("quote: %v", err)
	}
	if err := hwtpm.VerifySignature(akKey, q.Attest, q.Signature); err != nil {
		t.Fatal(err)
	}

	// the CA key is certified by the AK, and its root is self-signed over the same key
	cAtt, err := hwtpm.ParseAttest(id.CACertify.Attest, tpm2.TPMSTAttestCertify)
	if err != nil {
		t.Fatal(err)
	}
	if err := hwtpm.VerifySignature(akKey, id.CACertify.Attest, id.CACertify.Signature); err != nil {
		t.Fatal(err)
	}
	caPub, _ := hwtpm.ParsePublic(id.CAPublic)
	caName, _ := hwtpm.PublicName(caPub)
	info, _ := cAtt.Attested.Certify()
	if !bytes.Equal(info.Name.Buffer, caName) || !bytes.Equal(cAtt.ExtraData.Buffer, localca.HostCACertifyData) {
		t.Fatal("the certification does not name the CA key")
	}
	root, err := x509.ParseCertificate(id.CARoot)
	if err != nil {
		t.Fatal(err)
	}
	if err := root.CheckSignatureFrom(root); err != nil {
		t.Fatal(err)
	}
	caKey, _ := hwtpm.CryptoPublic(caPub)
	if !caKey.(*ecdsa.PublicKey).Equal(root.PublicKey) {
		t.Fatal("the root is not over the CA key")
	}
	if h, err := localca.FindHostAttribute(root); err != nil || !bytes.Equal(h.AKName, id.AKName) {
		t.Fatalf("root's host attribute: %+v, %v", h, err)
	}

	// TLS: the chain verifies against TrustedCAs, and a handshake with the TPM key works
	cert, err := s.TLSCertificate()
	if err != nil {
		t.Fatal(err)
	}
	pool, err := s.TrustedCAs()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cert.Leaf.Verify(x509.VerifyOptions{Roots: pool, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}); err != nil {
		t.Fatal(err)
	}
	tlsHandshake(t, cert, pool)

	// restart: the same identity, nothing remade
	s2 := newIdentityServer(t, hw, dir)
	id2, err := s2.HostIdentity()
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(id2.AKName, id.AKName) || !bytes.Equal(id2.CARoot, id.CARoot) || !bytes.Equal(id2.TLSCert, id.TLSCert) {
		t.Error("the identity changed across a restart")
	}

	// the file holds only TPM-wrapped blobs: no PEM private key, no key in the clear
	raw, err := os.ReadFile(filepath.Join(dir, identityName))
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(raw, []byte("PRIVATE KEY")) {
		t.Fatal("identity.json holds a private key")
	}
	if fi, _ := os.Stat(filepath.Join(dir, identityName)); fi.Mode().Perm() != 0o600 {
		t.Errorf("identity.json mode %v", fi.Mode())
	}

	// the identity does not load on another TPM: the blobs are this TPM's
	other := newIdentityServerMaybe(t, swtpmtest.Start(t), dir)
	if other.identity != nil {
		t.Error("another TPM loaded this host's identity")
	}
	if _, err := other.HostQuote(ctx, nil, []int{0}); !errors.Is(err, ErrNoHostIdentity) {
		t.Errorf("quote without identity: %v", err)
	}
}

// newIdentityServerMaybe is newIdentityServer without requiring an identity.
func newIdentityServerMaybe(t *testing.T, hw *swtpmtest.TPM, dir string) *Server {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	h, err := OpenHardware(ctx, hw.Spec(), "none", 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	// the ledger key is sealed to the first TPM: give this one its own directory with the
	// first one's identity file
	d := t.TempDir()
	b, err := os.ReadFile(filepath.Join(dir, identityName))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(d, identityName), b, 0o600); err != nil {
		t.Fatal(err)
	}
	s, err := New(ctx, Config{Dir: d, InstanceExe: "/bin/true"}, h)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// tlsHandshake runs a TLS 1.3 handshake with cert on both ends (mutual authentication).
func tlsHandshake(t *testing.T, cert tls.Certificate, pool *x509.CertPool) {
	t.Helper()
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	srv := tls.Server(a, &tls.Config{Certificates: []tls.Certificate{cert}, ClientCAs: pool,
		ClientAuth: tls.RequireAndVerifyClientCert, MinVersion: tls.VersionTLS13})
	cli := tls.Client(b, &tls.Config{Certificates: []tls.Certificate{cert}, RootCAs: pool,
		ServerName: cert.Leaf.Subject.CommonName, MinVersion: tls.VersionTLS13})
	errc := make(chan error, 1)
	go func() { errc <- srv.Handshake() }()
	if err := cli.Handshake(); err != nil {
		t.Fatalf("client handshake: %v", err)
	}
	if err := <-errc; err != nil {
		t.Fatalf("server handshake: %v", err)
	}
}

// TestTLSRenewal: a TLS certificate about to expire is replaced when asked for, by one from
// the same CA over the same TPM key, and kept.
func TestTLSRenewal(t *testing.T) {
	hw, dir := swtpmtest.Start(t), t.TempDir()
	s := newIdentityServer(t, hw, dir)
	id := s.identity
	// a certificate that expires in a day, as if the manager had run for a year
	c, _ := x509.ParseCertificate(id.rec.TLSCert)
	iss, _ := id.issuer()
	c.NotAfter = time.Now().Add(24 * time.Hour)
	der, err := x509.CreateCertificate(nil, c, iss, id.tls.Public(), id.caSigner)
	if err != nil {
		t.Fatal(err)
	}
	id.rec.TLSCert = der
	cert, err := s.TLSCertificate()
	if err != nil {
		t.Fatal(err)
	}
	if time.Until(cert.Leaf.NotAfter) < 300*24*time.Hour || bytes.Equal(cert.Certificate[0], der) {
		t.Fatalf("not renewed: until %v", cert.Leaf.NotAfter)
	}
	if err := cert.Leaf.CheckSignatureFrom(iss); err != nil {
		t.Fatal(err)
	}
	raw, _ := os.ReadFile(filepath.Join(dir, identityName))
	if !bytes.Contains(raw, []byte(base64.StdEncoding.EncodeToString(cert.Certificate[0])[:40])) {
		t.Error("the renewed certificate was not saved")
	}
}
