//go:build integration

package integration

import (
	"bytes"
	"crypto"
	"crypto/x509"
	"encoding/binary"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/backend/localca"
	"github.com/vtpmd/vtpmd/backend/setup/provision"
	"github.com/vtpmd/vtpmd/internal/tpmclient"
)

// setupEnv is a temp local CA and swtpm_setup.conf for vtpmd setup (never /etc or /var/lib).
type setupEnv struct {
	work, ca, conf, link string
}

func newSetupEnv(t *testing.T) *setupEnv {
	t.Helper()
	work := t.TempDir()
	s := &setupEnv{work: work, ca: filepath.Join(work, "ca"), conf: filepath.Join(work, "swtpm_setup.conf")}
	os.MkdirAll(s.ca, 0o700)
	os.WriteFile(filepath.Join(s.ca, "swtpm-localca.conf"), []byte(fmt.Sprintf(
		"statedir = %[1]s\nsigningkey = %[1]s/signkey.pem\nissuercert = %[1]s/issuercert.pem\ncertserial = %[1]s/certserial\n", s.ca)), 0o600)
	os.WriteFile(s.conf, []byte(fmt.Sprintf("create_certs_tool = /usr/bin/swtpm_localca\ncreate_certs_tool_config = %s/swtpm-localca.conf\n"+
		"create_certs_tool_options = /etc/swtpm-localca.options\nactive_pcr_banks = sha256\n", s.ca)), 0o600)
	// invoked through a link named swtpm_setup, as libvirt finds it
	s.link = filepath.Join(work, "bin", "swtpm_setup")
	os.MkdirAll(filepath.Dir(s.link), 0o755)
	if err := os.Symlink(env.bin, s.link); err != nil {
		t.Fatal(err)
	}
	return s
}

// run runs swtpm_setup (the vtpmd link) with the env's config and returns output and exit code.
func (s *setupEnv) run(t *testing.T, extra []*os.File, args ...string) (string, int) {
	t.Helper()
	c := exec.Command(s.link, append([]string{"--config", s.conf}, args...)...)
	c.ExtraFiles = extra
	out, err := c.CombinedOutput()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return string(out), code
}

func (s *setupEnv) pool(t *testing.T) (*x509.CertPool, *x509.CertPool) {
	t.Helper()
	roots, inter := x509.NewCertPool(), x509.NewCertPool()
	roots.AddCert(readPEM(t, filepath.Join(s.ca, "swtpm-localca-rootca-cert.pem")))
	inter.AddCert(readPEM(t, filepath.Join(s.ca, "issuercert.pem")))
	return roots, inter
}

// checkEKs checks, through tpm2-tools against a running emulator on the state, that each EK
// persisted at its handle is the key certified in its NV index, that the certificate verifies
// against the local CA with openssl, and that the indices carry swtpm_setup's attributes.
func (s *setupEnv) checkEKs(t *testing.T, tt *toolsTPM) {
	t.Helper()
	tt.run("tpm2_startup", "-c")
	pub := tt.run("tpm2_nvreadpublic")
	for _, ek := range []struct{ handle, index string }{{"0x81010001", "0x1c00002"}, {"0x81010016", "0x1c00016"}} {
		if !strings.Contains(pub, ek.index+":") {
			t.Fatalf("no NV index %s:\n%s", ek.index, pub)
		}
		tt.run("tpm2_readpublic", "-c", ek.handle, "-f", "pem", "-o", "ek-"+ek.handle+".pem")
		tt.run("tpm2_nvread", ek.index, "-C", "o", "-o", "cert-"+ek.index+".der")
		der, err := os.ReadFile(filepath.Join(tt.work, "cert-"+ek.index+".der"))
		if err != nil {
			t.Fatal(err)
		}
		cert, err := x509.ParseCertificate(der)
		if err != nil {
			t.Fatalf("certificate in %s: %v", ek.index, err)
		}
		ekPEM, _ := os.ReadFile(filepath.Join(tt.work, "ek-"+ek.handle+".pem"))
		blk, _ := pem.Decode(ekPEM)
		ekPub, err := x509.ParsePKIXPublicKey(blk.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		if !cert.PublicKey.(interface{ Equal(crypto.PublicKey) bool }).Equal(ekPub) {
			t.Fatalf("EK at %s is not the key certified in %s", ek.handle, ek.index)
		}
		certPEM := filepath.Join(tt.work, "cert-"+ek.index+".pem")
		os.WriteFile(certPEM, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600)
		out, err := exec.Command("openssl", "verify", "-CAfile", filepath.Join(s.ca, "swtpm-localca-rootca-cert.pem"),
			"-untrusted", filepath.Join(s.ca, "issuercert.pem"), certPEM).CombinedOutput()
		if err != nil || !strings.Contains(string(out), ": OK") {
			t.Fatalf("openssl verify %s: %v\n%s", ek.index, err, out)
		}
	}
	if n := strings.Count(pub, "0x62072801"); n != 3 {
		t.Fatalf("%d NV indices with swtpm_setup's written+locked attributes 0x62072801, want 3:\n%s", n, pub)
	}
	if out := tt.run("tpm2_getcap", "pcrs"); !strings.Contains(out, "sha1: [ ]") || !strings.Contains(out, "sha256: [ 0, 1") {
		t.Fatalf("PCR banks are not sha256 only:\n%s", out)
	}
}

// TestVtpmdSetupLibvirtInvocations runs libvirt's swtpm_setup command lines against vtpmd setup
// and checks that Debian's swtpm and vtpmd both use the result.
func TestVtpmdSetupLibvirtInvocations(t *testing.T) {
	need(t, "tpm2_nvread", "openssl", refSwtpm(), refSwtpmIoctl())
	needRefSwtpm(t)
	s := newSetupEnv(t)
	state := filepath.Join(s.work, "tpm2")
	os.MkdirAll(state, 0o700)
	log := filepath.Join(s.work, "swtpm.log")
	first := []string{"--tpm2", "--tpm-state", state, "--vmid", "vm1:6f2d8c4e-1111-2222-3333-444455556666", "--logfile", log,
		"--createek", "--create-ek-cert", "--create-platform-cert", "--lock-nvram", "--not-overwrite"}
	if out, code := s.run(t, nil, first...); code != 0 {
		t.Fatalf("first start: exit %d\n%s\n%s", code, out, readFile(t, log))
	}
	for _, line := range []string{"Successfully created RSA 2048 EK with handle 0x81010001.", "Successfully created NVRAM area 0x1c08000 for platform certificate.",
		"Successfully created ECC EK with handle 0x81010016.", "Successfully activated PCR banks sha256 among sha1,sha256,sha384,sha512.", "Successfully authored TPM state."} {
		if !strings.Contains(readFile(t, log), line) {
			t.Errorf("log lacks %q", line)
		}
	}
	for name, bin := range map[string]string{"Debian swtpm": refSwtpm(), "vtpmd": env.bin} {
		t.Run("loads in "+name, func(t *testing.T) {
			work := t.TempDir()
			copyDir(t, state, filepath.Join(work, "st"))
			tt := startToolsTPM(t, bin, filepath.Join(work, "st"), work, nil)
			s.checkEKs(t, tt)
			tt.stop()
		})
	}

	before := dirHash(t, state)
	if out, code := s.run(t, nil, first...); code != 0 || dirHash(t, state) != before || !strings.Contains(readFile(t, log), "Not overwriting existing state file.") {
		t.Fatalf("second start with --not-overwrite: exit %d, state changed %v\n%s", code, dirHash(t, state) != before, out)
	}
	if out, code := s.run(t, nil, "--tpm2", "--tpm-state", state, "--createek"); code != 1 || !strings.Contains(out, "Found existing TPM state 'permall'.") || dirHash(t, state) != before {
		t.Fatalf("existing state without --overwrite: exit %d\n%s", code, out)
	}

	// active_pcr_banks: reconfigure before every start
	if out, code := s.run(t, nil, "--tpm2", "--tpm-state", state, "--logfile", log, "--pcr-banks", "sha256,sha384", "--reconfigure"); code != 0 {
		t.Fatalf("reconfigure: exit %d\n%s", code, out)
	}
	func() {
		tt := startToolsTPM(t, env.bin, state, s.work, nil)
		defer tt.stop()
		tt.run("tpm2_startup", "-c")
		out := tt.run("tpm2_getcap", "pcrs")
		if !strings.Contains(out, "sha384: [ 0, 1") || !strings.Contains(out, "sha256: [ 0, 1") || !strings.Contains(out, "sha1: [ ]") {
			t.Fatalf("banks after reconfigure:\n%s", out)
		}
		if !strings.Contains(tt.run("tpm2_getcap", "handles-persistent"), "0x81010001") {
			t.Fatal("reconfigure lost the EK")
		}
	}()

	// incoming migration: libvirt re-makes the state, which the migration stream then replaces
	if out, code := s.run(t, nil, "--tpm2", "--tpm-state", state, "--logfile", log, "--overwrite"); code != 0 {
		t.Fatalf("incoming setup: exit %d\n%s", code, out)
	}
	func() {
		tt := startToolsTPM(t, refSwtpm(), state, s.work, nil)
		defer tt.stop()
		tt.run("tpm2_startup", "-c")
		if out := tt.run("tpm2_getcap", "handles-persistent"); strings.Contains(out, "0x81010001") {
			t.Fatalf("--overwrite kept the old EK: %s", out)
		}
	}()
}

// TestVtpmdSetupEncrypted: libvirt's <encryption> passes a passphrase on an fd with
// aes-256-cbc; Debian's swtpm opens the state with the same passphrase and refuses it without.
func TestVtpmdSetupEncrypted(t *testing.T) {
	need(t, "tpm2_nvread", "openssl", refSwtpm())
	needRefSwtpm(t)
	s := newSetupEnv(t)
	state := filepath.Join(s.work, "tpm2")
	os.MkdirAll(state, 0o700)
	pw := filepath.Join(s.work, "pass")
	os.WriteFile(pw, []byte("libvirt secret\n"), 0o600)
	r, w, _ := os.Pipe()
	w.Write([]byte("libvirt secret\n"))
	w.Close()
	out, code := s.run(t, []*os.File{r}, "--tpm2", "--pwdfile-fd", "3", "--cipher", "aes-256-cbc", "--tpm-state", state,
		"--vmid", "enc:1", "--createek", "--create-ek-cert", "--create-platform-cert", "--lock-nvram", "--not-overwrite")
	r.Close()
	if code != 0 || !strings.Contains(out, "encrypted using a key derived from a passphrase (fd)") {
		t.Fatalf("encrypted setup: exit %d\n%s", code, out)
	}
	perm, _ := os.ReadFile(filepath.Join(state, "tpm2-00.permall"))
	if bytes.Contains(perm, []byte("swtpm-localca")) {
		t.Fatal("the permanent state holds the certificate in the clear")
	}
	tt := startToolsTPM(t, refSwtpm(), state, s.work, []string{"--key", "pwdfile=" + pw + ",mode=aes-256-cbc"})
	s.checkEKs(t, tt)
	tt.stop()

	// --keyfile with a hex AES-128 key (the default cipher) opens with swtpm's --key file=
	keyState := filepath.Join(s.work, "tpm2-key")
	os.MkdirAll(keyState, 0o700)
	keyFile := filepath.Join(s.work, "key")
	os.WriteFile(keyFile, []byte("00112233445566778899aabbccddeeff\n"), 0o600)
	if out, code := s.run(t, nil, "--tpm2", "--keyfile", keyFile, "--tpm-state", keyState, "--createek", "--create-ek-cert",
		"--create-platform-cert", "--lock-nvram"); code != 0 || !strings.Contains(out, "encrypted with a provided key.") {
		t.Fatalf("--keyfile setup: exit %d\n%s", code, out)
	}
	tk := startToolsTPM(t, refSwtpm(), keyState, s.work, []string{"--key", "file=" + keyFile})
	s.checkEKs(t, tk)
	tk.stop()
	// without the key Debian's swtpm cannot start the TPM
	p := freePorts(t)
	c := exec.Command(refSwtpm(), "socket", "--tpm2", "--tpmstate", "dir="+state, "--flags", "not-need-init,startup-clear",
		"--server", fmt.Sprintf("type=tcp,port=%d", p), "--ctrl", fmt.Sprintf("type=tcp,port=%d", p+1))
	done := make(chan error, 1)
	if err := c.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { done <- c.Wait() }()
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("swtpm without the key exited cleanly")
		}
	case <-time.After(5 * time.Second):
		c.Process.Kill()
		t.Fatal("swtpm started on encrypted state without the key")
	}
}

// TestVtpmdSetupFailureLeavesNothing: when the CA is broken, setup fails with a clear message
// and neither a new nor an existing state directory changes.
func TestVtpmdSetupFailureLeavesNothing(t *testing.T) {
	s := newSetupEnv(t)
	state := filepath.Join(s.work, "tpm2")
	os.MkdirAll(state, 0o700)
	if _, code := s.run(t, nil, "--tpm2", "--tpm-state", state, "--createek"); code != 0 {
		t.Fatal("plain setup failed")
	}
	os.WriteFile(filepath.Join(s.ca, "signkey.pem"), []byte("garbage"), 0o600)
	os.WriteFile(filepath.Join(s.ca, "issuercert.pem"), []byte("garbage"), 0o600)
	before := dirHash(t, state)
	out, code := s.run(t, nil, "--tpm2", "--tpm-state", state, "--overwrite", "--create-ek-cert")
	if code != 1 || !strings.Contains(out, "signing key") || !strings.Contains(out, "Authoring the TPM state failed.") {
		t.Fatalf("broken CA: exit %d\n%s", code, out)
	}
	if dirHash(t, state) != before {
		t.Fatal("a failed --overwrite changed the existing state")
	}
	empty := filepath.Join(s.work, "new")
	os.MkdirAll(empty, 0o700)
	if _, code := s.run(t, nil, "--tpm2", "--tpm-state", empty, "--create-ek-cert"); code != 1 {
		t.Fatal("broken CA accepted")
	}
	if _, err := os.Stat(filepath.Join(empty, "tpm2-00.permall")); err == nil {
		t.Fatal("a failed setup left a half-made state")
	}
}

// TestVtpmdSetupConcurrentSerials: ten setups at once against one new CA all succeed, create one
// CA between them, and get distinct serial numbers.
func TestVtpmdSetupConcurrentSerials(t *testing.T) {
	s := newSetupEnv(t)
	const n = 10
	var wg sync.WaitGroup
	errs := make([]string, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			state := filepath.Join(s.work, fmt.Sprintf("vm%d", i))
			os.MkdirAll(state, 0o700)
			certs := filepath.Join(s.work, fmt.Sprintf("certs%d", i))
			os.MkdirAll(certs, 0o700)
			c := exec.Command(s.link, "--config", s.conf, "--tpm2", "--tpm-state", state, "--vmid", fmt.Sprintf("vm%d", i),
				"--create-ek-cert", "--create-platform-cert", "--lock-nvram", "--write-ek-cert-files", certs)
			if out, err := c.CombinedOutput(); err != nil {
				errs[i] = fmt.Sprintf("%v: %s", err, out)
			}
		}()
	}
	wg.Wait()
	for i, e := range errs {
		if e != "" {
			t.Fatalf("setup %d: %s", i, e)
		}
	}
	roots, inter := s.pool(t)
	seen := map[string]string{}
	for i := range n {
		for _, f := range []string{"ek-rsa2048.crt", "ek-secp384r1.crt"} {
			der, err := os.ReadFile(filepath.Join(s.work, fmt.Sprintf("certs%d", i), f))
			if err != nil {
				t.Fatal(err)
			}
			c, err := x509.ParseCertificate(der)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := localca.Verify(c, roots, inter); err != nil {
				t.Fatalf("vm%d %s: %v", i, f, err)
			}
			if prev, dup := seen[c.SerialNumber.String()]; dup {
				t.Fatalf("serial %s given to %s and vm%d/%s", c.SerialNumber, prev, i, f)
			}
			seen[c.SerialNumber.String()] = fmt.Sprintf("vm%d/%s", i, f)
		}
	}
	// 10 x (2 EK + 1 platform) certificates: the counter says 1 + 30
	if b, _ := os.ReadFile(filepath.Join(s.ca, "certserial")); string(b) != fmt.Sprint(1+3*n) {
		t.Fatalf("serial counter %q, want %d", b, 1+3*n)
	}
}

// TestVtpmdSetupGuestReadsEKCert: the guest of the socket issue reads the EK certificate that
// vtpmd setup stored, and it verifies against the local CA.
func TestVtpmdSetupGuestReadsEKCert(t *testing.T) {
	need(t, "qemu-system-x86_64")
	s := newSetupEnv(t)
	state := filepath.Join(s.work, "tpm2")
	os.MkdirAll(state, 0o700)
	if out, code := s.run(t, nil, "--tpm2", "--tpm-state", state, "--vmid", "guest-ek", "--createek", "--create-ek-cert",
		"--create-platform-cert", "--lock-nvram"); code != 0 {
		t.Fatalf("setup: %s", out)
	}
	cert := guestEKCert(t, state)
	roots, inter := s.pool(t)
	if _, err := localca.Verify(cert, roots, inter); err != nil {
		t.Fatalf("guest's EK certificate does not verify against the local CA: %v", err)
	}
	if cert.Subject.CommonName != "guest-ek" || len(cert.Subject.OrganizationalUnit) == 0 || cert.Subject.OrganizationalUnit[0] != localca.VirtualTPMUnit {
		t.Fatalf("subject %v", cert.Subject)
	}
}

func copyDir(t *testing.T, src, dst string) {
	t.Helper()
	os.MkdirAll(dst, 0o700)
	ents, err := os.ReadDir(src)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join(src, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		os.WriteFile(filepath.Join(dst, e.Name()), b, 0o600)
	}
}

// tpm12Cap runs TPM_GetCapability(capArea, subCap) over a data channel; ok is false when the
// TPM refuses it.
func tpm12Cap(t *testing.T, c net.Conn, capArea, subCap uint32) ([]byte, bool) {
	t.Helper()
	send := provision.Send12(func(cmd []byte) ([]byte, error) { return tpmclient.RoundTrip(c, cmd) })
	data, err := provision.Capability12(send, capArea, binary.BigEndian.AppendUint32(nil, subCap))
	if errors.Is(err, provision.ErrTPM12) {
		return nil, false
	}
	if err != nil {
		t.Fatal(err)
	}
	return data, true
}

// TestVtpmdSetupTPM12: libvirt's TPM 1.2 first-start invocation (no --tpm2), plus
// --take-ownership, makes a state that Debian's swtpm runs as an owned TPM 1.2 with the EK and
// platform certificates in NV (with the 7-byte header) and NV locked, and the TPM 1.2 guest
// boots on it under vtpmd.
func TestVtpmdSetupTPM12(t *testing.T) {
	need(t, refSwtpm())
	needRefSwtpm(t)
	s := newSetupEnv(t)
	state := filepath.Join(s.work, "tpm1.2")
	os.MkdirAll(state, 0o700)
	certs := filepath.Join(s.work, "certs")
	os.MkdirAll(certs, 0o700)
	log := filepath.Join(s.work, "swtpm.log")
	out, code := s.run(t, nil, "--tpm-state", state, "--vmid", "vm12:1", "--logfile", log, "--createek", "--create-ek-cert",
		"--create-platform-cert", "--lock-nvram", "--not-overwrite", "--take-ownership", "--ownerpass", "owner", "--write-ek-cert-files", certs)
	if code != 0 {
		t.Fatalf("TPM 1.2 setup: exit %d\n%s\n%s", code, out, readFile(t, log))
	}
	for _, line := range []string{"Successfully created EK.", "Successfully took ownership of the TPM.", "Successfully created NVRAM area for EK certificate.",
		"Successfully created NVRAM area for Platform certificate.", "Successfully locked NVRAM access.", "Successfully authored TPM state."} {
		if !strings.Contains(readFile(t, log), line) {
			t.Errorf("log lacks %q", line)
		}
	}
	if _, err := os.Stat(filepath.Join(state, "tpm-00.permall")); err != nil {
		t.Fatal(err)
	}
	der, err := os.ReadFile(filepath.Join(certs, "ek-rsa2048.crt"))
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	roots, inter := s.pool(t)
	if _, err := localca.Verify(cert, roots, inter); err != nil {
		t.Fatalf("TPM 1.2 EK certificate: %v", err)
	}

	work := t.TempDir()
	copyDir(t, state, filepath.Join(work, "st"))
	p := freePorts(t)
	sw := exec.Command(refSwtpm(), "socket", "--tpmstate", "dir="+filepath.Join(work, "st"), "--flags", "not-need-init,startup-clear",
		"--server", fmt.Sprintf("type=tcp,port=%d", p), "--ctrl", fmt.Sprintf("type=tcp,port=%d", p+1))
	sw.Stderr = os.Stderr
	if err := sw.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { sw.Process.Kill(); sw.Wait() }()
	c, err := dialRetry("tcp", fmt.Sprintf("127.0.0.1:%d", p))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if owner, ok := tpm12Cap(t, c, 5, 0x111); !ok || len(owner) != 1 || owner[0] != 1 { // TPM_CAP_PROPERTY / PROP_OWNER
		t.Fatalf("Debian's swtpm: TPM has no owner (%x)", owner)
	}
	for _, nv := range []struct {
		index uint32
		size  int
	}{{0x1000f000, len(der) + 7}, {0x1000f002, -1}} {
		pub, ok := tpm12Cap(t, c, 0x11, nv.index) // TPM_CAP_NV_INDEX
		if !ok {
			t.Fatalf("Debian's swtpm: no NV index 0x%x", nv.index)
		}
		if got := int(binary.BigEndian.Uint32(pub[len(pub)-4:])); nv.size >= 0 && got != nv.size {
			t.Fatalf("NV 0x%x size %d, want %d (certificate + header)", nv.index, got, nv.size)
		}
	}
	if _, ok := tpm12Cap(t, c, 0x11, 0xffffffff); ok {
		t.Log("lock index is listed") // informative: libtpms does not list it
	}

	e := startEmulator(t, env.bin, state, "--terminate")
	q := startQEMU(t, vm{firmware: "seabios", machine: "pc", model: "tpm-tis", ctrl: e.ctrl, noReboot: true})
	q.wait(t, 120*time.Second)
	g := guestValues(q.serialText())
	if g["tpm_version_major"] != "1" || !strings.Contains(g["tpm12_caps"], "TCG version: 1.2") {
		t.Fatalf("guest on the manufactured TPM 1.2: %v", g)
	}
}

// TestVtpmdSetupLinearFileAndRunas: a file:// state made by vtpmd setup is used by Debian's
// swtpm; --runas makes the state as that user (libvirt's tss).
func TestVtpmdSetupLinearFileAndRunas(t *testing.T) {
	need(t, refSwtpm(), "tpm2_getcap")
	needRefSwtpm(t)
	s := newSetupEnv(t)
	img := filepath.Join(s.work, "tpm2.img")
	if out, code := s.run(t, nil, "--tpm2", "--tpm-state", "file://"+img, "--createek", "--create-ek-cert", "--lock-nvram"); code != 0 {
		t.Fatalf("file:// setup: %s", out)
	}
	p := freePorts(t)
	sw := exec.Command(refSwtpm(), "socket", "--tpm2", "--tpmstate", "backend-uri=file://"+img, "--flags", "not-need-init,startup-clear",
		"--server", fmt.Sprintf("type=tcp,port=%d", p), "--ctrl", fmt.Sprintf("type=tcp,port=%d", p+1))
	sw.Stderr = os.Stderr
	if err := sw.Start(); err != nil {
		t.Fatal(err)
	}
	tt := &toolsTPM{t: t, cmd: sw, port: p, work: s.work}
	time.Sleep(300 * time.Millisecond)
	if out := tt.run("tpm2_getcap", "handles-persistent"); !strings.Contains(out, "0x81010001") || !strings.Contains(out, "0x81010016") {
		t.Fatalf("Debian's swtpm on the linear file: %s", out)
	}
	if out := tt.run("tpm2_nvreadpublic"); !strings.Contains(out, "0x1c00002") {
		t.Fatalf("no EK certificate index: %s", out)
	}
	tt.stop()

	if os.Geteuid() != 0 {
		t.Skip("--runas needs root")
	}
	u, err := user.Lookup("tss")
	if err != nil {
		t.Skip("no tss user")
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	state := filepath.Join(s.work, "tss-state")
	os.MkdirAll(state, 0o700)
	os.Chmod(filepath.Dir(s.work), 0o755) // t.TempDir's parent is 0700
	for _, p := range []string{s.work, state, s.ca} {
		os.Chown(p, uid, gid)
		os.Chmod(p, 0o755)
	}
	os.Chmod(state, 0o700)
	filepath.Walk(s.ca, func(p string, _ os.FileInfo, _ error) error { return os.Chown(p, uid, gid) })
	os.Chown(s.conf, uid, gid)
	if out, code := s.run(t, nil, "--runas", "tss", "--tpm2", "--tpm-state", state, "--create-ek-cert"); code != 0 {
		t.Fatalf("--runas tss: %s", out)
	}
	st, err := os.Stat(filepath.Join(state, "tpm2-00.permall"))
	if err != nil {
		t.Fatal(err)
	}
	if owner := st.Sys().(*syscall.Stat_t).Uid; int(owner) != uid {
		t.Fatalf("state owned by uid %d, want tss (%d)", owner, uid)
	}
	if out, code := s.run(t, nil, "--runas", "no-such-user-x", "--tpm2", "--tpm-state", state); code != 1 || !strings.Contains(out, "does not exist") {
		t.Fatalf("unknown --runas user: exit %d %s", code, out)
	}
}
