//go:build integration

package integration

import (
	"bytes"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/internal/swtpmtest"
	"github.com/vtpmd/vtpmd/internal/syncbuf"
	"github.com/vtpmd/vtpmd/internal/tpmclient"
	"github.com/vtpmd/vtpmd/manager/eventlog"
)

// The "measured host" fixture: a stand-in hardware TPM (Debian's swtpm) whose PCRs hold a
// real OVMF boot, and that boot's TCG event log in a file, as a host's
// /sys/kernel/security/tpm0/binary_bios_measurements would be.
//
// How it is made (once per test binary run and host variant): Debian's swtpm serves QEMU as
// the TPM of an OVMF boot of the test guest (kernel and initramfs by -kernel); the guest prints
// the firmware's event log and hangs; QEMU is killed (SIGKILL: no TPM2_Shutdown, no
// CMD_SHUTDOWN), swtpm stores its volatile state (swtpm_ioctl -v) and is stopped; the state
// directory is the snapshot. Each measuredHost call starts a new Debian swtpm on a copy of
// the snapshot with --flags not-need-init: it resumes the volatile state, so its PCRs are the
// boot's, and it serves its data channel on a unix socket (manager --tpm swtpm:path=...).
//
// The variants are different machines (observed with Debian's OVMF: SMBIOS is not measured,
// so the firmware itself makes the difference):
//
//	hostA: OVMF_CODE_4M.fd, empty variable store
//	hostB: OVMF_CODE.fd (the 2 MB build): another firmware build, PCR 0's two
//	       EV_EFI_PLATFORM_FIRMWARE_BLOB digests differ from hostA's, nothing else in PCRs 0-7
//	hostC: hostA's firmware with the snakeoil variable store (keys enrolled): PCR 7's
//	       variable measurements differ (an unapproved configuration)
const (
	hostA = "a"
	hostB = "b"
	hostC = "c"
)

// hostTPM is one running measured host.
type hostTPM struct {
	Variant string
	// Spec is the hwtpm spec of the stand-in TPM (vtpmd manager --tpm Spec).
	Spec string
	// Socket is its data socket; Ctrl its control socket.
	Socket, Ctrl string
	// EventLog is a file with the boot's event log (vtpmd manager --eventlog EventLog).
	EventLog string
	// Log is the parsed event log.
	Log *eventlog.Log
	// SHA256 are the TPM's SHA-256 PCRs 0-23 as the fixture read them after resuming.
	SHA256 [][]byte
	cmd    *exec.Cmd
	out    syncbuf.Buffer
}

// hostSnapshot is one variant's boot, made once.
type hostSnapshot struct {
	once     sync.Once
	stateDir string // swtpm state with tpm2-00.volatilestate
	eventLog string
	err      error
}

// hostVariants are each variant's firmware: code and variable store templates.
var hostVariants = map[string]struct{ code, vars string }{
	hostA: {"/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd"},
	hostB: {"/usr/share/OVMF/OVMF_CODE.fd", "/usr/share/OVMF/OVMF_VARS.fd"},
	hostC: {"/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.snakeoil.fd"},
}

var hostSnapshots = struct {
	mu sync.Mutex
	m  map[string]*hostSnapshot
}{m: map[string]*hostSnapshot{}}

// measuredHost starts a stand-in hardware TPM holding variant's OVMF boot; it is stopped when
// the test ends. The first call for a variant boots QEMU (about a minute under TCG).
func measuredHost(t *testing.T, variant string) *hostTPM {
	t.Helper()
	needRefSwtpm(t)
	need(t, "qemu-system-x86_64", "/usr/share/OVMF/OVMF_CODE_4M.fd")
	hostSnapshots.mu.Lock()
	s := hostSnapshots.m[variant]
	if s == nil {
		s = &hostSnapshot{}
		hostSnapshots.m[variant] = s
	}
	hostSnapshots.mu.Unlock()
	s.once.Do(func() { s.err = s.boot(t, variant) })
	if s.err != nil {
		t.Fatalf("measured host %s: %v", variant, s.err)
	}
	return s.start(t, variant)
}

// snapshotRoot holds the snapshots; TestMain removes it with the vtpmd binary's directory.
func snapshotRoot() string { return filepath.Join(filepath.Dir(env.bin), "hosttpm") }

// boot makes variant's snapshot: an OVMF boot with Debian's swtpm as the machine's TPM.
func (s *hostSnapshot) boot(t *testing.T, variant string) error {
	dir := filepath.Join(snapshotRoot(), variant)
	if err := os.MkdirAll(filepath.Join(dir, "state"), 0o700); err != nil {
		return err
	}
	run, err := os.MkdirTemp("", "vtpmd-host-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(run)
	ctrl := filepath.Join(run, "ctrl")
	var swOut syncbuf.Buffer
	sw := exec.Command(refSwtpm(), "socket", "--tpm2", "--tpmstate", "dir="+filepath.Join(dir, "state"),
		"--ctrl", "type=unixio,path="+ctrl)
	sw.Stdout, sw.Stderr = &swOut, &swOut
	sw.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := sw.Start(); err != nil {
		return fmt.Errorf("start swtpm: %w", err)
	}
	defer func() {
		sw.Process.Kill()
		sw.Wait()
	}()
	if !lvWait(10*time.Second, func() bool { _, err := os.Stat(ctrl); return err == nil }) {
		return fmt.Errorf("swtpm did not create %s: %s", ctrl, swOut.String())
	}
	vars := filepath.Join(run, "vars.fd")
	fw := hostVariants[variant]
	b, err := os.ReadFile(fw.vars)
	if err != nil {
		return err
	}
	if err := os.WriteFile(vars, b, 0o600); err != nil {
		return err
	}
	serial := filepath.Join(run, "serial.log")
	args := []string{"-machine", "q35,accel=tcg", "-m", "512", "-smp", "1", "-nographic", "-nodefaults",
		"-kernel", filepath.Join(env.guestDir, "vmlinuz"), "-initrd", filepath.Join(env.guestDir, "initrd.gz"),
		"-append", "console=ttyS0 panic=-1 quiet hang",
		"-chardev", "socket,id=chrtpm,path=" + ctrl, "-tpmdev", "emulator,id=tpm0,chardev=chrtpm",
		"-device", "tpm-crb,tpmdev=tpm0",
		"-drive", "if=pflash,format=raw,unit=0,readonly=on,file=" + fw.code,
		"-drive", "if=pflash,format=raw,unit=1,file=" + vars,
		"-serial", "file:" + serial, "-no-reboot"}
	q := exec.Command("qemu-system-x86_64", args...)
	var qOut syncbuf.Buffer
	q.Stdout, q.Stderr = &qOut, &qOut
	q.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := q.Start(); err != nil {
		return fmt.Errorf("start qemu: %w", err)
	}
	qDone := make(chan struct{})
	go func() { q.Wait(); close(qDone) }()
	kill := func() {
		q.Process.Kill()
		<-qDone
	}
	start := time.Now()
	var out string
	for {
		bs, _ := os.ReadFile(serial)
		out = strings.ReplaceAll(string(bs), "\r", "")
		if strings.Contains(out, "GUEST: after_extend_pcr16=") || strings.Contains(out, "GUEST: hanging") {
			break
		}
		select {
		case <-qDone:
			return fmt.Errorf("qemu exited before the guest was done:\n%s\nserial:\n%s", qOut.String(), tail(out, 3000))
		case <-time.After(300 * time.Millisecond):
		}
		if time.Since(start) > 5*time.Minute {
			kill()
			return fmt.Errorf("the OVMF guest did not finish within 5 minutes:\n%s", tail(out, 3000))
		}
	}
	// SIGKILL: QEMU sends neither CMD_SHUTDOWN nor the guest's TPM2_Shutdown
	kill()
	t.Logf("measured host %s: OVMF boot took %v", variant, time.Since(start).Round(time.Second))
	log, ok := guestBlob(out, "eventlog")
	if !ok {
		return fmt.Errorf("the OVMF guest printed no event log:\n%s", tail(out, 3000))
	}
	if _, err := eventlog.Parse(log); err != nil {
		return fmt.Errorf("the guest's event log: %w", err)
	}
	s.eventLog = filepath.Join(dir, "binary_bios_measurements")
	if err := os.WriteFile(s.eventLog, log, 0o644); err != nil {
		return err
	}
	if d := os.Getenv("VTPMD_HOSTTPM_SAVE"); d != "" { // keep the logs (for testdata)
		os.WriteFile(filepath.Join(d, "ovmf-host-"+variant+".bin"), log, 0o644)
	}
	// keep the TPM's volatile state (its PCRs) in the state directory
	if o, err := exec.Command(refSwtpmIoctl(), "--unix", ctrl, "-v").CombinedOutput(); err != nil {
		return fmt.Errorf("swtpm_ioctl -v: %v: %s", err, o)
	}
	if o, err := exec.Command(refSwtpmIoctl(), "--unix", ctrl, "-s").CombinedOutput(); err != nil {
		return fmt.Errorf("swtpm_ioctl -s: %v: %s", err, o)
	}
	sw.Wait()
	s.stateDir = filepath.Join(dir, "state")
	if _, err := os.Stat(filepath.Join(s.stateDir, "tpm2-00.volatilestate")); err != nil {
		return fmt.Errorf("no volatile state after swtpm_ioctl -v: %w", err)
	}
	// the guest's own PCR values, to check the resumed TPM against
	g := guestValues(out)
	for i := range 8 {
		if g[fmt.Sprintf("pcr%d", i)] == "" {
			return fmt.Errorf("the guest printed no PCR %d", i)
		}
	}
	return os.WriteFile(filepath.Join(dir, "guest-pcrs"), []byte(fmt.Sprint(g)), 0o644)
}

// start runs a new Debian swtpm on a copy of the snapshot.
func (s *hostSnapshot) start(t *testing.T, variant string) *hostTPM {
	t.Helper()
	state := t.TempDir()
	for _, f := range []string{"tpm2-00.permall", "tpm2-00.volatilestate"} {
		b, err := os.ReadFile(filepath.Join(s.stateDir, f))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(state, f), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	run := swtpmtest.ShortDir(t)
	h := &hostTPM{Variant: variant, Socket: filepath.Join(run, "data"), Ctrl: filepath.Join(run, "ctrl"), EventLog: s.eventLog}
	h.Spec = "swtpm:path=" + h.Socket
	h.cmd = exec.Command(refSwtpm(), "socket", "--tpm2", "--tpmstate", "dir="+state, "--flags", "not-need-init",
		"--server", "type=unixio,path="+h.Socket, "--ctrl", "type=unixio,path="+h.Ctrl)
	h.cmd.Stdout, h.cmd.Stderr = &h.out, &h.out
	if err := h.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	cmd := h.cmd
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	if !lvWait(10*time.Second, func() bool { _, err := os.Stat(h.Socket); return err == nil }) {
		t.Fatalf("swtpm (measured host %s) did not listen: %s", variant, h.out.String())
	}
	raw, err := os.ReadFile(s.eventLog)
	if err != nil {
		t.Fatal(err)
	}
	if h.Log, err = eventlog.Parse(raw); err != nil {
		t.Fatal(err)
	}
	h.SHA256 = h.ReadPCRs(t)
	want, err := h.Log.Replay(eventlog.AlgSHA256)
	if err != nil {
		t.Fatal(err)
	}
	for i := range 8 {
		if !bytes.Equal(h.SHA256[i], want[i]) {
			t.Fatalf("measured host %s: resumed PCR %d = %x, the boot's log replays to %x", variant, i, h.SHA256[i], want[i])
		}
	}
	return h
}

// ReadPCRs reads the host TPM's SHA-256 PCRs 0-23 over its data socket.
func (h *hostTPM) ReadPCRs(t *testing.T) [][]byte {
	t.Helper()
	c, err := net.Dial("unix", h.Socket)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	tp := tpmclient.Stream(c)
	out := make([][]byte, 24)
	for i := range out {
		if out[i], err = tpmclient.PCRRead(tp, uint(i)); err != nil {
			t.Fatalf("measured host %s: read PCR %d: %v", h.Variant, i, err)
		}
	}
	return out
}

// PCRHex is PCR i (SHA-256) in upper-case hex, as the guest prints PCRs.
func (h *hostTPM) PCRHex(i int) string { return strings.ToUpper(hex.EncodeToString(h.SHA256[i])) }

// TestMeasuredHost checks the fixture itself: each variant's stand-in TPM holds its boot's PCRs
// (the event log replays to them), and the variants differ in PCR 1 only among PCRs 0-7.
func TestMeasuredHost(t *testing.T) {
	a := measuredHost(t, hostA)
	b := measuredHost(t, hostB)
	measuredHost(t, hostC)
	var differ []int
	for i := range 8 {
		if !bytes.Equal(a.SHA256[i], b.SHA256[i]) {
			differ = append(differ, i)
		}
	}
	if len(differ) == 0 {
		t.Fatal("hosts a and b have the same PCRs 0-7: the variants do not differ")
	}
	t.Logf("hosts a and b differ in PCRs %v; %d events in a's log", differ, len(a.Log.Events))
}
