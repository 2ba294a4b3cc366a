package manager

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/vtpmd/vtpmd/backend/localca"
	"github.com/vtpmd/vtpmd/manager/hwtpm"
)

// ErrNoHostIdentity: the manager has no host identity (its Hardware cannot make one, or making
// or loading it failed at start; the log says why).
var ErrNoHostIdentity = errors.New("manager: no host identity")

// File names of the host identity in the manager's directory.
const (
	// identityName holds the TPM-wrapped key blobs and the certificates (mode 0600).
	identityName = "identity.json"
	// TrustedCAsName is an optional PEM file of further CA certificates the host trusts
	// for manager-to-manager channels (TrustedCAs).
	TrustedCAsName = "trusted-cas.pem"
)

// tlsValidity is a TLS certificate's lifetime; one with less than tlsRenew left is replaced
// at start.
const (
	tlsValidity = 365 * 24 * time.Hour
	tlsRenew    = 30 * 24 * time.Hour
)

// caNotAfter is the host CA certificate's end, as the local CA's ("no well-defined
// expiration", RFC 5280 §4.1.2.5).
var caNotAfter = time.Date(9999, 12, 31, 23, 59, 59, 0, time.UTC)

// Quote is a quote by the host's hardware AK: Attest is the TPMS_ATTEST and Signature the
// TPMT_SIGNATURE (TPM wire encodings); PCRs the SHA-256 PCRs quoted (ascending) and Values
// their values, whose SHA-256 is the quote's pcrDigest.
type Quote struct {
	Attest    []byte   `json:"attest"`
	Signature []byte   `json:"signature"`
	PCRs      []int    `json:"pcrs"`
	Values    [][]byte `json:"values"`
}

// HostIdentity is the host's hardware identity as others may see it. Byte fields are TPM
// wire encodings (TPMT_PUBLIC, names) or DER certificates.
type HostIdentity struct {
	Hostname string `json:"hostname"`
	// AKPublic is the hardware AK's TPMT_PUBLIC, AKName its TPM name.
	AKPublic []byte `json:"ak_public"`
	AKName   []byte `json:"ak_name"`
	// EKPublic is the hardware EK's TPMT_PUBLIC; EKCert its manufacturer's certificate from
	// NV, if the TPM has one.
	EKPublic []byte `json:"ek_public"`
	EKCert   []byte `json:"ek_cert,omitempty"`
	// AKCert is the AK's certificate from the operator's privacy CA (certify-host), with
	// its issuers up to the operator's root in AKChain; empty until certified.
	AKCert  []byte   `json:"ak_cert,omitempty"`
	AKChain [][]byte `json:"ak_chain,omitempty"`
	// CAPublic is the TPMT_PUBLIC of the host's CA key (in the TPM); CACertify is the AK's
	// TPM2_Certify of it (qualifying data localca.HostCACertifyData): the CA key is resident
	// in the TPM that holds the AK.
	CAPublic  []byte            `json:"ca_public"`
	CACertify hwtpm.Attestation `json:"ca_certify"`
	// CARoot is the CA key's self-signed root certificate. CACert is the certificate the CA
	// issues under: the operator's certificate of the CA key when certify-host gave one
	// (CAChain then holds its issuers up to the operator's root), else CARoot.
	CARoot  []byte   `json:"ca_root"`
	CACert  []byte   `json:"ca_cert"`
	CAChain [][]byte `json:"ca_chain,omitempty"`
	// TLSCert is the certificate of the host's TLS key, issued by the host CA.
	TLSCert []byte `json:"tls_cert"`
}

// identityRecord is identity.json.
type identityRecord struct {
	Version   int               `json:"version"`
	AK        *hwtpm.Key        `json:"ak"`
	CA        *hwtpm.Key        `json:"ca"`
	TLS       *hwtpm.Key        `json:"tls"`
	CACertify hwtpm.Attestation `json:"ca_certify"`
	CARoot    []byte            `json:"ca_root"`
	CACert    []byte            `json:"ca_cert,omitempty"`
	CAChain   [][]byte          `json:"ca_chain,omitempty"`
	AKCert    []byte            `json:"ak_cert,omitempty"`
	AKChain   [][]byte          `json:"ak_chain,omitempty"`
	TLSCert   []byte            `json:"tls_cert"`
	// EKPublic (TPMT_PUBLIC) and EKCert are the hardware EK's, derived at the first start.
	EKPublic []byte `json:"ek_public,omitempty"`
	EKCert   []byte `json:"ek_cert,omitempty"`
}

// ekOfRecord is the EK remembered in the record.
func ekOfRecord(public, cert []byte) (*hwtpm.EK, error) {
	pub, err := hwtpm.ParsePublic(public)
	if err != nil {
		return nil, fmt.Errorf("EK: %w", err)
	}
	name, err := hwtpm.PublicName(pub)
	if err != nil {
		return nil, err
	}
	key, err := hwtpm.CryptoPublic(pub)
	if err != nil {
		return nil, err
	}
	return &hwtpm.EK{Public: public, Name: name, Key: key, Cert: cert}, nil
}

// hostIdentity is the loaded identity.
type hostIdentity struct {
	hw       IdentityHardware
	dir      string
	hostname string
	ek       *hwtpm.EK
	akName   []byte
	caSigner crypto.Signer
	tls      crypto.Signer

	mu  sync.Mutex // guards rec and its file
	rec identityRecord
}

// openIdentity loads the host identity from dir, making what is missing: an AK, a CA key
// certified by it with its self-signed root, and a TLS key with a certificate from that CA.
// A Hardware without IdentityHardware gives none (nil, nil).
func openIdentity(ctx context.Context, dir string, hw Hardware, log *slog.Logger) (*hostIdentity, error) {
	ih, ok := hw.(IdentityHardware)
	if !ok {
		return nil, nil
	}
	id := &hostIdentity{hw: ih, dir: dir}
	id.hostname, _ = os.Hostname()
	raw, err := readLimited(id.path(), 1<<20)
	switch {
	case err == nil:
		if err := json.Unmarshal(raw, &id.rec); err != nil {
			return nil, fmt.Errorf("host identity %s: %w", id.path(), err)
		}
	case os.IsNotExist(err):
		log.Info("making the host identity: an attestation key, a CA key and a TLS key in the hardware TPM")
	default:
		return nil, err
	}
	changed, err := id.complete(ctx)
	if err != nil {
		return nil, fmt.Errorf("host identity %s: %w", id.path(), err)
	}
	// the EK is derived once and remembered: an RSA EK takes a hardware TPM seconds
	if len(id.rec.EKPublic) > 0 {
		if id.ek, err = ekOfRecord(id.rec.EKPublic, id.rec.EKCert); err != nil {
			return nil, fmt.Errorf("host identity %s: %w", id.path(), err)
		}
	} else {
		if id.ek, err = ih.EndorsementKey(ctx); err != nil {
			return nil, err
		}
		id.rec.EKPublic, id.rec.EKCert = id.ek.Public, id.ek.Cert
		changed = true
	}
	if changed {
		if err := id.save(); err != nil {
			return nil, err
		}
	}
	return id, nil
}

func (id *hostIdentity) path() string { return filepath.Join(id.dir, identityName) }

func (id *hostIdentity) save() error {
	b, err := json.MarshalIndent(id.rec, "", "  ")
	if err != nil {
		return err
	}
	return atomicWrite(id.path(), b)
}

// complete makes the parts of the record that are missing (all of it on first start) and
// loads the signers; it reports whether the record changed.
func (id *hostIdentity) complete(ctx context.Context) (changed bool, err error) {
	r := &id.rec
	if r.AK == nil {
		if r.AK, err = id.hw.CreateAK(ctx); err != nil {
			return false, err
		}
		// everything below hangs on the AK
		*r = identityRecord{AK: r.AK}
		changed = true
	}
	r.Version = 1
	if id.akName, err = r.AK.Name(); err != nil {
		return false, err
	}
	if r.CA == nil {
		if r.CA, err = id.hw.CreateSigningKey(ctx); err != nil {
			return false, err
		}
		r.CACertify, r.CARoot, r.CACert, r.CAChain = hwtpm.Attestation{}, nil, nil, nil
		changed = true
	}
	if len(r.CACertify.Attest) == 0 {
		a, err := id.hw.Certify(ctx, r.AK, r.CA, localca.HostCACertifyData)
		if err != nil {
			return false, err
		}
		r.CACertify = *a
		changed = true
	}
	if id.caSigner, err = id.hw.Signer(r.CA); err != nil {
		return false, err
	}
	// the blobs load in this TPM only: find out now, not at the first certificate
	probe := sha256.Sum256([]byte("vtpmd host identity probe"))
	sig, err := id.caSigner.Sign(nil, probe[:], crypto.SHA256)
	if err != nil {
		return false, fmt.Errorf("the CA key does not work in this TPM: %w", err)
	}
	if pk, ok := id.caSigner.Public().(*ecdsa.PublicKey); !ok || !ecdsa.VerifyASN1(pk, probe[:], sig) {
		return false, errors.New("the CA key's signature does not verify")
	}
	if len(r.CARoot) == 0 {
		if r.CARoot, err = id.selfSignedRoot(); err != nil {
			return false, fmt.Errorf("the host CA's root certificate: %w", err)
		}
		changed = true
	}
	if r.TLS == nil {
		if r.TLS, err = id.hw.CreateSigningKey(ctx); err != nil {
			return false, err
		}
		r.TLSCert = nil
		changed = true
	}
	if id.tls, err = id.hw.Signer(r.TLS); err != nil {
		return false, err
	}
	if id.tlsNeedsCert() {
		if r.TLSCert, err = id.issueTLS(); err != nil {
			return false, fmt.Errorf("the host's TLS certificate: %w", err)
		}
		changed = true
	}
	return changed, nil
}

// hostAttribute is the vTPM host attribute of the host's own certificates.
func (id *hostIdentity) hostAttribute(vmUUID string) (localca.Attribute, error) {
	return localca.HostAttribute{AKName: id.akName, VMUUID: vmUUID}.Attribute()
}

// caSubject is the host CA's name, in its root and in an operator's certificate of it.
func (id *hostIdentity) caSubject() pkix.Name {
	return pkix.Name{CommonName: "vtpmd host CA " + id.hostname, Organization: []string{"vtpmd"}}
}

// selfSignedRoot is the CA key's self-signed root certificate, signed in the TPM.
func (id *hostIdentity) selfSignedRoot() ([]byte, error) {
	serial, err := localca.RandomSerial()
	if err != nil {
		return nil, err
	}
	attr, err := id.hostAttribute("")
	if err != nil {
		return nil, err
	}
	ext, err := localca.DirectoryAttributesExtension(attr)
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial, Subject: id.caSubject(),
		NotBefore: time.Now().UTC().Truncate(time.Second), NotAfter: caNotAfter,
		IsCA: true, BasicConstraintsValid: true, MaxPathLenZero: true,
		KeyUsage:        x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		ExtraExtensions: []pkix.Extension{ext},
	}
	return x509.CreateCertificate(nil, tmpl, tmpl, id.caSigner.Public(), id.caSigner)
}

// issuer is the certificate the CA issues under (mu held or during open).
func (id *hostIdentity) issuer() (*x509.Certificate, error) {
	der := id.rec.CACert
	if len(der) == 0 {
		der = id.rec.CARoot
	}
	return x509.ParseCertificate(der)
}

// tlsNeedsCert reports a TLS certificate that is missing, about to expire, for another key
// or not from the current CA.
func (id *hostIdentity) tlsNeedsCert() bool {
	c, err := x509.ParseCertificate(id.rec.TLSCert)
	if err != nil {
		return true
	}
	iss, err := id.issuer()
	if err != nil || c.CheckSignatureFrom(iss) != nil {
		return true
	}
	return time.Until(c.NotAfter) < tlsRenew || !publicEqual(c.PublicKey, id.tls.Public())
}

// issueTLS issues the TLS key's certificate with the host CA: the hostname as DNS name,
// server and client authentication, the host attribute naming the AK.
func (id *hostIdentity) issueTLS() ([]byte, error) {
	iss, err := id.issuer()
	if err != nil {
		return nil, err
	}
	serial, err := localca.RandomSerial()
	if err != nil {
		return nil, err
	}
	attr, err := id.hostAttribute("")
	if err != nil {
		return nil, err
	}
	ext, err := localca.DirectoryAttributesExtension(attr)
	if err != nil {
		return nil, err
	}
	now := time.Now().UTC().Truncate(time.Second)
	tmpl := &x509.Certificate{
		SerialNumber: serial, Subject: pkix.Name{CommonName: id.hostname, Organization: []string{"vtpmd"}},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(tlsValidity),
		KeyUsage:        x509.KeyUsageDigitalSignature,
		ExtKeyUsage:     []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		ExtraExtensions: []pkix.Extension{ext},
	}
	if id.hostname != "" {
		tmpl.DNSNames = []string{id.hostname}
	}
	return x509.CreateCertificate(nil, tmpl, iss, id.tls.Public(), id.caSigner)
}

func publicEqual(a, b crypto.PublicKey) bool {
	ae, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && ae.Equal(b)
}

// identity is the server's host identity, or ErrNoHostIdentity.
func (s *Server) hostID() (*hostIdentity, error) {
	if s.identity == nil {
		return nil, ErrNoHostIdentity
	}
	return s.identity, nil
}

// HostQuote has the hardware AK quote the SHA-256 PCRs pcrs with qualifying data (at most
// 64 bytes; callers pass a digest that binds what they attest).
func (s *Server) HostQuote(ctx context.Context, qualifying []byte, pcrs []int) (*Quote, error) {
	id, err := s.hostID()
	if err != nil {
		return nil, err
	}
	q, err := id.hw.Quote(ctx, id.rec.AK, pcrs, qualifying)
	if err != nil {
		return nil, err
	}
	return &Quote{Attest: q.Attest, Signature: q.Signature, PCRs: q.PCRs, Values: q.Values}, nil
}

// HostIdentity is the host's identity: hardware AK and EK, the CA and its certificates.
func (s *Server) HostIdentity() (HostIdentity, error) {
	id, err := s.hostID()
	if err != nil {
		return HostIdentity{}, err
	}
	id.mu.Lock()
	defer id.mu.Unlock()
	r := id.rec
	cacert := r.CACert
	if len(cacert) == 0 {
		cacert = r.CARoot
	}
	return HostIdentity{
		Hostname: id.hostname,
		AKPublic: r.AK.PublicArea(), AKName: slices.Clone(id.akName),
		EKPublic: slices.Clone(id.ek.Public), EKCert: slices.Clone(id.ek.Cert),
		AKCert: slices.Clone(r.AKCert), AKChain: slices.Clone(r.AKChain),
		CAPublic: r.CA.PublicArea(), CACertify: r.CACertify,
		CARoot: slices.Clone(r.CARoot), CACert: slices.Clone(cacert), CAChain: slices.Clone(r.CAChain),
		TLSCert: slices.Clone(r.TLSCert),
	}, nil
}

// TLSCertificate is the host's TLS identity for manager-to-manager channels (renewed when it
// has less than 30 days left): a key in the hardware TPM (the PrivateKey is a crypto.Signer doing TPM2_Sign; ECDSA P-256 with SHA-256
// only, so use TLS 1.3) and its certificate chain up to, not including, the root (the host
// CA's self-signed root, or the operator's root).
func (s *Server) TLSCertificate() (tls.Certificate, error) {
	id, err := s.hostID()
	if err != nil {
		return tls.Certificate{}, err
	}
	id.mu.Lock()
	defer id.mu.Unlock()
	if id.tlsNeedsCert() { // a manager that runs for long: renew before it expires
		der, err := id.issueTLS()
		if err != nil {
			return tls.Certificate{}, fmt.Errorf("renew the host TLS certificate: %w", err)
		}
		old := id.rec.TLSCert
		id.rec.TLSCert = der
		if err := id.save(); err != nil {
			id.rec.TLSCert = old
			return tls.Certificate{}, err
		}
	}
	leaf, err := x509.ParseCertificate(id.rec.TLSCert)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("host TLS certificate: %w", err)
	}
	chain := [][]byte{id.rec.TLSCert}
	if len(id.rec.CACert) > 0 { // operator-issued: it and the operator's intermediates
		chain = append(chain, id.rec.CACert)
		if n := len(id.rec.CAChain); n > 1 {
			chain = append(chain, id.rec.CAChain[:n-1]...)
		}
	}
	return tls.Certificate{Certificate: chain, PrivateKey: id.tls, Leaf: leaf}, nil
}

// TrustedCAs are the roots the host trusts for manager-to-manager channels: its own CA's
// root, the operator's root that certified it (certify-host), and the certificates in
// TrustedCAsName in the manager's directory (other hosts' roots, another operator CA).
func (s *Server) TrustedCAs() (*x509.CertPool, error) {
	id, err := s.hostID()
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	id.mu.Lock()
	ders := [][]byte{id.rec.CARoot}
	if n := len(id.rec.CAChain); n > 0 {
		ders = append(ders, id.rec.CAChain[n-1])
	}
	id.mu.Unlock()
	for _, d := range ders {
		c, err := x509.ParseCertificate(d)
		if err != nil {
			return nil, fmt.Errorf("trusted CA: %w", err)
		}
		pool.AddCert(c)
	}
	p := filepath.Join(s.cfg.Dir, TrustedCAsName)
	raw, err := readLimited(p, 1<<20)
	if err != nil && !os.IsNotExist(err) {
		return nil, err
	}
	for rest := raw; len(rest) > 0; {
		var b *pem.Block
		if b, rest = pem.Decode(rest); b == nil {
			break
		}
		if b.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", p, err)
		}
		pool.AddCert(c)
	}
	return pool, nil
}

// hostCA is a local CA over the host's TPM-resident CA key (its current certificate).
func (id *hostIdentity) hostCA() (*localca.CA, *x509.Certificate, error) {
	id.mu.Lock()
	defer id.mu.Unlock()
	iss, err := id.issuer()
	if err != nil {
		return nil, nil, err
	}
	ca, err := localca.NewWithSigner(id.caSigner, iss)
	if err != nil {
		return nil, nil, err
	}
	return ca, iss, nil
}
