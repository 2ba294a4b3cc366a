package manager

import (
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
)

// Identity is a host manager's identity in secure migration: a signing key (resident in the
// host's hardware TPM, or an operator's key file), its certificate chain (leaf first), and
// the trust anchors that other hosts' identities must chain to. It signs the sealed blobs
// that leave this host and authenticates this manager on the manager-to-manager TLS channel,
// in both directions.
type Identity struct {
	Chain []*x509.Certificate
	Key   crypto.Signer
	Roots *x509.CertPool
	// rootsFn, when set, gives the trust anchors at each use instead of Roots.
	rootsFn func() (*x509.CertPool, error)
}

// roots are the trust anchors now.
func (id *Identity) roots() (*x509.CertPool, error) {
	if id.rootsFn != nil {
		return id.rootsFn()
	}
	return id.Roots, nil
}

// ID names the identity: the hex SHA-256 of its public key (SubjectPublicKeyInfo).
func (id *Identity) ID() string { return publicKeyID(id.Chain[0]) }

// Subject is the leaf certificate's subject, for records and messages.
func (id *Identity) Subject() string { return id.Chain[0].Subject.String() }

func (id *Identity) chainDER() [][]byte {
	out := make([][]byte, len(id.Chain))
	for i, c := range id.Chain {
		out[i] = c.Raw
	}
	return out
}

func (id *Identity) tlsCertificate() tls.Certificate {
	return tls.Certificate{Certificate: id.chainDER(), PrivateKey: id.Key, Leaf: id.Chain[0]}
}

// check says whether the identity is usable: a chain whose leaf holds the key's public half.
func (id *Identity) check() error {
	if id == nil || len(id.Chain) == 0 || id.Key == nil {
		return errors.New("migration identity: a certificate chain and a key are needed")
	}
	type equaler interface{ Equal(crypto.PublicKey) bool }
	pub, ok := id.Key.Public().(equaler)
	if !ok || !pub.Equal(id.Chain[0].PublicKey) {
		return errors.New("migration identity: the key does not match the certificate")
	}
	return nil
}

// LoadIdentityFiles reads an identity from PEM files: the certificate chain (leaf first),
// the private key (PKCS#8, EC or PKCS#1), and the trust anchors (CA certificates). It is the
// operator-CA form of an identity; a hardware-resident key is plugged in as Identity.Key.
func LoadIdentityFiles(certFile, keyFile, trustFile string) (*Identity, error) {
	chain, err := readCertificates(certFile)
	if err != nil {
		return nil, err
	}
	raw, err := readLimited(keyFile, 1<<20)
	if err != nil {
		return nil, fmt.Errorf("migration key: %w", err)
	}
	defer clear(raw)
	b, _ := pem.Decode(raw)
	if b == nil {
		return nil, fmt.Errorf("migration key %s: no PEM block", keyFile)
	}
	var key any
	switch b.Type {
	case "EC PRIVATE KEY":
		key, err = x509.ParseECPrivateKey(b.Bytes)
	case "RSA PRIVATE KEY":
		key, err = x509.ParsePKCS1PrivateKey(b.Bytes)
	default:
		key, err = x509.ParsePKCS8PrivateKey(b.Bytes)
	}
	clear(b.Bytes)
	if err != nil {
		return nil, fmt.Errorf("migration key %s: %w", keyFile, err)
	}
	signer, ok := key.(crypto.Signer)
	if !ok {
		return nil, fmt.Errorf("migration key %s: %T cannot sign", keyFile, key)
	}
	roots, err := LoadTrustAnchors(trustFile)
	if err != nil {
		return nil, err
	}
	id := &Identity{Chain: chain, Key: signer, Roots: roots}
	if err := id.check(); err != nil {
		return nil, err
	}
	return id, nil
}

// LoadTrustAnchors reads a PEM bundle of CA certificates.
func LoadTrustAnchors(path string) (*x509.CertPool, error) {
	certs, err := readCertificates(path)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	for _, c := range certs {
		pool.AddCert(c)
	}
	return pool, nil
}

func readCertificates(path string) ([]*x509.Certificate, error) {
	raw, err := readLimited(path, 1<<20)
	if err != nil {
		return nil, fmt.Errorf("certificates: %w", err)
	}
	var out []*x509.Certificate
	for {
		var b *pem.Block
		b, raw = pem.Decode(raw)
		if b == nil {
			break
		}
		if b.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return nil, fmt.Errorf("certificate in %s: %w", path, err)
		}
		out = append(out, c)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("%s: no certificate", path)
	}
	return out, nil
}
