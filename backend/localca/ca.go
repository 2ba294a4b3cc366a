package localca

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha1"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vtpmd/vtpmd/internal/atomicfile"
)

// File names next to the signing key, as swtpm_localca names them.
const (
	LockFileName   = ".lock.swtpm-localca"
	RootKeyName    = "swtpm-localca-rootca-privkey.pem"
	RootCertName   = "swtpm-localca-rootca-cert.pem"
	rootCommonName = "swtpm-localca-rootca"
	caCommonName   = "swtpm-localca"
	caKeyBits      = 3072 // swtpm_localca's certtool default ("High")
)

// Sentinel errors callers branch on.
var (
	// ErrSigningKey is wrapped when the CA's signing key cannot be used.
	ErrSigningKey = errors.New("local CA signing key unusable")
	// ErrIssuerCert is wrapped when the issuer certificate is missing, unreadable or does not
	// belong to the signing key.
	ErrIssuerCert = errors.New("local CA issuer certificate unusable")
)

// notAfter is swtpm_cert's "--days -1": no well-defined expiration (RFC 5280 §4.1.2.5).
var notAfter = time.Date(9999, 12, 31, 23, 59, 59, 0, time.UTC)

// CA is an opened local CA: the intermediate's key and certificate.
type CA struct {
	cfg    Config
	signer crypto.Signer
	issuer *x509.Certificate
	// serials hands out serial numbers (nil: the certserial counter, NextSerial)
	serials func(context.Context) (*big.Int, error)
	// Created reports whether Open created the CA.
	Created bool
}

// Open loads the CA that cfg names, creating the root and intermediate CA first when the
// signing key does not exist (as swtpm_localca does on first use). Creation runs under the
// CA's lock, so concurrent first uses create one CA.
func Open(ctx context.Context, cfg Config, log *slog.Logger) (*CA, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if err := os.MkdirAll(cfg.StateDir, 0o770); err != nil { // swtpm_localca's mode: tss may share it
		return nil, fmt.Errorf("local CA statedir: %w", err)
	}
	// Everything under the CA's lock: swtpm_localca creates its CA under it, key first and
	// not atomically, so a key seen without the lock may be half written.
	unlock, err := lockCA(ctx, cfg)
	if err != nil {
		return nil, err
	}
	defer unlock()
	ca := &CA{cfg: cfg}
	if _, err := os.Stat(cfg.SigningKey); errors.Is(err, os.ErrNotExist) {
		log.Info("Creating root CA and a local CA's signing key and issuer cert.")
		ca.Created = true
		if err := createCA(cfg); err != nil {
			return nil, fmt.Errorf("create local CA: %w", err)
		}
	}
	if ca.signer, err = LoadSigner(cfg.SigningKey, cfg.SigningKeyPassword); err != nil {
		return nil, err
	}
	if ca.issuer, err = loadCert(cfg.IssuerCert); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrIssuerCert, err)
	}
	if !publicKeysEqual(ca.issuer.PublicKey, ca.signer.Public()) {
		return nil, fmt.Errorf("%w: %s does not certify the key in %s", ErrIssuerCert, cfg.IssuerCert, cfg.SigningKey)
	}
	return ca, nil
}

// Issuer is the certificate that signs EK and platform certificates.
func (ca *CA) Issuer() *x509.Certificate { return ca.issuer }

// RootCertPath is where swtpm_localca keeps the root certificate (next to the signing key).
func (ca *CA) RootCertPath() string {
	return filepath.Join(filepath.Dir(ca.cfg.SigningKey), RootCertName)
}

// lockCA takes swtpm_localca's flock on StateDir/.lock.swtpm-localca, polling so that ctx can
// cancel the wait.
func lockCA(ctx context.Context, cfg Config) (func(), error) {
	p := filepath.Join(cfg.StateDir, LockFileName)
	f, err := os.OpenFile(p, os.O_RDWR|os.O_CREATE|unix.O_CLOEXEC, 0o755)
	if err != nil {
		return nil, fmt.Errorf("open local CA lock %s: %w", p, err)
	}
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			return func() { unix.Flock(int(f.Fd()), unix.LOCK_UN); f.Close() }, nil
		}
		if !errors.Is(err, unix.EWOULDBLOCK) && !errors.Is(err, unix.EINTR) {
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", p, err)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", p, ctx.Err())
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// maxSerialBits bounds a serial number: at most 20 octets in DER, positive.
const maxSerialBits = 20*8 - 1

// NextSerial hands out the next certificate serial number as swtpm_localca does: under the CA's
// lock it reads the decimal counter, adds one and stores the new value before returning it. A
// missing counter starts at 1 (so the first serial is 2); content that is not a number gives
// 1; a counter that would exceed 20 octets restarts at a random 20-digit number (swtpm 0.9+).
// Surrounding blanks are ignored. The file keeps its owner and mode (libvirt runs
// swtpm_localca as tss, which must still be able to write it).
func (ca *CA) NextSerial(ctx context.Context) (*big.Int, error) {
	unlock, err := lockCA(ctx, ca.cfg)
	if err != nil {
		return nil, err
	}
	defer unlock()
	next := big.NewInt(2)
	b, err := os.ReadFile(ca.cfg.CertSerial)
	switch {
	case err == nil:
		if v, ok := new(big.Int).SetString(strings.TrimSpace(string(b)), 10); ok && v.Sign() >= 0 {
			next = v.Add(v, big.NewInt(1))
		} else {
			next = big.NewInt(1)
		}
	case !errors.Is(err, os.ErrNotExist):
		return nil, fmt.Errorf("read serial counter: %w", err)
	}
	if next.BitLen() > maxSerialBits {
		lo := new(big.Int).Exp(big.NewInt(10), big.NewInt(19), nil)
		r, err := rand.Int(rand.Reader, new(big.Int).Mul(lo, big.NewInt(9)))
		if err != nil {
			return nil, err
		}
		next = r.Add(r, lo)
	}
	if err := atomicfile.WriteFileKeepOwner(ca.cfg.CertSerial, []byte(next.String()), 0o644); err != nil {
		return nil, fmt.Errorf("store serial counter: %w", err)
	}
	return next, nil
}

// LoadSigner reads a PEM private key (PKCS#1 RSA, SEC 1 EC or PKCS#8; certtool's text
// preamble is skipped). Password-protected keys are refused with a clear error.
func LoadSigner(path, password string) (crypto.Signer, error) {
	data, err := readBounded(path)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrSigningKey, err)
	}
	if password != "" {
		return nil, fmt.Errorf("%w: %s: signingkey_password (an encrypted CA key) is not supported by vtpmd's local CA", ErrSigningKey, path)
	}
	s, err := ParseSigner(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return s, nil
}

// ParseSigner finds the first private key among PEM blocks.
func ParseSigner(data []byte) (crypto.Signer, error) {
	for rest := data; ; {
		var blk *pem.Block
		blk, rest = pem.Decode(rest)
		if blk == nil {
			return nil, fmt.Errorf("%w: no PEM private key", ErrSigningKey)
		}
		var k any
		var err error
		switch blk.Type {
		case "RSA PRIVATE KEY":
			k, err = x509.ParsePKCS1PrivateKey(blk.Bytes)
		case "EC PRIVATE KEY":
			k, err = x509.ParseECPrivateKey(blk.Bytes)
		case "PRIVATE KEY":
			k, err = x509.ParsePKCS8PrivateKey(blk.Bytes)
		case "ENCRYPTED PRIVATE KEY":
			return nil, fmt.Errorf("%w: the key is encrypted, which vtpmd's local CA does not support", ErrSigningKey)
		default:
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("%w: %w", ErrSigningKey, err)
		}
		s, ok := k.(crypto.Signer)
		if !ok {
			return nil, fmt.Errorf("%w: key type %T cannot sign", ErrSigningKey, k)
		}
		return s, nil
	}
}

func loadCert(path string) (*x509.Certificate, error) {
	data, err := readBounded(path)
	if err != nil {
		return nil, err
	}
	if blk, _ := pem.Decode(data); blk != nil && blk.Type == "CERTIFICATE" {
		data = blk.Bytes
	}
	c, err := x509.ParseCertificate(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return c, nil
}

func publicKeysEqual(a, b crypto.PublicKey) bool {
	type equaler interface{ Equal(crypto.PublicKey) bool }
	e, ok := a.(equaler)
	return ok && e.Equal(b)
}

// createCA makes the root CA and the intermediate that signs, as swtpm_localca does: RSA 3072
// keys, CN=swtpm-localca-rootca (self-signed) and CN=swtpm-localca, CA:TRUE, certificate
// signing only, no expiry. The signing key is written last: its presence is what says "the CA
// exists", so a crash part-way leaves no CA rather than a broken one.
func createCA(cfg Config) error {
	dir := filepath.Dir(cfg.SigningKey)
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(cfg.IssuerCert), 0o750); err != nil {
		return err
	}
	rootKey, err := rsa.GenerateKey(rand.Reader, caKeyBits)
	if err != nil {
		return err
	}
	now := time.Now().UTC().Truncate(time.Second)
	root, err := caTemplate(rootCommonName, now, &rootKey.PublicKey)
	if err != nil {
		return err
	}
	rootDER, err := x509.CreateCertificate(rand.Reader, root, root, &rootKey.PublicKey, rootKey)
	if err != nil {
		return fmt.Errorf("sign root CA: %w", err)
	}
	rootCert, err := x509.ParseCertificate(rootDER)
	if err != nil {
		return err
	}
	key, err := rsa.GenerateKey(rand.Reader, caKeyBits)
	if err != nil {
		return err
	}
	inter, err := caTemplate(caCommonName, now, &key.PublicKey)
	if err != nil {
		return err
	}
	interDER, err := x509.CreateCertificate(rand.Reader, inter, rootCert, &key.PublicKey, rootKey)
	if err != nil {
		return fmt.Errorf("sign local CA: %w", err)
	}
	pemKey := func(k *rsa.PrivateKey) []byte {
		return pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(k)})
	}
	pemCert := func(der []byte) []byte { return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}) }
	for _, f := range []struct {
		path string
		data []byte
		mode os.FileMode
	}{
		{filepath.Join(dir, RootKeyName), pemKey(rootKey), 0o640},
		{filepath.Join(dir, RootCertName), pemCert(rootDER), 0o644},
		{cfg.IssuerCert, pemCert(interDER), 0o644},
		{cfg.SigningKey, pemKey(key), 0o640},
	} {
		if err := atomicfile.WriteFile(f.path, f.data, f.mode); err != nil {
			return err
		}
	}
	return nil
}

// caTemplate is a CA certificate as swtpm_localca makes them: CA:TRUE, certificate signing
// only, no expiry, a random serial and the key's identifier.
func caTemplate(cn string, now time.Time, pub *rsa.PublicKey) (*x509.Certificate, error) {
	c := &x509.Certificate{
		Subject:               pkix.Name{CommonName: cn},
		NotBefore:             now,
		NotAfter:              notAfter,
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign,
	}
	var err error
	if c.SerialNumber, err = randomSerial(); err != nil {
		return nil, err
	}
	if c.SubjectKeyId, err = keyID(pub); err != nil {
		return nil, err
	}
	return c, nil
}

// randomSerial is a positive 20-byte (160-bit) serial number, the RFC 5280 maximum.
func randomSerial() (*big.Int, error) {
	b := make([]byte, 20)
	if _, err := rand.Read(b); err != nil {
		return nil, err
	}
	b[0] &= 0x7f
	b[0] |= 0x40
	return new(big.Int).SetBytes(b), nil
}

// keyID is the RFC 5280 §4.2.1.2 method (1) key identifier: SHA-1 of the subjectPublicKey.
func keyID(pub crypto.PublicKey) ([]byte, error) {
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return nil, err
	}
	var spki struct {
		Algorithm pkix.AlgorithmIdentifier
		PublicKey asn1.BitString
	}
	if _, err := asn1.Unmarshal(der, &spki); err != nil {
		return nil, err
	}
	sum := sha1.Sum(spki.PublicKey.Bytes)
	return sum[:], nil
}

// signatureAlgorithm picks the signature the issuer's key makes: SHA-256 as swtpm_cert, or
// SHA-384 for a P-384 CA key.
func signatureAlgorithm(s crypto.Signer) x509.SignatureAlgorithm {
	if k, ok := s.Public().(*ecdsa.PublicKey); ok {
		if k.Curve.Params().BitSize >= 384 {
			return x509.ECDSAWithSHA384
		}
		return x509.ECDSAWithSHA256
	}
	if _, ok := s.Public().(*rsa.PublicKey); ok {
		return x509.SHA256WithRSA
	}
	return x509.UnknownSignatureAlgorithm // let crypto/x509 choose for other key types
}
