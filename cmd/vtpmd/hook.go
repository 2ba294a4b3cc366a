package main

import "github.com/urfave/cli/v2"

// hookCommand is the libvirt qemu hook entry point. Placeholder until it lands.
func hookCommand() *cli.Command {
	return &cli.Command{Name: "hook", Hidden: true, Action: func(*cli.Context) error { return cli.Exit("not implemented yet", 1) }}
}
