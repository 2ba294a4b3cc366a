package manager

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/vtpmd/vtpmd/backend/blob"
	"github.com/vtpmd/vtpmd/backend/store"
	"github.com/vtpmd/vtpmd/emulator"
	"github.com/vtpmd/vtpmd/internal/swtpmtest"
	"github.com/vtpmd/vtpmd/internal/tpmclient"
	"github.com/vtpmd/vtpmd/manager/registry"
)

// A test re-executes itself as a "vTPM process": its command line says `socket --tpmstate
// dir=PATH`, which is what the manager checks through SO_PEERCRED and /proc.
const childEnv = "VTPMD_MANAGER_TEST_CHILD"

func TestMain(m *testing.M) {
	if os.Getenv(childEnv) != "" {
		os.Exit(child())
	}
	code := m.Run()
	if binCopy != "" {
		os.RemoveAll(filepath.Dir(binCopy))
	}
	os.Exit(code)
}

// child asks the manager for a key (or reports a version) and prints the result.
func child() int {
	var req KeyRequest
	if err := json.Unmarshal([]byte(os.Getenv(childEnv)), &req); err != nil {
		fmt.Println("ERR", err)
		return 1
	}
	c := NewClient(os.Getenv("VTPMD_MANAGER_TEST_SOCK"))
	ctx := context.Background()
	if v := os.Getenv("VTPMD_MANAGER_TEST_REPORT"); v != "" {
		var n uint64
		fmt.Sscan(v, &n)
		if err := c.ReportVersion(ctx, req.StatePath, n); err != nil {
			fmt.Println("ERR", err)
			return 1
		}
		fmt.Println("OK")
		return 0
	}
	resp, err := c.Key(ctx, req)
	if err != nil {
		fmt.Println("ERR", err)
		return 1
	}
	fmt.Printf("KEY %x %d %s\n", resp.Key, resp.Version, resp.VM)
	return 0
}

type testManager struct {
	t    *testing.T
	hw   *swtpmtest.TPM
	dir  string
	sock string
	srv  *Server
	stop context.CancelFunc
	done chan struct{}
	reg  *registry.Registry
	rk   *rsa.PublicKey
}

func startManager(t *testing.T, hw *swtpmtest.TPM, dir string, rk *rsa.PublicKey) *testManager {
	t.Helper()
	m := &testManager{t: t, hw: hw, dir: dir, reg: registry.New(filepath.Join(dir, "registry")), rk: rk}
	m.start()
	return m
}

func (m *testManager) start() {
	t := m.t
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	h, err := OpenHardware(ctx, m.hw.Spec(), "none", 0)
	if err != nil {
		cancel()
		t.Fatalf("open hardware: %v\n%s", err, m.hw.Log())
	}
	srv, err := New(ctx, Config{Dir: m.dir, AutoEnroll: true, Registry: m.reg, RecoveryKey: m.rk, InstanceExe: testBinary(t)}, h)
	if err != nil {
		cancel()
		h.Close()
		t.Fatal(err)
	}
	sockDir, _ := os.MkdirTemp("", "vtpmd-mgr-")
	t.Cleanup(func() { os.RemoveAll(sockDir) })
	m.sock = filepath.Join(sockDir, "m.sock")
	ln, err := listenAPI(m.sock, "")
	if err != nil {
		t.Fatal(err)
	}
	m.srv, m.stop, m.done = srv, cancel, make(chan struct{})
	go func() { srv.Serve(ctx, ln); h.Close(); close(m.done) }()
	t.Cleanup(m.close)
}

func (m *testManager) close() {
	if m.stop != nil {
		m.stop()
		<-m.done
		m.stop = nil
	}
}

func (m *testManager) client() *Client { return NewClient(m.sock) }

// ask runs a child "vTPM process" serving servePath that sends req; it returns the child's
// output line.
func (m *testManager) ask(servePath string, req KeyRequest, report string, cred *syscall.Credential) string {
	m.t.Helper()
	b, _ := json.Marshal(req)
	cmd := exec.Command(testBinary(m.t), "socket", "--tpm2", "--tpmstate", "dir="+servePath+",mode=0600")
	cmd.Env = append(os.Environ(), childEnv+"="+string(b), "VTPMD_MANAGER_TEST_SOCK="+m.sock, "VTPMD_MANAGER_TEST_REPORT="+report)
	if cred != nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
	}
	out, _ := cmd.CombinedOutput()
	return strings.TrimSpace(string(out))
}

// testBinary is a copy of the test binary that any user may run.
func testBinary(t *testing.T) string {
	t.Helper()
	if binCopy == "" {
		dir, err := os.MkdirTemp("", "vtpmd-mgr-bin-")
		if err != nil {
			t.Fatal(err)
		}
		os.Chmod(dir, 0o755)
		data, err := os.ReadFile(os.Args[0])
		if err != nil {
			t.Fatal(err)
		}
		binCopy = filepath.Join(dir, "manager.test")
		if err := os.WriteFile(binCopy, data, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return binCopy
}

var binCopy string

func keyOf(t *testing.T, line string) []byte {
	t.Helper()
	f := strings.Fields(line)
	if len(f) < 2 || f[0] != "KEY" {
		t.Fatalf("no key: %q", line)
	}
	k, err := hex.DecodeString(f[1])
	if err != nil || len(k) != stateKeySize {
		t.Fatalf("bad key %q: %v", f[1], err)
	}
	return k
}

func stateDir(t *testing.T) string {
	t.Helper()
	d := filepath.Join(t.TempDir(), "tpm2")
	if err := os.Mkdir(d, 0o700); err != nil {
		t.Fatal(err)
	}
	return d
}

// TestKeyRelease: a new vTPM is enrolled on its first request and gets the same key after;
// the key is released only to the process serving that state, as its owner or root.
func TestKeyRelease(t *testing.T) {
	m := startManager(t, swtpmtest.Start(t), t.TempDir(), nil)
	st := stateDir(t)
	first := keyOf(t, m.ask(st, KeyRequest{StatePath: st, TPM2: true, Fresh: true}, "", nil))
	again := keyOf(t, m.ask(st, KeyRequest{StatePath: st, TPM2: true}, "", nil))
	if !bytes.Equal(first, again) {
		t.Fatal("the second request got another key")
	}
	other := stateDir(t)
	if out := m.ask(other, KeyRequest{StatePath: st, TPM2: true}, "", nil); !strings.Contains(out, "does not serve") {
		t.Fatalf("another vTPM's process got the key: %q", out)
	}
	if _, err := m.client().Key(context.Background(), KeyRequest{StatePath: st}); !errors.Is(err, ErrForbidden) {
		t.Fatalf("a process that serves no state: %v", err)
	}
	if os.Getuid() == 0 {
		// nobody may run the test binary and reach the socket: only the manager refuses it
		os.Chmod(filepath.Dir(m.sock), 0o755)
		os.Chmod(m.sock, 0o666)
		nobody := &syscall.Credential{Uid: 65534, Gid: 65534}
		if out := m.ask(st, KeyRequest{StatePath: st, TPM2: true}, "", nobody); !strings.Contains(out, "does not own") {
			t.Fatalf("another uid got the key: %q", out)
		}
	}
	unknown := stateDir(t)
	if out := m.ask(unknown, KeyRequest{StatePath: unknown, TPM2: true}, "", nil); !strings.Contains(out, "not enrolled") {
		t.Fatalf("an existing, unenrolled vTPM: %q", out)
	}
	// versions only grow; the record is what the next start must find at least
	for _, v := range []string{"5", "3"} {
		if out := m.ask(st, KeyRequest{StatePath: st}, v, nil); out != "OK" {
			t.Fatalf("report %s: %q", v, out)
		}
	}
	if f := strings.Fields(m.ask(st, KeyRequest{StatePath: st, TPM2: true}, "", nil)); len(f) < 3 || f[2] != "5" {
		t.Fatalf("recorded version: %v, want 5", f)
	}
	// the manager restarts: same records, same key
	m.close()
	m.start()
	if k := keyOf(t, m.ask(st, KeyRequest{StatePath: st, TPM2: true}, "", nil)); !bytes.Equal(k, first) {
		t.Fatal("another key after a manager restart")
	}
	s, err := m.client().Status(context.Background())
	if err != nil || len(s.VMs) != 1 || s.VMs[0].Version != 5 || !s.VMs[0].Sealed {
		t.Fatalf("status %+v %v", s, err)
	}
}

// TestLedgerProtection: the ledger cannot be rolled back, edited, or used with another TPM.
func TestLedgerProtection(t *testing.T) {
	hw, dir := swtpmtest.Start(t), t.TempDir()
	m := startManager(t, hw, dir, nil)
	st := stateDir(t)
	keyOf(t, m.ask(st, KeyRequest{StatePath: st, TPM2: true, Fresh: true}, "", nil))
	old, err := os.ReadFile(filepath.Join(dir, ledgerName))
	if err != nil {
		t.Fatal(err)
	}
	m.ask(st, KeyRequest{StatePath: st}, "7", nil)
	m.ask(st, KeyRequest{StatePath: st}, "8", nil)
	m.close()
	ctx := context.Background()
	reopen := func(hwSpec string) error {
		h, err := OpenHardware(ctx, hwSpec, "none", 0)
		if err != nil {
			return err
		}
		defer h.Close()
		_, err = New(ctx, Config{Dir: dir, Registry: m.reg}, h)
		return err
	}
	cur, _ := os.ReadFile(filepath.Join(dir, ledgerName))
	os.WriteFile(filepath.Join(dir, ledgerName), old, 0o600)
	if err := reopen(hw.Spec()); !errors.Is(err, ErrLedgerRollback) {
		t.Fatalf("rolled back ledger: %v", err)
	}
	edited := bytes.Replace(cur, []byte(`"version":8`), []byte(`"version":1`), 1)
	if bytes.Equal(edited, cur) {
		edited = bytes.Replace(cur, []byte(`dmVyc2lvbiI6OC`), []byte(`dmVyc2lvbiI6MS`), 1)
	}
	os.WriteFile(filepath.Join(dir, ledgerName), edited, 0o600)
	if err := reopen(hw.Spec()); err == nil || !strings.Contains(err.Error(), "authentication failed") {
		t.Fatalf("edited ledger: %v", err)
	}
	os.WriteFile(filepath.Join(dir, ledgerName), cur, 0o600)
	if err := reopen(hw.Spec()); err != nil {
		t.Fatalf("the current ledger: %v", err)
	}
	if err := reopen(swtpmtest.Start(t).Spec()); err == nil || !strings.Contains(err.Error(), "ledger key") {
		t.Fatalf("the ledger with another TPM: %v", err)
	}
}

// TestEnrollUnenroll: an existing plain state is re-encrypted in place with a sealed key, and
// back; an interrupted enrolment (files half converted) is finished by running it again.
func TestEnrollUnenroll(t *testing.T) {
	m := startManager(t, swtpmtest.Start(t), t.TempDir(), nil)
	st := stateDir(t)
	writeState(t, st, nil, "permanent", "volatile")
	ctx := context.Background()
	if _, err := m.client().Enroll(ctx, VMRequest{VM: st}); err != nil {
		t.Fatal(err)
	}
	key := keyOf(t, m.ask(st, KeyRequest{StatePath: st, TPM2: true}, "", nil))
	k, _ := blob.NewKey(key)
	checkState(t, st, k, "permanent", "volatile")
	if _, err := m.client().Enroll(ctx, VMRequest{VM: st}); err == nil {
		t.Fatal("enrolled twice")
	}
	if _, err := m.client().Unenroll(ctx, VMRequest{VM: st}); err != nil {
		t.Fatal(err)
	}
	checkState(t, st, nil, "permanent", "volatile")
	if out := m.ask(st, KeyRequest{StatePath: st, TPM2: true}, "", nil); !strings.Contains(out, "not enrolled") {
		t.Fatalf("after unenroll: %q", out)
	}

	// interrupted: the record says enrolling, one file is converted, one is not
	st2 := stateDir(t)
	writeState(t, st2, nil, "permanent", "volatile")
	m.srv.mu.Lock()
	rec, key2, err := m.srv.newRecord(ctx, st2, true)
	if err != nil {
		t.Fatal(err)
	}
	rec.Phase = phaseEnrolling
	m.srv.ledger.VMs[rec.ID] = rec
	m.srv.store.save(ctx, m.srv.ledger)
	m.srv.mu.Unlock()
	k2, _ := blob.NewKey(key2)
	s, _ := store.Open("dir://"+st2, store.Options{TPM2: true, StateKey: k2})
	s.Store(emulator.StatePermanent, []byte("permanent"))
	s.Close()
	if out := m.ask(st2, KeyRequest{StatePath: st2, TPM2: true}, "", nil); !strings.Contains(out, "enrolment incomplete") {
		t.Fatalf("start during an interrupted enrolment: %q", out)
	}
	if _, err := m.client().Enroll(ctx, VMRequest{VM: st2}); err != nil {
		t.Fatal(err)
	}
	checkState(t, st2, k2, "permanent", "volatile")
}

// TestRecover: a vTPM enrolled on a host whose TPM is gone is brought to another host's
// manager with the recovery private key; it gets the same state key there.
func TestRecover(t *testing.T) {
	priv, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	privPEM := filepath.Join(t.TempDir(), "recovery.pem")
	os.WriteFile(privPEM, pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(priv)}), 0o600)
	dirA := t.TempDir()
	a := startManager(t, swtpmtest.Start(t), dirA, &priv.PublicKey)
	st := stateDir(t)
	key := keyOf(t, a.ask(st, KeyRequest{StatePath: st, TPM2: true, Fresh: true}, "", nil))
	k, _ := blob.NewKey(key)
	writeState(t, st, k, "permanent")
	a.ask(st, KeyRequest{StatePath: st}, "4", nil)
	a.close()

	b := startManager(t, swtpmtest.Start(t), t.TempDir(), nil)
	if out := b.ask(st, KeyRequest{StatePath: st, TPM2: true}, "", nil); !strings.Contains(out, "not enrolled") {
		t.Fatalf("host B before recovery: %q", out)
	}
	ctx := context.Background()
	wrong, _ := rsa.GenerateKey(rand.Reader, 2048)
	wrongPEM := filepath.Join(t.TempDir(), "wrong.pem")
	os.WriteFile(wrongPEM, pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(wrong)}), 0o600)
	ledger := filepath.Join(dirA, ledgerName)
	if _, err := b.client().Recover(ctx, RecoverRequest{Ledger: ledger, PrivateKey: wrongPEM, VM: st}); err == nil {
		t.Fatal("recovered with the wrong private key")
	}
	if _, err := b.client().Recover(ctx, RecoverRequest{Ledger: ledger, PrivateKey: privPEM, VM: st}); err != nil {
		t.Fatal(err)
	}
	line := b.ask(st, KeyRequest{StatePath: st, TPM2: true}, "", nil)
	if got := keyOf(t, line); !bytes.Equal(got, key) {
		t.Fatal("recovered another key")
	}
	if f := strings.Fields(line); f[2] != "4" {
		t.Fatalf("recovered version %s, want 4", f[2])
	}
}

func writeState(t *testing.T, dir string, key *blob.Key, names ...string) {
	t.Helper()
	s, err := store.Open("dir://"+dir, store.Options{TPM2: true, StateKey: key})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	for i, n := range names {
		if err := s.Store([]emulator.StateType{emulator.StatePermanent, emulator.StateVolatile}[i], []byte(n)); err != nil {
			t.Fatal(err)
		}
	}
}

func checkState(t *testing.T, dir string, key *blob.Key, names ...string) {
	t.Helper()
	s, err := store.Open("dir://"+dir, store.Options{TPM2: true, StateKey: key})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	for i, n := range names {
		got, err := s.Load([]emulator.StateType{emulator.StatePermanent, emulator.StateVolatile}[i])
		if err != nil || string(got) != n {
			t.Fatalf("blob %d: %q, %v (want %q)", i, got, err, n)
		}
	}
}

// TestPolicyPCR: with --policy pcr:..., a state key unseals only while the host's PCRs hold
// the values they had when it was sealed; after a host change the vTPM is refused, clearly.
func TestPolicyPCR(t *testing.T) {
	hw := swtpmtest.Start(t)
	ctx := context.Background()
	h, err := OpenHardware(ctx, hw.Spec(), "pcr:sha256:16", 0)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	if h.PolicyName() != "pcr:sha256:16" {
		t.Fatalf("policy %q", h.PolicyName())
	}
	sealed, err := h.Seal(ctx, []byte("0123456789abcdef0123456789abcdef"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := h.Unseal(ctx, sealed); err != nil {
		t.Fatalf("unseal before the change: %v", err)
	}
	extendHostPCR(t, hw, 16)
	if _, err := h.Unseal(ctx, sealed); err == nil || !strings.Contains(err.Error(), "16") {
		t.Fatalf("unseal after PCR 16 changed: %v", err)
	}
	for _, bad := range []string{"pcr", "pcr:sha256:x", "tpm2", "pcr:sha999:1"} {
		if _, err := OpenHardware(ctx, hw.Spec(), bad, 0); err == nil {
			t.Errorf("policy %q accepted", bad)
		}
	}
}

// extendHostPCR extends a PCR of the stand-in hardware TPM, as a host event would.
func extendHostPCR(t *testing.T, hw *swtpmtest.TPM, pcr uint32) {
	t.Helper()
	c, err := net.Dial("unix", hw.Socket)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := tpmclient.PCRExtend(tpmclient.Stream(c), pcr, bytes.Repeat([]byte{1}, 32)); err != nil {
		t.Fatal(err)
	}
}

// TestKeySourceWithoutManager: with no manager running, a plain state is served as without
// one, and an encrypted state without its key is refused at once with the reason.
func TestKeySourceWithoutManager(t *testing.T) {
	ctx := context.Background()
	plain, sealed := stateDir(t), stateDir(t)
	writeState(t, plain, nil, "permanent")
	k, _ := blob.NewKey(bytes.Repeat([]byte{3}, 32))
	writeState(t, sealed, k, "permanent")
	gone := NewClient(filepath.Join(t.TempDir(), "no-manager.sock"))
	ks := &KeySource{Client: gone, StateURI: "dir://" + plain, TPM2: true}
	if keys, err := ks.Keys(ctx); err != nil || keys.State != nil || keys.RecordVersion != nil {
		t.Fatalf("plain state without a manager: %+v %v", keys, err)
	}
	ks.StateURI = "dir://" + sealed
	if _, err := ks.Keys(ctx); err == nil || !strings.Contains(err.Error(), "manager is not running") {
		t.Fatalf("encrypted state without a manager: %v", err)
	}
	ks.Required = true
	if _, err := ks.Keys(ctx); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("--manager given, none running: %v", err)
	}
}

// TestLedgerOnAUsedCounter: a TPM whose counter starts high (counters deleted before) still
// gives a new manager; a ledger removed after saves is a rollback, a first save cut short is
// not.
func TestLedgerOnAUsedCounter(t *testing.T) {
	hw := swtpmtest.Start(t)
	ctx := context.Background()
	h, err := OpenHardware(ctx, hw.Spec(), "none", 0)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	for range 5 {
		if _, err := h.Increment(ctx); err != nil {
			t.Fatal(err)
		}
	}
	dir := t.TempDir()
	srv, err := New(ctx, Config{Dir: dir, Registry: registry.New(t.TempDir())}, h)
	if err != nil {
		t.Fatalf("new manager on a counter at 6: %v", err)
	}
	// a first save cut after its increment: the ledger is gone, the counter one past base
	os.Remove(filepath.Join(dir, ledgerName))
	h.Increment(ctx)
	if _, err := New(ctx, Config{Dir: dir, Registry: srv.cfg.Registry}, h); err != nil {
		t.Fatalf("after a first save cut short: %v", err)
	}
	srv2, _ := New(ctx, Config{Dir: dir, Registry: srv.cfg.Registry}, h)
	srv2.mu.Lock()
	for range 2 {
		if err := srv2.store.save(ctx, srv2.ledger); err != nil {
			t.Fatal(err)
		}
	}
	srv2.mu.Unlock()
	os.Remove(filepath.Join(dir, ledgerName))
	if _, err := New(ctx, Config{Dir: dir, Registry: srv.cfg.Registry}, h); !errors.Is(err, ErrLedgerRollback) {
		t.Fatalf("ledger removed after saves: %v", err)
	}
}
