package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/urfave/cli/v2"

	"github.com/vtpmd/vtpmd/backend/setup"
)

// setupFlags are swtpm_setup's options (getopt_long names; every one takes its argument as
// the next word or after '=').
func setupFlags() []cli.Flag {
	str := func(name string, aliases ...string) cli.Flag {
		return &cli.StringFlag{Name: name, Aliases: aliases}
	}
	boolean := func(name string) cli.Flag { return &cli.BoolFlag{Name: name} }
	return []cli.Flag{
		str("runas"), str("tpm-state", "tpmstate"), str("tpm"), str("swtpm_ioctl"),
		boolean("tpm2"), boolean("createek"), boolean("allow-signing"), boolean("decryption"), boolean("ecc"),
		boolean("take-ownership"), str("ownerpass"), boolean("owner-well-known"), str("srkpass"), boolean("srk-well-known"),
		boolean("create-ek-cert"), boolean("create-platform-cert"), boolean("create-spk"), boolean("lock-nvram"),
		boolean("display"), str("config"), str("vmid"), str("logfile"), str("keyfile"), str("keyfile-fd"),
		str("pwdfile"), str("pwdfile-fd"), str("cipher"), boolean("overwrite"), boolean("not-overwrite"),
		str("pcr-banks"), str("rsa-keysize"), str("ek1keyalgo"), str("ek2keyalgo"), str("write-ek-cert-files"), str("tcsd-system-ps-file"),
		boolean("print-capabilities"), str("create-config-files"), boolean("reconfigure"),
		boolean("version"), &cli.BoolFlag{Name: "help", Aliases: []string{"h"}},
	}
}

// newSetupApp is swtpm_setup's command line.
func newSetupApp(name string) *cli.App {
	return &cli.App{
		Name:            name,
		HideHelp:        true,
		HideHelpCommand: true,
		HideVersion:     true,
		Flags:           setupFlags(),
		Writer:          os.Stdout,
		ErrWriter:       os.Stderr,
		OnUsageError: func(c *cli.Context, err error, _ bool) error {
			msg := err.Error()
			if f, ok := strings.CutPrefix(msg, "flag provided but not defined: -"); ok {
				msg = "unrecognized option '--" + strings.TrimPrefix(f, "-") + "'"
			}
			fmt.Fprintf(os.Stderr, "%s: %s\n", name, msg)
			fmt.Fprint(os.Stdout, setup.Usage(name, version))
			return cli.Exit("", 1)
		},
		Action: func(c *cli.Context) error {
			if c.NArg() > 0 {
				fmt.Fprintf(os.Stderr, "Unknown argument: %s\n", c.Args().First())
				fmt.Fprint(os.Stdout, setup.Usage(name, version))
				return cli.Exit("", 1)
			}
			return setupExit(setup.Run(c.Context, setupOptions(c, name)))
		},
	}
}

// setupArgs rewrites swtpm_setup's optional-argument option so urfave/cli can parse it:
// "--create-config-files" takes the next word as its argument only when it is not an option
// (as libvirt passes "--create-config-files skip-if-exist").
//
// "--pcr-banks" given more than once is joined with ',' (each value trimmed), as swtpm_setup
// does, instead of the last one winning.
func setupArgs(args []string) []string {
	out := make([]string, 0, len(args))
	banks := -1 // index in out of the first --pcr-banks value
	for i := 0; i < len(args); i++ {
		a := args[i]
		var bv string
		isBanks := false
		if v, ok := strings.CutPrefix(a, "--pcr-banks="); ok {
			bv, isBanks = v, true
		} else if a == "--pcr-banks" && i+1 < len(args) {
			bv, isBanks = args[i+1], true
			i++
		}
		if isBanks {
			if banks < 0 {
				out = append(out, "--pcr-banks", strings.TrimSpace(bv))
				banks = len(out) - 1
			} else {
				out[banks] += "," + strings.TrimSpace(bv)
			}
			continue
		}
		if a == "--create-config-files" {
			if i+1 < len(args) && !strings.HasPrefix(args[i+1], "-") {
				a += "=" + args[i+1]
				i++
			} else {
				a += "="
			}
		}
		out = append(out, a)
	}
	return out
}

func setupMain(ctx context.Context, args []string) int {
	return exitCode(newSetupApp(filepath.Base(args[0])).RunContext(ctx, setupArgs(args)))
}

// setupOptions is what the parsed command line means. --tpm is accepted and means nothing:
// the TPM runs in-process.
func setupOptions(c *cli.Context, name string) setup.Options {
	o := setup.Options{
		Program: name, Release: version, Stdout: os.Stdout, Stderr: os.Stderr,
		Help: c.Bool("help"), Version: c.Bool("version"), PrintCapabilities: c.Bool("print-capabilities"),
		CreateConfigFiles: c.IsSet("create-config-files"), ConfigFilesFlags: c.String("create-config-files"),
		RunAs: c.String("runas"), LogFile: c.String("logfile"), ConfigFile: c.String("config"),
		StatePath: c.String("tpm-state"), TPM2: c.Bool("tpm2"), VMID: c.String("vmid"),
		KeyFile: c.String("keyfile"), PwdFile: c.String("pwdfile"),
		KeyFileFD: c.String("keyfile-fd"), PwdFileFD: c.String("pwdfile-fd"), Cipher: c.String("cipher"),
		CreateEK: c.Bool("createek"), CreateEKCert: c.Bool("create-ek-cert"), CreatePlatformCert: c.Bool("create-platform-cert"),
		AllowSigning: c.Bool("allow-signing"), Decryption: c.Bool("decryption"),
		CreateSPK: c.Bool("create-spk"), ECC: c.Bool("ecc"), LockNVRAM: c.Bool("lock-nvram"),
		TakeOwnership: c.Bool("take-ownership"),
		OwnerPassword: c.String("ownerpass"), OwnerWellKnown: c.Bool("owner-well-known"),
		SRKPassword: c.String("srkpass"), SRKWellKnown: c.Bool("srk-well-known"),
		RSAKeySize: c.String("rsa-keysize"), EK1KeyAlgo: c.String("ek1keyalgo"), EK2KeyAlgo: c.String("ek2keyalgo"),
		PCRBanks: c.String("pcr-banks"), PCRBanksGiven: c.IsSet("pcr-banks"),
		Overwrite: c.Bool("overwrite"), NotOverwrite: c.Bool("not-overwrite"), Reconfigure: c.Bool("reconfigure"),
		WriteEKCertFiles: c.String("write-ek-cert-files"), Display: c.Bool("display"),
	}
	o.Keys = setupManagerKeys(o.StatePath, o.TPM2)
	o.CertIssuer = setupManagerCerts(o.StatePath)
	for _, d := range []string{"swtpm_ioctl", "tcsd-system-ps-file"} {
		if c.IsSet(d) {
			o.IgnoredOptions = append(o.IgnoredOptions, d)
		}
	}
	return o
}

// setupExit is the exit status for setup.Run's error; Run has reported the failure already.
func setupExit(err error) error {
	if err == nil {
		return nil
	}
	code := 1
	if ee, ok := errors.AsType[*setup.ExitError](err); ok {
		code = ee.Code
	}
	return cli.Exit("", code)
}
