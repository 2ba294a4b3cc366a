package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/vtpmd/vtpmd/libvirt"
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
			&cli.StringFlag{Name: "registry", Usage: "registry directory (overrides the configuration and $" + libvirt.RegistryEnv + ")"},
			&cli.DurationFlag{Name: "timeout", Value: 5 * time.Second, Usage: "libvirt connection timeout"},
		},
		Action: func(c *cli.Context) error {
			cfg, err := libvirt.LoadConfig(c.String("config"))
			if err != nil {
				return cli.Exit("vtpmd status: "+err.Error(), 1)
			}
			if d := os.Getenv(libvirt.RegistryEnv); d != "" {
				cfg.RegistryDir = d
			}
			if c.IsSet("registry") {
				cfg.RegistryDir = c.String("registry")
			}
			reg := libvirt.NewRegistry(cfg.RegistryDir)
			var sts []libvirt.VMStatus
			var serr error
			if c.Bool("no-libvirt") {
				sts, serr = libvirt.Status(nil, cfg, reg, c.Int("history"))
			} else {
				ctx, cancel := context.WithTimeout(c.Context, c.Duration("timeout")+2*time.Second)
				defer cancel()
				l, err := libvirt.Connect(ctx, c.String("connect"), c.Duration("timeout"))
				if err != nil {
					return cli.Exit("vtpmd status: "+err.Error()+" (--no-libvirt shows the registry alone)", 1)
				}
				defer l.Disconnect()
				sts, serr = libvirt.Status(l, cfg, reg, c.Int("history"))
			}
			if sts == nil && serr != nil {
				return cli.Exit("vtpmd status: "+serr.Error(), 1)
			}
			if c.Bool("json") {
				enc := json.NewEncoder(os.Stdout)
				enc.SetIndent("", "  ")
				if err := enc.Encode(sts); err != nil {
					return err
				}
			} else {
				printStatus(os.Stdout, sts)
			}
			if serr != nil {
				fmt.Fprintln(os.Stderr, "vtpmd status: warning:", serr)
			}
			return nil
		},
	}
}

func printStatus(w io.Writer, sts []libvirt.VMStatus) {
	if len(sts) == 0 {
		fmt.Fprintln(w, "no domains with a vTPM")
		return
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tUUID\tDOMAIN\tBACKEND\tVTPM\tPID\tSTATE DIR")
	for _, s := range sts {
		dom := "inactive"
		switch {
		case !s.Defined:
			dom = "unknown"
		case s.Active:
			dom = "running"
		}
		vtpm := "stopped"
		pid := "-"
		if s.Running {
			vtpm, pid = "running", fmt.Sprint(s.PID)
		}
		state := s.StateDir
		if state == "" {
			state = "-"
		} else if !s.StateFound {
			state += " (absent)"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", s.Name, s.UUID, dom, s.Backend, vtpm, pid, state)
	}
	tw.Flush()
	for _, s := range sts {
		if len(s.History) == 0 && s.Exe == "" && s.Socket == "" {
			continue
		}
		fmt.Fprintf(w, "\n%s (%s)\n", s.Name, s.UUID)
		if s.Socket != "" {
			fmt.Fprintf(w, "  socket: %s\n", s.Socket)
		}
		if s.Exe != "" {
			fmt.Fprintf(w, "  exe:    %s\n", s.Exe)
		}
		if s.Policy != nil && s.Policy.XML != "" {
			fmt.Fprintf(w, "  policy: %s\n", strings.Join(strings.Fields(s.Policy.XML), " "))
		}
		for _, e := range s.History {
			line := fmt.Sprintf("  %s %s %s", e.Time.Format(time.RFC3339), e.Op, e.SubOp)
			if e.PID > 0 {
				line += fmt.Sprintf(" pid=%d", e.PID)
			}
			if e.Detail != "" {
				line += " " + e.Detail
			}
			if e.Error != "" {
				line += " ERROR: " + e.Error
			}
			fmt.Fprintln(w, line)
		}
	}
}
