package main

import (
	"os"

	"github.com/urfave/cli/v2"

	"github.com/vtpmd/vtpmd/libvirt"
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
			&cli.StringFlag{Name: "registry", Usage: "registry directory (overrides the configuration and $" + libvirt.RegistryEnv + ")"},
			&cli.StringFlag{Name: "state-root", Usage: "state root for external backends (overrides the configuration)"},
		},
		OnUsageError: func(_ *cli.Context, err error, _ bool) error { return cli.Exit("vtpmd hook: "+err.Error(), 2) },
		Action: func(c *cli.Context) error {
			cfgPath := c.String("config")
			if !c.IsSet("config") {
				cfgPath = "" // the default file may be absent
			}
			cfg, err := libvirt.LoadConfig(cfgPath)
			if err != nil {
				return cli.Exit("vtpmd hook: "+err.Error(), 1)
			}
			if c.IsSet("state-root") {
				cfg.StateRoot = c.String("state-root")
				if !c.IsSet("registry") && os.Getenv(libvirt.RegistryEnv) == "" {
					cfg.RegistryDir = ""
				}
			}
			if d := os.Getenv(libvirt.RegistryEnv); d != "" {
				cfg.RegistryDir = d
			}
			if c.IsSet("registry") {
				cfg.RegistryDir = c.String("registry")
			}
			if err := cfg.Validate(); err != nil {
				return cli.Exit("vtpmd hook: "+err.Error(), 1)
			}
			h, err := libvirt.NewHook(cfg, "")
			if err != nil {
				return cli.Exit("vtpmd hook: "+err.Error(), 1)
			}
			if err := h.Run(c.Context, c.Args().Slice(), os.Stdin); err != nil {
				return cli.Exit("vtpmd hook: "+err.Error(), 1)
			}
			return nil
		},
	}
}
