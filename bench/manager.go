package main

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/vtpmd/vtpmd/internal/atomicfile"
	"github.com/vtpmd/vtpmd/internal/tpmclient"
	"github.com/vtpmd/vtpmd/manager"
	"github.com/vtpmd/vtpmd/manager/hwtpm"
	"github.com/vtpmd/vtpmd/manager/registry"
)

// The host manager's part of the bench: vtpmd serving an enrolled vTPM (its state encrypted
// with a key the manager unseals in the hardware TPM, its state versions reported to the
// manager) against vtpmd without a manager and Debian's swtpm, all three on the same golden
// state; then the manager's own costs. The hardware TPM is a stand-in: Debian's swtpm on a unix
// socket, started as internal/swtpmtest starts it for the tests.

// NV indices of the golden state, defined and written once so that their names are fixed.
const (
	nvKiB   = 0x01500030 // 1 KiB: the largest NV_Write libtpms takes in one command
	nvSmall = 0x01500031 // 64 bytes
)

// The three servers of this section, as named in its tables and stats maps.
const (
	withoutName = "vtpmd"
	withName    = "vtpmd + manager"
	swtpmName   = "swtpm"
)

// standIn starts Debian's swtpm as the stand-in for the host's hardware TPM and waits until it
// listens. Its hwtpm spec is "swtpm:path=" + its data socket.
func (r *run) standIn() (*instance, error) {
	in, err := r.start(impl{name: "hwtpm", bin: r.impls[1].bin, args: []string{"socket"}})
	if err != nil {
		return nil, fmt.Errorf("stand-in hardware TPM: %w", err)
	}
	c, err := in.dial(10 * time.Second)
	if err != nil {
		in.stop()
		return nil, fmt.Errorf("stand-in hardware TPM: %w", err)
	}
	c.Close() // swtpm serves one connection at a time: leave it to the manager
	return in, nil
}

// hostManager is `vtpmd manager` on a stand-in hardware TPM.
type hostManager struct {
	hw     *instance
	dir    string // records, registry and API socket
	sock   string
	cmd    *exec.Cmd
	exited chan error
}

// startHostManager starts `vtpmd manager` on its own stand-in hardware TPM, its records,
// registry and API socket in dir; what names it in errors ("" or a migration side), extra are
// further flags.
func (r *run) startHostManager(vtpmd, dir, what string, extra ...string) (*hostManager, error) {
	hw, err := r.standIn()
	if err != nil {
		return nil, err
	}
	m := &hostManager{hw: hw, dir: dir, sock: filepath.Join(dir, "api.sock"), exited: make(chan error, 1)}
	if err := os.MkdirAll(m.dir, 0o700); err != nil {
		hw.stop()
		return nil, err
	}
	args := append([]string{"manager", "--tpm", "swtpm:path=" + hw.data, "--dir", filepath.Join(m.dir, "records"),
		"--listen", m.sock, "--group", "", "--registry", filepath.Join(m.dir, "registry"), "--auto-enroll"}, extra...)
	m.cmd = exec.Command(vtpmd, args...)
	m.cmd.Stderr = os.Stderr
	if err := m.cmd.Start(); err != nil {
		hw.stop()
		return nil, err
	}
	go func() { m.exited <- m.cmd.Wait() }()
	name := strings.TrimSpace("vtpmd manager " + what)
	deadline := time.Now().Add(20 * time.Second)
	for !manager.Available(m.sock) {
		select {
		case err := <-m.exited:
			hw.stop()
			return nil, fmt.Errorf("%s exited: %v", name, err)
		case <-time.After(time.Millisecond):
		}
		if time.Now().After(deadline) {
			m.stop()
			return nil, fmt.Errorf("%s did not listen within 20s", name)
		}
	}
	return m, nil
}

// stop ends the manager (SIGTERM, then SIGKILL after 5s) and its hardware TPM.
func (m *hostManager) stop() {
	m.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-m.exited:
	case <-time.After(5 * time.Second):
		m.cmd.Process.Kill()
		<-m.exited
	}
	m.hw.stop()
}

// vtpmStatus is the manager's record of one vTPM and its ledger's hardware counter.
type vtpmStatus struct {
	manager.VMStatus
	Counter uint64
}

// vtpm is the manager's record of the vTPM whose state is at path.
func (m *hostManager) vtpm(ctx context.Context, path string) (*vtpmStatus, error) {
	st, err := manager.NewClient(m.sock).Status(ctx)
	if err != nil {
		return nil, err
	}
	for _, vm := range st.VMs {
		if vm.StatePath == path {
			return &vtpmStatus{VMStatus: vm, Counter: st.Counter}, nil
		}
	}
	return nil, fmt.Errorf("the manager has no record of %s", path)
}

// cpuTimes is the CPU time each process has used so far (user and system, all its threads,
// from /proc/PID/task/*/schedstat; 0 when unreadable).
func cpuTimes(pids map[string]int) map[string]time.Duration {
	out := map[string]time.Duration{}
	for name, pid := range pids {
		tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/schedstat", pid))
		for _, t := range tasks {
			b, err := os.ReadFile(t)
			if err != nil {
				continue
			}
			if f := strings.Fields(string(b)); len(f) > 0 {
				ns, _ := strconv.ParseInt(f[0], 10, 64)
				out[name] += time.Duration(ns)
			}
		}
	}
	return out
}

// goldenState makes, with Debian's swtpm, the state every server of this section starts from:
// manufactured, with the NV indices of the NV_Write rows defined and written once. It returns
// the state directory.
func (r *run) goldenState() (string, error) {
	in, err := r.start(r.impls[1])
	if err != nil {
		return "", err
	}
	defer in.stop()
	c, err := in.dial(10 * time.Second)
	if err != nil {
		return "", err
	}
	defer c.Close()
	t := tpmclient.Stream(c)
	for _, nv := range []struct {
		index uint32
		size  uint16
	}{{nvKiB, 1024}, {nvSmall, 64}} {
		if err := tpmclient.NVDefine(t, nv.index, nv.size); err != nil {
			return "", fmt.Errorf("golden state: define NV 0x%08x: %w", nv.index, err)
		}
		if err := tpmclient.NVWrite(t, nv.index, make([]byte, nv.size), 0); err != nil {
			return "", fmt.Errorf("golden state: write NV 0x%08x: %w", nv.index, err)
		}
	}
	return filepath.Join(in.dir, "state"), nil
}

// copyState copies the TPM 2 state files of from into dir/state.
func copyState(from, dir string) error {
	to := filepath.Join(dir, "state")
	if err := os.MkdirAll(to, 0o700); err != nil {
		return err
	}
	files, err := filepath.Glob(filepath.Join(from, "tpm2-*"))
	if err != nil || len(files) == 0 {
		return fmt.Errorf("golden state %s: no state files (%v)", from, err)
	}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(to, filepath.Base(f)), b, 0o600); err != nil {
			return err
		}
	}
	return nil
}

// server is one of the section's three servers with its own copy of the golden state.
type server struct {
	im  impl
	dir string // state in dir/state, sockets in dir
}

// measureBoth times fs both ways the bench does: interleaved (n rounds of one call each) and
// back-to-back (4 rounds of blocks of n/4 calls).
func measureBoth(n int, fs map[string]timed) (inter, b2b map[string]stats, err error) {
	ds, err := timeBlocks(n, 1, fs)
	if err != nil {
		return nil, nil, err
	}
	inter = summarizeAll(ds)
	if ds, err = timeBlocks(4, max(1, n/4), fs); err != nil {
		return nil, nil, err
	}
	return inter, summarizeAll(ds), nil
}

// managerSection is the report's section on the host manager.
func (r *run) managerSection() (string, error) {
	vtpmd := r.impls[0].bin
	var b strings.Builder
	b.WriteString("\n## With the host manager: sealed state on a hardware TPM\n\n")
	if os.Geteuid() != 0 {
		b.WriteString("Not measured: enrolling a vTPM is an operator request, which the manager answers only to root. Run the bench as root.\n")
		return b.String(), nil
	}
	ctx := context.Background()
	m, err := r.startHostManager(vtpmd, filepath.Join(r.work, "manager"), "")
	if err != nil {
		return "", err
	}
	defer m.stop()
	golden, err := r.goldenState()
	if err != nil {
		return "", err
	}
	servers := map[string]*server{
		withoutName: {im: r.impls[0]}, // vtpmd socket --manager none
		withName:    {im: impl{name: "vtpmd-with", bin: vtpmd, args: []string{"socket", "--manager", m.sock}}},
		swtpmName:   {im: r.impls[1]},
	}
	for _, name := range sortedKeys(servers) {
		s := servers[name]
		s.dir = filepath.Join(r.work, "golden-"+s.im.name)
		if err := copyState(golden, s.dir); err != nil {
			return "", err
		}
	}
	enrolled, err := filepath.EvalSymlinks(filepath.Join(servers[withName].dir, "state")) // as the manager names it
	if err != nil {
		return "", err
	}
	if _, err := manager.NewClient(m.sock).Enroll(ctx, manager.VMRequest{VM: enrolled}); err != nil {
		return "", fmt.Errorf("enrol the golden state: %w", err)
	}

	fmt.Fprintf(&b, "`vtpmd manager --tpm swtpm:path=SOCK` on Debian's swtpm as the hardware TPM (a software TPM on this CPU: a discrete TPM is much slower per command). "+
		"`%s` serves an enrolled vTPM (`vtpmd socket --manager SOCK`): its state encrypted with a key the manager unseals in the hardware TPM at start, "+
		"every durable state version reported to the manager. `%s` is `vtpmd socket --manager none`. "+
		"All three start from one golden state (manufactured by swtpm, NV indices defined), copied; the enrolled copy was re-encrypted by `vtpmd manager enroll`. "+
		"Back-to-back: 4 turns of blocks of calls to one server; interleaved: the servers take turns call by call. "+
		"The ratios (to swtpm, and with / without the manager) are of the back-to-back medians: interleaved, the manager's asynchronous work after a call "+
		"(the version report and its ledger save) runs during the next server's call and is charged to it.\n\n",
		withName, withoutName)

	// start to first answer, a restart on the existing state
	n := max(10, r.iters/10)
	starts := map[string]timed{}
	for name, s := range servers {
		starts[name] = firstAnswer(func() (*instance, error) { return startAt(s.im, s.dir) })
	}
	inter, b2b, err := measureBoth(n, starts)
	if err != nil {
		return "", fmt.Errorf("start: %w", err)
	}
	fmt.Fprintf(&b, "### Start to first answer (restart on the existing state: process start, with the manager its key request and unseal; median of %d each way)\n\n", n)
	b.WriteString("| server | back-to-back | interleaved | p99 (back-to-back) | / swtpm | with / without manager |\n|---|---|---|---|---|---|\n")
	for _, name := range []string{withoutName, withName, swtpmName} {
		fmt.Fprintf(&b, "| %s | %s | %s | %s | %s | %s |\n", name, fmtDur(b2b[name].median), fmtDur(inter[name].median), fmtDur(b2b[name].p99),
			ratio(b2b, name, swtpmName), withWithout(b2b, name))
	}
	r.summarize("vtpmd + manager: start to first answer (restart; with / without manager "+ratio(b2b, withName, withoutName)+")",
		fmtDur(b2b[withName].median), fmtDur(b2b[swtpmName].median), float64(b2b[withName].median)/float64(b2b[swtpmName].median))

	nv, err := r.nvWrites(m, servers, enrolled)
	if err != nil {
		return "", err
	}
	b.WriteString(nv)
	costs, err := r.managerCosts()
	if err != nil {
		return "", err
	}
	b.WriteString(costs)
	return b.String(), nil
}

// nvWrites times durable NV_Writes on one connection to each server, and reads the manager's
// record of the enrolled vTPM's state version before and after.
func (r *run) nvWrites(m *hostManager, servers map[string]*server, enrolled string) (string, error) {
	ctx := context.Background()
	var b strings.Builder
	before, err := m.vtpm(ctx, enrolled)
	if err != nil {
		return "", err
	}
	conns := map[string]transport.TPM{}
	pids := map[string]int{"manager": m.cmd.Process.Pid, "hardware TPM": m.hw.cmd.Process.Pid}
	for name, s := range servers {
		in, err := startAt(s.im, s.dir)
		if err != nil {
			return "", err
		}
		defer in.stop()
		c, err := in.dial(10 * time.Second)
		if err != nil {
			return "", err
		}
		defer c.Close()
		conns[name] = tpmclient.Stream(c)
		pids[name] = in.cmd.Process.Pid
	}
	cpu0 := cpuTimes(pids)
	nn := max(20, r.iters/4)
	fmt.Fprintf(&b, "\n### Durable NV_Write (one connection; each write acknowledged once on disk; median of %d each way)\n\n", nn)
	b.WriteString("| operation | server | back-to-back | interleaved | p99 (back-to-back) | ops/s (back-to-back) | / swtpm | with / without manager |\n|---|---|---|---|---|---|---|---|\n")
	for _, w := range []struct {
		name  string
		index uint32
		size  int
	}{{"NV_Write(1 KiB)", nvKiB, 1024}, {"NV_Write(64)", nvSmall, 64}} {
		fs := map[string]timed{}
		for name, t := range conns {
			f, err := nvWriter(t, w.index, w.size)
			if err != nil {
				return "", fmt.Errorf("%s on %s: %w", w.name, name, err)
			}
			fs[name] = clock(f)
		}
		inter, b2b, err := measureBoth(nn, fs)
		if err != nil {
			return "", fmt.Errorf("%s: %w", w.name, err)
		}
		for _, name := range []string{withoutName, withName, swtpmName} {
			fmt.Fprintf(&b, "| %s | %s | %s | %s | %s | %.0f | %s | %s |\n", w.name, name, fmtDur(b2b[name].median), fmtDur(inter[name].median),
				fmtDur(b2b[name].p99), opsPerSec(b2b[name].mean), ratio(b2b, name, swtpmName), withWithout(b2b, name))
		}
		if w.size == 1024 {
			r.summarize("vtpmd + manager: NV_Write(1 KiB) durable, back-to-back (with / without manager "+ratio(b2b, withName, withoutName)+")",
				fmtDur(b2b[withName].median), fmtDur(b2b[swtpmName].median), float64(b2b[withName].median)/float64(b2b[swtpmName].median))
		}
	}
	time.Sleep(100 * time.Millisecond) // the last report is asynchronous
	cpu := cpuTimes(pids)
	for name := range cpu {
		cpu[name] -= cpu0[name]
	}
	after, err := m.vtpm(ctx, enrolled)
	if err != nil {
		return "", err
	}
	writes := 2 * 2 * nn // per server: two sizes, two ways
	perWrite := func(name string) string { return fmtDur(cpu[name] / time.Duration(writes)) }
	fmt.Fprintf(&b, "\nCPU time per write over these %d writes per server: %s %s, %s %s, %s %s; behind %s's writes, the manager %s and the hardware TPM %s. "+
		"The manager's record of the vTPM's state version went from %d to %d, in %d ledger saves (each one hardware counter increment).\n",
		writes, withoutName, perWrite(withoutName), withName, perWrite(withName), swtpmName, perWrite(swtpmName), withName, perWrite("manager"), perWrite("hardware TPM"),
		before.Version, after.Version, after.Counter-before.Counter)

	return b.String(), nil
}

// nvWriter returns one durable TPM2_NV_Write of size bytes to index (its name read once: the
// golden state's indices are already written, so it does not change).
func nvWriter(t transport.TPM, index uint32, size int) (func() error, error) {
	pub, err := tpm2.NVReadPublic{NVIndex: tpm2.TPMHandle(index)}.Execute(t)
	if err != nil {
		return nil, err
	}
	data := make([]byte, size)
	cmd := tpm2.NVWrite{
		AuthHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)},
		NVIndex:    tpm2.NamedHandle{Handle: tpm2.TPMHandle(index), Name: pub.NVName},
		Data:       tpm2.TPM2BMaxNVBuffer{Buffer: data},
	}
	return func() error {
		rand.Read(data) // new bytes every time: libtpms stores nothing when a write leaves NV unchanged
		_, err := cmd.Execute(t)
		return err
	}, nil
}

func ratio(vals map[string]stats, name, to string) string {
	return fmt.Sprintf("%.2f", float64(vals[name].median)/float64(vals[to].median))
}

// withWithout is the with / without manager ratio on the with-manager row, blank elsewhere.
func withWithout(vals map[string]stats, name string) string {
	if name != withName {
		return ""
	}
	return ratio(vals, withName, withoutName)
}

// The manager's own costs are timed on an in-process manager (the code `vtpmd manager` runs,
// on its own stand-in hardware TPM) whose vTPM is this bench run again as -manager-client: the
// manager answers a vTPM's requests only from the process whose command line names the state
// (--tpmstate=dir=PATH) and runs the program it expects, here this bench.

// Names of the manager's requests as the client times them.
const (
	costKey        = "key request"
	costVersionNew = "version report, new version"
	costVersionOld = "version report, version already recorded"
)

// managerClient is the bench's -manager-client mode: it enrols the vTPM at the state path
// (a key request for a fresh state, auto-enrolment), then times the requests a vTPM makes (a
// key request on a new connection, as at a vTPM's start; version reports on one kept-alive
// connection, as its reporter sends them) and prints every call's duration as JSON.
func managerClient(sock, tpmstate string, n int) error {
	path, ok := strings.CutPrefix(tpmstate, "dir=")
	if !ok {
		return fmt.Errorf("-tpmstate %q: want dir=PATH", tpmstate)
	}
	ctx := context.Background()
	c := manager.NewClient(sock)
	resp, err := c.Key(ctx, manager.KeyRequest{StatePath: path, TPM2: true, Fresh: true})
	if err != nil {
		return fmt.Errorf("enrol: %w", err)
	}
	clear(resp.Key)
	version := uint64(1)
	if err := c.ReportVersion(ctx, path, version); err != nil {
		return err
	}
	ds, err := timeBlocks(n, 1, map[string]timed{
		costKey: clock(func() error { // on a new connection, as a starting vTPM asks
			resp, err := manager.NewClient(sock).Key(ctx, manager.KeyRequest{StatePath: path, TPM2: true})
			if err == nil {
				clear(resp.Key)
			}
			return err
		}),
		costVersionNew: clock(func() error { version++; return c.ReportVersion(ctx, path, version) }),
		costVersionOld: clock(func() error { return c.ReportVersion(ctx, path, 1) }),
	})
	if err != nil {
		return err
	}
	return json.NewEncoder(os.Stdout).Encode(ds)
}

// managerCosts times the manager's requests end to end (as the vTPM sees them) and the
// hardware TPM and disk work inside them, so that the reader sees where the time goes.
func (r *run) managerCosts() (string, error) {
	self, err := os.Executable()
	if err != nil {
		return "", err
	}
	hw, err := r.standIn()
	if err != nil {
		return "", err
	}
	defer hw.stop()
	spec := "swtpm:path=" + hw.data
	dir := filepath.Join(r.work, "manager-inproc")
	state := filepath.Join(dir, "vtpm")
	if err := os.MkdirAll(state, 0o700); err != nil {
		return "", err
	}
	n := max(20, r.iters/4)

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	hard, err := manager.OpenHardware(ctx, spec, "none", 0)
	if err != nil {
		return "", err
	}
	srv, err := manager.New(ctx, manager.Config{Dir: filepath.Join(dir, "records"), AutoEnroll: true, InstanceExe: self,
		Registry: registry.New(filepath.Join(dir, "registry"))}, hard)
	if err != nil {
		hard.Close()
		return "", err
	}
	sock := filepath.Join(dir, "api.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		hard.Close()
		return "", err
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ctx, ln) }()
	out, err := exec.Command(self, "-manager-client", sock, "-n", strconv.Itoa(n), "--tpmstate=dir="+state).Output()
	cancel()
	<-served
	hard.Close()
	if err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			err = fmt.Errorf("%w: %s", err, ee.Stderr)
		}
		return "", fmt.Errorf("manager client: %w", err)
	}
	var api map[string][]time.Duration
	if err := json.Unmarshal(out, &api); err != nil {
		return "", fmt.Errorf("manager client: %w", err)
	}
	ledger := filepath.Join(dir, "records", "ledger.json")
	fi, err := os.Stat(ledger)
	if err != nil {
		return "", err
	}

	// the same hardware and disk work on its own
	ctx = context.Background()
	sp, err := hwtpm.ParseSpec(spec)
	if err != nil {
		return "", err
	}
	tpm, err := hwtpm.Open(ctx, sp)
	if err != nil {
		return "", err
	}
	defer tpm.Close()
	sealed, err := tpm.Seal(ctx, make([]byte, 32), hwtpm.PolicyNone{})
	if err != nil {
		return "", err
	}
	counter := uint32(manager.DefaultCounterIndex + 1) // not the ledger's
	if err := tpm.DefineCounter(ctx, counter); err != nil {
		return "", err
	}
	ledgerBytes := make([]byte, fi.Size())
	rand.Read(ledgerBytes)
	const (
		partUnseal    = "hardware TPM: unseal"
		partIncrement = "hardware TPM: NV counter increment"
		partWrite     = "ledger write"
	)
	ds, err := timeBlocks(n, 1, map[string]timed{
		partUnseal: clock(func() error {
			key, err := tpm.Unseal(ctx, sealed)
			clear(key)
			return err
		}),
		partIncrement: clock(func() error { _, err := tpm.Increment(ctx, counter); return err }),
		partWrite: clock(func() error {
			return atomicfile.Write(ledger+".bench", ledgerBytes, atomicfile.Options{Perm: 0o600, ExactPerm: true})
		}),
	})
	if err != nil {
		return "", err
	}
	for name, d := range api {
		ds[name] = d
	}
	st := summarizeAll(ds)

	var b strings.Builder
	fmt.Fprintf(&b, "\n### The manager's own costs (median of %d, interleaved; the steps under a request are timed on their own)\n\n", n)
	b.WriteString("| request or step | median | p10 | p99 | what it is |\n|---|---|---|---|---|\n")
	for _, row := range []struct{ name, what string }{
		{costKey, "a vTPM's start: HTTP on the unix socket, peer check (SO_PEERCRED, /proc/PID), unseal"},
		{partUnseal, "ECC storage key CreatePrimary, Load, Unseal in a salted session, flushes"},
		{costVersionNew, "after a durable write, off the TPM's hot path: HTTP, peer check, ledger save"},
		{partIncrement, "ledger save, step 1: storage key, NV_ReadPublic, NV_Increment and NV_Read in salted sessions"},
		{partWrite, fmt.Sprintf("ledger save, step 2: %d B JSON + HMAC to a temporary file, fsync, rename, directory fsync", fi.Size())},
		{costVersionOld, "HTTP and peer check only (nothing to save): the API's floor"},
	} {
		s := st[row.name]
		fmt.Fprintf(&b, "| %s | %s | %s | %s | %s |\n", row.name, fmtDur(s.median), fmtDur(s.p10), fmtDur(s.p99), row.what)
	}
	return b.String(), nil
}
