package setup

import (
	"context"
	"crypto"
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
