package attest

import (
	"crypto"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"time"

	"github.com/vtpmd/vtpmd/manager/eventlog"
)

// trustedKey is the host AK as the verifier trusts it: its key, its TPM name when known,
// and how it came to be trusted.
type trustedKey struct {
	key  crypto.PublicKey
	name []byte
	area []byte // its TPMT_PUBLIC, when known
	how  string
}

// hostKey finds the host AK from the evidence: a certificate that chains to the trust anchors,
// or a public key given on trust.
func hostKey(ev Evidence, rep *Report) (*trustedKey, error) {
	switch {
	case len(ev.HostAKCert) > 0:
		return hostKeyFromCert(ev)
	case len(ev.HostAKPublic) > 0:
		if p, err := ParsePublic(ev.HostAKPublic); err == nil {
			return &trustedKey{key: p.Key, name: p.Name, area: p.Area, how: "its public key given to the verifier"}, nil
		}
		der := ev.HostAKPublic
		if blk, _ := pem.Decode(der); blk != nil {
			der = blk.Bytes
		}
		k, err := x509.ParsePKIXPublicKey(der)
		if err != nil {
			return nil, fmt.Errorf("%w: host AK public key: neither a TPM2B_PUBLIC nor a PKIX public key: %w", ErrHostKey, err)
		}
		return &trustedKey{key: k, how: "its public key given to the verifier"}, nil
	}
	return nil, fmt.Errorf("%w: the host AK's certificate (with trust anchors) or public key is needed", ErrInput)
}

// hostKeyFromCert verifies the host AK certificate up to the trust anchors. With the AK's
// public area too, the certificate must be over that AK (VerifyAKCertificate), whose TPM name
// the report must then carry.
func hostKeyFromCert(ev Evidence) (*trustedKey, error) {
	certs, err := CertPEMs(ev.HostAKCert)
	if err != nil || len(certs) == 0 {
		return nil, fmt.Errorf("%w: host AK certificate: %v", ErrHostKey, err)
	}
	anchors, err := CertPEMs(ev.TrustAnchors)
	if err != nil || len(anchors) == 0 {
		return nil, fmt.Errorf("%w: trust anchors (--ca) are needed with a certificate: %v", ErrInput, err)
	}
	now := ev.Now
	if now.IsZero() {
		now = time.Now()
	}
	if len(ev.HostAKPublic) > 0 {
		p, err := ParsePublic(ev.HostAKPublic)
		if err != nil {
			return nil, fmt.Errorf("%w: host AK: %w", ErrHostKey, err)
		}
		res, err := VerifyAKCertificate(certs[0], certs[1:], anchors, p.Area, now)
		if err != nil {
			return nil, fmt.Errorf("%w: %w", ErrHostKey, err)
		}
		return &trustedKey{key: p.Key, name: p.Name, area: p.Area, how: res.Proves[0]}, nil
	}
	chains, err := certs[0].Verify(x509.VerifyOptions{Roots: pool(anchors), Intermediates: pool(certs[1:]), CurrentTime: now,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}})
	if err != nil {
		return nil, fmt.Errorf("%w: host AK certificate: %w", ErrHostKey, err)
	}
	return &trustedKey{key: certs[0].PublicKey,
		how: fmt.Sprintf("certificate %q, chained to trust anchor %q", certs[0].Subject, chains[0][len(chains[0])-1].Subject)}, nil
}

// replayLog replays the host's event log and returns the values of the selected PCRs (in
// ascending order) and the number of events.
func replayLog(log []byte, sel PCRSelection) ([][]byte, int, error) {
	l, err := eventlog.Parse(log)
	if err != nil {
		return nil, 0, err
	}
	all, err := l.Replay(sel.Hash)
	if err != nil {
		return nil, 0, err
	}
	var out [][]byte
	for _, p := range sel.PCRs() {
		if p >= len(all) {
			return nil, 0, fmt.Errorf("PCR %d is outside the log's PCRs", p)
		}
		out = append(out, all[p])
	}
	return out, len(l.Events), nil
}

// verifyChains walks the certificate chains given beside the report: the host CA key's
// residency with the host AK, the vTPM's EK certificate, the host's direct vouching for the
// guest's AK. Each adds what it proves to res.
func verifyChains(ev Evidence, rep *Report, host *trustedKey, ak *Public, res *Result) error {
	anchors, err := CertPEMs(ev.TrustAnchors)
	if err != nil {
		return fmt.Errorf("%w: --ca: %w", ErrInput, err)
	}
	var caRoot *x509.Certificate
	if len(ev.CAPublic) > 0 {
		if host.area == nil {
			return fmt.Errorf("%w: the host CA's residency needs the host AK's public area (--host-ak or the identity's ak.pub)", ErrInput)
		}
		roots, err := CertPEMs(ev.CARoot)
		if err != nil || len(roots) != 1 {
			return fmt.Errorf("%w: the host CA's root certificate: %v", ErrInput, err)
		}
		caPub, err := ParsePublic(ev.CAPublic)
		if err != nil {
			return fmt.Errorf("host CA key: %w", err)
		}
		r, err := VerifyCAResidency(host.area, caPub.Area, ev.CACertify, roots[0])
		if err != nil {
			return err
		}
		caRoot = roots[0]
		res.Proven = append(res.Proven, r.Proves...)
	}
	if len(ev.EKCert) > 0 {
		certs, err := CertPEMs(ev.EKCert)
		if err != nil || len(certs) == 0 {
			return fmt.Errorf("%w: the vTPM's EK certificate: %v", ErrChain, err)
		}
		inter, err := CertPEMs(append(append([]byte{}, ev.CACert...), ev.CAChain...))
		if err != nil {
			return fmt.Errorf("%w: the host CA's certificates: %w", ErrInput, err)
		}
		roots := anchors
		if caRoot != nil {
			roots = append(roots, caRoot)
		}
		want := VTPMCertExpect{HostAKName: rep.HostAKName, VMUUID: res.VMUUID, Now: ev.Now}
		if len(ev.ExpectEK) > 0 {
			if p, err := ParsePublic(ev.ExpectEK); err == nil {
				want.EKPublic = p.Area
			}
		}
		r, err := VerifyVTPMCertificate(certs[0], append(certs[1:], inter...), roots, want)
		if err != nil {
			return err
		}
		res.Proven = append(res.Proven, r.Proves...)
		if want.EKPublic == nil {
			res.NotProven = append(res.NotProven, "that the EK certificate is over the report's EK: pass the EK's public area (--ek)")
		}
	}
	if ev.HostAKCertify != nil {
		if host.area == nil {
			return fmt.Errorf("%w: the host's quote over the guest AK needs the host AK's public area", ErrInput)
		}
		r, err := VerifyHostCertifiedAK(host.area, ak.Area, *ev.HostAKCertify)
		if err != nil {
			return err
		}
		res.Proven = append(res.Proven, r.Proves...)
	}
	return nil
}
