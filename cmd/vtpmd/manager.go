package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/urfave/cli/v2"

	"github.com/vtpmd/vtpmd/backend/seam"
	"github.com/vtpmd/vtpmd/internal/daemon"
	"github.com/vtpmd/vtpmd/manager"
)

func managerCommand() *cli.Command {
	socketFlag := &cli.StringFlag{Name: "listen", Value: manager.DefaultSocket, Usage: "the manager's API socket"}
	return &cli.Command{
		Name:  "manager",
		Usage: "the host manager: owns the hardware TPM, seals every vTPM's state key to it",
		Flags: append([]cli.Flag{
			&cli.StringFlag{Name: "tpm", Value: "device:/dev/tpmrm0", Usage: "hardware TPM: device:PATH, swtpm:path=SOCK or mssim:host=H,port=P"},
			&cli.StringFlag{Name: "dir", Value: manager.DefaultDir, Usage: "the manager's records"},
			socketFlag,
			&cli.StringFlag{Name: "group", Value: "tss", Usage: "group of the API socket (the vTPM processes' group; empty: unchanged)"},
			&cli.BoolFlag{Name: "auto-enroll", Usage: "enrol every new vTPM (empty state) that asks for a key"},
			&cli.StringFlag{Name: "policy", Value: "none", Usage: "unseal policy: none, or pcr:BANK:N,N,... (host PCRs)"},
			&cli.StringFlag{Name: "recovery-key", Usage: "PEM file of the operator's RSA recovery public key"},
			&cli.StringFlag{Name: "nv-index", Value: fmt.Sprintf("0x%08x", manager.DefaultCounterIndex), Usage: "hardware NV index of the ledger counter"},
			&cli.StringFlag{Name: "registry", Usage: "registry directory (default /var/lib/vtpmd/registry)"},
			&cli.StringFlag{Name: "eventlog", Value: manager.DefaultEventLog, Usage: "the host's TCG event log (host PCR projection: mirror, property)"},
			&cli.StringFlag{Name: "property-policy", Usage: "the operator's property policy file (JSON; host PCR projection mode property)"},
			&cli.GenericFlag{Name: "log", Value: &optFlag{allowed: daemon.LogOptions}, Usage: "file=<path>|fd=<n>[,level=<n>]"},
		}, migrationFlags()...),
		Subcommands: managerSubcommands(),
		Action: func(c *cli.Context) error {
			idx, err := strconv.ParseUint(c.String("nv-index"), 0, 32)
			if err != nil {
				return cli.Exit("--nv-index: "+err.Error(), 1)
			}
			mc, err := migrationConfig(c)
			if err != nil {
				return cli.Exit(err.Error(), 1)
			}
			lg, err := daemon.OpenLog(c.Generic("log").(*optFlag).set)
			if err != nil {
				return cli.Exit(err.Error(), 1)
			}
			defer lg.Close()
			log := lg.Logger
			return exitOnError(manager.Run(c.Context, manager.RunConfig{
				TPM: c.String("tpm"), Dir: c.String("dir"), Listen: c.String("listen"), Group: c.String("group"),
				AutoEnroll: c.Bool("auto-enroll"), Policy: c.String("policy"), RecoveryKey: c.String("recovery-key"),
				CounterIndex: uint32(idx), RegistryDir: c.String("registry"), Migration: mc, Log: log,
				Projection: manager.ProjectionConfig{EventLog: c.String("eventlog"), PropertyPolicy: c.String("property-policy")},
			}))
		},
	}
}

func managerSubcommands() []*cli.Command {
	return append([]*cli.Command{
		vmRequestCommand("enroll", "seal a new key for an existing vTPM and re-encrypt its state in place (VM stopped)", (*manager.Client).Enroll),
		vmRequestCommand("unenroll", "decrypt a vTPM's state back to plain files (or --key) and forget its key (VM stopped)", (*manager.Client).Unenroll),
		vmRequestCommand("accept", "let an older (rolled back) state start once, as the new record", (*manager.Client).Accept),
		{
			Name: "status", Usage: "the manager's view of every enrolled vTPM (JSON)", Flags: []cli.Flag{clientSocketFlag},
			Action: func(c *cli.Context) error {
				st, err := managerClient(c).Status(c.Context)
				if err != nil {
					return exitOnError(err)
				}
				return printJSON(st)
			},
		},
		{
			Name: "recover", Usage: "bring a vTPM enrolled on a failed host to this host's manager with the recovery private key",
			ArgsUsage: "VM (record ID, UUID, name or old state path)",
			Flags: []cli.Flag{clientSocketFlag,
				&cli.StringFlag{Name: "ledger", Required: true, Usage: "the failed host's ledger.json (a copy or backup)"},
				&cli.StringFlag{Name: "recovery-private-key", Required: true, Usage: "PEM file of the recovery private key"},
				&cli.StringFlag{Name: "state", Usage: "where the vTPM's state lives on this host (default: the old path)"}},
			Action: func(c *cli.Context) error {
				if c.NArg() != 1 {
					return cli.Exit("name one VM", 1)
				}
				st, err := managerClient(c).Recover(c.Context, manager.RecoverRequest{Ledger: c.String("ledger"),
					PrivateKey: c.String("recovery-private-key"), VM: c.Args().First(), StatePath: c.String("state")})
				if err != nil {
					return exitOnError(err)
				}
				return printJSON(st)
			},
		},
	}, identityCommands()...)
}

// managerClient is the client of the manager named by --socket.
func managerClient(c *cli.Context) *manager.Client { return manager.NewClient(c.String("socket")) }

var clientSocketFlag = &cli.StringFlag{Name: "socket", Value: manager.DefaultSocket, Usage: "the manager's API socket"}

func vmRequestCommand(name, usage string, call func(*manager.Client, context.Context, manager.VMRequest) (*manager.VMStatus, error)) *cli.Command {
	return &cli.Command{
		Name: name, Usage: usage, ArgsUsage: "VM (UUID, name or state directory)",
		Flags: []cli.Flag{clientSocketFlag, &cli.StringFlag{Name: "key", Usage: "the state's own key (swtpm --key syntax): now (enroll) or afterwards (unenroll)"}},
		Action: func(c *cli.Context) error {
			if c.NArg() != 1 {
				return cli.Exit("name one VM", 1)
			}
			st, err := call(managerClient(c), c.Context, manager.VMRequest{VM: c.Args().First(), Source: c.String("key")})
			if err != nil {
				return exitOnError(err)
			}
			return printJSON(st)
		},
	}
}

func printJSON(v any) error {
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func exitOnError(err error) error {
	if err == nil {
		return nil
	}
	return cli.Exit("vtpmd manager: "+err.Error(), 1)
}

// managerEnv=none keeps vtpmd setup (which has swtpm_setup's options only) away from the
// host's manager, as --manager none does for vtpmd socket.
const managerEnv = "VTPMD_MANAGER"

// setupManagerKeys is the key source of vtpmd setup (swtpm_setup) on a host whose manager's
// socket exists: a new vTPM is enrolled as it is made (auto-enrolment), so its very first
// state is sealed. swtpm_setup has no option for it; libvirt runs it with a sanitized
// environment, so the default socket is the one place to look.
func setupManagerKeys(statePath string, tpm2 bool) seam.KeySource {
	sock := setupManagerSocket()
	if statePath == "" || sock == "" || !manager.Available(sock) {
		return nil
	}
	uri := statePath
	if !strings.Contains(uri, "://") {
		uri = "dir://" + uri
	}
	return &manager.KeySource{Client: manager.NewClient(sock), StateURI: uri, TPM2: tpm2, Synchronous: true}
}
