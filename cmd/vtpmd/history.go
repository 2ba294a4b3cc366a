package main

import (
	"encoding/json"
	"fmt"
	"os"
	"text/tabwriter"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/vtpmd/vtpmd/manager"
)

// migrationFlags are `vtpmd manager`'s secure-migration options.
func migrationFlags() []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: "migration-listen", Usage: "TLS listener (HOST:PORT) where other hosts' managers fetch migration keys"},
		&cli.StringFlag{Name: "migration-address", Usage: "address other managers reach this one at, carried in sealed blobs (default: --migration-listen; its port on this host's name when it listens on every address)"},
		&cli.StringFlag{Name: "migration-policy", Value: manager.PolicySealed, Usage: "sealed (seal outgoing state, refuse plain), allow-plain (also accept plain, with a warning) or plain (seal nothing)"},
		&cli.StringFlag{Name: "migration-webhook", Usage: "URL that receives every migration event (JSON POST)"},
		&cli.StringFlag{Name: "migration-cert", Usage: "PEM certificate chain of an operator-CA identity (default: the host's hardware identity)"},
		&cli.StringFlag{Name: "migration-cert-key", Usage: "PEM private key of that identity"},
		&cli.StringFlag{Name: "migration-trust", Usage: "PEM CA certificates that identity trusts"},
	}
}

// migrationConfig turns the migration options into the manager's configuration.
func migrationConfig(c *cli.Context) (manager.MigrationConfig, error) {
	mc := manager.MigrationConfig{Listen: c.String("migration-listen"), Address: c.String("migration-address"),
		Policy: c.String("migration-policy"), Webhook: c.String("migration-webhook")}
	if _, err := manager.ParseMigrationPolicy(mc.Policy); err != nil {
		return mc, err
	}
	cert, key, trust := c.String("migration-cert"), c.String("migration-cert-key"), c.String("migration-trust")
	switch {
	case cert == "" && key == "" && trust == "":
	case cert == "" || key == "" || trust == "":
		return mc, fmt.Errorf("--migration-cert, --migration-cert-key and --migration-trust go together")
	default:
		id, err := manager.LoadIdentityFiles(cert, key, trust)
		if err != nil {
			return mc, err
		}
		mc.Identity = id
	}
	return mc, nil
}

// historyCommand is `vtpmd history VM`: the moves of a vTPM as this host's manager recorded
// them, and the operator's override for an older saved state (accept).
func historyCommand() *cli.Command {
	return &cli.Command{
		Name:      "history",
		Usage:     "the migrations (moves, restores) of a VM's vTPM recorded by this host's manager",
		ArgsUsage: "VM (UUID, name or state directory; none: every VM)",
		Flags: []cli.Flag{clientSocketFlag, &cli.BoolFlag{Name: "json", Usage: "print JSON"},
			&cli.BoolFlag{Name: "follow", Usage: "then print each new move as it happens (one JSON object a line), until interrupted"}},
		Action: func(c *cli.Context) error {
			if c.NArg() > 1 {
				return cli.Exit("name at most one VM", 1)
			}
			if c.Bool("follow") {
				return followHistory(c)
			}
			h, err := managerClient(c).History(c.Context, c.Args().First())
			if err != nil {
				return historyExit(err)
			}
			if c.Bool("json") {
				return printJSON(h.Entries)
			}
			return printHistory(h.Entries)
		},
		Subcommands: []*cli.Command{{
			Name:      "accept",
			Usage:     "let an older saved state of this VM be restored, or its moved-away vTPM run here, once",
			ArgsUsage: "VM (UUID, name or state directory)",
			Flags:     []cli.Flag{clientSocketFlag},
			Action: func(c *cli.Context) error {
				if c.NArg() != 1 {
					return cli.Exit("name one VM", 1)
				}
				return historyExit(managerClient(c).AcceptMigration(c.Context, c.Args().First()))
			},
		}},
	}
}

func printHistory(es []manager.HistoryEntry) error {
	if len(es) == 0 {
		fmt.Println("no migration recorded")
		return nil
	}
	w := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "TIME\tKIND\tVM\tSOURCE\tDESTINATION\tMOVES\tSTATE DIGEST\tTICKET")
	for _, e := range es {
		vm := e.Name
		if vm == "" {
			vm = e.VM
		}
		if vm == "" {
			vm = e.StatePath
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%d\t%s\t%s\n", e.Time.Format(time.RFC3339), e.Kind, vm,
			host(e.SourceSubject, e.Source), host(e.DestinationSubject, e.Destination), e.Moves, short(e.StateDigest), e.Ticket)
	}
	return w.Flush()
}

// host names a host identity: its certificate subject and the start of its key digest.
func host(subject, id string) string { return subject + " [" + short(id) + "]" }

func short(s string) string {
	if len(s) > 16 {
		return s[:16]
	}
	return s
}

// followHistory prints the moves the manager announces from now on (its event stream), one
// JSON history entry a line, for the VM named (or every VM).
func followHistory(c *cli.Context) error {
	vm := c.Args().First()
	enc := json.NewEncoder(os.Stdout)
	err := managerClient(c).Events(c.Context, func(e manager.Event) bool {
		if e.Type == "subscribed" {
			fmt.Fprintln(os.Stderr, "vtpmd history: following the manager's announcements")
			return true
		}
		h := e.History
		if e.Type != "migration" || vm != "" && vm != h.VM && vm != h.Name && vm != h.StatePath {
			return true
		}
		return enc.Encode(h) == nil
	})
	if err != nil && c.Context.Err() == nil {
		return historyExit(err)
	}
	return nil
}

func historyExit(err error) error {
	if err == nil {
		return nil
	}
	return cli.Exit("vtpmd history: "+err.Error(), 1)
}
