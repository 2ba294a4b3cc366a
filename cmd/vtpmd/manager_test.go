package main

import (
	"context"
	"os"
	"strings"
	"testing"

	"github.com/urfave/cli/v2"
)

// TestManagerUnitFile: the systemd unit shipped in the repository runs `vtpmd manager` with
// flags the command accepts.
func TestManagerUnitFile(t *testing.T) {
	raw, err := os.ReadFile("../../manager/systemd/vtpmd-manager.service")
	if err != nil {
		t.Fatal(err)
	}
	var args []string
	for _, line := range strings.Split(string(raw), "\n") {
		if v, ok := strings.CutPrefix(line, "ExecStart="); ok {
			args = strings.Fields(v)
		}
	}
	if len(args) < 2 || !strings.HasSuffix(args[0], "/vtpmd") || args[1] != "manager" {
		t.Fatalf("ExecStart = %q", args)
	}
	cmd := managerCommand()
	var got *cli.Context
	cmd.Action = func(c *cli.Context) error { got = c; return nil }
	app := &cli.App{Name: "vtpmd", Commands: []*cli.Command{cmd}}
	if err := app.RunContext(context.Background(), args); err != nil || got == nil {
		t.Fatalf("vtpmd %q: %v", args[1:], err)
	}
	if got.String("tpm") != "device:/dev/tpmrm0" || got.String("listen") != "/run/vtpmd/manager.sock" || !got.Bool("auto-enroll") {
		t.Fatalf("unit flags: tpm=%q listen=%q auto-enroll=%v", got.String("tpm"), got.String("listen"), got.Bool("auto-enroll"))
	}
}
