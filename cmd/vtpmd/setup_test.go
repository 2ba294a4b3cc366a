package main

import (
	"context"
	"slices"
	"testing"

	"github.com/urfave/cli/v2"

	"github.com/vtpmd/vtpmd/backend/setup"
)

func TestSetupArgs(t *testing.T) {
	cases := []struct{ in, want []string }{
		{[]string{"x", "--create-config-files", "skip-if-exist"}, []string{"x", "--create-config-files=skip-if-exist"}},
		{[]string{"x", "--create-config-files", "--tpm2"}, []string{"x", "--create-config-files=", "--tpm2"}},
		{[]string{"x", "--create-config-files"}, []string{"x", "--create-config-files="}},
		{[]string{"x", "--tpm2", "--tpm-state", "/d"}, []string{"x", "--tpm2", "--tpm-state", "/d"}},
		{[]string{"x", "--pcr-banks", "sha1", "--tpm2", "--pcr-banks= sha384 "}, []string{"x", "--pcr-banks", "sha1,sha384", "--tpm2"}},
	}
	for _, tc := range cases {
		if got := setupArgs(tc.in); !slices.Equal(got, tc.want) {
			t.Errorf("setupArgs(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}

// TestSetupOptions: the command line turns into what it means, including options given
// empty and the deprecated ones.
func TestSetupOptions(t *testing.T) {
	parse := func(args ...string) setup.Options {
		t.Helper()
		var o setup.Options
		app := &cli.App{HideHelp: true, Flags: setupFlags(), Action: func(c *cli.Context) error { o = setupOptions(c, "swtpm_setup"); return nil }}
		if err := app.RunContext(context.Background(), setupArgs(append([]string{"swtpm_setup"}, args...))); err != nil {
			t.Fatal(err)
		}
		return o
	}
	o := parse("--tpm2", "--tpmstate", "/d", "--pcr-banks", "sha1", "--pcr-banks", "sha384", "--create-config-files", "--tcsd-system-ps-file", "x", "--keyfile-fd", "3", "--take-ownership")
	if !o.TPM2 || o.StatePath != "/d" || o.PCRBanks != "sha1,sha384" || !o.PCRBanksGiven || !o.CreateConfigFiles || o.ConfigFilesFlags != "" ||
		!slices.Equal(o.IgnoredOptions, []string{"tcsd-system-ps-file"}) || o.KeyFileFD != "3" || !o.TakeOwnership || o.Program != "swtpm_setup" {
		t.Fatalf("options %+v", o)
	}
	if o := parse("--pcr-banks="); !o.PCRBanksGiven || o.PCRBanks != "" || o.CreateConfigFiles {
		t.Fatalf("empty --pcr-banks: %+v", o)
	}
}
