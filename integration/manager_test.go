//go:build integration

package integration

import (
	"bytes"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"

	"github.com/vtpmd/vtpmd/internal/swtpmtest"
	"github.com/vtpmd/vtpmd/internal/tpmclient"
)

// hostManager is a `vtpmd manager` process on a stand-in hardware TPM (Debian's swtpm).
type hostManager struct {
	t    *testing.T
	hw   *swtpmtest.TPM
	bin  string // the vtpmd it runs: the instances must run the same file
	dir  string
	sock string
	args []string
	cmd  *exec.Cmd
	log  string // every run's output, appended
}

// startHostManager starts a manager of env.bin on a private socket, with its own registry.
func startHostManager(t *testing.T, extra ...string) *hostManager {
	t.Helper()
	sockDir, err := os.MkdirTemp("", "vtpmd-mgr-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(sockDir) })
	dir := t.TempDir()
	return newHostManager(t, env.bin, filepath.Join(sockDir, "manager.sock"), "", filepath.Join(dir, "registry"), extra...)
}

// newHostManager starts `bin manager --auto-enroll` listening on sock (its group: group, ""
// unchanged), naming VMs from the registry at registry. Its output is logged when the test
// fails.
func newHostManager(t *testing.T, bin, sock, group, registry string, extra ...string) *hostManager {
	t.Helper()
	m := &hostManager{t: t, hw: swtpmtest.Start(t), bin: bin, dir: t.TempDir(), sock: sock}
	m.log = filepath.Join(t.TempDir(), "manager.log")
	m.args = append([]string{"manager", "--tpm", m.hw.Spec(), "--dir", m.dir, "--listen", m.sock, "--group", group,
		"--registry", registry, "--auto-enroll"}, extra...)
	t.Cleanup(func() {
		if t.Failed() {
			b, _ := os.ReadFile(m.log)
			t.Logf("manager output:\n%s", tail(string(b), 4000))
		}
	})
	m.start()
	return m
}

func (m *hostManager) start() {
	m.t.Helper()
	logf, err := os.OpenFile(m.log, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
	if err != nil {
		m.t.Fatal(err)
	}
	defer logf.Close()
	m.cmd = exec.Command(m.bin, m.args...)
	m.cmd.Stdout, m.cmd.Stderr = logf, logf
	if err := m.cmd.Start(); err != nil {
		m.t.Fatal(err)
	}
	cmd := m.cmd
	m.t.Cleanup(func() {
		if cmd.ProcessState == nil {
			cmd.Process.Kill()
			cmd.Wait()
		}
	})
	waitFor(m.t, 20*time.Second, func() bool { _, err := os.Stat(m.sock); return err == nil })
}

// stop ends the manager with SIGTERM, as an init system does, and waits for it.
func (m *hostManager) stop() {
	m.t.Helper()
	if m.cmd.ProcessState != nil {
		return
	}
	m.cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { m.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(20 * time.Second):
		m.t.Errorf("the manager did not stop on SIGTERM within 20s; killing it")
		m.cmd.Process.Kill()
		<-done
	}
}

func (m *hostManager) restart() {
	m.t.Helper()
	m.stop()
	if _, err := os.Lstat(m.sock); err == nil {
		m.t.Fatalf("the manager left its socket %s behind", m.sock)
	}
	m.start()
}

// vtpmdOnce starts vtpmd socket on state dir with the manager, initializes the TPM and runs f
// on its data channel, then shuts it down.
func vtpmdOnce(t *testing.T, m *hostManager, state string, f func(tp tpmclient.SendFunc)) {
	t.Helper()
	e := startEmulator(t, env.bin, state, "--tpm2", "--manager", m.sock)
	c := ctrlClient(t, e.ctrl)
	if err := c.Init(0); err != nil {
		t.Fatalf("INIT: %v\n%s", err, readFile(t, e.log))
	}
	conn := dataChannel(t, c)
	f(tpmclient.SendFunc(func(cmd []byte) ([]byte, error) { return tpmclient.RoundTrip(conn, cmd) }))
	c.Shutdown()
	e.cmd.Wait()
}

const nvIndex = 0x01500042

// TestManagerSealsState: with a manager, a new vTPM's state is encrypted with a key sealed by
// the host's TPM: Debian's swtpm cannot read it, the vTPM keeps its NV across restarts of
// itself and of the manager; the state copied to another host (another TPM) is refused,
// clearly and untouched, until it is recovered there with the recovery key.
func TestManagerSealsState(t *testing.T) {
	needRefSwtpm(t)
	priv, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	keys := t.TempDir()
	pubPEM, privPEM := filepath.Join(keys, "recovery.pub"), filepath.Join(keys, "recovery.key")
	pubDER, _ := x509.MarshalPKIXPublicKey(&priv.PublicKey)
	os.WriteFile(pubPEM, pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pubDER}), 0o644)
	os.WriteFile(privPEM, pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(priv)}), 0o600)

	a := startHostManager(t, "--recovery-key", pubPEM)
	state := filepath.Join(t.TempDir(), "tpm2")
	os.MkdirAll(state, 0o700)
	want := []byte("sealed-by-host-A")
	vtpmdOnce(t, a, state, func(tp tpmclient.SendFunc) {
		if err := tpmclient.Startup(tp); err != nil {
			t.Fatal(err)
		}
		if err := tpmclient.NVDefine(tp, nvIndex, uint16(len(want))); err != nil {
			t.Fatal(err)
		}
		if err := tpmclient.NVWrite(tp, nvIndex, want, 0); err != nil {
			t.Fatal(err)
		}
		tpmclient.Shutdown(tp, false)
	})
	// Debian's swtpm without the key cannot use it
	ref := startEmulator(t, refSwtpm(), state, "--tpm2")
	if err := ctrlClient(t, ref.ctrl).Init(0); err == nil {
		t.Fatal("Debian's swtpm initialized the sealed state without a key")
	}
	ref.cmd.Process.Kill()
	ref.cmd.Wait()

	// the vTPM's identity: its EK (from the endorsement seed in its state) and its NV
	var ek []byte
	readNV := func(m *hostManager, dir string) {
		t.Helper()
		vtpmdOnce(t, m, dir, func(tp tpmclient.SendFunc) {
			tpmclient.Startup(tp)
			got, err := tpmclient.NVRead(tp, nvIndex, uint16(len(want)), 0)
			if err != nil || !bytes.Equal(got, want) {
				t.Fatalf("NV after restart: %q %v", got, err)
			}
			k, err := tpmclient.CreatePrimary(tp, tpm2.TPMRHEndorsement, tpm2.RSAEKTemplate)
			if err != nil {
				t.Fatal(err)
			}
			pub := tpm2.Marshal(k.Public)
			if ek != nil && !bytes.Equal(pub, ek) {
				t.Fatal("the vTPM's EK changed")
			}
			ek = pub
		})
	}
	readNV(a, state)
	a.restart()
	readNV(a, state)

	// another host: its manager has no key for this state
	copyDir := filepath.Join(t.TempDir(), "tpm2")
	if out, err := exec.Command("cp", "-a", state, copyDir).CombinedOutput(); err != nil {
		t.Fatalf("cp: %v %s", err, out)
	}
	before := dirHash(t, copyDir)
	b := startHostManager(t)
	out, err := exec.Command(env.bin, "socket", "--tpm2", "--tpmstate", "dir="+copyDir, "--manager", b.sock,
		"--ctrl", "type=unixio,path="+filepath.Join(t.TempDir(), "c.sock")).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "holds no key for it") {
		t.Fatalf("state from another host: err %v, output %s", err, out)
	}
	if dirHash(t, copyDir) != before {
		t.Fatal("the refused state was changed")
	}
	// recovered with the recovery key: same NV contents
	rec := exec.Command(env.bin, "manager", "recover", "--socket", b.sock, "--ledger", filepath.Join(a.dir, "ledger.json"),
		"--recovery-private-key", privPEM, "--state", copyDir, state)
	if out, err := rec.CombinedOutput(); err != nil {
		t.Fatalf("recover: %v\n%s", err, out)
	}
	readNV(b, copyDir)
}

// TestManagerRollback: an older copy of an enrolled vTPM's state is refused at start with the
// versions found and expected, and nothing is changed; `vtpmd manager accept` lets it start
// once. A rolled back ledger keeps the manager from starting.
func TestManagerRollback(t *testing.T) {
	m := startHostManager(t)
	state := filepath.Join(t.TempDir(), "tpm2")
	os.MkdirAll(state, 0o700)
	writeNV := func(v string) {
		vtpmdOnce(t, m, state, func(tp tpmclient.SendFunc) {
			tpmclient.Startup(tp)
			tpmclient.NVDefine(tp, nvIndex, 2) // fails harmlessly once defined
			if err := tpmclient.NVWrite(tp, nvIndex, []byte(v), 0); err != nil {
				t.Fatal(err)
			}
			tpmclient.Shutdown(tp, false)
		})
	}
	writeNV("v1")
	old := filepath.Join(t.TempDir(), "old")
	if out, err := exec.Command("cp", "-a", state, old).CombinedOutput(); err != nil {
		t.Fatalf("cp: %v %s", err, out)
	}
	oldLedger := readFile(t, filepath.Join(m.dir, "ledger.json"))
	writeNV("v2")
	// the operator's copy of last week's state
	os.RemoveAll(state)
	if out, err := exec.Command("cp", "-a", old, state).CombinedOutput(); err != nil {
		t.Fatalf("cp: %v %s", err, out)
	}
	before := dirHash(t, state)
	out, err := exec.Command(env.bin, "socket", "--tpm2", "--tpmstate", "dir="+state, "--manager", m.sock,
		"--ctrl", "type=unixio,path="+filepath.Join(t.TempDir(), "c.sock")).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "refusing to start") || !strings.Contains(string(out), "rollback") {
		t.Fatalf("rolled back state: err %v, output %s", err, out)
	}
	t.Logf("refused: %s", strings.TrimSpace(string(out)))
	if dirHash(t, state) != before {
		t.Fatal("the refused state was changed")
	}
	if out, err := exec.Command(env.bin, "manager", "accept", "--socket", m.sock, state).CombinedOutput(); err != nil {
		t.Fatalf("accept: %v %s", err, out)
	}
	vtpmdOnce(t, m, state, func(tp tpmclient.SendFunc) {
		tpmclient.Startup(tp)
		if got, err := tpmclient.NVRead(tp, nvIndex, 2, 0); err != nil || string(got) != "v1" {
			t.Fatalf("accepted state: %q %v", got, err)
		}
	})
	// the manager's own records rolled back
	m.cmd.Process.Signal(syscall.SIGTERM)
	m.cmd.Wait()
	os.WriteFile(filepath.Join(m.dir, "ledger.json"), []byte(oldLedger), 0o600)
	out, err = exec.Command(env.bin, m.args...).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "ledger rolled back") {
		t.Fatalf("manager on a rolled back ledger: err %v, output %s", err, out)
	}
}
