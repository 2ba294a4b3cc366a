package main

import (
	"os"

	"github.com/urfave/cli/v2"

	"github.com/vtpmd/vtpmd/libvirt"
	"github.com/vtpmd/vtpmd/manager/registry"
)

// hookCommand is the libvirt qemu hook entry point: libvirt runs
// `vtpmd hook <domain> <operation> <sub-operation> <extra>` with the domain XML on stdin.
func hookCommand() *cli.Command {
	return &cli.Command{
		Name:      "hook",
		Usage:     "libvirt qemu hook (installed by `vtpmd install`); domain XML on stdin",
		ArgsUsage: "<domain> <operation> <sub-operation> <extra>",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "config", Usage: "hook configuration (JSON)", Value: libvirt.DefaultConfigPath},
			&cli.StringFlag{Name: "registry", Usage: "registry directory (overrides the configuration and $" + registry.DirEnv + ")"},
			&cli.StringFlag{Name: "state-root", Usage: "state root for external backends (overrides the configuration)"},
		},
		OnUsageError: func(_ *cli.Context, err error, _ bool) error { return cli.Exit("vtpmd hook: "+err.Error(), 2) },
		Action: func(c *cli.Context) error {
			req := libvirt.HookRequest{
				Overrides: libvirt.Overrides{StateRoot: c.String("state-root"), RegistryDir: c.String("registry")},
				Args:      c.Args().Slice(),
			}
			if c.IsSet("config") { // the default file may be absent, an explicit one may not
				req.ConfigPath = c.String("config")
			}
			if err := libvirt.RunHook(c.Context, req, os.Stdin, os.Stdout, os.Stderr); err != nil {
				return cli.Exit("vtpmd hook: "+err.Error(), 1)
			}
			return nil
		},
	}
}
