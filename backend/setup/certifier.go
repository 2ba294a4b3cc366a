package setup

import (
	"context"
	"crypto"
	"errors"
	"fmt"
	"log/slog"

	"github.com/vtpmd/vtpmd/backend/localca"
	"github.com/vtpmd/vtpmd/backend/setup/provision"
)

// localCertifier issues certificates with the local CA, as swtpm_localca does for
// swtpm_setup. It is built only when a certificate is asked for, so the CA is opened (and
// created on first use) only then.
type localCertifier struct {
	ca       *localca.CA
	vmid     string
	info     localca.TPMInfo
	platform localca.Platform
}

func newLocalCertifier(ctx context.Context, conf config, vmid string, info localca.TPMInfo, log *slog.Logger) (provision.Certifier, error) {
	if err := conf.checkCertTool(); err != nil {
		return nil, err
	}
	cfg, err := localca.LoadConfig(conf.caConfig)
	if err != nil {
		return nil, err
	}
	platform, err := localca.LoadOptions(conf.caOptions)
	if err != nil {
		return nil, err
	}
	ca, err := localca.Open(ctx, cfg, log)
	if err != nil {
		return nil, err
	}
	return &localCertifier{ca: ca, vmid: vmid, info: info, platform: platform}, nil
}

func (l *localCertifier) EKCertificate(ctx context.Context, ek crypto.PublicKey, sign, dec bool) ([]byte, error) {
	return l.ca.IssueEK(ctx, localca.EKRequest{PublicKey: ek, VMID: l.vmid, TPM: l.info, AllowSigning: sign, Decryption: dec})
}

func (l *localCertifier) PlatformCertificate(ctx context.Context, ek crypto.PublicKey) ([]byte, error) {
	return l.ca.IssuePlatform(ctx, localca.PlatformRequest{PublicKey: ek, VMID: l.vmid, TPM: l.info, Platform: l.platform})
}

// CertIssuer issues a vTPM's certificates in place of the local CA: the requests are the
// local CA's, with the VM's ID, the TPM's description and swtpm-localca.options' platform.
type CertIssuer interface {
	IssueEK(ctx context.Context, req localca.EKRequest) ([]byte, error)
	IssuePlatform(ctx context.Context, req localca.PlatformRequest) ([]byte, error)
}

// ErrNotIssued is what a CertIssuer answers (wrapped) when it does not certify this TPM; the
// local CA does then.
var ErrNotIssued = errors.New("the certificate issuer does not certify this TPM")

// newCertifier is the Options' CertIssuer, falling back to the local CA when it declines,
// or the local CA alone.
func newCertifier(ctx context.Context, conf config, o Options, info localca.TPMInfo, log *slog.Logger) (provision.Certifier, error) {
	local := func() (provision.Certifier, error) { return newLocalCertifier(ctx, conf, o.VMID, info, log) }
	if o.CertIssuer == nil {
		return local()
	}
	platform, err := localca.LoadOptions(conf.caOptions)
	if err != nil {
		return nil, err
	}
	return &issuerCertifier{issuer: o.CertIssuer, vmid: o.VMID, info: info, platform: platform, local: local, log: log}, nil
}

// issuerCertifier asks a CertIssuer, and the local CA once the issuer declines.
type issuerCertifier struct {
	issuer   CertIssuer
	vmid     string
	info     localca.TPMInfo
	platform localca.Platform
	local    func() (provision.Certifier, error)
	fallback provision.Certifier
	log      *slog.Logger
}

func (c *issuerCertifier) useLocal(err error) (provision.Certifier, error) {
	if c.fallback == nil {
		c.log.Info(fmt.Sprintf("  The local CA issues the certificates: %v", err))
		f, lerr := c.local()
		if lerr != nil {
			return nil, lerr
		}
		c.fallback = f
	}
	return c.fallback, nil
}

func (c *issuerCertifier) EKCertificate(ctx context.Context, ek crypto.PublicKey, sign, dec bool) ([]byte, error) {
	if c.fallback == nil {
		der, err := c.issuer.IssueEK(ctx, localca.EKRequest{PublicKey: ek, VMID: c.vmid, TPM: c.info, AllowSigning: sign, Decryption: dec})
		if !errors.Is(err, ErrNotIssued) {
			return der, err
		}
		if _, err := c.useLocal(err); err != nil {
			return nil, err
		}
	}
	return c.fallback.EKCertificate(ctx, ek, sign, dec)
}

func (c *issuerCertifier) PlatformCertificate(ctx context.Context, ek crypto.PublicKey) ([]byte, error) {
	if c.fallback == nil {
		der, err := c.issuer.IssuePlatform(ctx, localca.PlatformRequest{PublicKey: ek, VMID: c.vmid, TPM: c.info, Platform: c.platform})
		if !errors.Is(err, ErrNotIssued) {
			return der, err
		}
		if _, err := c.useLocal(err); err != nil {
			return nil, err
		}
	}
	return c.fallback.PlatformCertificate(ctx, ek)
}
