package qemu

import (
	"context"
	"crypto"
	"fmt"
	"log/slog"
	"path/filepath"

	"github.com/vtpmd/vtpmd/backend/localca"
	"github.com/vtpmd/vtpmd/backend/setup"
	"github.com/vtpmd/vtpmd/backend/setup/provision"
)

// vmID names the TPM in its certificates' subject.
const vmID = "vtpmd-run"

// caConfig is a local CA in dir, laid out as swtpm-localca's default one.
func caConfig(dir string) localca.Config {
	return localca.Config{
		StateDir:   dir,
		SigningKey: filepath.Join(dir, "signkey.pem"),
		IssuerCert: filepath.Join(dir, "issuercert.pem"),
		CertSerial: filepath.Join(dir, "certserial"),
	}
}

// certifier issues EK and platform certificates with a local CA.
type certifier struct {
	ca   *localca.CA
	info localca.TPMInfo
}

func (c *certifier) EKCertificate(ctx context.Context, ek crypto.PublicKey, sign, dec bool) ([]byte, error) {
	return c.ca.IssueEK(ctx, localca.EKRequest{PublicKey: ek, VMID: vmID, TPM: c.info, AllowSigning: sign, Decryption: dec})
}

func (c *certifier) PlatformCertificate(ctx context.Context, ek crypto.PublicKey) ([]byte, error) {
	return c.ca.IssuePlatform(ctx, localca.PlatformRequest{PublicKey: ek, VMID: vmID, TPM: c.info, Platform: localca.DefaultPlatform})
}

// manufacture makes the TPM in stateDir unless it holds one of this version already: EKs,
// their certificates and a platform certificate from the CA in caDir, the certificate
// indices locked, the TPM 2's PCR banks reduced to c.PCRBanks; what libvirt asks of
// swtpm_setup. It reports whether it made a TPM.
func manufacture(ctx context.Context, c *Config, stateDir, caDir string, log *slog.Logger) (bool, error) {
	res, err := setup.Manufacture(ctx, setup.ManufactureConfig{
		StateURI:     "dir://" + stateDir,
		TPM2:         c.TPM2,
		NotOverwrite: true,
		Provision: provision.Options{
			CreateEK: true, EKCert: true, PlatformCert: true, LockNVRAM: true, PCRBanks: c.PCRBanks,
		},
		Provision12: provision.Options12{CreateEK: true, EKCert: true, PlatformCert: true, LockNVRAM: true},
		NewCertifier: func(ctx context.Context, info localca.TPMInfo) (provision.Certifier, error) {
			ca, err := localca.Open(ctx, caConfig(caDir), log)
			if err != nil {
				return nil, fmt.Errorf("local CA %s: %w", caDir, err)
			}
			return &certifier{ca: ca, info: info}, nil
		},
		Log: log,
	})
	if err != nil {
		return false, fmt.Errorf("manufacture the TPM in %s: %w", stateDir, err)
	}
	return !res.Kept, nil
}
