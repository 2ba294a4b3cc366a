package manager

import (
	"context"
	"crypto/rand"
	"crypto/subtle"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/google/go-tpm/tpm2"

	"github.com/vtpmd/vtpmd/backend/localca"
	"github.com/vtpmd/vtpmd/manager/attest"
	"github.com/vtpmd/vtpmd/manager/hwtpm"
)

// CertifyHostConfig is `vtpmd manager certify-host`: the operator's CA (PEM certificate and
// key, and its issuers up to the root when it is not a root itself) certifies a host's AK and
// CA key after checking them.
type CertifyHostConfig struct {
	Socket        string
	CACert, CAKey string
	// CAChain is a PEM file of the operator CA's issuers up to its root ("": it is a root).
	CAChain string
	// EKRoots is a PEM file of the TPM manufacturers' CAs that the hardware EK certificate
	// must chain to ("": the EK is taken on trust, as the operator's word that this is the
	// host's TPM).
	EKRoots string
	// Validity of the certificates (0: ten years, capped by the operator CA's).
	Validity time.Duration
}

// CertifyHostResult says what certify-host checked and issued.
type CertifyHostResult struct {
	Hostname string   `json:"hostname"`
	AKName   string   `json:"ak_name"`
	EK       string   `json:"ek"`
	Checked  []string `json:"checked"`
	AKCert   string   `json:"ak_cert_subject"`
	CACert   string   `json:"ca_cert_subject"`
}

// CertifyHost is the privacy-CA flow, run by the operator against the manager at
// cfg.Socket: it reads the host's EK and AK, makes a credential for the EK and the AK's name
// (TPM2_MakeCredential, in software), has the manager's TPM activate it and compares the
// secret (the AK is in the TPM with that EK), checks the AK's certification of the CA key
// (the CA key is in that TPM too), then issues the AK's and the CA key's certificates with
// the operator's CA and stores them in the manager.
func CertifyHost(ctx context.Context, cfg CertifyHostConfig) (*CertifyHostResult, error) {
	opSigner, err := localca.LoadSigner(cfg.CAKey, "")
	if err != nil {
		return nil, fmt.Errorf("operator CA key: %w", err)
	}
	opCerts, err := readCertFile(cfg.CACert)
	if err != nil || len(opCerts) == 0 {
		return nil, fmt.Errorf("operator CA certificate %s: %v", cfg.CACert, err)
	}
	op := opCerts[0]
	if !publicEqual(op.PublicKey, opSigner.Public()) {
		return nil, fmt.Errorf("operator CA: %s does not certify the key in %s", cfg.CACert, cfg.CAKey)
	}
	chain := [][]byte{op.Raw}
	if cfg.CAChain != "" {
		more, err := readCertFile(cfg.CAChain)
		if err != nil {
			return nil, fmt.Errorf("operator CA chain: %w", err)
		}
		for _, c := range more {
			chain = append(chain, c.Raw)
		}
	}
	cl := NewClient(cfg.Socket)
	id, err := cl.HostIdentity(ctx)
	if err != nil {
		return nil, err
	}
	res := &CertifyHostResult{Hostname: id.Hostname, AKName: hex.EncodeToString(id.AKName)}

	// the EK: the manufacturer's certificate when roots are given, else taken on trust
	ekPub, err := hwtpm.ParsePublic(id.EKPublic)
	if err != nil {
		return nil, fmt.Errorf("host EK: %w", err)
	}
	ekKey, err := hwtpm.CryptoPublic(ekPub)
	if err != nil {
		return nil, fmt.Errorf("host EK: %w", err)
	}
	if res.EK, err = checkEK(id, ekKey, cfg.EKRoots); err != nil {
		return nil, err
	}

	// the AK: an attestation key, with the name it claims
	akPub, err := hwtpm.ParsePublic(id.AKPublic)
	if err != nil {
		return nil, fmt.Errorf("host AK: %w", err)
	}
	akName, _ := hwtpm.PublicName(akPub)
	if !hwtpm.IsAK(akPub) || subtle.ConstantTimeCompare(akName, id.AKName) != 1 {
		return nil, errors.New("host AK: not a restricted signing key fixed to its TPM, or not the name given")
	}
	akKey, err := hwtpm.CryptoPublic(akPub)
	if err != nil {
		return nil, err
	}

	// credential activation: only the TPM holding the EK, with the AK loaded, returns it
	encap, err := tpm2.ImportEncapsulationKey(ekPub)
	if err != nil {
		return nil, fmt.Errorf("host EK: %w", err)
	}
	secret := make([]byte, 32)
	if _, err := rand.Read(secret); err != nil {
		return nil, err
	}
	blob, enc, err := tpm2.CreateCredential(rand.Reader, encap, akName, secret)
	if err != nil {
		return nil, fmt.Errorf("make credential: %w", err)
	}
	got, err := cl.ActivateCredential(ctx, ActivateRequest{CredentialBlob: blob, Secret: enc})
	if err != nil {
		return nil, fmt.Errorf("credential activation: %w", err)
	}
	same := subtle.ConstantTimeCompare(got, secret) == 1
	clear(got)
	clear(secret)
	if !same {
		return nil, errors.New("credential activation returned another secret: the AK is not in the TPM with this EK")
	}
	res.Checked = append(res.Checked, "the AK is in the TPM that holds the EK (credential activated)")

	// the CA key: certified by the AK, and the root is over it
	root, err := x509.ParseCertificate(id.CARoot)
	if err != nil {
		return nil, fmt.Errorf("host CA root: %w", err)
	}
	if err := root.CheckSignatureFrom(root); err != nil {
		return nil, fmt.Errorf("host CA root: %w", err)
	}
	r, err := attest.VerifyCAResidency(id.AKPublic, id.CAPublic, id.CACertify, root)
	if err != nil {
		return nil, err
	}
	res.Checked = append(res.Checked, r.Proves...)

	// issue
	validity := cfg.Validity
	if validity == 0 {
		validity = 10 * 365 * 24 * time.Hour
	}
	now := time.Now().UTC().Truncate(time.Second)
	notAfter := now.Add(validity)
	if notAfter.After(op.NotAfter) {
		notAfter = op.NotAfter
	}
	attr, err := localca.HostAttribute{AKName: akName}.Attribute()
	if err != nil {
		return nil, err
	}
	ext, err := localca.DirectoryAttributesExtension(attr)
	if err != nil {
		return nil, err
	}
	serial, err := localca.RandomSerial()
	if err != nil {
		return nil, err
	}
	akTmpl := &x509.Certificate{SerialNumber: serial,
		Subject:   pkix.Name{CommonName: "vtpmd host AK " + id.Hostname, Organization: []string{"vtpmd"}},
		NotBefore: now, NotAfter: notAfter, KeyUsage: x509.KeyUsageDigitalSignature, BasicConstraintsValid: true,
		ExtraExtensions: []pkix.Extension{ext}}
	akDER, err := x509.CreateCertificate(rand.Reader, akTmpl, op, akKey, opSigner)
	if err != nil {
		return nil, fmt.Errorf("issue the AK certificate: %w", err)
	}
	if serial, err = localca.RandomSerial(); err != nil {
		return nil, err
	}
	caTmpl := &x509.Certificate{SerialNumber: serial, RawSubject: root.RawSubject, SubjectKeyId: root.SubjectKeyId,
		NotBefore: now, NotAfter: notAfter, IsCA: true, BasicConstraintsValid: true, MaxPathLenZero: true,
		KeyUsage:        x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		ExtraExtensions: []pkix.Extension{ext}}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, op, root.PublicKey, opSigner)
	if err != nil {
		return nil, fmt.Errorf("issue the CA certificate: %w", err)
	}
	if _, err := cl.SetHostCertificates(ctx, HostCertificates{AKCert: akDER, AKChain: chain, CACert: caDER, CAChain: chain}); err != nil {
		return nil, err
	}
	res.AKCert, res.CACert = akTmpl.Subject.String(), root.Subject.String()
	return res, nil
}

// checkEK verifies the hardware EK's certificate against the manufacturers' roots, when
// given, and says what is known of the EK.
func checkEK(id *HostIdentity, ekKey any, rootsFile string) (string, error) {
	if rootsFile == "" {
		if len(id.EKCert) > 0 {
			return "certificate present, not verified (no --ek-roots): the EK is taken on the operator's word", nil
		}
		return "no certificate in the TPM: the EK is taken on the operator's word", nil
	}
	if len(id.EKCert) == 0 {
		return "", errors.New("host EK: --ek-roots given but the TPM holds no EK certificate")
	}
	roots, err := readCertFile(rootsFile)
	if err != nil || len(roots) == 0 {
		return "", fmt.Errorf("EK roots %s: %v", rootsFile, err)
	}
	// NV may hold padding after the DER: the first element is the certificate
	var der asn1.RawValue
	if _, err := asn1.Unmarshal(id.EKCert, &der); err != nil {
		return "", fmt.Errorf("host EK certificate: %w", err)
	}
	c, err := x509.ParseCertificate(der.FullBytes)
	if err != nil {
		return "", fmt.Errorf("host EK certificate: %w", err)
	}
	if !publicEqual(c.PublicKey, ekKey) {
		return "", errors.New("host EK certificate: it is over another key than the TPM's EK")
	}
	inter := x509.NewCertPool()
	rp := x509.NewCertPool()
	for _, r := range roots {
		rp.AddCert(r)
		inter.AddCert(r)
	}
	if _, err := localca.Verify(c, rp, inter); err != nil {
		return "", fmt.Errorf("host EK certificate: %w", err)
	}
	return fmt.Sprintf("certificate %q verified against the manufacturers' roots", c.Subject), nil
}

func readCertFile(path string) ([]*x509.Certificate, error) {
	raw, err := readLimited(path, 1<<20)
	if err != nil {
		return nil, err
	}
	return attest.CertPEMs(raw)
}

// WriteIdentityFiles writes the host identity into dir as files for openssl and tpm2-tools:
// PEM certificates (ca-root.pem, ca.pem, ca-chain.pem, ak.pem, ak-chain.pem, tls.pem,
// ek.pem) and TPM structures (ak.pub and ek.pub as TPM2B_PUBLIC, ca.pub, ca-certify.attest
// and ca-certify.sig). It returns the names written.
func WriteIdentityFiles(dir string, id *HostIdentity) ([]string, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	pemOf := func(ders ...[]byte) []byte {
		var b []byte
		for _, d := range ders {
			if len(d) > 0 {
				b = append(b, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: d})...)
			}
		}
		return b
	}
	tpm2b := func(b []byte) []byte { return append([]byte{byte(len(b) >> 8), byte(len(b))}, b...) }
	files := []struct {
		name string
		data []byte
	}{
		{"ca-root.pem", pemOf(id.CARoot)},
		{"ca.pem", pemOf(id.CACert)},
		{"ca-chain.pem", pemOf(id.CAChain...)},
		{"ak.pem", pemOf(id.AKCert)},
		{"ak-chain.pem", pemOf(id.AKChain...)},
		{"tls.pem", pemOf(id.TLSCert)},
		{"ek.pem", pemOf(id.EKCert)},
		{"ak.pub", tpm2b(id.AKPublic)},
		{"ek.pub", tpm2b(id.EKPublic)},
		{"ca.pub", tpm2b(id.CAPublic)},
		{"ca-certify.attest", id.CACertify.Attest},
		{"ca-certify.sig", id.CACertify.Signature},
	}
	var names []string
	for _, f := range files {
		if len(f.data) == 0 || (len(f.data) == 2 && f.data[0] == 0 && f.data[1] == 0) {
			continue
		}
		if err := os.WriteFile(filepath.Join(dir, f.name), f.data, 0o644); err != nil {
			return names, err
		}
		names = append(names, f.name)
	}
	return names, nil
}
