package main

import (
	"fmt"
	"log/slog"
	"os"
	"strings"

	"github.com/urfave/cli/v2"

	"github.com/vtpmd/vtpmd/backend/qemu"
)

// runCommand is `vtpmd run [options] -- QEMU ARGS...`: QEMU with a vTPM, for CI.
func runCommand() *cli.Command {
	return &cli.Command{
		Name:      "run",
		Usage:     "run QEMU with a vTPM (made for the run, removed after it): vtpmd run [options] -- qemu-system-x86_64 ARGS...",
		ArgsUsage: "-- QEMU [ARGS...]",
		Flags: []cli.Flag{
			&cli.BoolFlag{Name: "tpm2", Usage: "emulate a TPM 2.0 (as without --tpm1.2)"},
			&cli.BoolFlag{Name: "tpm1.2", Usage: "emulate a TPM 1.2"},
			&cli.StringFlag{Name: "state", Usage: "keep the TPM's state in `DIR` (created and manufactured when empty, kept afterwards)"},
			&cli.BoolFlag{Name: "ephemeral", Usage: "a new TPM whose state is removed when QEMU exits (as without --state)"},
			&cli.BoolFlag{Name: "ek-certs", Value: true, Usage: "manufacture a new TPM with EKs, EK and platform certificates (--ek-certs=false: an empty TPM)"},
			&cli.StringFlag{Name: "ca", Usage: "local CA `DIR` that signs the certificates, created on first use and kept (default: one made for the run)"},
			&cli.StringFlag{Name: "pcr-banks", Usage: "PCR banks a new TPM 2 keeps active, comma-separated", Value: strings.Join(qemu.DefaultPCRBanks, ",")},
			&cli.StringFlag{Name: "model", Usage: "QEMU's TPM device (default: tpm-crb on q35 with a TPM 2, tpm-tis otherwise; tpm-tis-device on Arm, tpm-spapr on POWER)"},
			&cli.StringFlag{Name: "vtpm-log", Usage: "append the vTPM's log to `FILE` and keep it"},
			&cli.BoolFlag{Name: "verbose", Aliases: []string{"v"}, Usage: "say what vtpmd run does, on standard error"},
		},
		OnUsageError: func(_ *cli.Context, err error, _ bool) error { return cli.Exit("vtpmd run: "+err.Error(), 2) },
		Action: func(c *cli.Context) error {
			switch {
			case c.Bool("tpm2") && c.Bool("tpm1.2"):
				return cli.Exit("vtpmd run: --tpm2 and --tpm1.2 exclude each other", 2)
			case c.IsSet("state") && c.Bool("ephemeral"):
				return cli.Exit("vtpmd run: --state and --ephemeral exclude each other", 2)
			}
			level := slog.LevelWarn
			if c.Bool("verbose") {
				level = slog.LevelInfo
			}
			cfg := qemu.Config{
				QEMU:     c.Args().Slice(),
				TPM2:     !c.Bool("tpm1.2"),
				StateDir: c.String("state"),
				EKCerts:  c.Bool("ek-certs"),
				CADir:    c.String("ca"),
				PCRBanks: strings.Split(c.String("pcr-banks"), ","),
				Model:    c.String("model"),
				VTPMLog:  c.String("vtpm-log"),
				Log:      slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level})).With("prog", "vtpmd run"),
			}
			code, err := qemu.Run(c.Context, cfg)
			if err != nil {
				fmt.Fprintln(os.Stderr, "vtpmd run:", err)
			}
			if code != 0 {
				return cli.Exit("", code)
			}
			return nil
		},
	}
}
