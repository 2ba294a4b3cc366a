//go:build integration

package integration

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestLibvirt is the libvirt acceptance suite. It needs root, starts its own virtlogd and
// libvirtd instances (host A, and host B in a private mount namespace), installs vtpmd with
// `vtpmd install` and removes everything again at the end. Run it alone, it takes minutes:
//
//	go test -tags integration -run TestLibvirt -timeout 30m -v ./integration/
func TestLibvirt(t *testing.T) {
	e := lvSetup(t)
	emulator := "<backend type='emulator' version='2.0'/>"
	external := func(d string) string {
		return fmt.Sprintf("<backend type='external'><source type='unix' mode='connect' path='%s'/></backend>",
			filepath.Join(e.w, "A", "run", d, "ctrl.sock"))
	}

	t.Run("EmulatorCreateDestroy", func(t *testing.T) { e.sub(t).emulatorCreateDestroy(emulator) })
	t.Run("MigrateEmulator", func(t *testing.T) {
		se := e.sub(t)
		se.migrate(se.domain("lv-mig-emu", "02", "tpmloop", emulator), 29302) // below the ephemeral port range: no outgoing connection can hold it
	})
	t.Run("MigrateExternal", func(t *testing.T) {
		se := e.sub(t)
		se.migrate(se.domain("lv-mig-ext", "03", "tpmloop", external("lv-mig-ext")), 29303)
	})
	t.Run("SaveRestoreEmulator", func(t *testing.T) {
		se := e.sub(t)
		se.saveRestore(se.domain("lv-save-emu", "04", "tpmloop", emulator))
	})
	t.Run("SaveRestoreExternal", func(t *testing.T) {
		se := e.sub(t)
		se.saveRestore(se.domain("lv-save-ext", "05", "tpmloop", external("lv-save-ext")))
	})
	t.Run("PersistentStateEmulator", func(t *testing.T) {
		se := e.sub(t)
		d := se.domain("lv-persist-emu", "06", "nvmark", "<backend type='emulator' version='2.0' persistent_state='yes'/>")
		// the policy the way an administrator sets it: virsh metadata on the defined domain
		d.SetPolicy, d.PolicyMode = `<policy><projection mode="property"/></policy>`, "property"
		se.persistent(d, filepath.Join("/var/lib/libvirt/swtpm", d.UUID, "tpm2"))
	})
	t.Run("PersistentStateExternal", func(t *testing.T) {
		se := e.sub(t)
		d := se.domain("lv-persist-ext", "07", "nvmark", external("lv-persist-ext"))
		d.Metadata = `<vtpmd:policy xmlns:vtpmd="https://vtpmd.dev/xmlns/policy/1"><vtpmd:projection mode="summary" pcr="23"/></vtpmd:policy>`
		d.PolicyMode = "summary"
		se.persistent(d, filepath.Join(e.w, "A", "state", d.UUID, "tpm2"))
	})
	t.Run("EncryptedStateAndPCRBanks", func(t *testing.T) { e.sub(t).encrypted() })
	t.Run("HookRejectsBadSocket", func(t *testing.T) { e.sub(t).hookRejects() })
	t.Run("ReconnectAfterDaemonRestart", func(t *testing.T) {
		se := e.sub(t)
		se.reconnect(se.domain("lv-reconn-ext", "10", "tpmloop", external("lv-reconn-ext")))
	})
	t.Run("ExternalRunsAsTss", func(t *testing.T) { e.sub(t).externalRunsAsTss() })
	t.Run("Registry", func(t *testing.T) { e.sub(t).registry() })
}

const lvSecretUUID = "6dd3e4a5-1d76-44ce-961f-f119f5aad935"

// The emulator backend with <encryption secret> and <active_pcr_banks>: libvirt passes the
// passphrase on fds (swtpm_setup --pwdfile-fd, swtpm --key/--migration-key pwdfd=) and
// reconfigures the banks; the state on disk is encrypted, and the guest still migrates to B.
func (e *lvEnv) encrypted() {
	t := e.t
	secret := fmt.Sprintf(`<secret ephemeral='no' private='yes'><uuid>%s</uuid><usage type='vtpm'><name>lv-vtpm-secret</name></usage></secret>`, lvSecretUUID)
	p := filepath.Join(e.w, "secret.xml")
	os.WriteFile(p, []byte(secret), 0o600)
	for _, h := range []string{"A", "B"} {
		e.virsh(h, "secret-define", p)
		e.virsh(h, "secret-set-value", lvSecretUUID, "--base64", "dnRwbWQtdGVzdC1wYXNzcGhyYXNl") // "vtpmd-test-passphrase"
		defer e.virshErr(h, "secret-undefine", lvSecretUUID)
	}
	d := e.domain("lv-enc-emu", "08", "tpmloop", fmt.Sprintf(`<backend type='emulator' version='2.0'>
      <encryption secret='%s'/>
      <active_pcr_banks><sha256/><sha384/></active_pcr_banks>
    </backend>`, lvSecretUUID))
	e.virsh("A", "create", d.writeXML())
	procs := e.vtpmProcs(d.UUID)
	if len(procs) != 1 {
		t.Fatalf("vtpmd processes %v", procs)
	}
	cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", procs[0]))
	args := strings.ReplaceAll(string(cmdline), "\x00", " ")
	if !strings.Contains(args, "pwdfd=") || !strings.Contains(args, "--migration-key") {
		t.Fatalf("libvirt did not pass the key fds: %q", args)
	}
	state := filepath.Join("/var/lib/libvirt/swtpm", d.UUID, "tpm2", "tpm2-00.permall")
	data, err := os.ReadFile(state)
	if err != nil {
		t.Fatal(err)
	}
	// libtpms' plain permanent state carries the EK certificate (DER, issuer "swtpm-localca");
	// encrypted it must not.
	if strings.Contains(string(data), "swtpm-localca") {
		t.Fatalf("%s holds plaintext", state)
	}
	logData, _ := os.ReadFile("/var/log/swtpm/libvirt/qemu/" + d.Name + "-swtpm.log")
	if !strings.Contains(string(logData), "sha384") {
		t.Errorf("swtpm log does not mention the sha384 bank:\n%s", tail(string(logData), 1500))
	}
	before := e.waitRows(d.serial("A"), 0, 3, 2*time.Minute)
	e.virsh("A", "migrate", "--live", d.Name, lvURIB, "--migrateuri", "tcp://127.0.0.1:29308")
	raw, _ := os.ReadFile(d.serial("A"))
	before = lvRows(string(raw))
	after := e.waitRows(d.serial("B"), before[len(before)-1].n, 2, time.Minute)
	lvCheckChain(t, before, after)
	e.virsh("B", "destroy", d.Name)
	if !lvWait(10*time.Second, func() bool { return len(e.vtpmProcs(d.UUID)) == 0 }) {
		t.Fatalf("vtpmd left: %v", e.vtpmProcs(d.UUID))
	}
}

// A socket path outside the hook's roots: the hook refuses at prepare, libvirt shows its
// message, and nothing is created there.
func (e *lvEnv) hookRejects() {
	t := e.t
	evil := "/etc/lv-vtpmd-evil.sock"
	d := e.domain("lv-evil", "09", "tpmloop",
		fmt.Sprintf("<backend type='external'><source type='unix' mode='connect' path='%s'/></backend>", evil))
	out, err := e.virshErr("A", "create", d.writeXML())
	if err == nil {
		e.virshErr("A", "destroy", d.Name)
		t.Fatal("virsh create succeeded")
	}
	if !strings.Contains(out, "outside the allowed roots") || !strings.Contains(out, "vtpmd hook") {
		t.Fatalf("libvirt's error does not carry the hook's message:\n%s", out)
	}
	t.Logf("virsh create failed as expected: %s", strings.TrimSpace(out))
	if lvExists(evil) {
		os.Remove(evil)
		t.Fatal("the hook created the socket outside its roots")
	}
}

// libvirtd restarts while an external-backend domain runs: the reconnect hook re-attaches to
// the running vtpmd, and the guest's chain goes on.
func (e *lvEnv) reconnect(d *lvDomain) {
	t := e.t
	if !e.startedA {
		t.Skip("libvirtd A was not started by this test")
	}
	e.virsh("A", "create", d.writeXML())
	e.waitRows(d.serial("A"), 0, 2, 2*time.Minute)
	procs := e.vtpmProcs(d.UUID)
	if len(procs) != 1 {
		t.Fatalf("vtpmd processes %v", procs)
	}
	pid := lvPidFile("/run/libvirtd.pid")
	syscall.Kill(pid, syscall.SIGTERM)
	if !lvWait(15*time.Second, func() bool { return !lvProcAlive(pid) }) {
		t.Fatal("libvirtd did not stop")
	}
	e.startReaper("daemons-A-restarted.log", "libvirtd", "-d", "-p", "/run/libvirtd.pid")
	if !lvWait(20*time.Second, func() bool { _, err := e.virshErr("A", "version"); return err == nil }) {
		t.Fatal("libvirtd did not come back")
	}
	if st := strings.TrimSpace(e.virsh("A", "domstate", d.Name)); st != "running" {
		t.Fatalf("domain %s after the restart", st)
	}
	raw, _ := os.ReadFile(d.serial("A"))
	rows := lvRows(string(raw))
	after := e.waitRows(d.serial("A"), rows[len(rows)-1].n, 2, time.Minute)
	lvCheckChain(t, rows[:1], after[1:])
	if p := e.vtpmProcs(d.UUID); len(p) != 1 || p[0] != procs[0] {
		t.Fatalf("vtpmd processes %v, want the original %d", p, procs[0])
	}
	sts := e.status("--config", e.cfgA)
	s := lvFind(sts, d.Name)
	if s == nil || !strings.Contains(s.ops(), "reconnect") {
		t.Fatalf("no reconnect event: %+v", s)
	}
	if last := s.History[len(s.History)-1]; last.Op != "reconnect" || !strings.Contains(last.Detail, "re-attached") || last.PID != procs[0] {
		t.Fatalf("reconnect event %+v", last)
	}
	e.virsh("A", "destroy", d.Name)
	if !lvWait(10*time.Second, func() bool { return len(e.vtpmProcs(d.UUID)) == 0 }) {
		t.Fatalf("vtpmd left: %v", e.vtpmProcs(d.UUID))
	}
}

// sub returns the environment bound to a subtest.
func (e *lvEnv) sub(t *testing.T) *lvEnv {
	c := *e
	c.t = t
	return &c
}

// status runs `vtpmd status --json` with args.
func (e *lvEnv) status(args ...string) []lvStatus {
	e.t.Helper()
	out, err := e.vtpmctl(append([]string{"status", "--json", "--history", "-1"}, args...)...)
	if err != nil {
		e.t.Fatalf("vtpmd status %v: %v\n%s", args, err, out)
	}
	var sts []lvStatus
	if err := json.Unmarshal([]byte(out), &sts); err != nil {
		e.t.Fatalf("vtpmd status output: %v\n%s", err, out)
	}
	return sts
}

type lvStatus struct {
	Name       string `json:"name"`
	UUID       string `json:"uuid"`
	Defined    bool   `json:"defined"`
	Active     bool   `json:"active"`
	Backend    string `json:"backend"`
	StateDir   string `json:"state_dir"`
	StateFound bool   `json:"state_found"`
	Socket     string `json:"socket"`
	Running    bool   `json:"running"`
	PID        int    `json:"pid"`
	Exe        string `json:"exe"`
	Policy     *struct {
		Projection *struct {
			Mode string `json:"mode"`
			PCR  *int   `json:"pcr"`
		} `json:"projection"`
	} `json:"policy"`
	// Manager is the host manager's record of the vTPM (absent: no manager, or not enrolled).
	Manager *struct {
		ID      string `json:"id"`
		Sealed  bool   `json:"sealed"`
		Phase   string `json:"phase"`
		Version uint64 `json:"version"`
	} `json:"manager"`
	History []struct {
		Time   time.Time `json:"time"`
		Op     string    `json:"op"`
		PID    int       `json:"pid"`
		Detail string    `json:"detail"`
		Error  string    `json:"error"`
	} `json:"history"`
}

func lvFind(sts []lvStatus, name string) *lvStatus {
	for i := range sts {
		if sts[i].Name == name {
			return &sts[i]
		}
	}
	return nil
}

func (s *lvStatus) ops() string {
	var ops []string
	for _, h := range s.History {
		ops = append(ops, h.Op)
	}
	return strings.Join(ops, ",")
}

// Acceptance 1: the emulator backend runs vtpmd, the guest's PCR chain works, destroy leaves
// nothing behind.
func (e *lvEnv) emulatorCreateDestroy(backend string) {
	t := e.t
	d := e.domain("lv-emu", "01", "tpmloop", backend)
	start := time.Now()
	e.virsh("A", "create", d.writeXML())
	t.Logf("virsh create returned after %v", time.Since(start).Round(time.Millisecond))
	id := e.domID("A", d.Name)
	run := "/run/libvirt/qemu/swtpm"
	pid := lvPidFile(fmt.Sprintf("%s/%d-%s-swtpm.pid", run, id, d.Name))
	sock := fmt.Sprintf("%s/%d-%s-swtpm.sock", run, id, d.Name)
	if pid == 0 || !lvProcAlive(pid) {
		t.Fatalf("no live swtpm pid in libvirt's pid file")
	}
	exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid))
	if err != nil || exe != e.vtpmd {
		t.Fatalf("the swtpm libvirt started (pid %d) runs %q, want %s", pid, exe, e.vtpmd)
	}
	cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	cg, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", pid))
	t.Logf("libvirt's swtpm: pid %d exe %s argv %q cgroup %s", pid, exe, strings.Split(strings.TrimRight(string(cmdline), "\x00"), "\x00"), strings.TrimSpace(string(cg)))
	if fi, err := os.Stat(sock); err != nil || fi.Mode()&os.ModeSocket == 0 {
		t.Fatalf("control socket %s: %v", sock, err)
	}
	rows := e.waitRows(d.serial("A"), 0, 3, 2*time.Minute)
	lvCheckChain(t, rows[:1], rows[1:])
	t.Logf("guest running %v after create", time.Since(start).Round(time.Millisecond))
	// libvirt manufactured the TPM with its swtpm_setup, which is vtpmd setup: it issues the
	// certificates in-process (Debian's swtpm_setup logs "Invoking .../swtpm_localca")
	if lg := readFile(t, "/var/log/swtpm/libvirt/qemu/"+d.Name+"-swtpm.log"); !strings.Contains(lg, "Successfully created EK certificate locally.") ||
		!strings.Contains(lg, "Successfully authored TPM state.") || strings.Contains(lg, "Invoking") {
		t.Fatalf("libvirt's swtpm_setup run was not vtpmd setup's:\n%s", lg)
	}

	sts := e.status("--config", e.cfgA)
	s := lvFind(sts, d.Name)
	if s == nil || !s.Defined || !s.Active || s.Backend != "emulator" || !s.Running || s.PID != pid || s.Exe != e.vtpmd || !s.StateFound {
		t.Fatalf("vtpmd status: %+v", s)
	}

	e.virsh("A", "destroy", d.Name)
	if !lvWait(10*time.Second, func() bool { return len(e.vtpmProcs(d.UUID)) == 0 && !lvExists(sock) && !lvProcAlive(pid) }) {
		t.Fatalf("after destroy: vtpmd processes %v, socket exists %v", e.vtpmProcs(d.UUID), lvExists(sock))
	}
	if lvExists(filepath.Join("/var/lib/libvirt/swtpm", d.UUID)) {
		t.Errorf("transient domain's TPM state was kept")
	}
}

// Acceptance 2: live migration A -> B keeps the PCR chain.
func (e *lvEnv) migrate(d *lvDomain, port int) {
	t := e.t
	os.MkdirAll(filepath.Join(e.w, "B", "run"), 0o755)
	e.virsh("A", "create", d.writeXML())
	before := e.waitRows(d.serial("A"), 0, 3, 2*time.Minute)
	if len(e.vtpmProcs(d.UUID)) != 1 {
		t.Fatalf("want one vtpmd for the domain before migrating, have %v", e.vtpmProcs(d.UUID))
	}
	start := time.Now()
	e.virsh("A", "migrate", "--live", d.Name, lvURIB, "--migrateuri", fmt.Sprintf("tcp://127.0.0.1:%d", port))
	t.Logf("virsh migrate --live took %v", time.Since(start).Round(time.Millisecond))
	data, _ := os.ReadFile(d.serial("A"))
	before = lvRows(string(data))
	after := e.waitRows(d.serial("B"), before[len(before)-1].n, 2, time.Minute)
	lvCheckChain(t, before, after)

	xml := e.virsh("B", "dumpxml", d.Name)
	if strings.Contains(d.TPM, "external") {
		want := filepath.Join(e.w, "B", "run", d.Name, "ctrl.sock")
		if !strings.Contains(xml, want) {
			t.Fatalf("B's XML lacks the rewritten socket %s:\n%s", want, xml)
		}
		if lvExists(filepath.Join(e.w, "A", "run", d.Name, "ctrl.sock")) {
			t.Errorf("A's socket left after the migration")
		}
	}
	procs := e.vtpmProcs(d.UUID)
	if len(procs) != 1 {
		t.Fatalf("want exactly B's vtpmd after migration, have %v", procs)
	}
	sts := e.status("-c", lvURIB, "--config", e.cfgB)
	if s := lvFind(sts, d.Name); s == nil || !s.Active || !s.Running || s.PID != procs[0] {
		t.Fatalf("vtpmd status on B: %+v (vtpmd pid %d)", s, procs[0])
	}
	e.virsh("B", "destroy", d.Name)
	if !lvWait(10*time.Second, func() bool { return len(e.vtpmProcs(d.UUID)) == 0 }) {
		t.Fatalf("vtpmd left after destroy on B: %v", e.vtpmProcs(d.UUID))
	}
	if lvExists(filepath.Join(e.w, "B", "run", d.Name, "ctrl.sock")) {
		t.Errorf("B's socket left after destroy")
	}
}

// Acceptance 2 (save/restore): the chain continues after virsh save + virsh restore.
func (e *lvEnv) saveRestore(d *lvDomain) {
	t := e.t
	e.virsh("A", "create", d.writeXML())
	e.waitRows(d.serial("A"), 0, 3, 2*time.Minute)
	img := filepath.Join(e.w, d.Name+".save")
	e.virsh("A", "save", d.Name, img)
	data, _ := os.ReadFile(d.serial("A"))
	before := lvRows(string(data))
	if !lvWait(10*time.Second, func() bool { return len(e.vtpmProcs(d.UUID)) == 0 }) {
		t.Fatalf("vtpmd still running after save: %v", e.vtpmProcs(d.UUID))
	}
	e.virsh("A", "restore", img)
	after := e.waitRows(d.serial("A"), before[len(before)-1].n, 2, time.Minute)
	lvCheckChain(t, before, after)
	e.virsh("A", "destroy", d.Name)
	if !lvWait(10*time.Second, func() bool { return len(e.vtpmProcs(d.UUID)) == 0 }) {
		t.Fatalf("vtpmd left after destroy: %v", e.vtpmProcs(d.UUID))
	}
	os.Remove(img)
}

var lvNVRE = regexp.MustCompile(`GUEST: nvmark_before=([0-9a-f]{16})\s+GUEST: nvmark_after=([0-9a-f]{16})`)

// Acceptance 3: a persistent domain keeps its vTPM state (an NV index the guest defined and
// counts boots in) across guest power-off and virsh start.
func (e *lvEnv) persistent(d *lvDomain, stateDir string) {
	t := e.t
	e.virsh("A", "define", d.writeXML())
	if d.SetPolicy != "" {
		e.virsh("A", "metadata", d.Name, "--uri", "https://vtpmd.dev/xmlns/policy/1", "--key", "vtpmd", "--set", d.SetPolicy, "--config")
		t.Logf("metadata as libvirt stores it: %s", strings.TrimSpace(e.virsh("A", "metadata", d.Name, "--uri", "https://vtpmd.dev/xmlns/policy/1", "--config")))
	}
	for boot := 1; boot <= 2; boot++ {
		os.Remove(d.serial("A"))
		start := time.Now()
		e.virsh("A", "start", d.Name)
		var m []string
		ok := lvWait(2*time.Minute, func() bool {
			data, _ := os.ReadFile(d.serial("A"))
			m = lvNVRE.FindStringSubmatch(string(data))
			st, _ := e.virshErr("A", "domstate", d.Name)
			return m != nil && strings.TrimSpace(st) == "shut off"
		})
		if !ok {
			data, _ := os.ReadFile(d.serial("A"))
			t.Fatalf("boot %d: guest did not report the NV marker and power off:\n%s", boot, tail(string(data), 1500))
		}
		want := [2]string{fmt.Sprintf("%016x", boot-1), fmt.Sprintf("%016x", boot)}
		if m[1] != want[0] || m[2] != want[1] {
			t.Fatalf("boot %d: NV marker %s -> %s, want %s -> %s", boot, m[1], m[2], want[0], want[1])
		}
		t.Logf("boot %d: NV marker %s -> %s (%v)", boot, m[1], m[2], time.Since(start).Round(time.Millisecond))
		if len(e.vtpmProcs(d.UUID)) != 0 {
			t.Fatalf("vtpmd still running after power-off: %v", e.vtpmProcs(d.UUID))
		}
		if !lvExists(stateDir) {
			t.Fatalf("state %s gone after boot %d", stateDir, boot)
		}
	}
	sts := e.status("--config", e.cfgA)
	s := lvFind(sts, d.Name)
	if s == nil || !s.Defined || s.Active || s.Running || s.StateDir != stateDir || !s.StateFound {
		t.Fatalf("vtpmd status of the inactive domain: %+v", s)
	}
	if d.PolicyMode != "" && (s.Policy == nil || s.Policy.Projection == nil || s.Policy.Projection.Mode != d.PolicyMode) {
		t.Fatalf("policy not reported: %+v", s.Policy)
	}
	e.virsh("A", "undefine", "--tpm", d.Name)
}

// Acceptance 4: the registries show the lifecycles of the runs above.
func (e *lvEnv) registry() {
	t := e.t
	a := e.status("--no-libvirt", "--registry", e.regA)
	b := e.status("--no-libvirt", "--registry", e.regB)
	expect := []struct {
		sts       []lvStatus
		host      string
		name, ops string
	}{
		{a, "A", "lv-emu", "prepare,start,started,stopped,release"},
		{a, "A", "lv-mig-emu", "prepare,start,started,stopped,release"},
		{b, "B", "lv-mig-emu", "migrate,prepare,start,started,stopped,release"},
		{a, "A", "lv-mig-ext", "prepare,start,started,stopped,release"},
		{b, "B", "lv-mig-ext", "migrate,prepare,start,started,stopped,release"},
		{a, "A", "lv-save-emu", "prepare,start,started,stopped,release,restore,prepare,start,started,stopped,release"},
		{a, "A", "lv-save-ext", "prepare,start,started,stopped,release,restore,prepare,start,started,stopped,release"},
		{a, "A", "lv-persist-emu", "prepare,start,started,stopped,release,prepare,start,started,stopped,release"},
		{a, "A", "lv-persist-ext", "prepare,start,started,stopped,release,prepare,start,started,stopped,release"},
		{a, "A", "lv-enc-emu", "prepare,start,started,stopped,release"},
		{b, "B", "lv-enc-emu", "migrate,prepare,start,started,stopped,release"},
		{a, "A", "lv-reconn-ext", "prepare,start,started,reconnect,stopped,release"},
	}
	for _, x := range expect {
		s := lvFind(x.sts, x.name)
		if s == nil {
			t.Errorf("%s: no registry record for %s", x.host, x.name)
			continue
		}
		if got := s.ops(); got != x.ops {
			t.Errorf("%s %s: events %s, want %s", x.host, x.name, got, x.ops)
		}
		sawPID := false
		for _, h := range s.History {
			if h.Error != "" {
				t.Errorf("%s %s: %s failed: %s", x.host, x.name, h.Op, h.Error)
			}
			if h.PID > 0 && (h.Op == "prepare" || h.Op == "start" || h.Op == "started") {
				sawPID = true
			}
			if strings.HasPrefix(h.Detail, "emulator exe ") && h.Detail != "emulator exe "+e.vtpmd {
				t.Errorf("%s %s: %s ran %s", x.host, x.name, h.Op, h.Detail)
			}
		}
		if !sawPID {
			t.Errorf("%s %s: no vTPM pid recorded", x.host, x.name)
		}
		if s.Running {
			t.Errorf("%s %s: still running", x.host, x.name)
		}
	}
	out, err := e.vtpmctl("status", "--no-libvirt", "--registry", e.regA)
	if err != nil {
		t.Fatalf("vtpmd status: %v\n%s", err, out)
	}
	t.Logf("vtpmd status (host A registry):\n%s", out)
}
