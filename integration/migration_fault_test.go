//go:build integration

package integration

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/manager"
)

// TestMigrationFault is issue 14's acceptance 3: `virsh migrate --live` A -> B with a manager on
// each host, and at each step of the handshake one of four parties killed (SIGKILL): the
// source's manager, the destination's manager, the source's QEMU or the destination's QEMU.
// The managers run with VTPMD_MIGRATION_PAUSE naming every step; the test releases each pause
// at once except the one under test, where it kills its victim first. Afterwards:
//
//   - at most one host runs a live TPM for the VM: the guest's iterations whose TPM commands all
//     answered (ok=true) do not go on on both hosts past the point where B's began, and vTPM
//     processes are left only where the domain is active;
//   - no acknowledged write is lost: wherever the guest goes on, its NV counter (read back
//     before every write) never falls below the last write its TPM acknowledged, across A and B.
//
// VTPMD_FAULT_CASES=step/victim,... runs only those cases (victims: source-manager,
// dest-manager, source-qemu, dest-qemu).
func TestMigrationFault(t *testing.T) {
	steps := []string{manager.StepExportSealed, manager.StepReleaseReceived, manager.StepReleaseRecorded, manager.StepReleaseSent,
		manager.StepImportReceived, manager.StepKeyReceived, manager.StepImportRecorded}
	victims := []string{"source-manager", "dest-manager", "source-qemu", "dest-qemu"}
	var only map[string]bool
	if v := os.Getenv("VTPMD_FAULT_CASES"); v != "" {
		only = map[string]bool{}
		for _, c := range strings.Split(v, ",") {
			only[strings.TrimSpace(c)] = true
		}
	}
	h := lvSetupHosts(t, false, nil)
	h.mgr["A"].env = []string{"VTPMD_MIGRATION_PAUSE=" + strings.Join(steps, ",")}
	h.mgr["B"].env = h.mgr["A"].env
	h.startManagers()
	p := h.startPauser()
	t.Cleanup(func() {
		if p.reuse != nil {
			h.virshErr("A", "destroy", p.reuse.Name)
			h.virshErr("A", "undefine", "--tpm", p.reuse.Name)
		}
	})
	i := 0
	for _, step := range steps {
		for _, victim := range victims {
			name := step + "/" + victim
			if only != nil && !only[name] {
				continue
			}
			i++
			port := 29430 + i
			t.Run(name, func(t *testing.T) {
				hs := h.sub(t)
				hs.faultCase(p, step, victim, port, i)
			})
		}
	}
}

// stepSide is the host whose manager pauses at step.
func stepSide(step string) string {
	switch step {
	case manager.StepImportReceived, manager.StepKeyReceived, manager.StepImportRecorded:
		return "B"
	}
	return "A"
}

// pauser watches the managers' pause files: it releases every pause at once, except the one
// a case waits for, which it reports and leaves to the case.
type pauser struct {
	h      *lvHosts
	mu     sync.Mutex
	target string        // "HOST:step" held for the case, "" none
	hit    chan struct{} // closed when target was reached
	seen   []string      // every pause reached, in order
	stop   chan struct{}
	done   chan struct{}
	// reuse is the domain the last case left running on A with a live TPM
	reuse *lvDomain
}

func (h *lvHosts) startPauser() *pauser {
	p := &pauser{h: h, stop: make(chan struct{}), done: make(chan struct{})}
	go p.run()
	h.t.Cleanup(func() { close(p.stop); <-p.done })
	return p
}

func (p *pauser) run() {
	defer close(p.done)
	for {
		select {
		case <-p.stop:
			return
		case <-time.After(20 * time.Millisecond):
		}
		for _, host := range []string{"A", "B"} {
			files, _ := filepath.Glob(filepath.Join(p.h.mgr[host].dir, "pause-*"))
			for _, f := range files {
				step := strings.TrimPrefix(filepath.Base(f), "pause-")
				key := host + ":" + step
				p.mu.Lock()
				if key == p.target {
					if p.hit != nil {
						p.seen = append(p.seen, key)
						close(p.hit)
						p.hit = nil
					}
					p.mu.Unlock()
					continue
				}
				p.seen = append(p.seen, key)
				p.mu.Unlock()
				os.Remove(f)
			}
		}
	}
}

// arm sets the pause to hold; the returned channel is closed when it is reached.
func (p *pauser) arm(host, step string) <-chan struct{} {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.target, p.hit, p.seen = host+":"+step, make(chan struct{}), nil
	return p.hit
}

// release lets the held pause go (removes its file, if the manager is still there to wait on
// it) and holds nothing any more.
func (p *pauser) release(host, step string) {
	p.mu.Lock()
	p.target = ""
	p.mu.Unlock()
	os.Remove(filepath.Join(p.h.mgr[host].dir, "pause-"+step))
}

func (p *pauser) trace() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return strings.Join(p.seen, " ")
}

// qemuPID is the pid of d's QEMU on host (0: none). B's pid file is in B's mount namespace,
// reached through its libvirtd's /proc/PID/root.
func (h *lvHosts) qemuPID(host string, d *lvDomain) int {
	p := "/run/libvirt/qemu/" + d.Name + ".pid"
	if host == "B" {
		p = fmt.Sprintf("/proc/%d/root%s", lvPidFile(filepath.Join(h.hostB, "libvirtd.pid")), p)
	}
	pid := lvPidFile(p)
	if pid == 0 || !lvProcAlive(pid) {
		return 0
	}
	return pid
}

// vtpmHost says on which host a vTPM process runs: B when it shares libvirtd B's mount
// namespace.
func (h *lvHosts) vtpmHost(pid int) string {
	ns, _ := os.Readlink(fmt.Sprintf("/proc/%d/ns/mnt", pid))
	nsB, _ := os.Readlink(fmt.Sprintf("/proc/%d/ns/mnt", lvPidFile(filepath.Join(h.hostB, "libvirtd.pid"))))
	if ns != "" && ns == nsB {
		return "B"
	}
	return "A"
}

var faultRowRE = regexp.MustCompile(`GUEST: iter=(\d+) PCR16=([0-9A-F]*) nv=(\d+) ok=(true|false)`)

type faultRow struct {
	iter, nv int
	ok       bool
}

func faultRows(path string) []faultRow {
	raw, _ := os.ReadFile(path)
	var rows []faultRow
	for _, m := range faultRowRE.FindAllStringSubmatch(string(raw), -1) {
		n, _ := strconv.Atoi(m[1])
		v, _ := strconv.Atoi(m[3])
		rows = append(rows, faultRow{n, v, m[4] == "true"})
	}
	return rows
}

// faultCase runs one case: a domain on A (the one the case before left running with a live
// TPM on A, or a fresh one), the migration held at step, victim killed there, the pause
// released, then the invariants checked once things settle.
func (h *lvHosts) faultCase(p *pauser, step, victim string, port, i int) {
	t := h.t
	d := p.reuse
	p.reuse = nil
	if d == nil {
		d = h.domain(fmt.Sprintf("lv-fault-%02d", i), fmt.Sprintf("%02d", 40+i), "migloop", "<backend type='emulator' version='2.0'/>")
		os.Remove(d.serial("A"))
		os.Remove(d.serial("B"))
		// persistent on A: its vTPM state outlives the VM, for the recovery check
		h.virsh("A", "define", d.writeSmallXML())
		h.virsh("A", "start", d.Name)
		h.waitRows(d.serial("A"), 0, 3, 3*time.Minute)
	} else {
		t.Logf("the guest of %s runs on A with a live TPM after the case before: reused", d.Name)
	}
	t.Cleanup(func() {
		if p.reuse != d {
			for _, host := range []string{"A", "B"} {
				h.virshErr(host, "destroy", d.Name)
			}
			h.virshErr("A", "undefine", "--tpm", d.Name)
		}
		for _, m := range []*lvMgr{h.mgr["A"], h.mgr["B"]} {
			if !m.running() {
				m.start()
			}
		}
		if p.reuse != d {
			lvWait(15*time.Second, func() bool { return len(h.vtpmProcs(d.UUID)) == 0 })
		}
	})
	side := stepSide(step)
	hit := p.arm(side, step)
	type result struct {
		out string
		err error
	}
	migrated := make(chan result, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
		defer cancel()
		out, err := lvRun(ctx, "virsh", "-q", "-c", lvURIA, "migrate", "--live", d.Name, lvURIB, "--migrateuri", fmt.Sprintf("tcp://127.0.0.1:%d", port))
		migrated <- result{out, err}
	}()
	var res result
	reached := false
	select {
	case <-hit:
		reached = true
	case res = <-migrated:
	case <-time.After(3 * time.Minute):
	}
	if !reached {
		p.release(side, step)
		if res.out == "" && res.err == nil {
			res = <-migrated
		}
		t.Fatalf("the migration never reached %s on %s (pauses seen: %s); virsh migrate: %v %s", step, side, p.trace(), res.err, strings.TrimSpace(res.out))
	}
	// the victim
	switch victim {
	case "source-manager":
		h.mgr["A"].kill()
	case "dest-manager":
		h.mgr["B"].kill()
	case "source-qemu", "dest-qemu":
		host := map[string]string{"source-qemu": "A", "dest-qemu": "B"}[victim]
		pid := h.qemuPID(host, d)
		if pid == 0 {
			t.Fatalf("no QEMU for %s on %s", d.Name, host)
		}
		syscall.Kill(pid, syscall.SIGKILL)
		// its vTPM goes with it (--terminate): let it be gone before the held step goes on,
		// as docs/migration.md's rows for a dead QEMU B describe
		lvWait(10*time.Second, func() bool {
			for _, vp := range h.vtpmProcs(d.UUID) {
				if h.vtpmHost(vp) == host {
					return false
				}
			}
			return true
		})
	}
	okAtFault := lastOK(faultRows(d.serial("A")))
	t.Logf("held at %s on %s; killed the %s (the guest's last live iteration on A: %d)", step, side, victim, okAtFault)
	p.release(side, step)
	res = <-migrated
	t.Logf("virsh migrate: %v %s (pauses: %s)", res.err, strings.TrimSpace(res.out), p.trace())
	// a killed manager comes back (its host's vTPMs ask it whether they may run on)
	for _, m := range []*lvMgr{h.mgr["A"], h.mgr["B"]} {
		if !m.running() {
			m.start()
		}
	}
	reusable := h.faultSettled(d, res.err == nil)
	// the source's fate, against docs/migration.md's failure table where it is unambiguous: a
	// migration that fails before the release leaves the source running; once the release is
	// durable and the migration fails, the source refuses every command
	stA, _ := h.virshErr("A", "domstate", d.Name)
	liveA := strings.TrimSpace(stA) == "running" && lvWait(5*time.Second, func() bool { return lastOK(faultRows(d.serial("A"))) >= okAtFault+2 })
	t.Logf("outcome %s/%s: migration %v; source TPM live after the fault: %v", step, victim, res.err == nil, liveA)
	if want, known := sourceRunsOn(step, victim, res.err == nil); known && liveA != want {
		t.Errorf("after %s with the %s killed the source's TPM is live=%v, want %v (docs/migration.md's failure table)", step, victim, liveA, want)
	}
	stB, _ := h.virshErr("B", "domstate", d.Name)
	if !liveA && strings.TrimSpace(stB) != "running" && !t.Failed() {
		reusable = h.recoverOnA(d)
	}
	if reusable && !t.Failed() {
		p.reuse = d
	}
}

// recoverOnA: no host runs the TPM after the fault. The operator's way back (docs/migration.md):
// `vtpmd history accept VM` on A, then the VM started again on A runs A's copy of the state. No
// write the source's TPM acknowledged is lost: the restarted guest's NV counter is at least the
// last one it acknowledged on A. It says whether the domain now runs on A with a live TPM.
func (h *lvHosts) recoverOnA(d *lvDomain) bool {
	t := h.t
	t.Helper()
	acked := -1
	for _, r := range faultRows(d.serial("A")) {
		if r.ok {
			acked = r.nv
		}
	}
	out, err := h.mgr["A"].ctl("history", "accept", "--socket", h.mgr["A"].sock, d.UUID)
	t.Logf("no host runs the TPM: vtpmd history accept %s on A: %v %s", d.UUID, err, strings.TrimSpace(out))
	h.virshErr("A", "destroy", d.Name)
	if !lvWait(15*time.Second, func() bool { return len(h.vtpmProcs(d.UUID)) == 0 }) {
		t.Errorf("vtpmd left after destroy on A: %v", h.vtpmProcs(d.UUID))
		return false
	}
	os.Remove(d.serial("A"))
	os.Remove(d.serial("B"))
	h.virsh("A", "start", d.Name)
	var v map[string]string
	if !lvWait(3*time.Minute, func() bool {
		raw, _ := os.ReadFile(d.serial("A"))
		v = guestValues(strings.ReplaceAll(string(raw), "\r", ""))
		return v["nvcount_start"] != "" && lastOK(faultRows(d.serial("A"))) >= 2
	}) {
		raw, _ := os.ReadFile(d.serial("A"))
		t.Errorf("the VM restarted on A after accept has no live TPM:\n%s", tail(string(raw), 1500))
		return false
	}
	n, _ := strconv.Atoi(v["nvcount_start"])
	if n < acked {
		t.Errorf("restarted on A, the guest's NV counter is %d, below the %d its TPM acknowledged before the migration", n, acked)
	}
	t.Logf("restarted on A after accept: the NV counter reads %d (last acknowledged %d)", n, acked)
	return true
}

// sourceRunsOn is whether the source's TPM must run on after the case, when the failure
// table says so without doubt (known false: not asserted).
func sourceRunsOn(step, victim string, migrated bool) (want, known bool) {
	if victim == "source-qemu" {
		return false, false // no source VM left to run it
	}
	if migrated {
		return false, true // the VM left A: A's TPM must not run
	}
	switch step {
	case manager.StepExportSealed:
		return true, true // nothing released
	case manager.StepReleaseReceived, manager.StepImportReceived:
		if victim == "source-manager" || victim == "dest-qemu" || (step == manager.StepImportReceived && victim == "dest-manager") {
			return true, true // the release never happened (a dead destination withdraws its request)
		}
		return false, false // the release may still go through after the victim died
	case manager.StepReleaseRecorded, manager.StepReleaseSent, manager.StepKeyReceived, manager.StepImportRecorded:
		return false, true // released: the source refuses every command
	}
	return false, false
}

// faultSettled waits for the dust to settle and checks the two invariants. It says whether
// the domain runs on A alone with a live TPM (the next case may use it).
func (h *lvHosts) faultSettled(d *lvDomain, migrated bool) bool {
	t := h.t
	t.Helper()
	state := func(host string) string {
		out, err := h.virshErr(host, "domstate", d.Name)
		if err != nil {
			return "absent"
		}
		return strings.TrimSpace(out)
	}
	// give the guest time to go on wherever it can (or to fail to)
	time.Sleep(8 * time.Second)
	stA, stB := state("A"), state("B")
	t.Logf("after the fault (migration %s): domain on A %q, on B %q", map[bool]string{true: "succeeded", false: "failed"}[migrated], stA, stB)
	if stA == "running" && stB == "running" {
		t.Errorf("the domain runs on both hosts")
	}
	// where the domain is paused on A while B runs it (libvirt's post-migration state kept),
	// resuming it must not give the guest a live TPM
	if stB == "running" && strings.HasPrefix(stA, "paused") {
		if _, err := h.virshErr("A", "resume", d.Name); err == nil {
			t.Logf("resumed the paused source on A to see whether its TPM still answers")
			time.Sleep(5 * time.Second)
		}
	}
	rowsA, rowsB := faultRows(d.serial("A")), faultRows(d.serial("B"))
	okA, okB := lastOK(rowsA), lastOK(rowsB)
	t.Logf("guest on A: %d rows, last ok iteration %d; on B: %d rows, last ok iteration %d", len(rowsA), okA, len(rowsB), okB)
	// two live TPMs: B's guest went on with a working TPM, and so did A's past B's first row
	if len(rowsB) > 0 {
		b0 := rowsB[0].iter
		if okB >= b0 && okA >= b0 {
			t.Errorf("two live TPMs: the guest's TPM answered on A up to iteration %d and on B from %d to %d", okA, b0, okB)
		}
	}
	// no acknowledged write lost, along the path the guest took
	for _, log := range []string{d.serial("A"), d.serial("B")} {
		raw, _ := os.ReadFile(log)
		if m := regexp.MustCompile(`GUEST: nvlost [^\n]*`).FindString(string(raw)); m != "" {
			t.Errorf("%s: %s", filepath.Base(log), m)
		}
	}
	acked, lastIter := -1, 0
	path := rowsA
	if len(rowsB) > 0 && okB >= rowsB[0].iter {
		// the guest went on on B: A's rows before B's first, then B's
		var pre []faultRow
		for _, r := range rowsA {
			if r.iter < rowsB[0].iter {
				pre = append(pre, r)
			}
		}
		path = append(pre, rowsB...)
	}
	for _, r := range path {
		if r.iter <= lastIter {
			continue
		}
		if acked >= 0 && r.nv < acked {
			t.Errorf("iteration %d: NV counter %d below the acknowledged %d", r.iter, r.nv, acked)
		}
		if r.ok {
			acked = r.nv
		}
		lastIter = r.iter
	}
	// vTPM processes only where the domain is active
	lvWait(20*time.Second, func() bool {
		for _, pid := range h.vtpmProcs(d.UUID) {
			if st := state(h.vtpmHost(pid)); st == "absent" || st == "shut off" {
				return false
			}
		}
		return true
	})
	live := map[string]int{}
	for _, pid := range h.vtpmProcs(d.UUID) {
		live[h.vtpmHost(pid)]++
	}
	for host, n := range live {
		if st := state(host); st == "absent" || st == "shut off" {
			t.Errorf("%d vTPM process(es) left on %s, where the domain is %s", n, host, st)
		}
	}
	t.Logf("settled: A %s, B %s, vTPM processes %v, last acknowledged NV %d", state("A"), state("B"), live, acked)
	// reusable: on A only, no row ever on B, and the guest's TPM answered after the fault
	okBefore := lastOK(rowsA)
	return state("A") == "running" && state("B") == "absent" && len(rowsB) == 0 &&
		lvWait(5*time.Second, func() bool { return lastOK(faultRows(d.serial("A"))) >= okBefore+2 })
}

// lastOK is the last iteration whose TPM commands all answered (0: none).
func lastOK(rows []faultRow) int {
	n := 0
	for _, r := range rows {
		if r.ok {
			n = r.iter
		}
	}
	return n
}
