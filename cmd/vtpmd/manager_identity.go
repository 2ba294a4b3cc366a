package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/vtpmd/vtpmd/backend/localca"
	"github.com/vtpmd/vtpmd/backend/setup"
	"github.com/vtpmd/vtpmd/manager"
)

// identityCommands are the host identity's subcommands of `vtpmd manager`.
func identityCommands() []*cli.Command {
	return []*cli.Command{
		{
			Name: "identity", Usage: "the host's hardware identity: AK, EK, CA and TLS certificates (JSON; --out writes PEM and TPM files)",
			Flags: []cli.Flag{clientSocketFlag, &cli.StringFlag{Name: "out", Usage: "directory to write the identity's files into"}},
			Action: func(c *cli.Context) error {
				id, err := managerClient(c).HostIdentity(c.Context)
				if err != nil {
					return exitOnError(err)
				}
				if dir := c.String("out"); dir != "" {
					names, err := manager.WriteIdentityFiles(dir, id)
					if err != nil {
						return exitOnError(err)
					}
					return printJSON(map[string]any{"dir": dir, "files": names})
				}
				return printJSON(id)
			},
		},
		{
			Name:  "certify-host",
			Usage: "operator's privacy CA: check the host AK with the EK (credential activation) and the CA key's residency, then certify both",
			Flags: []cli.Flag{clientSocketFlag,
				&cli.StringFlag{Name: "ca-cert", Required: true, Usage: "PEM certificate of the operator's CA"},
				&cli.StringFlag{Name: "ca-key", Required: true, Usage: "PEM private key of the operator's CA"},
				&cli.StringFlag{Name: "ca-chain", Usage: "PEM issuers of the operator's CA up to its root (when it is not a root)"},
				&cli.StringFlag{Name: "ek-roots", Usage: "PEM TPM manufacturer CAs the hardware EK certificate must chain to"},
				&cli.IntFlag{Name: "days", Usage: "validity of the certificates (default 3650, at most the CA's)"}},
			Action: func(c *cli.Context) error {
				res, err := manager.CertifyHost(c.Context, manager.CertifyHostConfig{Socket: c.String("socket"),
					CACert: c.String("ca-cert"), CAKey: c.String("ca-key"), CAChain: c.String("ca-chain"), EKRoots: c.String("ek-roots"),
					Validity: daysFlag(c.Int("days"))})
				if err != nil {
					return exitOnError(err)
				}
				return printJSON(res)
			},
		},
		{
			Name:  "certify-vtpm-ak",
			Usage: "have the hardware AK vouch for a vTPM's AK: a host quote with qualifying data SHA-256(the AK's TPMT_PUBLIC)",
			Flags: []cli.Flag{clientSocketFlag,
				&cli.StringFlag{Name: "ak-public", Required: true, Usage: "the vTPM AK's public area (TPM2B_PUBLIC as tpm2_createak -u writes it, or TPMT_PUBLIC)"},
				&cli.StringFlag{Name: "pcrs", Value: "0", Usage: "host SHA-256 PCRs to quote, e.g. 0,7"},
				&cli.StringFlag{Name: "out", Usage: "file for the quote (JSON); default standard output"}},
			Action: func(c *cli.Context) error {
				pcrs, err := parsePCRList(c.String("pcrs"))
				if err != nil {
					return cli.Exit("--pcrs: "+err.Error(), 1)
				}
				pub, err := os.ReadFile(c.String("ak-public"))
				if err != nil {
					return exitOnError(err)
				}
				if len(pub) >= 2 && int(pub[0])<<8|int(pub[1]) == len(pub)-2 {
					pub = pub[2:]
				}
				q, err := managerClient(c).CertifyVTPMAK(c.Context, manager.AKCertifyRequest{AKPublic: pub, PCRs: pcrs})
				if err != nil {
					return exitOnError(err)
				}
				if out := c.String("out"); out != "" {
					b, _ := json.MarshalIndent(q, "", "  ")
					return exitOnError(os.WriteFile(out, b, 0o644))
				}
				return printJSON(q)
			},
		},
	}
}

func daysFlag(d int) time.Duration { return time.Duration(d) * 24 * time.Hour }

func parsePCRList(s string) ([]int, error) {
	var out []int
	for _, f := range strings.Split(s, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil {
			return nil, err
		}
		out = append(out, n)
	}
	return out, nil
}

// setupManagerCerts is the certificate issuer of vtpmd setup on a host whose manager answers
// (the same condition as setupManagerKeys): the manager's TPM-resident CA issues the EK and
// platform certificates of the vTPMs it protects; the local CA those of others.
func setupManagerCerts(statePath string) setup.CertIssuer {
	sock := setupManagerSocket()
	if statePath == "" || sock == "" || !manager.Available(sock) {
		return nil
	}
	return declining{manager.CertIssuer{Client: manager.NewClient(sock), StatePath: statePath}}
}

// setupManagerSocket is the manager socket of vtpmd setup: the default one, another named
// by VTPMD_MANAGER=/path (a second manager, tests; libvirt's sanitized environment has none),
// or "" for VTPMD_MANAGER=none.
func setupManagerSocket() string {
	switch v := os.Getenv(managerEnv); {
	case v == "none":
		return ""
	case strings.HasPrefix(v, "/"):
		return v
	}
	return manager.DefaultSocket
}

// declining turns the manager's "not mine" answers into setup.ErrNotIssued.
type declining struct{ manager.CertIssuer }

func (d declining) IssueEK(ctx context.Context, req localca.EKRequest) ([]byte, error) {
	b, err := d.CertIssuer.IssueEK(ctx, req)
	return b, decline(err)
}

func (d declining) IssuePlatform(ctx context.Context, req localca.PlatformRequest) ([]byte, error) {
	b, err := d.CertIssuer.IssuePlatform(ctx, req)
	return b, decline(err)
}

func decline(err error) error {
	if errors.Is(err, manager.ErrNotEnrolled) || errors.Is(err, manager.ErrNoHostIdentity) {
		return fmt.Errorf("%w: %w", setup.ErrNotIssued, err)
	}
	return err
}
