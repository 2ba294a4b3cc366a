package manager

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vtpmd/vtpmd/internal/swtpmtest"
)

// askSetup is ask from a "vtpmd setup" process (swtpm_setup's command line) making the vTPM at
// path.
func (m *testManager) askSetup(path string, req KeyRequest) string {
	m.t.Helper()
	b, _ := json.Marshal(req)
	cmd := exec.Command(testBinary(m.t), "setup", "--tpm2", "--tpm-state", path, "--createek")
	cmd.Env = append(os.Environ(), childEnv+"="+string(b), "VTPMD_MANAGER_TEST_SOCK="+m.sock)
	out, _ := cmd.CombinedOutput()
	return strings.TrimSpace(string(out))
}

// TestFreshStateReenrolled: libvirt removes a transient domain's vTPM state when it stops and
// makes a new vTPM at the same path (swtpm_setup) when the domain is created again. That new
// vTPM is enrolled with a new key and starts from version 0; only swtpm_setup on a path
// that holds no state does that. A vTPM process on a state that went missing is still told the
// version its record expects (the store refuses it), and a setup whose state holds blobs gets
// the record's key.
func TestFreshStateReenrolled(t *testing.T) {
	m := startManager(t, swtpmtest.Start(t), t.TempDir(), nil)
	st := stateDir(t)
	first := keyOf(t, m.askSetup(st, KeyRequest{StatePath: st, TPM2: true, Fresh: true}))
	if out := m.ask(st, KeyRequest{StatePath: st}, "5", nil); out != "OK" {
		t.Fatalf("report: %q", out)
	}
	// the state is gone; the vTPM process asks as for a new vTPM: the record stands
	line := m.ask(st, KeyRequest{StatePath: st, TPM2: true, Fresh: true}, "", nil)
	if f := strings.Fields(line); !bytes.Equal(keyOf(t, line), first) || len(f) < 3 || f[2] != "5" {
		t.Fatalf("a vTPM process on the emptied state: %q, want the record's key and version 5", line)
	}
	// swtpm_setup makes a new vTPM there: new key, new record
	line = m.askSetup(st, KeyRequest{StatePath: st, TPM2: true, Fresh: true})
	second := keyOf(t, line)
	if bytes.Equal(second, first) || strings.Fields(line)[2] != "0" {
		t.Fatalf("swtpm_setup on the emptied state: %q, want a new key and version 0", line)
	}
	s, err := m.client().Status(context.Background())
	if err != nil || len(s.VMs) != 1 || s.VMs[0].Version != 0 || s.VMs[0].StatePath != st || !s.VMs[0].Sealed {
		t.Fatalf("status after re-enrolment: %+v %v", s, err)
	}
	// a setup whose state holds blobs (whatever it says) gets the record's key
	if err := os.WriteFile(filepath.Join(st, "tpm2-00.permall"), []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	if k := keyOf(t, m.askSetup(st, KeyRequest{StatePath: st, TPM2: true, Fresh: true})); !bytes.Equal(k, second) {
		t.Fatal("swtpm_setup on existing state got a new key")
	}
	// the new record survives a restart
	m.close()
	m.start()
	if k := keyOf(t, m.ask(st, KeyRequest{StatePath: st, TPM2: true}, "", nil)); !bytes.Equal(k, second) {
		t.Fatal("another key after a manager restart")
	}
}
