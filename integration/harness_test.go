//go:build integration

package integration

import (
	"bufio"
	"context"
	"encoding/base64"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"
)

// env holds what TestMain prepared: the vtpmd binary, a PATH directory where swtpm,
// swtpm_setup and swtpm_ioctl are links to it, and the guest kernel and initramfs.
var env struct {
	bin      string // vtpmd
	linkDir  string // contains swtpm -> vtpmd
	guestDir string // vmlinuz, initrd.gz
}

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "vtpmd-integration-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	env.bin = filepath.Join(dir, "vtpmd")
	if out, err := exec.Command("go", "build", "-o", env.bin, "../cmd/vtpmd").CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "build vtpmd: %v\n%s", err, out)
		os.Exit(1)
	}
	env.linkDir = filepath.Join(dir, "links")
	os.MkdirAll(env.linkDir, 0o755)
	for _, n := range []string{"swtpm", "swtpm_ioctl"} {
		os.Symlink(env.bin, filepath.Join(env.linkDir, n))
	}
	env.guestDir = os.Getenv("VTPMD_GUEST_DIR")
	if env.guestDir == "" {
		env.guestDir, _ = filepath.Abs("../.cache/guest")
	}
	if out, err := exec.Command("../scripts/build-guest.sh", env.guestDir).CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "build guest: %v\n%s", err, out)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// need fails (CI=true) or skips the test when a program is missing.
func need(t *testing.T, progs ...string) {
	t.Helper()
	for _, p := range progs {
		if _, err := exec.LookPath(p); err != nil {
			if strings.HasPrefix(p, "/") {
				if _, err := os.Stat(p); err == nil {
					continue
				}
			}
			if os.Getenv("CI") == "true" {
				t.Fatalf("%s is missing (CI=true: a missing dependency is a failure)", p)
			}
			t.Skipf("%s not installed", p)
		}
	}
}

// emulator is a running vtpmd (or swtpm) with a unix control socket.
type emulator struct {
	cmd  *exec.Cmd
	ctrl string
	dir  string
	log  string
}

// startEmulator starts "<bin> socket --ctrl type=unixio,path=... --tpmstate dir=..." plus args.
func startEmulator(t *testing.T, bin, stateDir string, args ...string) *emulator {
	t.Helper()
	dir := t.TempDir()
	if stateDir == "" {
		stateDir = filepath.Join(dir, "state")
		os.MkdirAll(stateDir, 0o700)
	}
	e := &emulator{ctrl: filepath.Join(dir, "ctrl.sock"), dir: stateDir, log: filepath.Join(dir, "emulator.log")}
	all := append([]string{"socket", "--tpmstate", "dir=" + stateDir, "--ctrl", "type=unixio,path=" + e.ctrl,
		"--log", "file=" + e.log + ",level=20"}, args...)
	e.cmd = exec.Command(bin, all...)
	e.cmd.Stderr = os.Stderr
	if err := e.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		e.cmd.Process.Kill()
		e.cmd.Wait()
	})
	waitFor(t, 10*time.Second, func() bool { _, err := os.Stat(e.ctrl); return err == nil })
	return e
}

func waitFor(t *testing.T, d time.Duration, ok func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !ok() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v", d)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// vm describes one QEMU run.
type vm struct {
	firmware string // seabios | ovmf | qboot (a firmware without TPM support: the kernel starts the TPM)
	machine  string // q35 | pc
	model    string // tpm-crb | tpm-tis
	cmdline  string // extra kernel command line words (tpmloop, nvmark, hang)
	ctrl     string // emulator control socket
	incoming string // -incoming URI
	noReboot bool
}

type qemu struct {
	cmd    *exec.Cmd
	serial string
	mon    string
	done   chan error
}

func startQEMU(t *testing.T, v vm) *qemu {
	t.Helper()
	need(t, "qemu-system-x86_64")
	dir := t.TempDir()
	q := &qemu{serial: filepath.Join(dir, "serial.log"), mon: filepath.Join(dir, "mon.sock"), done: make(chan error, 1)}
	args := []string{"-machine", v.machine + ",accel=tcg", "-m", "512", "-smp", "1", "-nographic", "-nodefaults",
		"-kernel", filepath.Join(env.guestDir, "vmlinuz"), "-initrd", filepath.Join(env.guestDir, "initrd.gz"),
		"-append", "console=ttyS0 panic=-1 quiet " + v.cmdline,
		"-chardev", "socket,id=chrtpm,path=" + v.ctrl, "-tpmdev", "emulator,id=tpm0,chardev=chrtpm",
		"-device", v.model + ",tpmdev=tpm0",
		"-serial", "file:" + q.serial, "-monitor", "unix:" + q.mon + ",server=on,wait=off"}
	if v.noReboot {
		args = append(args, "-no-reboot")
	}
	if v.firmware == "qboot" {
		need(t, "/usr/share/qemu/qboot.rom")
		args = append(args, "-bios", "/usr/share/qemu/qboot.rom")
	}
	if v.firmware == "ovmf" {
		need(t, "/usr/share/OVMF/OVMF_CODE_4M.fd")
		vars := filepath.Join(dir, "vars.fd")
		b, err := os.ReadFile("/usr/share/OVMF/OVMF_VARS_4M.fd")
		if err != nil {
			t.Fatal(err)
		}
		os.WriteFile(vars, b, 0o600)
		args = append(args, "-drive", "if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd",
			"-drive", "if=pflash,format=raw,unit=1,file="+vars)
	}
	if v.incoming != "" {
		args = append(args, "-incoming", v.incoming)
	}
	q.cmd = exec.Command("qemu-system-x86_64", args...)
	out, _ := os.Create(filepath.Join(dir, "qemu.out"))
	q.cmd.Stdout, q.cmd.Stderr = out, out
	if err := q.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { q.done <- q.cmd.Wait() }()
	t.Cleanup(func() {
		q.cmd.Process.Kill()
		<-q.done
		if t.Failed() {
			b, _ := os.ReadFile(filepath.Join(dir, "qemu.out"))
			s, _ := os.ReadFile(q.serial)
			t.Logf("qemu output:\n%s\nserial (tail):\n%s", b, tail(string(s), 3000))
		}
	})
	return q
}

func tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

// wait waits for QEMU to exit.
func (q *qemu) wait(t *testing.T, d time.Duration) {
	t.Helper()
	select {
	case err := <-q.done:
		q.done <- err
		if err != nil {
			t.Fatalf("qemu: %v", err)
		}
	case <-time.After(d):
		t.Fatalf("qemu did not finish within %v", d)
	}
}

// hmp sends one monitor command and returns its output.
func (q *qemu) hmp(t *testing.T, cmd string) string {
	t.Helper()
	var c net.Conn
	var err error
	waitFor(t, 10*time.Second, func() bool { c, err = net.Dial("unix", q.mon); return err == nil })
	defer c.Close()
	r := bufio.NewReader(c)
	readPrompt := func() string {
		var sb strings.Builder
		c.SetReadDeadline(time.Now().Add(30 * time.Second))
		for !strings.HasSuffix(sb.String(), "(qemu) ") {
			b, err := r.ReadByte()
			if err != nil {
				break
			}
			sb.WriteByte(b)
		}
		return sb.String()
	}
	readPrompt()
	fmt.Fprintf(c, "%s\n", cmd)
	return strings.ReplaceAll(readPrompt(), "\r", "")
}

// serialText returns what the guest printed so far.
func (q *qemu) serialText() string {
	b, _ := os.ReadFile(q.serial)
	return strings.ReplaceAll(string(b), "\r", "")
}

// waitSerial waits until the serial log matches re (n times).
func (q *qemu) waitSerial(t *testing.T, re *regexp.Regexp, n int, d time.Duration) string {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		s := q.serialText()
		if len(re.FindAllStringIndex(s, -1)) >= n {
			return s
		}
		select {
		case err := <-q.done:
			q.done <- err
			t.Fatalf("qemu exited (%v) before %q appeared %d times", err, re, n)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("%q did not appear %d times within %v", re, n, d)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// guestValues parses "GUEST: k=v" lines (the last value of a key wins).
func guestValues(s string) map[string]string {
	m := map[string]string{}
	for _, line := range strings.Split(s, "\n") {
		if rest, ok := strings.CutPrefix(line, "GUEST: "); ok {
			if k, v, ok := strings.Cut(rest, "="); ok {
				m[k] = v
			}
		}
	}
	return m
}

// guestBlob extracts a base64 blob the guest printed between markers.
func guestBlob(s, name string) ([]byte, bool) {
	start := strings.Index(s, "GUEST-BEGIN "+name+"\n")
	if start < 0 {
		return nil, false
	}
	rest := s[start+len("GUEST-BEGIN "+name+"\n"):]
	end := strings.Index(rest, "GUEST-END "+name)
	if end < 0 {
		return nil, false
	}
	b, err := base64.StdEncoding.DecodeString(strings.ReplaceAll(rest[:end], "\n", ""))
	return b, err == nil
}

func ctxTimeout(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

func readFile(t *testing.T, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// socketpair returns both ends of a unix stream socketpair.
func socketpair() (*os.File, *os.File, error) {
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, err
	}
	return os.NewFile(uintptr(fds[0]), "a"), os.NewFile(uintptr(fds[1]), "b"), nil
}

// refSwtpm is Debian's swtpm, the reference implementation (SWTPM_BIN overrides). It is named
// by path: a "swtpm" on PATH may be a link to vtpmd (vtpmd install puts one in /usr/local/bin).
func refSwtpm() string { return envOr("SWTPM_BIN", "/usr/bin/swtpm") }

// refSwtpmIoctl is Debian's swtpm_ioctl (SWTPM_IOCTL_BIN overrides).
func refSwtpmIoctl() string { return envOr("SWTPM_IOCTL_BIN", "/usr/bin/swtpm_ioctl") }

func envOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}

// needRefSwtpm requires the reference swtpm and swtpm_ioctl, and refuses a vtpmd in disguise.
func needRefSwtpm(t *testing.T) {
	t.Helper()
	need(t, refSwtpm(), refSwtpmIoctl())
	out, err := exec.Command(refSwtpm(), "--version").CombinedOutput()
	if err != nil || strings.Contains(string(out), "vtpmd") {
		t.Fatalf("%s is not Debian's swtpm: %q %v", refSwtpm(), out, err)
	}
}
