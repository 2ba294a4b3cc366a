//go:build integration

package integration

import (
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// freePort returns a TCP port with the next one free as well (data + control).
func freePorts(t *testing.T) int {
	t.Helper()
	for i := 0; i < 50; i++ {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		p := l.Addr().(*net.TCPAddr).Port
		l.Close()
		if l2, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", p+1)); err == nil {
			l2.Close()
			return p
		}
	}
	t.Fatal("no free port pair")
	return 0
}

// ioctlScript is the swtpm_ioctl sequence run against both emulators.
func ioctlScript(dir string) [][]string {
	return [][]string{
		{"-c"}, {"-e"}, {"-g"}, {"-b", "0"}, {"-i"}, {"-e"}, {"-b", "3000"}, {"-l", "3"}, {"-l", "5"},
		{"-r", "3"}, {"-r", "0"}, {"-l", "0"}, {"-v"}, {"-C"}, {"--info", "1"}, {"--info", "2"}, {"-h", "measured data"},
		{"-e"}, {"--save", "permanent", dir + "/p"}, {"--save", "volatile", dir + "/v"}, {"--save", "savestate", dir + "/s"},
		{"--stop"}, {"-b", "3000"}, {"--load", "permanent", dir + "/p"}, {"--load", "volatile", dir + "/v"},
		{"--load", "savestate", dir + "/s"}, {"-i"}, {"-e"}, {"--stop"}, {"-s"},
	}
}

// TestSwtpmIoctlParity drives vtpmd and Debian's swtpm with Debian's swtpm_ioctl through every
// option, over --unix and --tcp, and requires the same output and exit status (the capability
// word differs by design: vtpmd implements LOCK_STORAGE, as swtpm 0.8+).
func TestSwtpmIoctlParity(t *testing.T) {
	needRefSwtpm(t)
	for _, transport := range []string{"unix", "tcp"} {
		t.Run(transport, func(t *testing.T) {
			results := map[string][]string{}
			for _, bin := range []string{refSwtpm(), env.bin} {
				work := t.TempDir()
				state := filepath.Join(work, "state")
				os.MkdirAll(state, 0o700)
				var ctrlArg, ioctlArg []string
				if transport == "unix" {
					sock := filepath.Join(work, "c.sock")
					ctrlArg, ioctlArg = []string{"--ctrl", "type=unixio,path=" + sock}, []string{"--unix", sock}
				} else {
					p := freePorts(t)
					ctrlArg, ioctlArg = []string{"--ctrl", fmt.Sprintf("type=tcp,port=%d", p)}, []string{"--tcp", fmt.Sprintf("127.0.0.1:%d", p)}
				}
				cmd := exec.Command(bin, append([]string{"socket", "--tpm2", "--tpmstate", "dir=" + state}, ctrlArg...)...)
				if err := cmd.Start(); err != nil {
					t.Fatal(err)
				}
				time.Sleep(300 * time.Millisecond)
				var lines []string
				for _, step := range ioctlScript(work) {
					out, err := exec.Command(refSwtpmIoctl(), append(ioctlArg, step...)...).CombinedOutput()
					rc := 0
					if err != nil {
						rc = 1
					}
					lines = append(lines, strings.ReplaceAll(fmt.Sprintf("%v -> rc=%d %s", step, rc, strings.TrimSpace(string(out))), work, "WORK"))
				}
				done := make(chan struct{})
				go func() { cmd.Wait(); close(done) }()
				select {
				case <-done:
				case <-time.After(5 * time.Second):
					cmd.Process.Kill()
					t.Errorf("%s did not exit after -s", bin)
				}
				for _, f := range []string{"p", "v"} {
					if st, err := os.Stat(filepath.Join(work, f)); err != nil || st.Size() == 0 {
						t.Errorf("%s: --save wrote no %s blob", bin, f)
					}
				}
				results[bin] = lines
			}
			sw, vt := results[refSwtpm()], results[env.bin]
			for i := range sw {
				s, v := sw[i], vt[i]
				if i == 0 {
					if !strings.Contains(v, "ptm capability is 0x1ffff") {
						t.Errorf("vtpmd capabilities: %s", v)
					}
					continue
				}
				if s != v {
					t.Errorf("step %d differs:\n  swtpm: %s\n  vtpmd: %s", i, s, v)
				}
			}
		})
	}
}

// TestTPM2Tools runs tpm2-tools through the tss2 swtpm TCTI (tcp data + tcp control).
func TestTPM2Tools(t *testing.T) {
	need(t, "tpm2_startup", "tpm2_checkquote")
	p := freePorts(t)
	state := t.TempDir()
	cmd := exec.Command(env.bin, "socket", "--tpm2", "--tpmstate", "dir="+state,
		"--server", fmt.Sprintf("type=tcp,port=%d", p), "--ctrl", fmt.Sprintf("type=tcp,port=%d", p+1), "--flags", "not-need-init")
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	time.Sleep(300 * time.Millisecond)
	work := t.TempDir()
	run := func(args ...string) string {
		t.Helper()
		c := exec.Command(args[0], args[1:]...)
		c.Dir = work
		c.Env = append(os.Environ(), fmt.Sprintf("TPM2TOOLS_TCTI=swtpm:host=127.0.0.1,port=%d", p))
		out, err := c.CombinedOutput()
		if err != nil {
			t.Fatalf("%v: %v\n%s", args, err, out)
		}
		return string(out)
	}
	run("tpm2_startup", "-c")
	if out := run("tpm2_getrandom", "--hex", "16"); len(strings.TrimSpace(out)) != 32 {
		t.Fatalf("getrandom: %q", out)
	}
	run("tpm2_pcrextend", "16:sha256=4141414141414141414141414141414141414141414141414141414141414141")
	if out := run("tpm2_pcrread", "sha256:16"); !strings.Contains(strings.ToUpper(out), "0X"+pcr16AfterOneExtend) {
		t.Fatalf("pcrread after extend:\n%s", out)
	}
	flush := func() { run("tpm2_flushcontext", "-t"); run("tpm2_flushcontext", "-s") } // no resource manager on this TCTI
	run("tpm2_createprimary", "-C", "o", "-G", "ecc", "-c", "primary.ctx")
	flush()
	run("tpm2_create", "-C", "primary.ctx", "-G", "ecc", "-u", "key.pub", "-r", "key.priv")
	flush()
	run("tpm2_load", "-C", "primary.ctx", "-u", "key.pub", "-r", "key.priv", "-c", "key.ctx")
	flush()
	run("tpm2_createek", "-c", "ek.ctx", "-G", "ecc", "-u", "ek.pub")
	flush()
	run("tpm2_createak", "-C", "ek.ctx", "-c", "ak.ctx", "-u", "ak.pem", "-f", "pem", "-G", "ecc", "-g", "sha256", "-s", "ecdsa")
	flush()
	run("tpm2_quote", "-c", "ak.ctx", "-l", "sha256:0,16", "-q", "abcdef", "-m", "q.msg", "-s", "q.sig", "-o", "q.pcrs", "-g", "sha256")
	flush()
	run("tpm2_checkquote", "-u", "ak.pem", "-m", "q.msg", "-s", "q.sig", "-f", "q.pcrs", "-g", "sha256", "-q", "abcdef")
	run("tpm2_nvdefine", "0x1500016", "-C", "o", "-s", "32", "-a", "ownerread|ownerwrite")
	os.WriteFile(filepath.Join(work, "nv.in"), []byte("vtpmd nv data"), 0o600)
	run("tpm2_nvwrite", "0x1500016", "-C", "o", "-i", "nv.in")
	if out := run("tpm2_nvread", "0x1500016", "-C", "o", "-s", "13"); out != "vtpmd nv data" {
		t.Fatalf("nvread: %q", out)
	}
}

// TestSwtpmSetupDrivesVtpmd runs Debian's swtpm_setup with vtpmd as its swtpm, then boots the
// guest on that state: the guest reads the EK certificate from NV, and it verifies against the
// local CA.
func TestSwtpmSetupDrivesVtpmd(t *testing.T) {
	need(t, "swtpm_setup", "swtpm_localca")
	work := t.TempDir()
	state := filepath.Join(work, "state")
	ca := filepath.Join(work, "ca")
	os.MkdirAll(state, 0o700)
	os.MkdirAll(ca, 0o700)
	os.WriteFile(filepath.Join(ca, "swtpm-localca.conf"), []byte(fmt.Sprintf(
		"statedir = %[1]s\nsigningkey = %[1]s/signkey.pem\nissuercert = %[1]s/issuercert.pem\ncertserial = %[1]s/certserial\n", ca)), 0o600)
	conf := filepath.Join(work, "swtpm_setup.conf")
	os.WriteFile(conf, []byte(fmt.Sprintf("create_certs_tool = /usr/bin/swtpm_localca\ncreate_certs_tool_config = %s/swtpm-localca.conf\n"+
		"create_certs_tool_options = /etc/swtpm-localca.options\nactive_pcr_banks = sha256\n", ca)), 0o600)
	c := exec.Command("swtpm_setup", "--tpm2", "--tpm-state", state, "--config", conf, "--vmid", "itest",
		"--createek", "--create-ek-cert", "--create-platform-cert", "--lock-nvram")
	c.Env = append(os.Environ(), "PATH="+env.linkDir+":"+os.Getenv("PATH"))
	if out, err := c.CombinedOutput(); err != nil {
		t.Fatalf("swtpm_setup with vtpmd as swtpm: %v\n%s", err, out)
	}
	cert := guestEKCert(t, state)
	if cert.Subject.CommonName != "itest" {
		t.Errorf("EK certificate subject %q", cert.Subject)
	}
	issuer := readPEM(t, filepath.Join(ca, "issuercert.pem"))
	root := readPEM(t, filepath.Join(ca, "swtpm-localca-rootca-cert.pem"))
	roots, inter := x509.NewCertPool(), x509.NewCertPool()
	roots.AddCert(root)
	inter.AddCert(issuer)
	// EK certificates carry a critical SAN directoryName that Go does not process; check the
	// signature chain explicitly instead of Verify's name rules.
	if err := cert.CheckSignatureFrom(issuer); err != nil {
		t.Fatalf("EK certificate not signed by the local CA: %v", err)
	}
	if err := issuer.CheckSignatureFrom(root); err != nil {
		t.Fatalf("intermediate not signed by the root: %v", err)
	}
}

// guestEKCert boots the guest (SeaBIOS, tpm-crb) on a TPM 2 state served by vtpmd and returns
// the RSA EK certificate the guest read from NV.
func guestEKCert(t *testing.T, state string) *x509.Certificate {
	t.Helper()
	e := startEmulator(t, env.bin, state, "--tpm2", "--terminate")
	q := startQEMU(t, vm{firmware: "seabios", machine: "q35", model: "tpm-crb", ctrl: e.ctrl, noReboot: true})
	q.wait(t, 120*time.Second)
	der, ok := guestBlob(q.serialText(), "ekcert-rsa")
	if !ok {
		t.Fatalf("guest did not read an EK certificate: %v", guestValues(q.serialText()))
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatalf("EK certificate from the guest: %v", err)
	}
	return cert
}

func readPEM(t *testing.T, path string) *x509.Certificate {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	blk, _ := pem.Decode(b)
	if blk == nil {
		t.Fatalf("%s: no PEM", path)
	}
	c, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return c
}
