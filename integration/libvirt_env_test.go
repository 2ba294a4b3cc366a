//go:build integration

package integration

// The libvirt acceptance tests' environment: vtpmd installed as the host's swtpm, two libvirtd
// instances ("hosts" A and B, B in a private mount namespace with its own host UUID and a TCP
// listener), each under a child-subreaper that reaps the processes libvirt daemonizes (this
// sandbox's PID 1 does not reap orphans, so without it every stopped swtpm stays a zombie).

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

const (
	lvReaperEnv = "VTPMD_LIBVIRT_REAPER"
	lvPath      = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
	lvBinDir    = "/usr/local/bin"
	lvHookPath  = "/etc/libvirt/hooks/qemu.d/50-vtpmd"
	lvPortB     = 16510
	lvURIA      = "qemu:///system"
	lvURIB      = "qemu+tcp://127.0.0.1:16510/system"
	lvHostUUIDB = "22222222-2222-4222-8222-222222222222"
)

// init turns the test binary into a child-subreaper when re-executed with lvReaperEnv set: it
// runs its arguments and reaps every descendant that gets orphaned, until none is left.
func init() {
	if os.Getenv(lvReaperEnv) != "1" {
		return
	}
	os.Exit(lvReaper(os.Args[1:]))
}

func lvReaper(args []string) int {
	if len(args) == 0 {
		return 2
	}
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		fmt.Fprintln(os.Stderr, "reaper:", err)
		return 1
	}
	path, err := exec.LookPath(args[0])
	if err != nil {
		fmt.Fprintln(os.Stderr, "reaper:", err)
		return 1
	}
	env := []string{}
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, lvReaperEnv+"=") {
			env = append(env, kv)
		}
	}
	pid, err := syscall.ForkExec(path, args, &syscall.ProcAttr{Env: env, Files: []uintptr{0, 1, 2}})
	if err != nil {
		fmt.Fprintln(os.Stderr, "reaper:", err)
		return 1
	}
	code := 0
	for {
		var ws syscall.WaitStatus
		p, err := syscall.Wait4(-1, &ws, 0, nil)
		if errors.Is(err, syscall.EINTR) {
			continue
		}
		if err != nil {
			break // ECHILD: nothing left to reap
		}
		if p == pid {
			code = ws.ExitStatus()
		}
		fmt.Fprintf(os.Stderr, "reaper: reaped %d (%v)\n", p, ws)
	}
	return code
}

// lvEnv is the prepared machine.
type lvEnv struct {
	t        *testing.T
	w        string // work dir, 0755, no symlinks
	vtpmd    string // installed binary
	kernel   string
	initrd   string
	startedA bool
	reapers  []*exec.Cmd
	cfgA     string
	cfgB     string
	regA     string
	regB     string
	hostB    string
	// existed before the test, so teardown leaves them
	hadLogSwtpm, hadRunLibvirt, hadLibSwtpm bool
}

func lvRun(ctx context.Context, name string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env = append(os.Environ(), "PATH="+lvPath, "LC_ALL=C")
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	return out.String(), err
}

func lvExists(p string) bool { _, err := os.Lstat(p); return err == nil }

func lvProcAlive(pid int) bool {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	i := bytes.LastIndexByte(data, ')')
	return i > 0 && i+2 < len(data) && data[i+2] != 'Z' && data[i+2] != 'X'
}

func lvPidFile(p string) int {
	data, err := os.ReadFile(p)
	if err != nil {
		return 0
	}
	pid, _ := strconv.Atoi(strings.TrimSpace(string(data)))
	return pid
}

// lvPgrepExact finds live processes whose command line is exactly cmdline.
func lvPgrepExact(cmdline ...string) []int {
	want := strings.Join(cmdline, "\x00")
	var pids []int
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		data, err := os.ReadFile("/proc/" + e.Name() + "/cmdline")
		if err != nil {
			continue
		}
		if strings.TrimSuffix(string(data), "\x00") == want && lvProcAlive(pid) {
			pids = append(pids, pid)
		}
	}
	return pids
}

// lvWait polls ok until it holds or d passes.
func lvWait(d time.Duration, ok func() bool) bool {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		if ok() {
			return true
		}
		time.Sleep(100 * time.Millisecond)
	}
	return ok()
}

// lvSetup prepares everything or skips (fails under CI=true) when libvirt is missing.
func lvSetup(t *testing.T) *lvEnv {
	t.Helper()
	if os.Geteuid() != 0 {
		if os.Getenv("CI") == "true" {
			t.Fatal("the libvirt tests need root (CI=true)")
		}
		t.Skip("the libvirt tests need root")
	}
	need(t, "virsh", "libvirtd", "virtlogd", "qemu-system-x86_64", "unshare", "/usr/bin/swtpm_setup")
	if lvExists(lvHookPath) {
		t.Fatalf("%s exists already; refusing to run over another installation", lvHookPath)
	}
	w, err := os.MkdirTemp("/var/tmp", "vtpmd-libvirt-")
	if err != nil {
		t.Fatal(err)
	}
	os.Chmod(w, 0o755)
	e := &lvEnv{t: t, w: w, vtpmd: filepath.Join(lvBinDir, "vtpmd"), hostB: filepath.Join(w, "hostB")}
	e.hadLogSwtpm = lvExists("/var/log/swtpm")
	e.hadRunLibvirt = lvExists("/run/libvirt")
	e.hadLibSwtpm = lvExists("/var/lib/libvirt/swtpm")
	t.Cleanup(e.teardown)
	t.Logf("work dir %s", w)

	// the guest, copied: libvirt relabels kernel and initrd, and QEMU runs as libvirt-qemu
	for _, n := range []string{"vmlinuz", "initrd.gz"} {
		data, err := os.ReadFile(filepath.Join(env.guestDir, n))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(w, n), data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	e.kernel, e.initrd = filepath.Join(w, "vmlinuz"), filepath.Join(w, "initrd.gz")

	// hook configurations: per "host" state roots and registries in the work dir
	for _, h := range []string{"A", "B"} {
		os.MkdirAll(filepath.Join(w, h, "run"), 0o755)
		cfg := map[string]any{
			"state_root":   filepath.Join(w, h, "state"),
			"registry_dir": filepath.Join(w, h, "registry"),
			"socket_roots": []string{filepath.Join(w, h, "run")},
		}
		if h == "B" {
			// both hosts share this filesystem: the destination uses its own paths
			cfg["rewrite"] = []map[string]string{{"from": filepath.Join(w, "A"), "to": filepath.Join(w, "B")}}
		}
		data, _ := json.MarshalIndent(cfg, "", "  ")
		p := filepath.Join(w, h, "hook.json")
		if err := os.WriteFile(p, data, 0o644); err != nil {
			t.Fatal(err)
		}
		if h == "A" {
			e.cfgA, e.regA = p, filepath.Join(w, h, "registry")
		} else {
			e.cfgB, e.regB = p, filepath.Join(w, h, "registry")
		}
	}

	// libvirt runs swtpm_setup as tss (reference notes, section 6)
	if lvExists("/var/lib/swtpm-localca") {
		lvRun(context.Background(), "chown", "-R", "tss:root", "/var/lib/swtpm-localca")
	}

	start := time.Now()
	out, err := lvRun(context.Background(), env.bin, "install", "--bin-dir", lvBinDir, "--config", e.cfgA, "--manifest", filepath.Join(w, "install.json"))
	t.Logf("vtpmd install (%v):\n%s", time.Since(start).Round(time.Millisecond), out)
	if err != nil {
		t.Fatalf("vtpmd install: %v", err)
	}
	// swtpm_setup too: vtpmd setup answers --print-capabilities, so install links it
	for _, n := range []string{"swtpm", "swtpm_ioctl", "swtpm_setup"} {
		if res, err := filepath.EvalSymlinks(filepath.Join(lvBinDir, n)); err != nil || res != e.vtpmd {
			t.Fatalf("%s resolves to %q (%v)", n, res, err)
		}
	}

	e.startA()
	e.startB()
	return e
}

// startReaper runs argv under a subreaper, detached, logging to logName in the work dir.
func (e *lvEnv) startReaper(logName string, argv ...string) {
	e.t.Helper()
	logf, err := os.Create(filepath.Join(e.w, logName))
	if err != nil {
		e.t.Fatal(err)
	}
	defer logf.Close()
	self, err := os.Executable()
	if err != nil {
		e.t.Fatal(err)
	}
	cmd := exec.Command(self, argv...)
	cmd.Env = append(os.Environ(), lvReaperEnv+"=1", "PATH="+lvPath, "LC_ALL=C")
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		e.t.Fatal(err)
	}
	e.reapers = append(e.reapers, cmd)
}

func (e *lvEnv) startA() {
	t := e.t
	if len(lvPgrepExact("libvirtd", "-d")) > 0 || lvExists("/run/libvirtd.pid") && lvProcAlive(lvPidFile("/run/libvirtd.pid")) {
		// Someone else's daemon: it must have been started with /usr/local/bin before /usr/bin
		// and without having cached swtpm; the exe checks below tell.
		t.Logf("libvirtd is already running; sending SIGHUP so it reads the hook")
		syscall.Kill(lvPidFile("/run/libvirtd.pid"), syscall.SIGHUP)
		time.Sleep(time.Second)
		return
	}
	e.startedA = true
	e.startReaper("daemons-A.log", "sh", "-c", "virtlogd -d -p /run/virtlogd.pid && libvirtd -d -p /run/libvirtd.pid")
	if !lvWait(20*time.Second, func() bool {
		_, err := lvRun(context.Background(), "virsh", "-c", lvURIA, "version")
		return err == nil
	}) {
		t.Fatalf("libvirtd A did not come up: %s", readFile(t, filepath.Join(e.w, "daemons-A.log")))
	}
}

func (e *lvEnv) startB() {
	t := e.t
	B := e.hostB
	for _, d := range []string{"etc", "varlib", "log", "logswtpm", "cache"} {
		os.MkdirAll(filepath.Join(B, d), 0o755)
	}
	os.MkdirAll("/run/libvirt", 0o755)
	for _, cp := range [][2]string{{"/etc/libvirt/.", B + "/etc/"}, {"/var/lib/libvirt/.", B + "/varlib/"}} {
		if out, err := lvRun(context.Background(), "cp", "-a", cp[0], cp[1]); err != nil {
			t.Fatalf("cp %v: %v %s", cp, err, out)
		}
	}
	os.RemoveAll(filepath.Join(B, "varlib", "swtpm"))
	os.RemoveAll(filepath.Join(B, "varlib", "qemu"))
	os.MkdirAll(filepath.Join(B, "varlib", "qemu"), 0o751)
	conf := fmt.Sprintf("\nhost_uuid = %q\nlisten_tls = 0\nlisten_tcp = 1\ntcp_port = \"%d\"\nlisten_addr = \"127.0.0.1\"\nauth_tcp = \"none\"\n", lvHostUUIDB, lvPortB)
	f, err := os.OpenFile(filepath.Join(B, "etc", "libvirtd.conf"), os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteString(conf)
	f.Close()
	// B's hook: the same vtpmd with B's configuration
	hook, err := os.ReadFile(lvHookPath)
	if err != nil {
		t.Fatal(err)
	}
	hookB := strings.ReplaceAll(string(hook), e.cfgA, e.cfgB)
	if err := os.WriteFile(filepath.Join(B, "etc", "hooks", "qemu.d", "50-vtpmd"), []byte(hookB), 0o755); err != nil {
		t.Fatal(err)
	}
	script := fmt.Sprintf(`set -e
mount -t tmpfs tmpfs /run/libvirt
mount --bind %[1]s/varlib /var/lib/libvirt
mount --bind %[1]s/etc /etc/libvirt
mount --bind %[1]s/log /var/log/libvirt
mkdir -p /var/log/swtpm
mount --bind %[1]s/logswtpm /var/log/swtpm
mount --bind %[1]s/cache /var/cache/libvirt
virtlogd -d -p %[1]s/virtlogd.pid
exec libvirtd -d --listen -p %[1]s/libvirtd.pid
`, B)
	e.startReaper("daemons-B.log", "unshare", "-m", "--propagation", "private", "sh", "-c", script)
	if !lvWait(20*time.Second, func() bool {
		c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", lvPortB), time.Second)
		if err == nil {
			c.Close()
		}
		return err == nil
	}) {
		t.Fatalf("libvirtd B did not come up: %s", readFile(t, filepath.Join(e.w, "daemons-B.log")))
	}
	out := e.virsh("B", "capabilities")
	if !strings.Contains(out, lvHostUUIDB) {
		t.Fatalf("B does not report its host UUID")
	}
}

// teardown destroys test domains, stops the daemons it started, uninstalls vtpmd and removes
// what the tests created.
func (e *lvEnv) teardown() {
	t := e.t
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	for _, h := range []string{"A", "B"} {
		uri := lvURIA
		if h == "B" {
			uri = lvURIB
		}
		out, _ := lvRun(ctx, "virsh", "-c", uri, "list", "--all", "--name")
		for _, name := range strings.Fields(out) {
			if strings.HasPrefix(name, "lv-") {
				lvRun(ctx, "virsh", "-c", uri, "destroy", name)
				lvRun(ctx, "virsh", "-c", uri, "undefine", "--tpm", name)
			}
		}
	}
	stop := func(pidfile string) {
		pid := lvPidFile(pidfile)
		if pid > 0 && lvProcAlive(pid) {
			syscall.Kill(pid, syscall.SIGTERM)
			if !lvWait(15*time.Second, func() bool { return !lvProcAlive(pid) }) {
				syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	}
	stop(filepath.Join(e.hostB, "libvirtd.pid"))
	stop(filepath.Join(e.hostB, "virtlogd.pid"))
	if e.startedA {
		stop("/run/libvirtd.pid")
		stop("/run/virtlogd.pid")
	}
	for _, r := range e.reapers {
		done := make(chan error, 1)
		go func() { done <- r.Wait() }()
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			t.Errorf("reaper %d still has children after the daemons stopped; killing it", r.Process.Pid)
			r.Process.Kill()
			<-done
		}
	}
	out, err := lvRun(ctx, e.vtpmdOr(env.bin), "uninstall", "--bin-dir", lvBinDir, "--manifest", filepath.Join(e.w, "install.json"))
	t.Logf("vtpmd uninstall:\n%s", out)
	if err != nil {
		t.Errorf("vtpmd uninstall: %v", err)
	}
	for _, p := range []string{lvHookPath, lvBinDir + "/swtpm", lvBinDir + "/swtpm_ioctl", lvBinDir + "/swtpm_setup", lvBinDir + "/vtpmd"} {
		if fi, err := os.Lstat(p); err == nil && (fi.Mode()&os.ModeSymlink != 0 || p == lvHookPath || p == lvBinDir+"/vtpmd") {
			t.Errorf("%s left behind", p)
		}
	}
	// logs of the test domains, directories libvirt created for them
	for _, g := range []string{"/var/log/libvirt/qemu/lv-*.log", "/var/log/swtpm/libvirt/qemu/lv-*"} {
		m, _ := filepath.Glob(g)
		for _, p := range m {
			os.Remove(p)
		}
	}
	if !e.hadLogSwtpm {
		os.RemoveAll("/var/log/swtpm")
	}
	if !e.hadLibSwtpm {
		os.Remove("/var/lib/libvirt/swtpm") // only when empty: other domains' state stays
	}
	if e.startedA && !e.hadRunLibvirt {
		os.RemoveAll("/run/libvirt")
	}
	if t.Failed() && os.Getenv("VTPMD_KEEP") == "" {
		t.Logf("keeping %s for inspection", e.w)
		return
	}
	os.RemoveAll(e.w)
}

func (e *lvEnv) vtpmdOr(fallback string) string {
	if lvExists(e.vtpmd) {
		return e.vtpmd
	}
	return fallback
}

func lvURI(host string) string {
	if host == "B" {
		return lvURIB
	}
	return lvURIA
}

// virsh runs virsh against host A or B and fails the test on error.
func (e *lvEnv) virsh(host string, args ...string) string {
	e.t.Helper()
	start := time.Now()
	out, err := e.virshErr(host, args...)
	e.t.Logf("virsh[%s] %s (%v)", host, strings.Join(args, " "), time.Since(start).Round(time.Millisecond))
	if err != nil {
		e.t.Fatalf("virsh %s %v: %v\n%s", host, args, err, out)
	}
	return out
}

func (e *lvEnv) virshErr(host string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	return lvRun(ctx, "virsh", append([]string{"-q", "-c", lvURI(host)}, args...)...)
}

// lvDomain is a test domain: the tiny guest, direct kernel boot, TCG.
type lvDomain struct {
	Name, UUID string
	Cmdline    string
	TPM        string // the <backend> element
	Metadata   string // content of <metadata> in the XML
	SetPolicy  string // a policy set with virsh metadata after define
	PolicyMode string // the projection mode vtpmd status should then report
	e          *lvEnv
}

func (e *lvEnv) domain(name, uuidSuffix, cmdline, backend string) *lvDomain {
	return &lvDomain{Name: name, UUID: "5b1e7c3a-1111-4c1e-9d3b-0000000000" + uuidSuffix, Cmdline: cmdline, TPM: backend, e: e}
}

// serial is the serial log of the domain as seen on host h (the B hook rewrites A's path).
func (d *lvDomain) serial(h string) string {
	return filepath.Join(d.e.w, h, "run", d.Name+"-serial.log")
}

func (d *lvDomain) xml() string {
	return fmt.Sprintf(`<domain type='qemu'>
  <name>%s</name>
  <uuid>%s</uuid>
  <metadata>%s</metadata>
  <memory unit='MiB'>512</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>%s</kernel>
    <initrd>%s</initrd>
    <cmdline>console=ttyS0 panic=-1 quiet %s</cmdline>
  </os>
  <features><acpi/></features>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <serial type='file'><source path='%s'/></serial>
    <tpm model='tpm-crb'>%s</tpm>
    <memballoon model='none'/>
  </devices>
</domain>
`, d.Name, d.UUID, d.Metadata, d.e.kernel, d.e.initrd, d.Cmdline, d.serial("A"), d.TPM)
}

func (d *lvDomain) writeXML() string {
	p := filepath.Join(d.e.w, d.Name+".xml")
	if err := os.WriteFile(p, []byte(d.xml()), 0o644); err != nil {
		d.e.t.Fatal(err)
	}
	return p
}

var lvIterRE = regexp.MustCompile(`GUEST: iter=(\d+) PCR16=([0-9A-F]{64})`)

type lvRow struct {
	n   int
	pcr string
}

func lvRows(s string) []lvRow {
	var rows []lvRow
	for _, m := range lvIterRE.FindAllStringSubmatch(s, -1) {
		n, _ := strconv.Atoi(m[1])
		rows = append(rows, lvRow{n, m[2]})
	}
	return rows
}

// lvChain[i] is PCR16 after i extends with 32 x 'A' from zero.
func lvChain(n int) []string {
	out := make([]string, n+1)
	v := make([]byte, 32)
	for i := 1; i <= n; i++ {
		sum := sha256.Sum256(append(v, bytes.Repeat([]byte("A"), 32)...))
		v = sum[:]
		out[i] = fmt.Sprintf("%X", v)
	}
	return out
}

// checkChain verifies that every row matches the hash chain and that after continues before.
func lvCheckChain(t *testing.T, before, after []lvRow) {
	t.Helper()
	if len(before) == 0 || len(after) == 0 {
		t.Fatalf("no PCR16 rows: before %d, after %d", len(before), len(after))
	}
	max := after[len(after)-1].n
	if b := before[len(before)-1].n; b > max {
		max = b
	}
	chain := lvChain(max)
	for _, r := range append(append([]lvRow(nil), before...), after...) {
		if r.n < 1 || chain[r.n] != r.pcr {
			t.Fatalf("iter %d: PCR16 %s breaks the chain", r.n, r.pcr)
		}
	}
	if after[len(after)-1].n <= before[len(before)-1].n {
		t.Fatalf("the chain did not continue: before ..%d, after ..%d", before[len(before)-1].n, after[len(after)-1].n)
	}
	t.Logf("PCR16 chain intact: iterations %d..%d, then %d..%d", before[0].n, before[len(before)-1].n, after[0].n, after[len(after)-1].n)
}

// waitRows waits until the serial log at p shows at least n loop iterations beyond from.
func (e *lvEnv) waitRows(p string, from, n int, d time.Duration) []lvRow {
	e.t.Helper()
	var rows []lvRow
	ok := lvWait(d, func() bool {
		data, _ := os.ReadFile(p)
		rows = lvRows(string(data))
		return len(rows) > 0 && rows[len(rows)-1].n >= from+n
	})
	if !ok {
		data, _ := os.ReadFile(p)
		e.t.Fatalf("serial %s: wanted iteration %d within %v, log tail:\n%s", p, from+n, d, tail(string(data), 1500))
	}
	return rows
}

// vtpmProcs lists live processes running the installed vtpmd whose command line mentions s.
func (e *lvEnv) vtpmProcs(s string) []int {
	var pids []int
	entries, _ := os.ReadDir("/proc")
	for _, en := range entries {
		pid, err := strconv.Atoi(en.Name())
		if err != nil || !lvProcAlive(pid) {
			continue
		}
		exe, _ := os.Readlink("/proc/" + en.Name() + "/exe")
		if filepath.Base(strings.TrimSuffix(exe, " (deleted)")) != "vtpmd" {
			continue
		}
		data, _ := os.ReadFile("/proc/" + en.Name() + "/cmdline")
		if strings.Contains(string(data), s) {
			pids = append(pids, pid)
		}
	}
	return pids
}

// domID returns the running domain's id on host h.
func (e *lvEnv) domID(h, name string) int {
	e.t.Helper()
	id, err := strconv.Atoi(strings.TrimSpace(e.virsh(h, "domid", name)))
	if err != nil {
		e.t.Fatalf("domid %s: %v", name, err)
	}
	return id
}

// vtpmctl runs the installed vtpmd with args.
func (e *lvEnv) vtpmctl(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	return lvRun(ctx, e.vtpmd, args...)
}
