//go:build integration

package integration

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/internal/syncbuf"
)

// vtpmdRun is one `vtpmd run` of the test guest: its own TMPDIR (which must be empty again
// afterwards) and serial log.
type vtpmdRun struct {
	tmp, serial string
	cmd         *exec.Cmd
	stderr      syncbuf.Buffer
}

// newRun prepares `vtpmd run OPTS -- qemu-system-x86_64 ...` booting the guest with cmdline
// on machine ("" for QEMU's default, pc).
func newRun(t *testing.T, opts []string, machine, cmdline string) *vtpmdRun {
	t.Helper()
	need(t, "qemu-system-x86_64")
	dir := t.TempDir()
	r := &vtpmdRun{tmp: filepath.Join(dir, "tmp"), serial: filepath.Join(dir, "serial.log")}
	os.Mkdir(r.tmp, 0o700)
	args := append([]string{"run", "--verbose"}, opts...)
	args = append(args, "--", "qemu-system-x86_64")
	if machine != "" {
		args = append(args, "-machine", machine+",accel=tcg")
	} else {
		args = append(args, "-accel", "tcg")
	}
	args = append(args, "-m", "512", "-smp", "1", "-nographic", "-nodefaults", "-no-reboot",
		"-kernel", filepath.Join(env.guestDir, "vmlinuz"), "-initrd", filepath.Join(env.guestDir, "initrd.gz"),
		"-append", "console=ttyS0 panic=-1 quiet "+cmdline, "-serial", "file:"+r.serial)
	r.cmd = exec.Command(env.bin, args...)
	r.cmd.Env = append(os.Environ(), "TMPDIR="+r.tmp)
	r.cmd.Stdout, r.cmd.Stderr = &r.stderr, &r.stderr
	return r
}

// exit runs (or waits for) the run and returns its exit status.
func (r *vtpmdRun) exit(t *testing.T, d time.Duration) int {
	t.Helper()
	if r.cmd.Process == nil {
		if err := r.cmd.Start(); err != nil {
			t.Fatal(err)
		}
	}
	done := make(chan error, 1)
	go func() { done <- r.cmd.Wait() }()
	select {
	case err := <-done:
		var ee *exec.ExitError
		if err != nil && !errors.As(err, &ee) {
			t.Fatal(err)
		}
		return r.cmd.ProcessState.ExitCode()
	case <-time.After(d):
		r.cmd.Process.Kill()
		<-done
		t.Fatalf("vtpmd run did not finish within %v:\n%s", d, r.stderr.String())
		return -1
	}
}

// serialText is what the guest printed.
func (r *vtpmdRun) serialText() string {
	b, _ := os.ReadFile(r.serial)
	return strings.ReplaceAll(string(b), "\r", "")
}

// assertClean fails when the run left a file in its TMPDIR or a process that mentions it.
func (r *vtpmdRun) assertClean(t *testing.T) {
	t.Helper()
	if entries, _ := os.ReadDir(r.tmp); len(entries) != 0 {
		t.Errorf("left in TMPDIR: %v", entries)
	}
	var left []string
	waitFor(t, 5*time.Second, func() bool {
		left = nil
		entries, _ := os.ReadDir("/proc")
		for _, e := range entries {
			if _, err := strconv.Atoi(e.Name()); err != nil {
				continue
			}
			b, _ := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
			if bytes.Contains(b, []byte(r.tmp)) && lvProcAlive(mustAtoi(e.Name())) {
				left = append(left, e.Name()+": "+strings.ReplaceAll(string(b), "\x00", " "))
			}
		}
		return len(left) == 0
	})
}

func mustAtoi(s string) int { n, _ := strconv.Atoi(s); return n }

// ekCert returns the guest's RSA EK certificate, nil when it has none.
func ekCert(t *testing.T, serial string) *x509.Certificate {
	t.Helper()
	der, ok := guestBlob(serial, "ekcert-rsa")
	if !ok {
		return nil
	}
	// swtpm's NV certificates are plain DER
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatalf("EK certificate: %v", err)
	}
	return c
}

// TestRunTPM2 (acceptance 8): `vtpmd run -- qemu-system-x86_64 -machine q35 ...` with no other
// option boots the guest with a working TPM 2 on tpm-crb whose EK certificate comes from a
// CA made for the run; QEMU's status comes back; nothing is left.
func TestRunTPM2(t *testing.T) {
	r := newRun(t, nil, "q35", "")
	start := time.Now()
	code := r.exit(t, 3*time.Minute)
	t.Logf("vtpmd run: status %d after %v", code, time.Since(start).Round(time.Millisecond))
	out := r.serialText()
	g := guestValues(out)
	if code != 0 || g["tpm_version_major"] != "2" || g["driver"] != "tpm_crb" || g["extend_ok"] != "true" || g["after_extend_pcr16"] != pcr16AfterOneExtend {
		t.Fatalf("status %d, guest saw %v\n%s\nserial: %s", code, g, r.stderr.String(), tail(out, 2000))
	}
	c := ekCert(t, out)
	if c == nil || c.Issuer.CommonName != "swtpm-localca" {
		t.Fatalf("EK certificate %v", c)
	}
	if !strings.Contains(r.stderr.String(), "vTPM ready") || !strings.Contains(r.stderr.String(), "model=tpm-crb") {
		t.Fatalf("vtpmd run said:\n%s", r.stderr.String())
	}
	r.assertClean(t)
}

// TestRunTPM12: --tpm1.2 on QEMU's default machine gives the guest a TPM 1.2 on tpm-tis.
func TestRunTPM12(t *testing.T) {
	r := newRun(t, []string{"--tpm1.2"}, "", "")
	start := time.Now()
	code := r.exit(t, 3*time.Minute)
	t.Logf("vtpmd run --tpm1.2: status %d after %v", code, time.Since(start).Round(time.Millisecond))
	g := guestValues(r.serialText())
	if code != 0 || g["tpm_version_major"] != "1" || g["driver"] != "tpm_tis" || !strings.Contains(g["tpm12_caps"], "TCG version: 1.2") {
		t.Fatalf("status %d, guest saw %v\n%s", code, g, r.stderr.String())
	}
	r.assertClean(t)
}

// TestRunKeptState: --state and --ca keep the TPM: the second boot sees the NV mark and the
// EK certificate of the first, which verifies against the kept CA's root; a TPM made with
// --ek-certs=false has no certificate.
func TestRunKeptState(t *testing.T) {
	dir := t.TempDir()
	state, ca := filepath.Join(dir, "tpm"), filepath.Join(dir, "ca")
	var certs []*x509.Certificate
	for boot, want := range []string{"0000000000000000", "0000000000000001"} {
		r := newRun(t, []string{"--state", state, "--ca", ca, "--model", "tpm-tis"}, "q35", "nvmark")
		code := r.exit(t, 3*time.Minute)
		g := guestValues(r.serialText())
		if code != 0 || g["driver"] != "tpm_tis" || g["nvmark_before"] != want || g["extend_ok"] != "true" {
			t.Fatalf("boot %d: status %d, guest saw %v\n%s", boot+1, code, g, r.stderr.String())
		}
		certs = append(certs, ekCert(t, r.serialText()))
		r.assertClean(t)
	}
	if certs[0] == nil || certs[1] == nil || !certs[0].Equal(certs[1]) {
		t.Fatal("the EK certificate changed between boots of a kept TPM")
	}
	b, err := os.ReadFile(filepath.Join(ca, "swtpm-localca-rootca-cert.pem"))
	if err != nil {
		t.Fatal(err)
	}
	blk, _ := pem.Decode(b)
	root, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	issuer, err := os.ReadFile(filepath.Join(ca, "issuercert.pem"))
	if err != nil {
		t.Fatal(err)
	}
	blk, _ = pem.Decode(issuer)
	if err := certs[0].CheckSignatureFrom(mustParse(t, blk.Bytes)); err != nil {
		t.Fatalf("EK certificate not signed by the kept CA: %v", err)
	}
	if err := mustParse(t, blk.Bytes).CheckSignatureFrom(root); err != nil {
		t.Fatalf("the kept CA's issuer is not signed by its root: %v", err)
	}

	r := newRun(t, []string{"--ek-certs=false"}, "q35", "")
	if code := r.exit(t, 3*time.Minute); code != 0 || guestValues(r.serialText())["ekcert-rsa"] != "none" {
		t.Fatalf("--ek-certs=false: status %d, guest saw %v", code, guestValues(r.serialText()))
	}
	r.assertClean(t)
}

func mustParse(t *testing.T, der []byte) *x509.Certificate {
	t.Helper()
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// TestRunStatusAndSignals: QEMU's failure status comes back as it is (1 for a bad option,
// 137 when QEMU is killed); SIGTERM to vtpmd run mid-boot ends QEMU and the vTPM with
// status 143; SIGINT gives 130; each leaves nothing.
func TestRunStatusAndSignals(t *testing.T) {
	r := newRun(t, nil, "q35", "")
	r.cmd.Args = append(r.cmd.Args, "-no-such-option")
	if code := r.exit(t, time.Minute); code != 1 || !strings.Contains(r.stderr.String(), "no-such-option") {
		t.Fatalf("bad QEMU option: status %d\n%s", code, r.stderr.String())
	}
	r.assertClean(t)

	for _, c := range []struct {
		name string
		// when: "boot" a second after the vTPM is ready (firmware and kernel boot), "guest"
		// once the guest uses the TPM
		when string
		kill func(r *vtpmdRun) error
		want int
	}{
		{"SIGTERM mid-boot", "boot", func(r *vtpmdRun) error { return r.cmd.Process.Signal(syscall.SIGTERM) }, 143},
		{"SIGINT", "guest", func(r *vtpmdRun) error { return r.cmd.Process.Signal(syscall.SIGINT) }, 130},
		{"qemu killed", "guest", func(r *vtpmdRun) error { return syscall.Kill(qemuPid(t, r), syscall.SIGKILL) }, 137},
	} {
		t.Run(c.name, func(t *testing.T) {
			r := newRun(t, nil, "q35", "tpmloop")
			if err := r.cmd.Start(); err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
			defer cancel()
			reached := func() bool {
				if c.when == "boot" {
					return strings.Contains(r.stderr.String(), "vTPM ready")
				}
				return strings.Contains(r.serialText(), "GUEST: tpm_version_major=2")
			}
			for !reached() {
				if ctx.Err() != nil {
					r.cmd.Process.Kill()
					t.Fatalf("the guest did not start:\n%s", r.stderr.String())
				}
				time.Sleep(100 * time.Millisecond)
			}
			if c.when == "boot" {
				time.Sleep(time.Second)
			}
			start := time.Now()
			if err := c.kill(r); err != nil {
				t.Fatal(err)
			}
			code := r.exit(t, time.Minute)
			t.Logf("%s: status %d, %v to exit", c.name, code, time.Since(start).Round(time.Millisecond))
			if code != c.want {
				t.Fatalf("status %d, want %d\n%s", code, c.want, r.stderr.String())
			}
			r.assertClean(t)
		})
	}
}

// qemuPid finds the QEMU that run r started.
func qemuPid(t *testing.T, r *vtpmdRun) int {
	t.Helper()
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		b, _ := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if bytes.HasPrefix(b, []byte("qemu-system-x86_64\x00")) && bytes.Contains(b, []byte(r.serial)) {
			return mustAtoi(e.Name())
		}
	}
	t.Fatal("QEMU not found")
	return 0
}
