//go:build integration

package integration

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/backend/blob"
	"github.com/vtpmd/vtpmd/manager"
)

// TestLibvirtManager is the host manager's acceptance test 1 under libvirt: with `vtpmd
// manager --auto-enroll` on the default socket, a persistent domain with the emulator backend
// (its XML unchanged: libvirt runs vtpmd as its swtpm_setup and swtpm, as user tss) gets a
// vTPM whose state files are encrypted with a key sealed by the host's TPM (Debian's swtpm
// stands in for it); Debian's swtpm cannot initialize a copy of them; the guest sees the same
// TPM (EK certificate, an NV counter it keeps) across VM restarts and a manager restart.
//
// It prepares its own libvirt environment instead of being a TestLibvirt subtest: a manager on
// the default socket changes how every vTPM on the host starts, so the other libvirt tests
// must never see one, even when this test fails half-way.
func TestLibvirtManager(t *testing.T) {
	needRefSwtpm(t)
	if manager.Available(manager.DefaultSocket) {
		t.Fatalf("%s exists: another manager runs on this host; refusing to replace it", manager.DefaultSocket)
	}
	e := lvSetup(t)
	m := e.startManager()

	d := e.domain("lv-mgr-emu", "11", "nvmark hang", "<backend type='emulator' version='2.0'/>")
	stateDir := filepath.Join("/var/lib/libvirt/swtpm", d.UUID, "tpm2")
	e.virsh("A", "define", d.writeXML())

	// boot 1: libvirt manufactures the TPM (swtpm_setup) and starts it (swtpm); both are
	// vtpmd, running as tss, and the manager enrols the new vTPM
	setups := e.watchSetup()
	ek, start := e.managerBoot(d, 1)
	setups()
	if lg := e.swtpmLog(d); !strings.Contains(lg, "sealed by the host's vtpmd manager") || !strings.Contains(lg, "Successfully authored TPM state.") {
		t.Fatalf("libvirt's swtpm_setup did not make the state with the manager's key:\n%s", lg)
	}
	pid := e.observeEmulator(d)
	rec := e.managerRecord(d, stateDir, start, 1)
	e.destroyAndWait(d, pid)
	e.checkSealedState(stateDir)

	// boot 2: the VM restarted; the key comes from the manager again
	ek2, start := e.managerBoot(d, 2)
	if !bytes.Equal(ek2, ek) {
		t.Fatalf("boot 2: the guest sees another EK certificate")
	}
	pid = e.observeEmulator(d)
	rec = e.managerRecord(d, stateDir, start, rec.Version+1) // the guest's NV write is a new version

	// the manager restarts under the running VM; its record stays; the VM then restarts and
	// gets its key from the new manager
	m.restart()
	rec = e.managerRecord(d, stateDir, time.Time{}, rec.Version)
	e.destroyAndWait(d, pid)
	ek3, start := e.managerBoot(d, 3)
	if !bytes.Equal(ek3, ek) {
		t.Fatalf("boot 3 (after the manager restarted): the guest sees another EK certificate")
	}
	pid = e.observeEmulator(d)
	rec = e.managerRecord(d, stateDir, start, rec.Version+1)

	// vtpmd status joins the manager's record to libvirt's view of the domain
	s := lvFind(e.status("--config", e.cfgA), d.Name)
	if s == nil || !s.Running || s.PID != pid || s.StateDir != stateDir || s.Manager == nil || !s.Manager.Sealed || s.Manager.ID != rec.ID {
		out, _ := e.vtpmctl("status", "--json", "--config", e.cfgA)
		t.Fatalf("vtpmd status of %s (pid %d, state %s, the manager's record %s):\n%s", d.Name, pid, stateDir, rec.ID, out)
	}
	e.destroyAndWait(d, pid)
	e.checkSealedState(stateDir)

	// a transient domain: libvirt removes its vTPM state when it stops; created again (same
	// UUID, so the same state path) it is a new vTPM, enrolled anew
	tr := e.domain("lv-mgr-tmp", "12", "nvmark hang", "<backend type='emulator' version='2.0'/>")
	trState := filepath.Join("/var/lib/libvirt/swtpm", tr.UUID, "tpm2")
	var trEK []byte
	for run := 1; run <= 2; run++ {
		ek, start := e.managerBoot(tr, 1, "create", tr.writeXML())
		if bytes.Equal(ek, trEK) {
			t.Fatalf("transient run %d: the guest sees the EK certificate of the run before", run)
		}
		trEK = ek
		e.managerRecord(tr, trState, start, 1)
		e.checkSealedState(trState)
		e.destroyAndWait(tr, e.observeEmulator(tr))
		if lvExists(trState) {
			t.Fatalf("libvirt kept the transient domain's state %s", trState)
		}
	}

	// without its manager the vTPM cannot start, and its state is left as it was
	m.stop()
	before, logged := dirHash(t, stateDir), len(e.swtpmLogAll(d))
	out, err := e.virshErr("A", "start", d.Name)
	if err == nil {
		t.Fatalf("the domain started without the manager")
	}
	lg := e.swtpmLogAll(d)[logged:]
	t.Logf("virsh start without the manager fails:\n%s\nswtpm log of that start:\n%s", strings.TrimSpace(out), lg)
	// the reason reaches the user through libvirt ("swtpm died and reported: ..."), and names
	// the manager
	if !strings.Contains(out+lg, "encrypted") || !strings.Contains(out+lg, "manager is not running") {
		t.Errorf("neither virsh nor the swtpm log says why the vTPM cannot start")
	}
	if dirHash(t, stateDir) != before {
		t.Fatalf("the state changed in the failed start")
	}
	e.virsh("A", "undefine", "--tpm", d.Name)
	if lvExists(filepath.Join("/var/lib/libvirt/swtpm", d.UUID)) {
		t.Errorf("undefine --tpm left the state")
	}
}

// startManager runs the installed vtpmd (the file libvirt's swtpm link resolves to: the
// manager releases keys only to processes running its own executable) as the host's manager
// on the default socket, for libvirt's vTPMs (group tss), naming VMs from host A's registry.
// It is stopped and its socket removed when the test ends, whatever happened.
func (e *lvEnv) startManager() *hostManager {
	t := e.t
	hadRun := lvExists(filepath.Dir(manager.DefaultSocket))
	t.Cleanup(func() {
		os.Remove(manager.DefaultSocket)
		if !hadRun {
			os.Remove(filepath.Dir(manager.DefaultSocket))
		}
	})
	m := newHostManager(t, e.vtpmd, manager.DefaultSocket, "tss", e.regA, "--log", "fd=2")
	t.Cleanup(m.stop) // before the generic kill: SIGTERM, so the manager removes its socket itself
	// libvirt's vTPM processes run as tss: the socket is theirs to connect to, nobody else's
	fi, err := os.Stat(manager.DefaultSocket)
	if err != nil {
		t.Fatal(err)
	}
	tss, err := user.LookupGroup("tss")
	if err != nil {
		t.Fatal(err)
	}
	if st := fi.Sys().(*syscall.Stat_t); fi.Mode().Perm() != 0o660 || strconv.Itoa(int(st.Gid)) != tss.Gid {
		t.Fatalf("manager socket mode %v gid %d, want 0660 and tss (%s)", fi.Mode(), st.Gid, tss.Gid)
	}
	return m
}

// managerBoot starts the domain (virsh start, or the virsh command given) and waits for the
// guest's report: its NV marker must count this boot (boot-1 before), its TPM work; it
// returns the guest's EK certificate and when the domain was started.
func (e *lvEnv) managerBoot(d *lvDomain, boot int, virsh ...string) ([]byte, time.Time) {
	t := e.t
	t.Helper()
	if len(virsh) == 0 {
		virsh = []string{"start", d.Name}
	}
	os.Remove(d.serial("A"))
	start := time.Now()
	if out, err := e.virshErr("A", virsh...); err != nil {
		t.Fatalf("boot %d: virsh %v: %v\n%s\nswtpm log:\n%s", boot, virsh, err, out, e.swtpmLog(d))
	}
	t.Logf("virsh[A] %s (%v)", strings.Join(virsh, " "), time.Since(start).Round(time.Millisecond))
	var out string
	ok := lvWait(2*time.Minute, func() bool {
		raw, _ := os.ReadFile(d.serial("A"))
		out = strings.ReplaceAll(string(raw), "\r", "")
		return strings.Contains(out, "GUEST: extend_ok=") || strings.Contains(out, "GUEST: error=")
	})
	if !ok {
		t.Fatalf("boot %d: the guest did not report within 2m:\n%s\nswtpm log:\n%s", boot, tail(out, 1500), e.swtpmLog(d))
	}
	v := guestValues(out)
	if v["error"] != "" || v["extend_ok"] != "true" || v["tpm_version_major"] != "2" {
		t.Fatalf("boot %d: the guest's TPM: %v\n%s\nswtpm log:\n%s", boot, v, tail(out, 1500), e.swtpmLog(d))
	}
	want := [2]string{fmt.Sprintf("%016x", boot-1), fmt.Sprintf("%016x", boot)}
	if v["nvmark_before"] != want[0] || v["nvmark_after"] != want[1] {
		t.Fatalf("boot %d: NV marker %s -> %s, want %s -> %s", boot, v["nvmark_before"], v["nvmark_after"], want[0], want[1])
	}
	ek, ok := guestBlob(out, "ekcert-rsa")
	if !ok || len(ek) == 0 {
		t.Fatalf("boot %d: no EK certificate from the guest", boot)
	}
	t.Logf("%s boot %d: NV marker %s -> %s, EK certificate %d bytes (%v)", d.Name, boot, want[0], want[1], len(ek), time.Since(start).Round(time.Millisecond))
	return ek, start
}

// swtpmLog is the tail of the log libvirt gives the domain's swtpm and swtpm_setup.
func (e *lvEnv) swtpmLog(d *lvDomain) string { return tail(e.swtpmLogAll(d), 3000) }

func (e *lvEnv) swtpmLogAll(d *lvDomain) string {
	b, _ := os.ReadFile("/var/log/swtpm/libvirt/qemu/" + d.Name + "-swtpm.log")
	return string(b)
}

// observeEmulator logs how libvirt runs the domain's vtpmd (command line, user) and returns
// its pid.
func (e *lvEnv) observeEmulator(d *lvDomain) int {
	t := e.t
	t.Helper()
	procs := e.vtpmProcs(d.UUID)
	if len(procs) != 1 {
		t.Fatalf("vtpmd processes for %s: %v", d.Name, procs)
	}
	pid := procs[0]
	exe, _ := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid))
	if exe != e.vtpmd {
		t.Fatalf("libvirt's swtpm (pid %d) runs %s, want %s", pid, exe, e.vtpmd)
	}
	cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	status, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	var ids []string
	for _, l := range strings.Split(string(status), "\n") {
		if strings.HasPrefix(l, "Uid:") || strings.HasPrefix(l, "Gid:") {
			ids = append(ids, strings.Join(strings.Fields(l), " "))
		}
	}
	t.Logf("libvirt's swtpm: pid %d exe %s %s argv %q", pid, exe, strings.Join(ids, "; "),
		strings.Split(strings.TrimRight(string(cmdline), "\x00"), "\x00"))
	return pid
}

func (e *lvEnv) destroyAndWait(d *lvDomain, pid int) {
	t := e.t
	t.Helper()
	e.virsh("A", "destroy", d.Name)
	if !lvWait(15*time.Second, func() bool { return len(e.vtpmProcs(d.UUID)) == 0 && !lvProcAlive(pid) }) {
		t.Fatalf("vtpmd left after destroy: %v", e.vtpmProcs(d.UUID))
	}
}

// checkSealedState: every state file libvirt's vTPM wrote is a swtpm blob encrypted with the
// state key, and Debian's swtpm, given a copy without the key, cannot initialize the TPM.
func (e *lvEnv) checkSealedState(stateDir string) {
	t := e.t
	t.Helper()
	files, _ := filepath.Glob(filepath.Join(stateDir, "tpm2-00.*"))
	var names []string
	perm := false
	for _, f := range files {
		if strings.HasSuffix(f, ".lock") {
			continue
		}
		raw, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		h, _, err := blob.ParseHeader(raw)
		if err != nil || h.Flags&blob.FlagEncrypted == 0 {
			t.Fatalf("%s is not an encrypted swtpm blob (header %+v, %v)", f, h, err)
		}
		if bytes.Contains(raw, []byte("swtpm-localca")) {
			t.Fatalf("%s holds plaintext (the EK certificate's issuer)", f)
		}
		perm = perm || strings.HasSuffix(f, ".permall")
		fi, _ := os.Stat(f)
		names = append(names, fmt.Sprintf("%s (%d bytes, flags %#x, mode %v)", filepath.Base(f), len(raw), h.Flags, fi.Mode()))
	}
	if !perm {
		t.Fatalf("no permanent state in %s: %v", stateDir, files)
	}
	t.Logf("state in %s: %s", stateDir, strings.Join(names, ", "))

	cp := filepath.Join(t.TempDir(), "tpm2")
	if out, err := exec.Command("cp", "-a", stateDir, cp).CombinedOutput(); err != nil {
		t.Fatalf("cp: %v %s", err, out)
	}
	ref := startEmulator(t, refSwtpm(), cp, "--tpm2")
	err := ctrlClient(t, ref.ctrl).Init(0)
	ref.cmd.Process.Kill()
	ref.cmd.Wait()
	if err == nil {
		t.Fatal("Debian's swtpm initialized the sealed state without its key")
	}
	lg, _ := os.ReadFile(ref.log)
	t.Logf("Debian's swtpm on a copy without the key: CMD_INIT: %v; its log: %s", err, strings.TrimSpace(tail(string(lg), 600)))
}

// lvManagerVM is one vTPM in `vtpmd manager status`'s JSON.
type lvManagerVM struct {
	ID        string    `json:"id"`
	Name      string    `json:"name"`
	UUID      string    `json:"uuid"`
	StatePath string    `json:"state_path"`
	Sealed    bool      `json:"sealed"`
	Phase     string    `json:"phase"`
	Version   uint64    `json:"version"`
	LastSeen  time.Time `json:"last_seen"`
}

// managerRecord is the manager's record of the domain's vTPM, from `vtpmd manager status`:
// enrolled, sealed, named from the registry; its key last released after seen
// (zero: not checked); its state version at least minVersion (waited for: a running vTPM
// reports its versions asynchronously).
func (e *lvEnv) managerRecord(d *lvDomain, stateDir string, seen time.Time, minVersion uint64) lvManagerVM {
	t := e.t
	t.Helper()
	var out string
	var vm *lvManagerVM
	ok := lvWait(15*time.Second, func() bool {
		var err error
		if out, err = e.vtpmctl("manager", "status", "--socket", manager.DefaultSocket); err != nil {
			t.Fatalf("vtpmd manager status: %v\n%s", err, out)
		}
		var st struct {
			TPM string        `json:"tpm"`
			VMs []lvManagerVM `json:"vms"`
		}
		if err := json.Unmarshal([]byte(out), &st); err != nil {
			t.Fatalf("vtpmd manager status output: %v\n%s", err, out)
		}
		vm = nil
		for i := range st.VMs {
			if st.VMs[i].StatePath == stateDir {
				vm = &st.VMs[i]
			}
		}
		return vm != nil && vm.Name == d.Name && vm.UUID == d.UUID && vm.Sealed && vm.Phase == "enrolled" &&
			vm.Version >= minVersion && (seen.IsZero() || vm.LastSeen.After(seen))
	})
	if !ok {
		t.Fatalf("the manager's record of %s (want name %s, uuid %s, sealed, enrolled, version >= %d, last seen after %v):\n%s",
			stateDir, d.Name, d.UUID, minVersion, seen.UTC(), out)
	}
	t.Logf("the manager's record: %+v", *vm)
	return *vm
}

// watchSetup watches for libvirt's swtpm_setup (the installed vtpmd under that name) until the
// returned function is called, which logs each run's user and command line. Only an
// observation: a run may end between two looks.
func (e *lvEnv) watchSetup() func() {
	stop, done := make(chan struct{}), make(chan []string)
	go func() {
		seen := map[int]string{}
		var order []string
		for {
			select {
			case <-stop:
				done <- order
				return
			case <-time.After(5 * time.Millisecond):
			}
			entries, _ := os.ReadDir("/proc")
			for _, en := range entries {
				pid, err := strconv.Atoi(en.Name())
				if err != nil || seen[pid] != "" {
					continue
				}
				cmdline, _ := os.ReadFile("/proc/" + en.Name() + "/cmdline")
				argv := strings.Split(strings.TrimRight(string(cmdline), "\x00"), "\x00")
				if filepath.Base(argv[0]) != "swtpm_setup" {
					continue
				}
				exe, _ := os.Readlink("/proc/" + en.Name() + "/exe")
				if exe != e.vtpmd { // another test's swtpm_setup
					continue
				}
				status, _ := os.ReadFile("/proc/" + en.Name() + "/status")
				uid := ""
				for _, l := range strings.Split(string(status), "\n") {
					if strings.HasPrefix(l, "Uid:") {
						uid = strings.Join(strings.Fields(l), " ")
					}
				}
				seen[pid] = fmt.Sprintf("pid %d exe %s %s argv %q", pid, exe, uid, argv)
				order = append(order, seen[pid])
			}
		}
	}()
	return func() {
		close(stop)
		runs := <-done
		if len(runs) == 0 {
			e.t.Logf("libvirt's swtpm_setup: no run caught")
		}
		for _, r := range runs {
			e.t.Logf("libvirt's swtpm_setup: %s", r)
		}
	}
}
