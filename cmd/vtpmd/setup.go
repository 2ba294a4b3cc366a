package main

import "github.com/urfave/cli/v2"

// newSetupApp is swtpm_setup's command line (issue: vtpmd setup). Placeholder until it lands.
func newSetupApp(name string) *cli.App {
	return &cli.App{Name: name, Action: func(*cli.Context) error { return cli.Exit("not implemented yet", 1) }}
}
