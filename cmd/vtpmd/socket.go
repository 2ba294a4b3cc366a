package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"

	"github.com/vtpmd/vtpmd/backend/seam"

	"github.com/urfave/cli/v2"

	"github.com/vtpmd/vtpmd/backend"
	"github.com/vtpmd/vtpmd/backend/store"
	"github.com/vtpmd/vtpmd/emulator"
	"github.com/vtpmd/vtpmd/internal/daemon"
	"github.com/vtpmd/vtpmd/internal/opts"
	"github.com/vtpmd/vtpmd/manager"
	"github.com/vtpmd/vtpmd/socket"
)

// optFlag adapts a swtpm sub-option string to urfave/cli: the last occurrence of the option
// wins, as with getopt; unknown sub-options are refused at parse time.
type optFlag struct {
	allowed []string
	set     *opts.Set
}

func (f *optFlag) Set(s string) error {
	p, err := opts.Parse(s, f.allowed...)
	if err != nil {
		return err
	}
	f.set = p
	return nil
}

func (f *optFlag) String() string {
	if f == nil || f.set == nil {
		return ""
	}
	return f.set.Raw
}

// raw is the option string as given ("" when absent).
func (f *optFlag) raw() string { return f.String() }

// socketOpts are the sub-option schemas of swtpm socket.
type socketOpts struct {
	tpmstate, ctrl, server, pid, log, key, migKey, locality, flags, migration, seccomp optFlag
}

func newSocketOpts() *socketOpts {
	keyOpts := []string{"file", "fd", "pwdfile", "pwdfd", "format", "mode", "kdf", "remove"}
	return &socketOpts{
		tpmstate:  optFlag{allowed: store.TPMStateOptions},
		ctrl:      optFlag{allowed: socket.CtrlOptions},
		server:    optFlag{allowed: socket.ServerOptions},
		pid:       optFlag{allowed: []string{"file", "fd"}},
		log:       optFlag{allowed: daemon.LogOptions},
		key:       optFlag{allowed: keyOpts},
		migKey:    optFlag{allowed: keyOpts},
		locality:  optFlag{allowed: []string{"reject-locality-4", "allow-set-locality"}},
		flags:     optFlag{allowed: []string{"not-need-init", "startup-clear", "startup-state", "startup-deactivated", "startup-none", "disable-auto-shutdown"}},
		migration: optFlag{allowed: []string{"incoming", "release-lock-outgoing"}},
		seccomp:   optFlag{allowed: []string{"action"}},
	}
}

func socketFlags(o *socketOpts) []cli.Flag {
	return []cli.Flag{
		&cli.BoolFlag{Name: "tpm2", Usage: "emulate a TPM 2.0 (default: TPM 1.2)"},
		&cli.GenericFlag{Name: "tpmstate", Value: &o.tpmstate, Usage: "dir=<dir>|backend-uri=dir://<dir>|file://<file>[,mode=0640][,lock]"},
		&cli.GenericFlag{Name: "ctrl", Value: &o.ctrl, Usage: "type=unixio|tcp[,path=<p>][,port=<n>][,bindaddr=<a>][,fd=<n>][,clientfd=<n>][,mode=0770][,uid=][,gid=][,terminate]"},
		&cli.GenericFlag{Name: "server", Value: &o.server, Usage: "type=tcp|unixio[,port=<n>][,bindaddr=<a>][,path=<p>][,fd=<n>][,mode=][,uid=][,gid=][,disconnect]"},
		&cli.IntFlag{Name: "port", Aliases: []string{"p"}, Usage: "TCP data port (implies disconnect)"},
		&cli.IntFlag{Name: "fd", Aliases: []string{"f"}, Value: -1, Usage: "data channel on an inherited connected fd"},
		&cli.BoolFlag{Name: "terminate", Aliases: []string{"t"}, Usage: "exit when the data connection closes"},
		&cli.BoolFlag{Name: "daemon", Aliases: []string{"d"}, Usage: "run in the background"},
		&cli.GenericFlag{Name: "pid", Value: &o.pid, Usage: "file=<path>|fd=<n>"},
		&cli.GenericFlag{Name: "log", Value: &o.log, Usage: "file=<path>|fd=<n>[,level=<n>][,prefix=<s>][,truncate]"},
		&cli.GenericFlag{Name: "key", Value: &o.key, Usage: "file=|fd=|pwdfile=|pwdfd=[,format=hex|binary][,mode=aes-cbc|aes-256-cbc][,kdf=pbkdf2|sha512][,remove]"},
		&cli.GenericFlag{Name: "migration-key", Value: &o.migKey, Usage: "as --key, for state blobs"},
		&cli.GenericFlag{Name: "locality", Value: &o.locality, Usage: "reject-locality-4,allow-set-locality"},
		&cli.GenericFlag{Name: "flags", Value: &o.flags, Usage: "not-need-init,startup-clear|startup-state|startup-none,disable-auto-shutdown"},
		&cli.GenericFlag{Name: "migration", Value: &o.migration, Usage: "incoming,release-lock-outgoing"},
		&cli.StringFlag{Name: "runas", Aliases: []string{"r"}, Usage: "user to run as"},
		&cli.StringFlag{Name: "chroot", Aliases: []string{"R"}, Usage: "directory to chroot into"},
		&cli.GenericFlag{Name: "seccomp", Value: &o.seccomp, Usage: "action=none|kill|log: what a forbidden system call does (default kill)"},
		&cli.StringFlag{Name: "manager", Usage: "the vtpmd manager's socket (default " + manager.DefaultSocket + " when it exists; none: no manager)"},
		&cli.BoolFlag{Name: "print-capabilities", Usage: "print capabilities as JSON and exit"},
		&cli.BoolFlag{Name: "print-states", Usage: "print the existing state blobs as JSON and exit"},
	}
}

func socketCommand() *cli.Command {
	o := newSocketOpts()
	return instanceCommand("socket", "serve one vTPM over swtpm's socket protocol (swtpm socket's options)",
		socketFlags(o), func(c *cli.Context) error { return runSocket(c.Context, c, o) })
}

// instanceCommand is a command that serves one vTPM with swtpm's command line (socket,
// chardev): swtpm's wording for usage errors, stray arguments and failures.
func instanceCommand(name, usage string, flags []cli.Flag, run func(*cli.Context) error) *cli.Command {
	return &cli.Command{
		Name:            name,
		Usage:           usage,
		HideHelpCommand: true,
		Flags:           flags,
		OnUsageError: func(_ *cli.Context, err error, _ bool) error {
			return cli.Exit(usageMessage(err), 1)
		},
		Action: func(c *cli.Context) error {
			if c.Args().Len() > 0 {
				return cli.Exit(fmt.Sprintf("Unknown parameter '%s'", c.Args().First()), 1)
			}
			if err := run(c); err != nil {
				var ec cli.ExitCoder
				if errors.As(err, &ec) {
					return err
				}
				return cli.Exit("Error: "+err.Error(), 1)
			}
			return nil
		},
	}
}

// usageMessage rewords urfave/cli's parse errors the way swtpm reports them.
func usageMessage(err error) string {
	msg := err.Error()
	if errors.Is(err, opts.ErrUnknown) || strings.Contains(msg, "unknown option") {
		if i := strings.Index(msg, "unknown option '"); i >= 0 {
			return "Unknown option" + msg[i+len("unknown option"):]
		}
	}
	return msg
}

// swtpmMain is the program when invoked as swtpm: "swtpm socket ..." or "swtpm -v".
func swtpmMain(ctx context.Context, args []string) int {
	if len(args) < 2 {
		fmt.Fprintln(os.Stderr, "Missing TPM interface type.")
		return 1
	}
	switch args[1] {
	case "-v", "--version":
		fmt.Printf("TPM emulator version %s, Copyright (c) 2014-2022 IBM Corp. and others (vtpmd %s)\n", backend.SwtpmCompatVersion, version)
		return 0
	case "-h", "--help":
		fmt.Printf("Usage: %s socket|chardev|cuse [options]\n\nvtpmd implements the 'socket' and 'chardev' interfaces.\n", args[0])
		return 0
	case "socket", "chardev":
		app := &cli.App{Name: "swtpm", HideHelpCommand: true, Commands: []*cli.Command{socketCommand(), chardevCommand()}}
		return exitCode(app.RunContext(ctx, args))
	case "cuse":
		fmt.Fprintf(os.Stderr, "vtpmd does not implement the '%s' interface; use 'socket'.\n", args[1])
		return 1
	}
	fmt.Fprintf(os.Stderr, "Unsupported TPM interface type '%s'.\n", args[1])
	return 1
}

// runSocket applies the process options in swtpm's order (daemon, chroot, runas, log), then
// turns the rest into a backend.RunConfig and serves.
func runSocket(ctx context.Context, c *cli.Context, o *socketOpts) error {
	if c.Bool("daemon") && !daemon.IsDetached() {
		return daemon.Detach(ctx)
	}
	lg, err := enterProcess(c, o)
	if err != nil {
		return err
	}
	defer lg.Close()
	log := lg.Logger
	tpm2 := c.Bool("tpm2")
	if c.Bool("print-capabilities") {
		fmt.Println(backend.Capabilities(tpm2))
		return nil
	}
	uri, storeOpts, err := store.ParseTPMState(o.tpmstate.set, tpm2)
	if err != nil {
		return err
	}
	if c.Bool("print-states") {
		return backend.PrintStates(os.Stdout, uri, tpm2)
	}
	cfg, err := socketConfig(c, o, tpm2)
	if err != nil {
		return err
	}
	cfg.StateURI, cfg.Store, cfg.Log, cfg.Ready = uri, storeOpts, log, daemon.SignalReady
	cfg.Server.Dump, cfg.DebugLog, cfg.DebugLevel = lg.Traffic, lg.File, lg.Level
	cfg.Keys, cfg.Guard = withManager(c, cfg, log)
	return backend.Run(ctx, cfg)
}

// withManager puts the host's manager in front of the instance's own key options, and its
// guard (host PCR projection, attestation indices) in front of the TPM: explicitly with
// --manager SOCK, or when the default manager's socket exists.
func withManager(c *cli.Context, cfg backend.RunConfig, log *slog.Logger) (seam.KeySource, seam.Guard) {
	sock, explicit := c.String("manager"), c.IsSet("manager")
	if sock == "none" {
		return cfg.Keys, cfg.Guard
	}
	client := manager.NewClient(sock)
	tpm2 := cfg.Version == emulator.TPM2
	keys := &manager.KeySource{Client: client, StateURI: cfg.StateURI, TPM2: tpm2,
		Fallback: cfg.Keys, Required: explicit, Log: log}
	guard := manager.InstanceGuard(manager.GuardConfig{Client: client, StateURI: cfg.StateURI, TPM2: tpm2, Log: log})
	return keys, guard
}

// enterProcess applies swtpm's process options in its order: --chroot, --runas, then opens
// --log (as the user the process now runs as).
func enterProcess(c *cli.Context, o *socketOpts) (*daemon.Log, error) {
	if dir := c.String("chroot"); dir != "" {
		if err := daemon.Chroot(dir); err != nil {
			return nil, err
		}
	}
	if u := c.String("runas"); u != "" {
		if err := daemon.RunAs(u); err != nil {
			return nil, err
		}
	}
	daemon.ReturnIdleMemory(c.Context) // one of many mostly idle vTPMs on a host
	return daemon.OpenLog(o.log.set)
}
