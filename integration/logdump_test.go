//go:build integration

package integration

import (
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/internal/tpmclient"
	"github.com/vtpmd/vtpmd/internal/tpmwire"
)

// TestLogTrafficDump: for the same traffic, `--log level=20` holds the same dump lines (titles
// and hex) in vtpmd's log as in Debian's swtpm's; level 1 holds none.
func TestLogTrafficDump(t *testing.T) {
	needRefSwtpm(t)
	traffic := func(bin, level string) []string {
		t.Helper()
		dir := t.TempDir()
		sockDir, _ := os.MkdirTemp("", "vtpmd-dump-")
		defer os.RemoveAll(sockDir)
		ctrl, data, log := filepath.Join(sockDir, "c"), filepath.Join(sockDir, "s"), filepath.Join(dir, "log")
		cmd := exec.Command(bin, "socket", "--tpm2", "--tpmstate", "dir="+dir, "--ctrl", "type=unixio,path="+ctrl,
			"--server", "type=unixio,path="+data, "--log", "file="+log+",level="+level, "--flags", "not-need-init,startup-clear")
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		defer func() { cmd.Process.Kill(); cmd.Wait() }()
		waitFor(t, 10*time.Second, func() bool { _, err := os.Stat(data); return err == nil })
		c := ctrlClient(t, ctrl)
		if _, err := c.GetConfig(); err != nil {
			t.Fatal(err)
		}
		conn, err := net.Dial("unix", data)
		if err != nil {
			t.Fatal(err)
		}
		// a deterministic answer (GetRandom's is not): TPM2_Startup again gets TPM_RC_INITIALIZE
		if _, err := tpmclient.RoundTrip(conn, tpmwire.Startup2(tpmwire.SUClear)); err != nil {
			t.Fatal(err)
		}
		conn.Close()
		c.Shutdown()
		cmd.Wait()
		raw, err := os.ReadFile(log)
		if err != nil {
			t.Fatal(err)
		}
		var lines []string
		for _, l := range strings.Split(string(raw), "\n") {
			if strings.HasPrefix(l, " ") {
				lines = append(lines, l)
			}
		}
		return lines
	}
	want := traffic(refSwtpm(), "20")
	got := traffic(env.bin, "20")
	if len(want) < 6 {
		t.Fatalf("Debian's swtpm dumped %d lines: %q", len(want), want)
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Fatalf("dump lines differ\nvtpmd:\n%s\nswtpm:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	if lines := traffic(env.bin, "1"); len(lines) != 0 {
		t.Fatalf("level 1 dumped traffic: %q", lines)
	}
}
