package setup

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/vtpmd/vtpmd/backend/localca"
	"github.com/vtpmd/vtpmd/backend/setup/provision"
)

// manufactureConfig reads the configuration and the state key and turns the options into
// what Manufacture makes.
func (s *session) manufactureConfig(ctx context.Context, state string) (ManufactureConfig, error) {
	o := s.opts
	conf, err := loadConfig(o.ConfigFile)
	if err != nil {
		return ManufactureConfig{}, s.fail(err)
	}
	keys, keyMsg, err := stateKey(ctx, o)
	if err != nil {
		return ManufactureConfig{}, s.fail(err)
	}
	if keyMsg != "" {
		s.log.Info(keyMsg)
	}
	po, err := s.provisionOptions(conf)
	if err != nil {
		return ManufactureConfig{}, err
	}
	what := "manufacturing"
	if o.Reconfigure {
		what = "reconfiguration"
	}
	return ManufactureConfig{
		StateURI: state, TPM2: o.TPM2, StateKey: keys.State, RecordVersion: keys.RecordVersion,
		Overwrite: o.Overwrite, NotOverwrite: o.NotOverwrite, Reconfigure: o.Reconfigure,
		Provision:   po,
		Provision12: provision12Options(o, po.CreateEK),
		NewCertifier: func(ctx context.Context, info localca.TPMInfo) (provision.Certifier, error) {
			return newCertifier(ctx, conf, o, info, s.log)
		},
		Started: func() {
			s.log.Info(fmt.Sprintf("Starting vTPM %s as %s @ %s", what, currentUserGroup(), logTime()))
		},
		Log: s.log,
	}, nil
}

// provisionOptions is what to make in a TPM 2, with the PCR banks and EK algorithms
// defaulted from the configuration.
func (s *session) provisionOptions(conf config) (provision.Options, error) {
	o := s.opts
	banks, err := s.pcrBanks(conf)
	if err != nil {
		return provision.Options{}, err
	}
	bits, err := s.rsaKeyBits()
	if err != nil {
		return provision.Options{}, err
	}
	// as swtpm_setup 0.7.1 does (its help text says otherwise): --create-platform-cert makes
	// the EKs and the platform certificate, not the EK certificates
	return provision.Options{
		CreateEK:     o.CreateEK || o.CreateEKCert || o.CreatePlatformCert,
		RSAKeyBits:   bits,
		EK1:          stringOr(o.EK1KeyAlgo, conf.ek1),
		EK2:          stringOr(o.EK2KeyAlgo, conf.ek2),
		AllowSigning: o.AllowSigning,
		Decryption:   o.Decryption,
		EKCert:       o.CreateEKCert,
		PlatformCert: o.CreatePlatformCert,
		LockNVRAM:    o.LockNVRAM,
		CreateSPK:    o.CreateSPK,
		SPKECC:       o.ECC,
		PCRBanks:     banks,
	}, nil
}

// provision12Options is what to make in a TPM 1.2.
func provision12Options(o Options, createEK bool) provision.Options12 {
	return provision.Options12{
		CreateEK:      createEK || o.TakeOwnership,
		TakeOwnership: o.TakeOwnership,
		OwnerAuth:     provision.Secret12(stringOr(o.OwnerPassword, provision.DefaultOwnerPassword), o.OwnerWellKnown),
		SRKAuth:       provision.Secret12(stringOr(o.SRKPassword, provision.DefaultSRKPassword), o.SRKWellKnown),
		EKCert:        o.CreateEKCert,
		PlatformCert:  o.CreatePlatformCert,
		LockNVRAM:     o.LockNVRAM,
	}
}

// pcrBanks is the banks a TPM 2 keeps active (nil for a TPM 1.2 or '-', all). As
// swtpm_setup: an empty list falls back to the configured active_pcr_banks, then sha256;
// unknown names are dropped; a list left empty by that is an error.
func (s *session) pcrBanks(conf config) ([]string, error) {
	if !s.opts.TPM2 {
		return nil, nil
	}
	banks := s.opts.PCRBanks
	for _, def := range []string{conf.activeBanks, "sha256"} {
		if strings.Trim(banks, ",") == "" {
			banks = def
		}
	}
	parsed, err := provision.ParseBanks(banks)
	if err != nil {
		return nil, s.fail(err)
	}
	if parsed != nil && len(parsed) == 0 {
		return nil, s.failf("No PCR banks could be allocated. None of the selected algorithms are supported.")
	}
	return parsed, nil
}

// rsaKeyBits is --rsa-keysize: 2048 by default, max is 3072 for a TPM 2 (2048 for a TPM 1.2).
func (s *session) rsaKeyBits() (int, error) {
	v := s.opts.RSAKeySize
	switch {
	case v == "":
		return 2048, nil
	case v == "max" && s.opts.TPM2:
		return 3072, nil
	case v == "max":
		return 2048, nil
	}
	if bits, err := strconv.Atoi(v); err == nil && (bits == 2048 || bits == 3072) {
		return bits, nil
	}
	// swtpm_setup logs this one as information, not as an error
	msg := fmt.Sprintf("Unsupported RSA key size %s.", v)
	s.log.Info(msg)
	return 0, failed(errors.New(msg))
}
