package main

import (
	"os"

	"github.com/urfave/cli/v2"

	"github.com/vtpmd/vtpmd/libvirt"
)

func installFlags() []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: "bin-dir", Value: libvirt.DefaultBinDir, Usage: "directory before /usr/bin in libvirtd's PATH"},
		&cli.StringFlag{Name: "hook-dir", Value: libvirt.DefaultHookDir, Usage: "libvirt's qemu hook directory"},
		&cli.StringFlag{Name: "hook-name", Value: libvirt.DefaultHookName, Usage: "file name of the hook"},
		&cli.StringFlag{Name: "manifest", Value: libvirt.DefaultManifestPath, Usage: "where install records what it created"},
		&cli.BoolFlag{Name: "json", Usage: "print the report as JSON"},
	}
}

func installOptions(c *cli.Context) libvirt.InstallOptions {
	return libvirt.InstallOptions{
		BinDir:       c.String("bin-dir"),
		HookDir:      c.String("hook-dir"),
		HookName:     c.String("hook-name"),
		ManifestPath: c.String("manifest"),
	}
}

// installCommand links vtpmd as the host's swtpm, swtpm_setup and swtpm_ioctl and installs
// the libvirt qemu hook.
func installCommand() *cli.Command {
	return &cli.Command{
		Name:  "install",
		Usage: "make vtpmd libvirt's swtpm (links in --bin-dir) and install the qemu hook (root)",
		Description: "Idempotent. Copies this binary to BIN-DIR/vtpmd, links swtpm, swtpm_ioctl and (when vtpmd's\n" +
			"setup works, or --setup=vtpmd) swtpm_setup to it, and installs HOOK-DIR/HOOK-NAME, which runs\n" +
			"`vtpmd hook`. Restart libvirtd afterwards. `vtpmd uninstall` undoes it.",
		Flags: append(installFlags(),
			&cli.StringFlag{Name: "setup", Value: libvirt.SetupAuto, Usage: "swtpm_setup: auto, vtpmd (link it to vtpmd) or system (keep " + libvirt.SystemSwtpmSetup + ")"},
			&cli.StringFlag{Name: "config", Usage: "hook configuration file baked into the hook (default " + libvirt.DefaultConfigPath + ")"},
			&cli.StringFlag{Name: "registry", Usage: "registry directory baked into the hook"},
			&cli.BoolFlag{Name: "force", Usage: "move files vtpmd did not create aside (NAME.vtpmd-saved) instead of failing"},
		),
		Action: func(c *cli.Context) error {
			if c.Args().Len() > 0 {
				return cli.Exit("vtpmd install: unexpected argument "+c.Args().First(), 2)
			}
			o := installOptions(c)
			o.Setup = c.String("setup")
			o.Force = c.Bool("force")
			o.HookConfig = c.String("config")
			o.HookRegistry = c.String("registry")
			if err := libvirt.RunInstall(c.Context, o, os.Stdout, c.Bool("json")); err != nil {
				return cli.Exit("vtpmd install: "+err.Error(), 1)
			}
			return nil
		},
	}
}

// uninstallCommand undoes install.
func uninstallCommand() *cli.Command {
	return &cli.Command{
		Name:  "uninstall",
		Usage: "remove what `vtpmd install` created (root)",
		Flags: installFlags(),
		Action: func(c *cli.Context) error {
			if err := libvirt.RunUninstall(installOptions(c), os.Stdout, c.Bool("json")); err != nil {
				return cli.Exit("vtpmd uninstall: "+err.Error(), 1)
			}
			return nil
		},
	}
}
