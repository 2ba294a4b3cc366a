package main

import (
	"context"
	"errors"
	"testing"

	"github.com/urfave/cli/v2"

	"github.com/vtpmd/vtpmd/backend"
	"github.com/vtpmd/vtpmd/internal/seccomp"
)

// chardevConfigOf parses a chardev command line into its instance config, as --vtpm-proxy
// would have it when proxy is set.
func chardevConfigOf(t *testing.T, proxy bool, args ...string) (backend.RunConfig, error) {
	t.Helper()
	o := newSocketOpts()
	var cfg backend.RunConfig
	var cfgErr error
	app := &cli.App{HideHelp: true, Flags: chardevFlags(o), Action: func(c *cli.Context) error {
		cfg, cfgErr = instanceConfig(c, o, c.Bool("tpm2"))
		if cfgErr == nil && proxy {
			vtpmProxyDefaults(&cfg, o)
		}
		return nil
	}}
	if err := app.RunContext(context.Background(), append([]string{"swtpm"}, args...)); err != nil {
		t.Fatal(err)
	}
	return cfg, cfgErr
}

// TestVTPMProxyDefaults: --vtpm-proxy powers the TPM on with a TPM_Startup(CLEAR) unless
// --flags names another startup, and accepts the kernel's SET_LOCALITY.
func TestVTPMProxyDefaults(t *testing.T) {
	cfg, err := chardevConfigOf(t, true, "--tpm2")
	if err != nil || !cfg.PowerOn || cfg.Startup != backend.StartupClear || !cfg.Server.AllowSetLocality {
		t.Fatalf("--vtpm-proxy: %+v %v", cfg, err)
	}
	for flags, want := range map[string]backend.Startup{"startup-state": backend.StartupState, "startup-none": backend.StartupNone,
		"not-need-init": backend.StartupClear, "disable-auto-shutdown": backend.StartupClear} {
		cfg, err := chardevConfigOf(t, true, "--tpm2", "--flags", flags)
		if err != nil || !cfg.PowerOn || cfg.Startup != want {
			t.Errorf("--vtpm-proxy --flags %s: power on %v, %v (want %v), %v", flags, cfg.PowerOn, cfg.Startup, want, err)
		}
	}
	if cfg, _ := chardevConfigOf(t, false, "--tpm2"); cfg.PowerOn || cfg.Server.AllowSetLocality {
		t.Fatalf("without --vtpm-proxy: %+v", cfg)
	}
}

// TestSeccompOption: swtpm's filter is installed unless action=none, with or without
// --seccomp; an unknown action is refused.
func TestSeccompOption(t *testing.T) {
	for args, confined := range map[string]bool{"": seccomp.Supported(), "action=kill": true, "action=log": true, "action=none": false} {
		a := []string{"--tpm2"}
		if args != "" {
			a = append(a, "--seccomp", args)
		}
		cfg, err := chardevConfigOf(t, false, a...)
		if err != nil || (cfg.Confine != nil) != confined {
			t.Errorf("--seccomp %q: confined %v, want %v (%v)", args, cfg.Confine != nil, confined, err)
		}
	}
	if _, err := chardevConfigOf(t, false, "--seccomp", "action=trap"); !errors.Is(err, seccomp.ErrAction) {
		t.Fatalf("action=trap: %v", err)
	}
}

func TestFirstFlag(t *testing.T) {
	args := []string{"swtpm", "chardev", "--tpm2", "-f", "3", "--chardev=/dev/x", "--fd=4"}
	if i := firstFlag(args, "f", "fd"); i != 3 {
		t.Errorf("-f at %d", i)
	}
	if i := firstFlag(args, "c", "chardev"); i != 5 {
		t.Errorf("--chardev at %d", i)
	}
	if i := firstFlag(args, "R", "chroot"); i != len(args) {
		t.Errorf("absent --chroot at %d", i)
	}
}
