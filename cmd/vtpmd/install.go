package main

import "github.com/urfave/cli/v2"

// installCommand links vtpmd as the host's swtpm. Placeholder until it lands.
func installCommand() *cli.Command {
	return &cli.Command{Name: "install", Hidden: true, Action: func(*cli.Context) error { return cli.Exit("not implemented yet", 1) }}
}

// uninstallCommand undoes install. Placeholder until it lands.
func uninstallCommand() *cli.Command {
	return &cli.Command{Name: "uninstall", Hidden: true, Action: func(*cli.Context) error { return cli.Exit("not implemented yet", 1) }}
}
