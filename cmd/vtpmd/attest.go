package main

import (
	"os"

	"github.com/urfave/cli/v2"

	"github.com/vtpmd/vtpmd/manager/attest"
)

// attestCommand groups the attestation verifier's subcommands.
func attestCommand() *cli.Command {
	return &cli.Command{
		Name:        "attest",
		Usage:       "verify a guest's deep attestation (no TPM needed)",
		Subcommands: []*cli.Command{attestVerifyCommand()},
	}
}

// attestVerifyCommand checks a guest's vTPM quote and the host's report (read by the guest
// from NV 0x01400001) against the host AK, its event log and the nonce.
func attestVerifyCommand() *cli.Command {
	return &cli.Command{
		Name:  "verify",
		Usage: "check a guest's vTPM quote and its host report; print what is proven",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "quote", Required: true, Usage: "the guest's quote: TPMS_ATTEST (tpm2_quote -m)"},
			&cli.StringFlag{Name: "signature", Required: true, Usage: "its signature: TPMT_SIGNATURE (tpm2_quote -s)"},
			&cli.StringFlag{Name: "ak", Required: true, Usage: "the guest AK's public key: TPM2B_PUBLIC (tpm2_createak -u)"},
			&cli.StringFlag{Name: "report", Required: true, Usage: "the report the guest read from NV 0x01400001"},
			&cli.StringFlag{Name: "nonce", Usage: "the nonce given to the guest, in hex"},
			&cli.StringFlag{Name: "nonce-file", Usage: "the nonce given to the guest, raw bytes in a file"},
			&cli.StringFlag{Name: "host-ak-cert", Usage: "the host AK's certificate (PEM or DER; with --ca)"},
			&cli.StringFlag{Name: "host-ak", Usage: "the host AK's public key (TPM2B_PUBLIC or PEM), trusted as given"},
			&cli.StringFlag{Name: "ca", Usage: "trust anchors (PEM): the operator roots for --host-ak-cert, the identity's AK certificate and --ek-cert"},
			&cli.StringFlag{Name: "eventlog", Required: true, Usage: "the host's TCG event log (binary_bios_measurements)"},
			&cli.StringFlag{Name: "host-identity", Usage: "the host identity directory (vtpmd manager identity --out): host AK, its certificate, the host CA and its residency proof"},
			&cli.StringFlag{Name: "ek-cert", Usage: "the vTPM's EK certificate (PEM or DER), checked up to --ca or the host CA's root"},
			&cli.StringFlag{Name: "host-ak-certify", Usage: "the host's quote over the guest AK (vtpmd manager certify-vtpm-ak --out)"},
			&cli.StringFlag{Name: "ek", Usage: "the vTPM EK expected (TPM2B_PUBLIC, or its name in hex)"},
			&cli.StringFlag{Name: "vm", Usage: "the VM UUID expected"},
			&cli.BoolFlag{Name: "json", Usage: "print JSON"},
		},
		Action: func(c *cli.Context) error {
			f := attest.Files{
				Quote: c.String("quote"), Signature: c.String("signature"), AKPublic: c.String("ak"),
				Report: c.String("report"), Nonce: c.String("nonce"), NonceFile: c.String("nonce-file"),
				HostAKCert: c.String("host-ak-cert"), HostAKPublic: c.String("host-ak"), TrustAnchors: c.String("ca"),
				EventLog: c.String("eventlog"), HostIdentity: c.String("host-identity"), EKCert: c.String("ek-cert"),
				HostAKCertify: c.String("host-ak-certify"), ExpectEK: c.String("ek"), ExpectVM: c.String("vm"), JSON: c.Bool("json"),
			}
			if err := attest.VerifyFiles(f, os.Stdout); err != nil {
				return cli.Exit("vtpmd attest verify: NOT VERIFIED: "+err.Error(), 1)
			}
			return nil
		},
	}
}
