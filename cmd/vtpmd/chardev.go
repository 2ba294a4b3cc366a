package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"

	"github.com/urfave/cli/v2"

	"github.com/vtpmd/vtpmd/backend"
	"github.com/vtpmd/vtpmd/backend/store"
	"github.com/vtpmd/vtpmd/internal/daemon"
	"github.com/vtpmd/vtpmd/socket"
)

// Errors of swtpm chardev's data channel options.
var (
	ErrNoCharDev       = errors.New("missing character device or file descriptor")
	ErrProxyWithDevice = errors.New("cannot use vTPM proxy with a provided device")
)

// chardevFlags are swtpm chardev's options: socket's, without its data-channel options
// (--server, --port, --terminate), with -c/--chardev, -f/--fd and --vtpm-proxy.
func chardevFlags(o *socketOpts) []cli.Flag {
	flags := []cli.Flag{
		&cli.StringFlag{Name: "chardev", Aliases: []string{"c"}, Usage: "serve the TPM on the given character device"},
		&cli.IntFlag{Name: "fd", Aliases: []string{"f"}, Value: -1, Usage: "serve the TPM on the given character device, socket or anonymous file descriptor"},
		&cli.BoolFlag{Name: "vtpm-proxy", Usage: "create a TPM device with Linux's vTPM proxy (/dev/vtpmx) and serve its commands"},
	}
	for _, f := range socketFlags(o) {
		if !slices.Contains([]string{"server", "port", "fd", "terminate"}, f.Names()[0]) {
			flags = append(flags, f)
		}
	}
	return flags
}

// chardevCommand is swtpm chardev: one vTPM served on a character device, an inherited file
// descriptor or a new vTPM proxy device, with socket's control channel and instance options.
func chardevCommand() *cli.Command {
	o := newSocketOpts()
	return instanceCommand("chardev", "serve one vTPM on a character device, an inherited fd or Linux's vTPM proxy (swtpm chardev's options)",
		chardevFlags(o), func(c *cli.Context) error { return runChardev(c.Context, c, o) })
}

// runChardev is runSocket for swtpm chardev: the device given with -c is opened first (before
// --chroot and --runas), the vTPM proxy after them, as in swtpm.
func runChardev(ctx context.Context, c *cli.Context, o *socketOpts) error {
	if c.Bool("daemon") && !daemon.IsDetached() {
		return daemon.Detach(ctx)
	}
	data, err := chardevData(c, os.Args)
	if err != nil {
		return err
	}
	lg, err := enterProcess(c, o)
	if err != nil {
		return err
	}
	defer lg.Close()
	log := lg.Logger
	tpm2, proxy := c.Bool("tpm2"), c.Bool("vtpm-proxy")
	if proxy {
		if data != nil {
			return ErrProxyWithDevice
		}
		sp, dev, err := socket.NewVTPMProxy(tpm2)
		if err != nil {
			return err
		}
		data = sp
		fmt.Printf("New TPM device: %s (major/minor = %d/%d)\n", dev.Device(), dev.Major, dev.Minor)
		log.Info("vTPM proxy device created", "device", dev.Device(), "major", dev.Major, "minor", dev.Minor)
	}
	if c.Bool("print-capabilities") {
		fmt.Println(backend.Capabilities(tpm2))
		return nil
	}
	uri, storeOpts, stateErr := store.ParseTPMState(o.tpmstate.set, tpm2)
	if c.Bool("print-states") {
		if stateErr != nil {
			return stateErr
		}
		return backend.PrintStates(os.Stdout, uri, tpm2)
	}
	if data == nil {
		return ErrNoCharDev
	}
	if stateErr != nil {
		return stateErr
	}
	cfg, err := instanceConfig(c, o, tpm2)
	if err != nil {
		return err
	}
	cfg.Data = data
	if proxy {
		vtpmProxyDefaults(&cfg, o)
	}
	cfg.StateURI, cfg.Store, cfg.Log, cfg.Ready = uri, storeOpts, log, daemon.SignalReady
	cfg.Server.Dump, cfg.DebugLog, cfg.DebugLevel = lg.Traffic, lg.File, lg.Level
	cfg.Keys, cfg.Guard = withManager(c, cfg, log)
	return backend.Run(ctx, cfg)
}

// chardevData is -c/--chardev or -f/--fd (nil: neither); given both, the first on the command
// line wins, as in swtpm.
func chardevData(c *cli.Context, args []string) (*socket.ListenSpec, error) {
	dev, fd := c.String("chardev"), c.Int("fd")
	switch {
	case dev != "" && fd >= 0:
		if firstFlag(args, "c", "chardev") < firstFlag(args, "f", "fd") {
			return socket.OpenCharDev(dev)
		}
		return socket.CharDevFD(fd)
	case dev != "":
		return socket.OpenCharDev(dev)
	case c.IsSet("fd"):
		return socket.CharDevFD(fd)
	}
	return nil, nil
}

// firstFlag is the index in args of the first -short or --long option (len(args): none).
func firstFlag(args []string, short, long string) int {
	for i, a := range args {
		name, _, _ := strings.Cut(strings.TrimLeft(a, "-"), "=")
		if strings.HasPrefix(a, "-") && (name == short || name == long) {
			return i
		}
	}
	return len(args)
}

// vtpmProxyDefaults is what swtpm implies with --vtpm-proxy: the kernel talks to the TPM at
// once, so it is powered on and started (TPM_ST_CLEAR, or TPM2_SU_CLEAR, unless --flags names
// another startup), and the kernel's SET_LOCALITY command is accepted.
func vtpmProxyDefaults(cfg *backend.RunConfig, o *socketOpts) {
	cfg.PowerOn = true
	if !slices.ContainsFunc([]string{"startup-clear", "startup-state", "startup-deactivated", "startup-none"},
		func(n string) bool { return o.flags.set.Bool(n, false) }) {
		cfg.Startup = backend.StartupClear
	}
	cfg.Server.AllowSetLocality = true
}
