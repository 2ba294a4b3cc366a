package main

import (
	"errors"
	"fmt"
	"os"

	"github.com/urfave/cli/v2"
	"github.com/vtpmd/vtpmd/backend"
)

// version is the vtpmd release; swtpmCompatVersion is the swtpm version whose interfaces
// vtpmd reproduces (what --print-capabilities and --version report in swtpm's place).
const (
	version            = "0.1.0"
	swtpmCompatVersion = backend.SwtpmCompatVersion
)

func newVtpmdApp() *cli.App {
	return &cli.App{
		Name:            "vtpmd",
		Usage:           "virtual TPM service for QEMU/KVM and libvirt hosts (a drop-in for swtpm)",
		Version:         version,
		HideHelpCommand: true,
		Commands: []*cli.Command{
			socketCommand(), chardevCommand(),
			{
				Name:            "setup",
				Usage:           "manufacture a new vTPM's state (swtpm_setup's options)",
				SkipFlagParsing: true,
				Action: func(c *cli.Context) error {
					if code := setupMain(c.Context, append([]string{"vtpmd setup"}, c.Args().Slice()...)); code != 0 {
						return cli.Exit("", code)
					}
					return nil
				},
			},
			{
				Name:            "ioctl",
				Usage:           "send control-channel commands to a vTPM (swtpm_ioctl's options)",
				SkipFlagParsing: true,
				Action: func(c *cli.Context) error {
					if code := ioctlMain(c.Context, append([]string{"vtpmd ioctl"}, c.Args().Slice()...)); code != 0 {
						return cli.Exit("", code)
					}
					return nil
				},
			},
			hookCommand(),
			installCommand(),
			uninstallCommand(),
			statusCommand(),
			managerCommand(),
			historyCommand(),
			runCommand(),
			attestCommand(),
		},
	}
}

// exitCode turns an App's error into a process exit status, printing it like the C tools do.
func exitCode(err error) int {
	if err == nil {
		return 0
	}
	var ec cli.ExitCoder
	if errors.As(err, &ec) {
		if msg := err.Error(); msg != "" {
			fmt.Fprintln(os.Stderr, msg)
		}
		return ec.ExitCode()
	}
	fmt.Fprintln(os.Stderr, err)
	return 1
}
