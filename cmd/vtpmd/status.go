package main

import (
	"errors"
	"os"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/vtpmd/vtpmd/libvirt"
	"github.com/vtpmd/vtpmd/manager/registry"
)

// statusCommand lists domains with a vTPM, their backends, state and processes, and the
// registry's history.
func statusCommand() *cli.Command {
	return &cli.Command{
		Name:  "status",
		Usage: "list domains with a vTPM: backend, state directory, emulator process, registry history",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "connect", Aliases: []string{"c"}, Value: libvirt.DefaultURI, Usage: "libvirt URI (qemu:///system, qemu+tcp://host:port/system, ...)"},
			&cli.BoolFlag{Name: "no-libvirt", Usage: "report the registry only, without asking libvirt"},
			&cli.BoolFlag{Name: "json", Usage: "print JSON"},
			&cli.IntFlag{Name: "history", Value: 10, Usage: "events per VM (-1: all)"},
			&cli.StringFlag{Name: "config", Usage: "hook configuration (default " + libvirt.DefaultConfigPath + ")"},
			&cli.StringFlag{Name: "registry", Usage: "registry directory (overrides the configuration and $" + registry.DirEnv + ")"},
			&cli.DurationFlag{Name: "timeout", Value: 5 * time.Second, Usage: "libvirt connection timeout"},
			&cli.StringFlag{Name: "manager", Usage: "the vtpmd manager's socket (default: ask the host's manager when it runs; none: do not)"},
		},
		Action: func(c *cli.Context) error {
			q := libvirt.StatusQuery{
				ConfigPath:    c.String("config"),
				Overrides:     libvirt.Overrides{RegistryDir: c.String("registry")},
				URI:           c.String("connect"),
				NoLibvirt:     c.Bool("no-libvirt"),
				Timeout:       c.Duration("timeout"),
				History:       c.Int("history"),
				JSON:          c.Bool("json"),
				ManagerSocket: c.String("manager"),
			}
			if err := libvirt.ShowStatus(c.Context, q, os.Stdout, os.Stderr); err != nil {
				msg := "vtpmd status: " + err.Error()
				if errors.Is(err, libvirt.ErrConnect) {
					msg += " (--no-libvirt shows the registry alone)"
				}
				return cli.Exit(msg, 1)
			}
			return nil
		},
	}
}
