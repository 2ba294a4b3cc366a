package main

import "github.com/urfave/cli/v2"

// statusCommand lists domains with a vTPM. Placeholder until it lands.
func statusCommand() *cli.Command {
	return &cli.Command{Name: "status", Hidden: true, Action: func(*cli.Context) error { return cli.Exit("not implemented yet", 1) }}
}
