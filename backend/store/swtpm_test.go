package store

// Helpers that run Debian's swtpm 0.7.1 (not vtpmd's swtpm links, which may come first in
// PATH), and the fixtures recorded from it.

import (
	"context"
	"crypto/sha256"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/internal/syncbuf"

	"github.com/google/go-tpm/tpm2/transport"

	"github.com/vtpmd/vtpmd/backend/blob"
	"github.com/vtpmd/vtpmd/internal/tpmclient"
)

// swtpmBins are the Debian binaries. SWTPM_BIN and SWTPM_IOCTL_BIN override the defaults.
type swtpmBins struct{ swtpm, ioctl string }

// debianSwtpm returns Debian's swtpm and swtpm_ioctl, skipping the test when they are missing
// unless CI=true, where a missing swtpm is a failure.
func debianSwtpm(t testing.TB) swtpmBins {
	t.Helper()
	b := swtpmBins{swtpm: "/usr/bin/swtpm", ioctl: "/usr/bin/swtpm_ioctl"}
	if v := os.Getenv("SWTPM_BIN"); v != "" {
		b.swtpm = v
	}
	if v := os.Getenv("SWTPM_IOCTL_BIN"); v != "" {
		b.ioctl = v
	}
	missing := func(format string, a ...any) {
		t.Helper()
		if os.Getenv("CI") == "true" {
			t.Fatalf(format+" (CI=true: swtpm is required)", a...)
		}
		t.Skipf(format, a...)
	}
	for _, p := range []string{b.swtpm, b.ioctl} {
		if _, err := os.Stat(p); err != nil {
			missing("Debian swtpm not installed: %v", err)
		}
	}
	out, err := exec.Command(b.swtpm, "--version").CombinedOutput()
	if err != nil || !strings.HasPrefix(string(out), "TPM emulator version") || strings.Contains(string(out), "vtpmd") {
		missing("%s is not Debian's swtpm: %q %v", b.swtpm, out, err)
	}
	return b
}

// swtpmProc is one running `swtpm socket --tpm2` with unixio control and server sockets.
type swtpmProc struct {
	t      testing.TB
	bins   swtpmBins
	cmd    *exec.Cmd
	ctrl   string
	server string
	out    *syncbuf.Buffer
	done   chan struct{}
}

// startSwtpm starts Debian's swtpm with args (e.g. --tpmstate ...) and waits for its control
// and data sockets (swtpm creates them one after the other). The process is shut down and reaped when the test ends.
func startSwtpm(t testing.TB, bins swtpmBins, args ...string) *swtpmProc {
	t.Helper()
	sock, err := os.MkdirTemp("", "vtpmd-swtpm-") // short: unix socket paths are limited
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(sock) })
	p := &swtpmProc{t: t, bins: bins, ctrl: filepath.Join(sock, "c"), server: filepath.Join(sock, "s"), out: &syncbuf.Buffer{}, done: make(chan struct{})}
	all := append([]string{"socket", "--tpm2", "--ctrl", "type=unixio,path=" + p.ctrl, "--server", "type=unixio,path=" + p.server}, args...)
	p.cmd = exec.Command(bins.swtpm, all...)
	p.cmd.Stdout, p.cmd.Stderr = p.out, p.out
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.cmd.Wait(); close(p.done) }()
	t.Cleanup(p.stop)
	for i := 0; i < 500; i++ {
		_, errCtrl := os.Stat(p.ctrl)
		_, errData := os.Stat(p.server)
		if errCtrl == nil && errData == nil {
			return p
		}
		select {
		case <-p.done:
			t.Fatalf("swtpm %v exited: %s", args, p.out)
		case <-time.After(10 * time.Millisecond):
		}
	}
	t.Fatalf("swtpm %v: no control and data sockets after 5 s: %s", args, p.out)
	return nil
}

// exited reports whether the process has ended.
func (p *swtpmProc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// waitOutput waits up to 5 s for sub to appear in the process's output (it arrives through a
// pipe, after the control-channel answer).
func (p *swtpmProc) waitOutput(sub string) bool {
	for i := 0; i < 500; i++ {
		if strings.Contains(p.out.String(), sub) {
			return true
		}
		time.Sleep(10 * time.Millisecond)
	}
	return false
}

// stop sends CMD_SHUTDOWN and waits; it kills the process if it does not exit in 5 s.
func (p *swtpmProc) stop() {
	if p.exited() {
		return
	}
	exec.Command(p.bins.ioctl, "--unix", p.ctrl, "-s").Run()
	select {
	case <-p.done:
	case <-time.After(5 * time.Second):
		p.cmd.Process.Kill()
		<-p.done
	}
}

// ioctl runs swtpm_ioctl against the control socket.
func (p *swtpmProc) ioctl(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, p.bins.ioctl, append([]string{"--unix", p.ctrl}, args...)...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("swtpm_ioctl %v: %w: %s", args, err, out)
	}
	return string(out), nil
}

func (p *swtpmProc) mustIoctl(args ...string) string {
	p.t.Helper()
	out, err := p.ioctl(args...)
	if err != nil {
		p.t.Fatalf("%v (swtpm: %s)", err, p.out)
	}
	return out
}

// tpm connects to the data channel (--server unixio).
func (p *swtpmProc) tpm() transport.TPM {
	p.t.Helper()
	// swtpm listens on the data socket a little after the control socket appears
	var c net.Conn
	var err error
	for i := 0; i < 500; i++ {
		if c, err = net.Dial("unix", p.server); err == nil || p.exited() {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err != nil {
		p.t.Fatalf("connect to swtpm data socket: %v (swtpm: %s)", err, p.out)
	}
	p.t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(30 * time.Second))
	return tpmclient.Stream(c)
}

// pcrAfterExtend is PCR value after one SHA-256 extend of digest into a zero PCR.
func pcrAfterExtend(digest []byte) []byte {
	h := sha256.New()
	h.Write(make([]byte, 32))
	h.Write(digest)
	return h.Sum(nil)
}

// fixtureDigest is what the fixture generator extends into PCR 16 for a case.
func fixtureDigest(name string) []byte {
	d := sha256.Sum256([]byte("vtpmd fixture " + name))
	return d[:]
}

// fixturePCR is the PCR the fixtures extend.
const fixturePCR = 16

// fixtureRoot holds state written by Debian's swtpm 0.7.1 (see TestGenerateSwtpmFixtures).
const fixtureRoot = "testdata/swtpm-0.7.1"

// fixtureCase is one recorded swtpm configuration. Key options name files relative to
// fixtureRoot.
type fixtureCase struct {
	Name         string
	Key, MigKey  string // --key, --migration-key options ("" = none)
	Linear       bool   // file:// backend (tpm2.img) instead of a directory
	SaveVolatile bool   // also record GET_STATEBLOB(volatile)
	PermFlags    uint16 // header flags of the stored permall
	MigPermFlags uint16 // header flags of GET_STATEBLOB(permanent) as swtpm_ioctl --save asks for it
	MigInnerTLV  uint16 // tag of the inner TLV of that blob
	MigOuterTLV  uint16 // its outer TLV tag
}

var fixtureCases = []fixtureCase{
	{Name: "plain", SaveVolatile: true, PermFlags: 0x00, MigPermFlags: 0x04, MigOuterTLV: 4},
	{Name: "aes128-hex", Key: "file=keys/k128.hex", PermFlags: 0x01, MigPermFlags: 0x04, MigOuterTLV: 4},
	{Name: "aes256-hex", Key: "file=keys/k256.hex,mode=aes-256-cbc", PermFlags: 0x09, MigPermFlags: 0x04, MigOuterTLV: 4},
	{Name: "aes256-pwd-migkey256", Key: "pwdfile=keys/pwd,mode=aes-256-cbc", MigKey: "pwdfile=keys/mpwd,mode=aes-256-cbc", SaveVolatile: true,
		PermFlags: 0x09, MigPermFlags: 0x16, MigOuterTLV: 5},
	{Name: "aes128-sha512", Key: "pwdfile=keys/pwd,kdf=sha512", PermFlags: 0x01, MigPermFlags: 0x04, MigOuterTLV: 4},
	{Name: "migkey128", MigKey: "file=keys/k128.hex", PermFlags: 0x00, MigPermFlags: 0x06, MigOuterTLV: 5},
	{Name: "aes128-migkey256", Key: "file=keys/k128.hex", MigKey: "file=keys/k256.hex,mode=aes-256-cbc", PermFlags: 0x01, MigPermFlags: 0x16, MigOuterTLV: 5},
	{Name: "linear-plain", Linear: true, PermFlags: 0x00, MigPermFlags: 0x04, MigOuterTLV: 4},
	{Name: "linear-aes256", Linear: true, Key: "file=keys/k256.hex,mode=aes-256-cbc", PermFlags: 0x09, MigPermFlags: 0x04, MigOuterTLV: 4},
}

var fixtureKeys = map[string]string{
	"k128.hex": "00112233445566778899aabbccddeeff\n",
	"k256.hex": "0x00112233445566778899aabbccddeeff0123456789abcdeffedcba9876543210\n",
	"pwd":      "correct horse battery staple\n",
	"mpwd":     "migration secret",
}

// absKeyOpt makes the key file names of a fixture option absolute.
func absKeyOpt(root, opt string) string {
	if opt == "" {
		return ""
	}
	parts := strings.Split(opt, ",")
	for i, p := range parts {
		if k, v, ok := strings.Cut(p, "="); ok && (k == "file" || k == "pwdfile") && !filepath.IsAbs(v) {
			abs, _ := filepath.Abs(filepath.Join(root, v))
			parts[i] = k + "=" + abs
		}
	}
	return strings.Join(parts, ",")
}

// loadFixtureKey loads a fixture key option ("" gives nil).
func loadFixtureKey(t testing.TB, opt string) *blob.Key {
	t.Helper()
	if opt == "" {
		return nil
	}
	spec, err := blob.ParseKeyOption(absKeyOpt(fixtureRoot, opt))
	if err != nil {
		t.Fatal(err)
	}
	k, err := blob.LoadKey(spec)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func (c fixtureCase) uri(dir string) string {
	if c.Linear {
		return "file://" + filepath.Join(dir, "tpm2.img")
	}
	return "dir://" + dir
}

func (c fixtureCase) tpmstate(dir string) string {
	if c.Linear {
		return "backend-uri=" + c.uri(dir)
	}
	return "dir=" + dir
}

// swtpmKeyArgs are the --key/--migration-key arguments of a case.
func (c fixtureCase) swtpmKeyArgs(root string) []string {
	var args []string
	if c.Key != "" {
		args = append(args, "--key", absKeyOpt(root, c.Key))
	}
	if c.MigKey != "" {
		args = append(args, "--migration-key", absKeyOpt(root, c.MigKey))
	}
	return args
}

// recordSwtpmState runs Debian's swtpm for case c on dir: PCR 16 extended with the case's
// digest, GET_STATEBLOB(permanent) (and volatile) saved as *.mig next to the state, the
// volatile state stored, then shut down.
func recordSwtpmState(t *testing.T, bins swtpmBins, c fixtureCase, dir, keyRoot string) {
	t.Helper()
	args := append([]string{"--tpmstate", c.tpmstate(dir), "--flags", "not-need-init,startup-clear"}, c.swtpmKeyArgs(keyRoot)...)
	p := startSwtpm(t, bins, args...)
	if err := tpmclient.PCRExtend(p.tpm(), fixturePCR, fixtureDigest(c.Name)); err != nil {
		t.Fatalf("PCR_Extend on swtpm: %v (%s)", err, p.out)
	}
	// Order matters with swtpm 0.7.1: GET_STATEBLOB(volatile) deletes the volatile file, and
	// once a longer key was used every encryption with a shorter one fails (its IV buffer
	// only grows), so the state is stored before the migration key is used.
	if c.SaveVolatile {
		p.mustIoctl("--save", "volatile", filepath.Join(dir, "volatile.mig"))
	}
	p.mustIoctl("-v")
	p.mustIoctl("--save", "permanent", filepath.Join(dir, "permanent.mig"))
	p.stop()
	os.Remove(filepath.Join(dir, ".lock"))
}

// TestGenerateSwtpmFixtures rewrites testdata/swtpm-0.7.1 from Debian's swtpm. It runs only
// with VTPMD_REGEN_FIXTURES=1.
func TestGenerateSwtpmFixtures(t *testing.T) {
	if os.Getenv("VTPMD_REGEN_FIXTURES") != "1" {
		t.Skip("set VTPMD_REGEN_FIXTURES=1 to record the swtpm fixtures again")
	}
	bins := debianSwtpm(t)
	if err := os.RemoveAll(fixtureRoot); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(fixtureRoot, "keys"), 0o755); err != nil {
		t.Fatal(err)
	}
	for name, content := range fixtureKeys {
		if err := os.WriteFile(filepath.Join(fixtureRoot, "keys", name), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	for _, c := range fixtureCases {
		dir := filepath.Join(fixtureRoot, c.Name)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		abs, _ := filepath.Abs(dir)
		recordSwtpmState(t, bins, c, abs, fixtureRoot)
		ents, _ := os.ReadDir(dir)
		for _, e := range ents {
			os.Chmod(filepath.Join(dir, e.Name()), 0o644)
		}
	}
}

// copyFixture copies a fixture case into a fresh directory (tests must not touch testdata).
func copyFixture(t testing.TB, c fixtureCase) string {
	t.Helper()
	dst := t.TempDir()
	ents, err := os.ReadDir(filepath.Join(fixtureRoot, c.Name))
	if err != nil {
		t.Fatalf("fixture %s: %v", c.Name, err)
	}
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join(fixtureRoot, c.Name, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dst, e.Name()), b, 0o640); err != nil {
			t.Fatal(err)
		}
	}
	return dst
}
