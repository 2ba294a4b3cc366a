package main

import (
	"errors"
	"fmt"
	"os"

	"github.com/vtpmd/vtpmd/backend/seam"

	"github.com/urfave/cli/v2"

	"github.com/vtpmd/vtpmd/backend"
	"github.com/vtpmd/vtpmd/emulator"
	"github.com/vtpmd/vtpmd/internal/daemon"
	"github.com/vtpmd/vtpmd/internal/seccomp"
	"github.com/vtpmd/vtpmd/socket"
)

// socketConfig turns swtpm socket's flags into a backend.RunConfig (without the state
// location and the logger, which runSocket fills in).
func socketConfig(c *cli.Context, o *socketOpts, tpm2 bool) (backend.RunConfig, error) {
	cfg, err := instanceConfig(c, o, tpm2)
	if err != nil {
		return cfg, err
	}
	port := -1
	if c.IsSet("port") {
		port = c.Int("port")
	}
	cfg.Data, err = socket.ParseData(o.server.set, port, c.Int("fd"))
	return cfg, err
}

// instanceConfig turns the flags swtpm socket and chardev share into a backend.RunConfig:
// everything but the data channel, the state location and the logger.
func instanceConfig(c *cli.Context, o *socketOpts, tpm2 bool) (backend.RunConfig, error) {
	cfg := backend.RunConfig{Version: emulator.TPM12}
	if tpm2 {
		cfg.Version = emulator.TPM2
	}
	if o.key.set != nil || o.migKey.set != nil {
		cfg.Keys = seam.KeyOptions{State: o.key.raw(), Migration: o.migKey.raw()}
	}
	var err error
	if cfg.PowerOn, cfg.Startup, err = startupFlags(o); err != nil {
		return cfg, err
	}
	cfg.DisableAutoShutdown = o.flags.set.Bool("disable-auto-shutdown", false)
	cfg.IncomingMigration = o.migration.set.Bool("incoming", false)
	cfg.Server = socket.Options{
		Terminate:        c.Bool("terminate"),
		RejectLocality4:  o.locality.set.Bool("reject-locality-4", false),
		AllowSetLocality: o.locality.set.Bool("allow-set-locality", false),
		GoDataPath:       os.Getenv(socket.GoDataPathEnv) == "1",
	}
	// swtpm confines itself unless told action=none, --seccomp given or not (where there is
	// no filter for the platform, only an explicit --seccomp is refused)
	action, err := seccomp.ParseAction(o.seccomp.set.String("action", "kill"))
	if err != nil {
		return cfg, fmt.Errorf("--seccomp: %w", err)
	}
	if action != seccomp.None && (o.seccomp.set != nil || seccomp.Supported()) {
		cfg.Confine = func() error { return seccomp.Install(action) }
	}
	if cfg.PidFile, err = pidFlags(o); err != nil {
		return cfg, err
	}
	cfg.Ctrl, err = socket.ParseCtrl(o.ctrl.set)
	return cfg, err
}

// startupFlags reads --flags not-need-init and startup-* (which imply not-need-init).
func startupFlags(o *socketOpts) (powerOn bool, st backend.Startup, err error) {
	f := o.flags.set
	powerOn = f.Bool("not-need-init", false)
	seen := false
	for name, s := range map[string]backend.Startup{"startup-clear": backend.StartupClear, "startup-state": backend.StartupState,
		"startup-deactivated": backend.StartupDeactivated, "startup-none": backend.StartupNone} {
		if !f.Bool(name, false) {
			continue
		}
		if seen {
			return false, 0, errors.New("--flags: only one of the startup-* options may be given")
		}
		seen, powerOn, st = true, true, s
	}
	return powerOn, st, nil
}

// pidFlags reads --pid file=|fd=.
func pidFlags(o *socketOpts) (daemon.PidFile, error) {
	p := daemon.PidFile{FD: -1}
	s := o.pid.set
	if s == nil {
		return p, nil
	}
	p.Path = s.String("file", "")
	fd, err := s.Int("fd", -1)
	if err != nil {
		return p, fmt.Errorf("--pid: %w", err)
	}
	p.FD = fd
	if p.Path == "" && p.FD < 0 {
		return p, errors.New("--pid: file= or fd= is required")
	}
	return p, nil
}
