package attest

import (
	"bytes"
	"crypto"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"time"

	"github.com/google/go-tpm/tpm2"

	"github.com/vtpmd/vtpmd/backend/localca"
	"github.com/vtpmd/vtpmd/manager/hwtpm"
)

// Sentinel errors of the certificate chains.
var (
	// ErrChain: a certificate does not chain to the trust anchors, or is not the one expected.
	ErrChain = errors.New("attest: certificate chain does not verify")
	// ErrResidency: a key's residency proof (an AK's TPM2_Certify) does not verify or does
	// not name the key.
	ErrResidency = errors.New("attest: residency proof does not verify")
	// ErrHostVouch: the host AK's quote over a vTPM AK does not verify or names another key.
	ErrHostVouch = errors.New("attest: host quote over the vTPM AK does not verify")
)

// ChainResult is what a verified chain proves, as sentences for a person, and what was found.
type ChainResult struct {
	Proves []string
	// Path is the verified certificate path, leaf first, anchor last (when certificates were
	// checked).
	Path []*x509.Certificate
	// Host is the vTPM host attribute of a vTPM certificate: the host AK's name and the VM.
	Host *localca.HostAttribute
	// AKName is the TPM name of the AK the result is about (host AK or vTPM AK).
	AKName []byte
}

// CertPEMs reads certificates from PEM (any number) or from one DER certificate.
func CertPEMs(b []byte) ([]*x509.Certificate, error) {
	var out []*x509.Certificate
	rest := b
	for {
		var blk *pem.Block
		if blk, rest = pem.Decode(rest); blk == nil {
			break
		}
		if blk.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			return nil, fmt.Errorf("%w: %w", ErrChain, err)
		}
		out = append(out, c)
	}
	if len(out) == 0 && len(b) > 0 {
		c, err := x509.ParseCertificate(b)
		if err != nil {
			return nil, fmt.Errorf("%w: neither PEM certificates nor one DER certificate: %w", ErrChain, err)
		}
		out = append(out, c)
	}
	return out, nil
}

func pool(certs []*x509.Certificate) *x509.CertPool {
	p := x509.NewCertPool()
	for _, c := range certs {
		p.AddCert(c)
	}
	return p
}

// VTPMCertExpect narrows VerifyVTPMCertificate: every field set must match.
type VTPMCertExpect struct {
	// HostAKName is the host AK the certificate must name (e.g. from VerifyAKCertificate).
	HostAKName []byte
	// VMUUID is the VM the certificate must name.
	VMUUID string
	// EKPublic is the vTPM's EK (a TPMT_PUBLIC) the certificate must certify.
	EKPublic []byte
	// Now is the time to check validity at (zero: now).
	Now time.Time
}

// VerifyVTPMCertificate verifies a vTPM's EK or platform certificate issued by a host CA up
// to roots (the operator's root, or the host CA's self-signed root), with intermediates (the
// host CA's certificate when the operator issued it), and reads its vTPM host attribute.
func VerifyVTPMCertificate(cert *x509.Certificate, intermediates, roots []*x509.Certificate, want VTPMCertExpect) (*ChainResult, error) {
	if len(roots) == 0 {
		return nil, fmt.Errorf("%w: no trust anchor", ErrChain)
	}
	cc := *cert
	chains, err := verifyTCG(&cc, pool(intermediates), pool(roots), want.Now)
	if err != nil {
		return nil, fmt.Errorf("%w: vTPM certificate %q: %w", ErrChain, cert.Subject, err)
	}
	host, err := localca.FindHostAttribute(cert)
	if err != nil {
		return nil, fmt.Errorf("%w: vTPM certificate %q: %w", ErrChain, cert.Subject, err)
	}
	if want.HostAKName != nil && !bytes.Equal(host.AKName, want.HostAKName) {
		return nil, fmt.Errorf("%w: the certificate names host AK %x, not %x", ErrChain, host.AKName, want.HostAKName)
	}
	if want.VMUUID != "" && host.VMUUID != want.VMUUID {
		return nil, fmt.Errorf("%w: the certificate names VM %q, not %q", ErrChain, host.VMUUID, want.VMUUID)
	}
	if want.EKPublic != nil {
		pub, err := hwtpm.ParsePublic(want.EKPublic)
		if err != nil {
			return nil, fmt.Errorf("%w: vTPM EK: %w", ErrInput, err)
		}
		k, err := hwtpm.CryptoPublic(pub)
		if err != nil {
			return nil, fmt.Errorf("%w: vTPM EK: %w", ErrInput, err)
		}
		if !keysEqual(cert.PublicKey, k) {
			return nil, fmt.Errorf("%w: the certificate is over another key than the vTPM's EK", ErrChain)
		}
	}
	path := chains[0]
	vm := host.VMUUID
	if vm == "" {
		vm = "(none named)"
	}
	return &ChainResult{
		Proves: []string{
			fmt.Sprintf("certificate %q chains to %q", cert.Subject, path[len(path)-1].Subject),
			fmt.Sprintf("its issuer vouches that the TPM is virtual, served on the host whose hardware AK is %s, for VM %s", hex.EncodeToString(host.AKName), vm),
		},
		Path: path, Host: host, AKName: host.AKName,
	}, nil
}

// verifyTCG is x509 verification that accepts the TCG profiles' critical subjectAltName
// holding a directoryName (localca.Verify), at now.
func verifyTCG(c *x509.Certificate, inter, roots *x509.CertPool, now time.Time) ([][]*x509.Certificate, error) {
	if now.IsZero() {
		return localca.Verify(c, roots, inter)
	}
	// localca.Verify checks at the current time; a verification at another time repeats its
	// one allowance here
	for _, id := range c.UnhandledCriticalExtensions {
		if !id.Equal([]int{2, 5, 29, 17}) {
			return nil, fmt.Errorf("unhandled critical extension %v", id)
		}
	}
	c.UnhandledCriticalExtensions = nil
	return c.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, CurrentTime: now, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}})
}

// VerifyCAResidency checks a host CA key's residency proof: the host AK (akPublic, a
// TPMT_PUBLIC, an attestation key) certified with TPM2_Certify (certify) the key whose public
// area is caPublic, with qualifying data localca.HostCACertifyData; that key was made in the
// TPM and cannot leave it; and caCert (the host CA's root or its operator-issued certificate)
// is over that key. It proves the CA key is in the TPM that holds the AK — as far as the AK
// itself is trusted (VerifyAKCertificate, or the AK's name in a vTPM certificate).
func VerifyCAResidency(akPublic, caPublic []byte, certify hwtpm.Attestation, caCert *x509.Certificate) (*ChainResult, error) {
	_, akKey, akName, err := parseAK(akPublic)
	if err != nil {
		return nil, err
	}
	ca, err := hwtpm.ParsePublic(caPublic)
	if err != nil {
		return nil, fmt.Errorf("%w: CA key: %w", ErrResidency, err)
	}
	if !hwtpm.IsResidentSigner(ca) {
		return nil, fmt.Errorf("%w: the CA key is not a signing key made in and fixed to its TPM", ErrResidency)
	}
	caName, err := hwtpm.PublicName(ca)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrResidency, err)
	}
	att, err := hwtpm.ParseAttest(certify.Attest, tpm2.TPMSTAttestCertify)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrResidency, err)
	}
	if err := hwtpm.VerifySignature(akKey, certify.Attest, certify.Signature); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrResidency, err)
	}
	info, err := att.Attested.Certify()
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrResidency, err)
	}
	if !bytes.Equal(info.Name.Buffer, caName) {
		return nil, fmt.Errorf("%w: the certification names key %x, not the CA key %x", ErrResidency, info.Name.Buffer, caName)
	}
	if !bytes.Equal(att.ExtraData.Buffer, localca.HostCACertifyData) {
		return nil, fmt.Errorf("%w: the certification's qualifying data is not the host CA's", ErrResidency)
	}
	caKey, err := hwtpm.CryptoPublic(ca)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrResidency, err)
	}
	if caCert == nil || !keysEqual(caCert.PublicKey, caKey) {
		return nil, fmt.Errorf("%w: the CA certificate is not over the certified key", ErrResidency)
	}
	return &ChainResult{
		Proves: []string{fmt.Sprintf("the key of CA %q was made in, and cannot leave, the TPM holding AK %s (TPM2_Certify by that AK)",
			caCert.Subject, hex.EncodeToString(akName))},
		Path: []*x509.Certificate{caCert}, AKName: akName,
	}, nil
}

// parseAK parses a host AK's TPMT_PUBLIC and checks it is an attestation key: restricted,
// signing, made in its TPM and fixed to it.
func parseAK(b []byte) (*tpm2.TPMTPublic, crypto.PublicKey, []byte, error) {
	pub, err := hwtpm.ParsePublic(b)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("%w: AK: %w", ErrInput, err)
	}
	if !hwtpm.IsAK(pub) {
		return nil, nil, nil, fmt.Errorf("%w: the AK is not a restricted signing key fixed to its TPM", ErrInput)
	}
	k, err := hwtpm.CryptoPublic(pub)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("%w: AK: %w", ErrInput, err)
	}
	name, err := hwtpm.PublicName(pub)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("%w: AK: %w", ErrInput, err)
	}
	return pub, k, name, nil
}

// VerifyAKCertificate verifies a host AK certificate (from the operator's privacy CA, issued
// after the AK activated a credential with the host's EK) up to roots, and that it is over
// the AK whose public area is akPublic, an attestation key.
func VerifyAKCertificate(cert *x509.Certificate, intermediates, roots []*x509.Certificate, akPublic []byte, now time.Time) (*ChainResult, error) {
	_, akKey, akName, err := parseAK(akPublic)
	if err != nil {
		return nil, err
	}
	if len(roots) == 0 {
		return nil, fmt.Errorf("%w: no trust anchor", ErrChain)
	}
	chains, err := cert.Verify(x509.VerifyOptions{Roots: pool(roots), Intermediates: pool(intermediates), CurrentTime: now,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}})
	if err != nil {
		return nil, fmt.Errorf("%w: AK certificate %q: %w", ErrChain, cert.Subject, err)
	}
	if !keysEqual(cert.PublicKey, akKey) {
		return nil, fmt.Errorf("%w: the AK certificate is over another key", ErrChain)
	}
	path := chains[0]
	return &ChainResult{
		Proves: []string{fmt.Sprintf("CA %q certified AK %s as a key of the TPM whose EK it checked (credential activation)",
			path[len(path)-1].Subject, hex.EncodeToString(akName))},
		Path: path, AKName: akName,
	}, nil
}

// VerifyHostCertifiedAK checks that the host AK (hostAKPublic, trusted by the caller)
// vouched for a vTPM AK (vtpmAKPublic, a TPMT_PUBLIC or TPM2B_PUBLIC): quote is the host
// AK's quote whose qualifying data is SHA-256 of the vTPM AK's TPMT_PUBLIC.
func VerifyHostCertifiedAK(hostAKPublic, vtpmAKPublic []byte, quote hwtpm.Attestation) (*ChainResult, error) {
	_, hostKey, hostName, err := parseAK(hostAKPublic)
	if err != nil {
		return nil, err
	}
	area := vtpmAKPublic
	if len(area) >= 2 && int(area[0])<<8|int(area[1]) == len(area)-2 {
		area = area[2:] // TPM2B_PUBLIC, as tpm2-tools writes it
	}
	vpub, err := hwtpm.ParsePublic(area)
	if err != nil {
		return nil, fmt.Errorf("%w: vTPM AK: %w", ErrInput, err)
	}
	vname, err := hwtpm.PublicName(vpub)
	if err != nil {
		return nil, fmt.Errorf("%w: vTPM AK: %w", ErrInput, err)
	}
	att, err := hwtpm.ParseAttest(quote.Attest, tpm2.TPMSTAttestQuote)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrHostVouch, err)
	}
	if err := hwtpm.VerifySignature(hostKey, quote.Attest, quote.Signature); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrHostVouch, err)
	}
	sum := sha256.Sum256(area)
	if !bytes.Equal(att.ExtraData.Buffer, sum[:]) {
		return nil, fmt.Errorf("%w: the quote's qualifying data is not SHA-256 of this vTPM AK", ErrHostVouch)
	}
	kind := "a signing key"
	if hwtpm.IsAK(vpub) {
		kind = "an attestation key (restricted, fixed to the vTPM)"
	}
	return &ChainResult{
		// the quote's reset and restart counts are obfuscated for a key outside the endorsement
		// hierarchy (TPM 2.0 Part 1, 36.7), so only the clock is told
		Proves: []string{fmt.Sprintf("host AK %s vouched for vTPM key %s, %s (host quote at TPM clock %d ms)",
			hex.EncodeToString(hostName), hex.EncodeToString(vname), kind, att.ClockInfo.Clock)},
		AKName: vname,
	}, nil
}

func keysEqual(a, b crypto.PublicKey) bool {
	ae, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	if !ok {
		return false
	}
	return ae.Equal(b)
}
