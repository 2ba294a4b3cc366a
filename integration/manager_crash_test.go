//go:build integration

package integration

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/binary"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	mrand "math/rand"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/internal/syncbuf"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/vtpmd/vtpmd/backend/blob"
	"github.com/vtpmd/vtpmd/internal/swtpmtest"
	"github.com/vtpmd/vtpmd/internal/tpmclient"
	"github.com/vtpmd/vtpmd/manager"
	"github.com/vtpmd/vtpmd/manager/hwtpm"
	"github.com/vtpmd/vtpmd/socket"
)

// killableManager is a `vtpmd manager` on a stand-in hardware TPM (Debian's swtpm) that the
// test kills with SIGKILL and starts again on the same directory and TPM.
type killableManager struct {
	t      *testing.T
	hw     *swtpmtest.TPM
	dir    string
	sock   string
	log    string
	args   []string
	cmd    *exec.Cmd
	done   chan struct{}
	starts time.Duration // total time spent starting (for the report)
	nstart int
	rk     *rsa.PrivateKey
	// leftFlushed counts the objects (0x80) and sessions (0x02, 0x03) killed managers left.
	leftFlushed map[uint32]int
}

func newKillableManager(t *testing.T) *killableManager {
	t.Helper()
	rk, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	pubDER, _ := x509.MarshalPKIXPublicKey(&rk.PublicKey)
	keys := t.TempDir()
	pub := filepath.Join(keys, "recovery.pub")
	if err := os.WriteFile(pub, pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pubDER}), 0o644); err != nil {
		t.Fatal(err)
	}
	sockDir, err := os.MkdirTemp("", "vtpmd-mgr-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(sockDir) })
	m := &killableManager{t: t, hw: swtpmtest.Start(t), dir: t.TempDir(), sock: filepath.Join(sockDir, "manager.sock"),
		log: filepath.Join(keys, "manager.log"), rk: rk, leftFlushed: map[uint32]int{}}
	m.args = []string{"manager", "--tpm", m.hw.Spec(), "--dir", m.dir, "--listen", m.sock, "--group", "",
		"--registry", filepath.Join(m.dir, "registry"), "--auto-enroll", "--recovery-key", pub}
	t.Cleanup(func() {
		m.kill()
		if t.Failed() {
			b, _ := os.ReadFile(m.log)
			t.Logf("manager log (tail):\n%s", tail(string(b), 4000))
		}
	})
	return m
}

// start runs the manager and waits until it answers on its socket (a killed manager leaves its
// socket file behind: only a connection tells that the new one listens). A manager that exits
// instead is an error: after a kill it must come back.
func (m *killableManager) start() error {
	begin := time.Now()
	logf, err := os.OpenFile(m.log, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	m.cmd = exec.Command(env.bin, m.args...)
	m.cmd.Stdout, m.cmd.Stderr = logf, logf
	err = m.cmd.Start()
	logf.Close()
	if err != nil {
		return err
	}
	done := make(chan struct{})
	m.done = done
	go func(cmd *exec.Cmd) { cmd.Wait(); close(done) }(m.cmd)
	deadline := time.Now().Add(20 * time.Second)
	for {
		if c, err := net.Dial("unix", m.sock); err == nil {
			c.Close()
			break
		}
		select {
		case <-done:
			b, _ := os.ReadFile(m.log)
			return fmt.Errorf("the manager exited instead of serving (%v):\n%s", m.cmd.ProcessState, tail(string(b), 2000))
		default:
		}
		if time.Now().After(deadline) {
			return errors.New("the manager did not listen within 20s")
		}
		time.Sleep(2 * time.Millisecond)
	}
	m.nstart++
	m.starts += time.Since(begin)
	return nil
}

func (m *killableManager) mustStart() {
	m.t.Helper()
	if err := m.start(); err != nil {
		m.t.Fatal(err)
	}
}

func (m *killableManager) running() bool {
	if m.done == nil {
		return false
	}
	select {
	case <-m.done:
		return false
	default:
		return true
	}
}

// kill ends the manager with SIGKILL and reaps it, then counts the transient objects and
// sessions it left loaded in the stand-in TPM (swtpm has no resource manager): the next
// manager must flush them at start (hwtpm.Open), or after three kills in the middle of an
// operation it would find no room for an object.
func (m *killableManager) kill() {
	if m.done == nil {
		return
	}
	m.cmd.Process.Signal(syscall.SIGKILL)
	<-m.done
	if err := m.countLeft(); err != nil {
		m.t.Errorf("count what the killed manager left in the TPM: %v", err)
	}
}

// countLeft counts the transient objects and sessions in the stand-in TPM.
func (m *killableManager) countLeft() error {
	c, err := net.Dial("unix", m.hw.Socket)
	if err != nil {
		return err
	}
	defer c.Close()
	tp := tpmclient.Stream(c)
	for _, ht := range []uint32{0x80000000, 0x02000000, 0x03000000} { // transient, HMAC and policy sessions
		resp, err := tpm2.GetCapability{Capability: tpm2.TPMCapHandles, Property: ht, PropertyCount: 64}.Execute(tp)
		if err != nil {
			return err
		}
		hs, err := resp.CapabilityData.Data.Handles()
		if err != nil {
			return err
		}
		for _, h := range hs.Handle {
			if uint32(h)&0xff000000 != ht {
				continue
			}
			m.leftFlushed[ht>>24]++
		}
	}
	return nil
}

// counterGap is how far the hardware counter is ahead of the ledger on disk (the manager must
// be down: swtpm serves one connection at a time). 1 is a kill between a ledger save's
// increment and its write, which the manager must survive.
func (m *killableManager) counterGap() (int64, error) {
	l, err := readLedgerView(m.dir)
	if err != nil || l == nil {
		return 0, err
	}
	spec, err := hwtpm.ParseSpec(m.hw.Spec())
	if err != nil {
		return 0, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	tpm, err := hwtpm.Open(ctx, spec)
	if err != nil {
		return 0, err
	}
	defer tpm.Close()
	hw, err := tpm.ReadCounter(ctx, manager.DefaultCounterIndex)
	if err != nil {
		return 0, err
	}
	return int64(hw) - int64(l.Counter), nil
}

// ledgerView is what the test reads of the manager's ledger (it is JSON with a MAC).
type ledgerView struct {
	Counter uint64 `json:"counter"`
	VMs     map[string]struct {
		ID        string `json:"id"`
		StatePath string `json:"state_path"`
		Phase     string `json:"phase"`
		Version   uint64 `json:"version"`
		Recovery  []byte `json:"recovery"`
	} `json:"vms"`
}

func readLedgerView(dir string) (*ledgerView, error) {
	raw, err := os.ReadFile(filepath.Join(dir, "ledger.json"))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var lf struct {
		Ledger json.RawMessage `json:"ledger"`
	}
	var l ledgerView
	if err := json.Unmarshal(raw, &lf); err != nil {
		return nil, err
	}
	if err := json.Unmarshal(lf.Ledger, &l); err != nil {
		return nil, err
	}
	return &l, nil
}

// recordVersion is the state version the ledger records for the vTPM at state.
func (m *killableManager) recordVersion(state string) uint64 {
	l, _ := readLedgerView(m.dir)
	if l != nil {
		for _, r := range l.VMs {
			if r.StatePath == state {
				return r.Version
			}
		}
	}
	return 0
}

// record is the ledger's record of the vTPM at state ("" phase: none), with its state key
// unwrapped from the recovery wrap.
func (m *killableManager) record(state string) (phase string, key *blob.Key, err error) {
	l, err := readLedgerView(m.dir)
	if err != nil || l == nil {
		return "", nil, err
	}
	for _, r := range l.VMs {
		if r.StatePath != state {
			continue
		}
		k, err := rsa.DecryptOAEP(sha256.New(), nil, m.rk, r.Recovery, []byte("vtpmd recovery v1 "+r.ID))
		if err != nil {
			return "", nil, fmt.Errorf("unwrap the recovery copy of %s's key: %w", r.ID, err)
		}
		key, err := blob.NewKey(k)
		return r.Phase, key, err
	}
	return "", nil, nil
}

// killableVTPM is `vtpmd socket` on a state directory with the manager, with data and control
// sockets at fixed paths so that a restart after SIGKILL takes their place.
type killableVTPM struct {
	dataPath, ctrlPath string
	cmd                *exec.Cmd
	done               chan struct{}
	stderr             *syncbuf.Buffer
	ctrl               *socket.Client
	data               net.Conn
	tp                 transport.TPM
}

// startKillableVTPM starts vtpmd socket on state with the manager at mgr ("none": without), and
// connects to it once it serves (it fetches its key before it opens its sockets). A vTPM that
// exits instead is an error that says why.
func startKillableVTPM(t *testing.T, run, state, mgr string) (*killableVTPM, error) {
	t.Helper()
	return launchVTPM(t, run, state, mgr).connect()
}

// launchVTPM starts the vtpmd process; connect waits for it to serve.
func launchVTPM(t *testing.T, run, state, mgr string) *killableVTPM {
	t.Helper()
	v := &killableVTPM{stderr: &syncbuf.Buffer{}, done: make(chan struct{}),
		dataPath: filepath.Join(run, "d.sock"), ctrlPath: filepath.Join(run, "c.sock")}
	v.cmd = exec.Command(env.bin, "socket", "--tpm2", "--tpmstate", "dir="+state, "--manager", mgr,
		"--server", "type=unixio,path="+v.dataPath, "--ctrl", "type=unixio,path="+v.ctrlPath)
	v.cmd.Stdout, v.cmd.Stderr = v.stderr, v.stderr
	if err := v.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { v.cmd.Wait(); close(v.done) }()
	t.Cleanup(v.kill)
	return v
}

func (v *killableVTPM) connect() (*killableVTPM, error) {
	deadline := time.Now().Add(20 * time.Second)
	for {
		c, err := socket.Dial("unix", v.ctrlPath)
		if err == nil {
			v.ctrl = c
			break
		}
		select {
		case <-v.done:
			return nil, fmt.Errorf("vtpmd exited (%v): %s", v.cmd.ProcessState, strings.TrimSpace(v.stderr.String()))
		default:
		}
		if time.Now().After(deadline) {
			v.kill()
			return nil, errors.New("vtpmd did not serve within 20s")
		}
		time.Sleep(2 * time.Millisecond)
	}
	c, err := dialRetry("unix", v.dataPath)
	if err != nil {
		v.kill()
		return nil, err
	}
	v.data, v.tp = c, tpmclient.Stream(c)
	return v, nil
}

func (v *killableVTPM) kill() {
	v.cmd.Process.Signal(syscall.SIGKILL)
	<-v.done
	if v.ctrl != nil {
		v.ctrl.Close()
	}
	if v.data != nil {
		v.data.Close()
	}
}

// power runs INIT (which loads the state: an undecryptable one fails here) and TPM2_Startup.
func (v *killableVTPM) power() error {
	if err := v.ctrl.Init(0); err != nil {
		return fmt.Errorf("INIT (state not loadable?): %w; vtpmd: %s", err, strings.TrimSpace(v.stderr.String()))
	}
	return tpmclient.Startup(v.tp)
}

// stop is an orderly end: TPM2_Shutdown, then CMD_SHUTDOWN.
func (v *killableVTPM) stop() {
	tpmclient.Shutdown(v.tp, false)
	v.ctrl.Shutdown()
	<-v.done
	v.ctrl.Close()
	v.data.Close()
}

// crashCounts are what the crash test did, for its report.
type crashCounts struct {
	rounds                                 int
	killVTPM, killManager, killBoth        int // during NV writes
	killManagerAtStart, startsRefused      int // while a vTPM fetched its key
	writesWithoutManager                   int // acknowledged while the manager was down or starting
	killFreshManager, killFreshVTPM        int // while a new vTPM was auto-enrolled
	freshRefused                           int // new vTPMs that did not start (killed, or no manager)
	killEnroll, killUnenroll               int // while the operator's request ran
	enrollInterrupted, unenrollInterrupted int // the request failed because of the kill
	phases                                 map[string]int
	answersLost                            int // done, its answer lost to the kill: "already (un)enrolled" when run again
	enrollAbandoned                        int // interrupted enrolments undone by unenroll
	counterAhead                           int // restarts with the hardware counter one ahead of the ledger
	vtpmRestarts                           int
	managerStarts                          int
}

// TestManagerCrashSafety kills the manager and vTPMs with SIGKILL at random moments, during NV
// writes, key requests, auto-enrolment of new vTPMs, and the operator's enroll and unenroll
// in place: no acknowledged write is lost, every kill of the manager is followed by a manager
// that starts (its ledger and the hardware counter agree), and a state is never left
// undecryptable: each of its files opens with the old or the new key, and the key of an
// encrypted file is always sealed in the ledger.
func TestManagerCrashSafety(t *testing.T) {
	needRefSwtpm(t)
	writeRounds, freshRounds, enrolKills := 70, 15, 40
	if testing.Short() {
		writeRounds, freshRounds, enrolKills = 15, 3, 6
	}
	seed := time.Now().UnixNano()
	t.Logf("seed %d", seed)
	rng := mrand.New(mrand.NewSource(seed))
	n := &crashCounts{phases: map[string]int{}}
	begin := time.Now()
	m := newKillableManager(t)
	m.mustStart()

	t.Run("writes", func(t *testing.T) { crashWrites(t, m, rng, n, writeRounds) })
	tWrites := time.Since(begin)
	if !t.Failed() {
		t.Run("fresh", func(t *testing.T) { crashFresh(t, m, rng, n, freshRounds) })
	}
	tFresh := time.Since(begin) - tWrites
	if !t.Failed() {
		t.Run("enrol", func(t *testing.T) { crashEnrol(t, m, rng, n, enrolKills) })
	}
	tEnrol := time.Since(begin) - tWrites - tFresh
	n.managerStarts = m.nstart
	t.Logf("%d rounds in %v (writes %v, fresh vTPMs %v, enroll/unenroll %v); manager started %d times (%v on average)",
		n.rounds, time.Since(begin).Round(time.Millisecond), tWrites.Round(time.Millisecond), tFresh.Round(time.Millisecond),
		tEnrol.Round(time.Millisecond), m.nstart, (m.starts / time.Duration(max(m.nstart, 1))).Round(time.Millisecond))
	t.Logf("kills during NV writes: vTPM %d, manager %d, both %d; %d writes acknowledged while the manager was down or restarting",
		n.killVTPM, n.killManager, n.killBoth, n.writesWithoutManager)
	t.Logf("manager kills while a vTPM fetched its key: %d (%d starts refused); kills while a new vTPM was auto-enrolled: manager %d, vTPM %d (%d starts failed)",
		n.killManagerAtStart, n.startsRefused, n.killFreshManager, n.killFreshVTPM, n.freshRefused)
	t.Logf("manager kills during enroll: %d (%d failed it), during unenroll: %d (%d failed it); %d done but answered \"already\" when run again; %d interrupted enrolments undone by unenroll; phases after a request: %v",
		n.killEnroll, n.enrollInterrupted, n.killUnenroll, n.unenrollInterrupted, n.answersLost, n.enrollAbandoned, n.phases)
	t.Logf("restarts with the hardware counter one ahead of the ledger (killed between increment and write): %d; vTPM restarts: %d",
		n.counterAhead, n.vtpmRestarts)
	t.Logf("killed managers left %d objects, %d HMAC and %d policy sessions loaded in the stand-in TPM (flushed by the next manager at start)",
		m.leftFlushed[0x80], m.leftFlushed[0x02], m.leftFlushed[0x03])
	if !t.Failed() && n.rounds < 100 && !testing.Short() {
		t.Fatalf("only %d rounds", n.rounds)
	}
}

// restartManager starts the killed manager again after checking how its ledger and the
// hardware counter stand.
func restartManager(t *testing.T, m *killableManager, n *crashCounts) {
	t.Helper()
	gap, err := m.counterGap()
	if err != nil {
		t.Fatalf("read the hardware counter: %v", err)
	}
	switch gap {
	case 0:
	case 1:
		n.counterAhead++
	default:
		t.Errorf("the hardware counter is %d ahead of the ledger after a kill", gap)
	}
	if err := m.start(); err != nil {
		t.Fatalf("the manager does not start after a kill (counter %d ahead of the ledger): %v", gap, err)
	}
}

// nvState is what the writer knows: the last value acknowledged and the last one sent.
type nvState struct{ acked, sent uint64 }

// check reads the counter after a restart: it must be the last acknowledged value or a later
// one that was in flight.
func (s *nvState) check(t *testing.T, tp transport.TPM, round int) {
	t.Helper()
	b, err := tpmclient.NVRead(tp, crashNV, 8, 0)
	if err != nil {
		t.Fatalf("round %d: NV index lost: %v", round, err)
	}
	got := binary.BigEndian.Uint64(b)
	if got < s.acked || got > s.sent {
		t.Fatalf("round %d: NV holds %d; acknowledged %d, sent %d", round, got, s.acked, s.sent)
	}
	s.acked, s.sent = got, got
}

// write writes the next counter value; it returns the error of a write that was not
// acknowledged.
func (s *nvState) write(tp transport.TPM) error {
	s.sent++
	if err := tpmclient.NVWrite(tp, crashNV, nvValue(s.sent), 0); err != nil {
		return err
	}
	s.acked = s.sent
	return nil
}

// crashWrites: one vTPM, auto-enrolled, writes an NV counter while the vTPM, the manager or
// both are killed; the manager is also killed while the vTPM starts and fetches its key.
func crashWrites(t *testing.T, m *killableManager, rng *mrand.Rand, n *crashCounts, rounds int) {
	run := t.TempDir()
	state := filepath.Join(t.TempDir(), "tpm2")
	os.MkdirAll(state, 0o700)
	var nv nvState
	v, err := startKillableVTPM(t, run, state, m.sock)
	if err != nil {
		t.Fatal(err)
	}
	if err := v.power(); err != nil {
		t.Fatal(err)
	}
	if err := tpmclient.NVDefine(v.tp, crashNV, 8); err != nil {
		t.Fatal(err)
	}
	if err := nv.write(v.tp); err != nil {
		t.Fatal(err)
	}
	if phase, _, err := m.record(state); err != nil || phase != "enrolled" {
		t.Fatalf("the new vTPM was not auto-enrolled: phase %q, %v", phase, err)
	}
	// restartVTPM starts the vTPM until it serves (the manager must run) and checks its NV.
	restartVTPM := func(round int) {
		t.Helper()
		var err error
		if v, err = startKillableVTPM(t, run, state, m.sock); err != nil {
			t.Fatalf("round %d: the vTPM does not start after a kill: %v", round, err)
		}
		n.vtpmRestarts++
		if err := v.power(); err != nil {
			t.Fatalf("round %d: %v", round, err)
		}
		nv.check(t, v.tp, round)
	}
	delay := func() time.Duration { return time.Duration(rng.Intn(40000)) * time.Microsecond }
	// writeUntilKilled writes until a write fails (the vTPM was killed), and reports how many
	// writes were acknowledged.
	writeUntilKilled := func() (acked int) {
		for nv.write(v.tp) == nil {
			acked++
		}
		return acked
	}
	for round := 1; round <= rounds; round++ {
		n.rounds++
		switch k := rng.Intn(10); {
		case k < 4: // the vTPM, during writes
			n.killVTPM++
			p := v
			time.AfterFunc(delay(), func() { p.cmd.Process.Signal(syscall.SIGKILL) })
			writeUntilKilled()
			v.kill()
			restartVTPM(round)
		case k < 6: // the manager, during writes: the vTPM has its key and keeps serving
			n.killManager++
			stop := make(chan error, 1)
			go func() {
				time.Sleep(delay())
				m.kill()
				time.Sleep(delay() / 4)
				stop <- nil
			}()
			for done := false; !done; {
				select {
				case <-stop:
					done = true
				default:
				}
				if err := nv.write(v.tp); err != nil {
					t.Fatalf("round %d: an NV write failed while the manager was killed: %v", round, err)
				}
			}
			// start it again while the vTPM writes
			type restarted struct {
				gap int64
				err error
			}
			started := make(chan restarted, 1)
			go func() {
				gap, err := m.counterGap()
				if err == nil && gap != 0 && gap != 1 {
					err = fmt.Errorf("the hardware counter is %d ahead of the ledger after a kill", gap)
				}
				if err == nil {
					err = m.start()
				}
				started <- restarted{gap, err}
			}()
			for done := false; !done; {
				select {
				case r := <-started:
					if r.err != nil {
						t.Fatalf("round %d: %v", round, r.err)
					}
					if r.gap == 1 {
						n.counterAhead++
					}
					done = true
				default:
				}
				if err := nv.write(v.tp); err != nil {
					t.Fatalf("round %d: an NV write failed while the manager restarted: %v", round, err)
				}
				n.writesWithoutManager++
			}
			if err := nv.write(v.tp); err != nil {
				t.Fatalf("round %d: an NV write failed after the manager restarted: %v", round, err)
			}
			nv.check(t, v.tp, round)
		case k < 8: // both, in a random order, during writes
			n.killBoth++
			p := v
			first, second := delay(), delay()
			vFirst := rng.Intn(2) == 0
			killed := make(chan struct{})
			go func() {
				time.Sleep(first)
				if vFirst {
					p.cmd.Process.Signal(syscall.SIGKILL)
				} else {
					m.kill()
				}
				time.Sleep(second)
				if vFirst {
					m.kill()
				} else {
					p.cmd.Process.Signal(syscall.SIGKILL)
				}
				close(killed)
			}()
			writeUntilKilled()
			<-killed
			v.kill()
			restartManager(t, m, n)
			restartVTPM(round)
		default: // the manager, while the vTPM starts and asks for its key
			n.killManagerAtStart++
			v.stop()
			p, err := startAndKillManager(t, m, rng, run, state, 60*time.Millisecond)
			restartManager(t, m, n)
			if err != nil {
				n.startsRefused++
				restartVTPM(round)
			} else {
				v = p
				n.vtpmRestarts++
				if err := v.power(); err != nil {
					t.Fatalf("round %d: %v", round, err)
				}
				nv.check(t, v.tp, round)
			}
		}
		// every round ends with a write to the running vTPM
		if err := nv.write(v.tp); err != nil {
			t.Fatalf("round %d: write after the round: %v", round, err)
		}
	}
	// the versions the vTPM reported reached the manager across its restarts, and the last
	// ones before it stopped (it flushes its reports at exit)
	first := m.recordVersion(state)
	nv.write(v.tp)
	v.stop()
	if last := m.recordVersion(state); last <= first {
		t.Errorf("the manager's record of the vTPM's version did not grow: %d, then %d after more writes", first, last)
	} else {
		t.Logf("the manager records state version %d", last)
	}
}

// startAndKillManager starts a vTPM on state and kills the manager at a random moment within
// window of it (while the vTPM asks for its key, or just before, or after): the vTPM starts or
// fails to, cleanly.
func startAndKillManager(t *testing.T, m *killableManager, rng *mrand.Rand, run, state string, window time.Duration) (*killableVTPM, error) {
	t.Helper()
	killed := make(chan struct{})
	time.AfterFunc(time.Duration(rng.Int63n(int64(window))), func() { m.kill(); close(killed) })
	v, err := startKillableVTPM(t, run, state, m.sock)
	<-killed
	return v, err
}

// crashFresh: new vTPMs (empty state) are auto-enrolled when they first ask for a key; the
// manager, the vTPM or both are killed meanwhile. The vTPM starts (again), keeps its NV across
// a restart, and its state is sealed.
func crashFresh(t *testing.T, m *killableManager, rng *mrand.Rand, n *crashCounts, rounds int) {
	want := []byte("fresh-vtpm-nv")
	const window = 80 * time.Millisecond // a vTPM's start with its key request, and a little more
	for round := 1; round <= rounds; round++ {
		n.rounds++
		run := t.TempDir()
		state := filepath.Join(t.TempDir(), "tpm2")
		os.MkdirAll(state, 0o700)
		killManager, killVTPM := true, false
		switch rng.Intn(3) {
		case 1:
			killManager, killVTPM = false, true
		case 2:
			killVTPM = true
		}
		var wg sync.WaitGroup
		v := launchVTPM(t, run, state, m.sock)
		if killManager {
			n.killFreshManager++
			wg.Add(1)
			time.AfterFunc(time.Duration(rng.Int63n(int64(window))), func() { m.kill(); wg.Done() })
		}
		if killVTPM {
			n.killFreshVTPM++
			wg.Add(1)
			p := v
			time.AfterFunc(time.Duration(rng.Int63n(int64(window))), func() { p.cmd.Process.Signal(syscall.SIGKILL); wg.Done() })
		}
		_, err := v.connect()
		wg.Wait()
		if killManager {
			restartManager(t, m, n)
		}
		if killVTPM {
			v.kill()
		}
		if err != nil || killVTPM {
			n.freshRefused++
			if v, err = startKillableVTPM(t, run, state, m.sock); err != nil {
				t.Fatalf("round %d: a new vTPM does not start after a kill: %v", round, err)
			}
		}
		if err := v.power(); err != nil {
			t.Fatal(err)
		}
		if _, err := tpmclient.NVRead(v.tp, crashNV, uint16(len(want)), 0); err != nil {
			if err := tpmclient.NVDefine(v.tp, crashNV, uint16(len(want))); err != nil {
				t.Fatal(err)
			}
		}
		if err := tpmclient.NVWrite(v.tp, crashNV, want, 0); err != nil {
			t.Fatal(err)
		}
		v.stop()
		if phase, key, err := m.record(state); err != nil || phase != "enrolled" {
			t.Fatalf("round %d: the new vTPM's record: phase %q, %v", round, phase, err)
		} else if plain, enc := checkStateFiles(t, state, key); plain != 0 || enc == 0 {
			t.Fatalf("round %d: a new vTPM's state: %d plain files, %d encrypted", round, plain, enc)
		}
		readNVWith(t, run, state, m.sock, want)
	}
}

// checkStateFiles checks that each state file opens: in the clear, or with key (nil: the
// ledger holds no key for this state). It returns how many are plain and how many encrypted.
func checkStateFiles(t *testing.T, state string, key *blob.Key) (plain, encrypted int) {
	t.Helper()
	files, _ := filepath.Glob(filepath.Join(state, "tpm2-00.*"))
	if len(files) == 0 {
		t.Fatalf("no state files in %s", state)
	}
	for _, f := range files {
		raw, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		h, _, err := blob.ParseHeader(raw)
		if err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		if h.Flags&blob.FlagEncrypted == 0 {
			if _, err := blob.Open(raw, nil); err != nil {
				t.Fatalf("%s is plain but does not open: %v", f, err)
			}
			plain++
			continue
		}
		if key == nil {
			t.Fatalf("%s is encrypted, but the ledger holds no key for %s: undecryptable", f, state)
		}
		if _, err := blob.Open(raw, key); err != nil {
			t.Fatalf("%s does not open with the key sealed in the ledger: %v", f, err)
		}
		encrypted++
	}
	return plain, encrypted
}

// readNVWith starts vtpmd on state (with the manager at mgr, or "none") and checks the NV.
func readNVWith(t *testing.T, run, state, mgr string, want []byte) {
	t.Helper()
	v, err := startKillableVTPM(t, run, state, mgr)
	if err != nil {
		t.Fatalf("vtpmd --manager %s does not start on %s: %v", mgr, state, err)
	}
	if err := v.power(); err != nil {
		t.Fatal(err)
	}
	got, err := tpmclient.NVRead(v.tp, crashNV, uint16(len(want)), 0)
	if err != nil || !bytes.Equal(got, want) {
		t.Fatalf("NV of %s: %q %v, want %q", state, got, err, want)
	}
	v.stop()
}

// crashEnrol: an existing plain state is enrolled in place and unenrolled again, cycle after
// cycle until the manager was killed that many times, while the manager is killed at random moments of each request; the request is run
// again until it succeeds. After every kill the manager starts, every state file opens with
// the old or the new key, and the state is served: by vtpmd with the manager (not enrolled
// yet, or enrolled), or refused as incomplete until the request is run again; after
// unenrolment by vtpmd without a manager.
func crashEnrol(t *testing.T, m *killableManager, rng *mrand.Rand, n *crashCounts, kills int) {
	run := t.TempDir()
	state := filepath.Join(t.TempDir(), "tpm2")
	os.MkdirAll(state, 0o700)
	want := []byte("enrolled-in-place")
	v, err := startKillableVTPM(t, run, state, "none")
	if err != nil {
		t.Fatal(err)
	}
	if err := v.power(); err != nil {
		t.Fatal(err)
	}
	if err := tpmclient.NVDefine(v.tp, crashNV, uint16(len(want))); err != nil {
		t.Fatal(err)
	}
	if err := tpmclient.NVWrite(v.tp, crashNV, want, 0); err != nil {
		t.Fatal(err)
	}
	v.stop()
	if plain, enc := checkStateFiles(t, state, nil); plain == 0 || enc != 0 {
		t.Fatalf("the plain state: %d plain files, %d encrypted", plain, enc)
	}
	// took is how long each request ran when not interrupted: kills fall within it.
	took := map[string]time.Duration{"enroll": 150 * time.Millisecond, "unenroll": 150 * time.Millisecond}
	for cycle := 0; cycle < 2 || n.killEnroll+n.killUnenroll < kills; cycle++ {
		for _, op := range []string{"enroll", "unenroll"} {
			for attempt := 0; ; attempt++ {
				kill := attempt < 6 // then let it finish
				cmd := exec.Command(env.bin, "manager", op, "--socket", m.sock, state)
				var killed chan struct{}
				start := time.Now()
				if kill {
					n.rounds++
					if op == "enroll" {
						n.killEnroll++
					} else {
						n.killUnenroll++
					}
					killed = make(chan struct{})
					d := time.Duration(rng.Int63n(int64(took[op]) * 5 / 4))
					time.AfterFunc(d, func() { m.kill(); close(killed) })
				}
				out, err := cmd.CombinedOutput()
				elapsed := time.Since(start)
				if kill {
					<-killed
					restartManager(t, m, n)
				}
				done := err == nil
				if !done && attempt > 0 && (op == "enroll" && bytes.Contains(out, []byte("already enrolled")) ||
					op == "unenroll" && bytes.Contains(out, []byte("not enrolled"))) {
					// the last attempt finished, its answer lost to the kill: this is the
					// manager's answer to a request that is done (checked below)
					done = true
					n.answersLost++
				}
				if !done && !kill {
					t.Fatalf("cycle %d: %s without a kill: %v\n%s", cycle, op, err, out)
				}
				if err != nil && kill {
					if op == "enroll" {
						n.enrollInterrupted++
					} else {
						n.unenrollInterrupted++
					}
				}
				phase := checkEnrolment(t, m, run, state, want, op, done)
				n.phases[op+":"+phase]++
				if done {
					if err == nil {
						took[op] = elapsed
					}
					break
				}
				if op == "enroll" && phase == "enrolling" && rng.Intn(4) == 0 {
					// the operator gives up: unenroll finishes an interrupted enrolment backwards
					n.enrollAbandoned++
					break
				}
			}
		}
		// unenrolled: vtpmd without a manager serves it
		if plain, enc := checkStateFiles(t, state, nil); plain == 0 || enc != 0 {
			t.Fatalf("cycle %d: after unenroll: %d plain files, %d encrypted", cycle, plain, enc)
		}
		readNVWith(t, run, state, "none", want)
	}
}

// checkEnrolment checks the state after an enroll or unenroll that was killed or done (ok):
// every file opens with the old or the new key, and the state is served in its phase. It
// returns the phase ("none": no record).
func checkEnrolment(t *testing.T, m *killableManager, run, state string, want []byte, op string, ok bool) string {
	t.Helper()
	phase, key, err := m.record(state)
	if err != nil {
		t.Fatal(err)
	}
	plain, enc := checkStateFiles(t, state, key)
	switch {
	case phase == "":
		phase = "none"
		if enc != 0 {
			t.Fatalf("%s: no record, but %d state files are encrypted", op, enc)
		}
		if ok && op == "enroll" {
			t.Fatalf("enroll succeeded but the ledger has no record of %s", state)
		}
	case phase == "enrolled":
		if plain != 0 {
			t.Fatalf("%s: enrolled, but %d state files are plain", op, plain)
		}
		if ok && op == "unenroll" {
			t.Fatalf("unenroll succeeded but the ledger still has %s enrolled", state)
		}
	case phase == "enrolling" || phase == "unenrolling":
		if ok {
			t.Fatalf("%s succeeded but the record is %s", op, phase)
		}
		// an interrupted request: the vTPM is refused until it is run again, the state untouched
		before := dirHash(t, state)
		if v, err := startKillableVTPM(t, run, state, m.sock); err == nil {
			v.kill()
			t.Fatalf("a vTPM whose record is %s was served", phase)
		} else if !strings.Contains(err.Error(), "again") {
			t.Fatalf("a vTPM whose record is %s: %v", phase, err)
		}
		if dirHash(t, state) != before {
			t.Fatalf("the refused vTPM (%s) changed its state", phase)
		}
		return phase
	default:
		t.Fatalf("record phase %q", phase)
	}
	// none or enrolled: vtpmd with the manager serves it
	readNVWith(t, run, state, m.sock, want)
	return phase
}
