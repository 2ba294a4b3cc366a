//go:build integration

package integration

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"math/big"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/manager"
	"github.com/vtpmd/vtpmd/manager/attest"
	"github.com/vtpmd/vtpmd/manager/eventlog"
	"github.com/vtpmd/vtpmd/manager/registry"
)

// attestVM is the UUID the registry gives the attesting guest's vTPM.
const attestVM = "6a1e0b52-6f8e-4b7a-9a57-3c2d1e0f4a11"

// TestDeepAttestation (issue 13, acceptance 4): a QEMU/OVMF guest whose vTPM is vtpmd socket under
// a manager on the measured host (a stand-in hardware TPM holding a real OVMF boot), with
// stock tpm2-tools only, makes an EK and an AK, writes a nonce to NV 0x01400002, reads the
// report from NV 0x01400001 and quotes its PCRs with the nonce, twice (two nonces), and can
// neither write nor delete the report index (owner, index or platform authorization). On the
// host, `vtpmd attest verify` accepts the second quote with its report, and rejects a
// tampered quote, a tampered report, another nonce, a tampered event log, another host AK, a
// report made for another vTPM (a second vtpmd under the same manager, driven by tpm2-tools
// on the host) and the first, older report replayed.
func TestDeepAttestation(t *testing.T) {
	need(t, "qemu-system-x86_64", "tpm2_createak", "tpm2_nvread")
	host := measuredHost(t, hostA)
	work := t.TempDir()
	stateDir := filepath.Join(work, "vm-state")
	os.Mkdir(stateDir, 0o700)
	regDir := filepath.Join(work, "registry")
	if _, err := registry.New(regDir).Update(context.Background(), attestVM, func(r *registry.Record) error {
		r.Name, r.StateDir = "attest-vm", stateDir
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	m := startManagerOn(t, host, regDir)
	id, err := manager.NewClient(m.sock).HostIdentity(ctxTimeout(t, 30*time.Second))
	if err != nil {
		t.Fatalf("host identity: %v", err)
	}
	file := func(name string, b []byte) string {
		p := filepath.Join(work, name)
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	hostAK := file("host-ak.pub", id.AKPublic)

	// the guest's vTPM is made by vtpmd setup under the manager: its EK certificate comes
	// from the host CA (key in the hardware TPM) and names the host AK and the VM; an
	// operator CA certifies the host AK and CA key (credential activation); the host identity
	// as files
	need(t, "openssl")
	conf, _ := caSetupConfig(t, work)
	setupWithManager(t, m, conf, stateDir, "attest-vm:"+attestVM, filepath.Join(work, "setup-certs"))
	opKey, opCert := filepath.Join(work, "op-key.pem"), filepath.Join(work, "op-root.pem")
	caRun(t, "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
		"-keyout", opKey, "-out", opCert, "-days", "30", "-subj", "/O=Operator/CN=operator root CA")
	caRun(t, env.bin, "manager", "certify-host", "--socket", m.sock, "--ca-cert", opCert, "--ca-key", opKey)
	idDir := filepath.Join(work, "identity")
	caRun(t, env.bin, "manager", "identity", "--socket", m.sock, "--out", idDir)

	// the guest
	nonces := []string{randomHex(t, 32), randomHex(t, 32)}
	e := startEmulator(t, env.bin, stateDir, "--tpm2", "--manager", m.sock)
	q := startQEMU(t, vm{firmware: "ovmf", machine: "q35", model: "tpm-crb", ctrl: e.ctrl, noReboot: true,
		cmdline: "attest attest_nonce=" + strings.Join(nonces, ",")})
	q.wait(t, 300*time.Second)
	out := q.serialText()
	g := guestValues(out)
	if g["attest"] != "done" {
		t.Fatalf("the guest's attestation did not complete: %q\nvtpmd log:\n%s", g["attest_error"], tail(readFile(t, e.log), 3000))
	}
	for _, k := range []string{"attest_report_write_owner", "attest_report_write_index", "attest_report_undefine_platform",
		"attest_report_undefine_owner", "attest_key_read_index", "attest_key_read_owner"} {
		if g[k] != "refused" {
			t.Errorf("the guest's %s: %q, want refused", k, g[k])
		}
	}
	blobs := map[string]string{}
	for _, name := range []string{"ekcert-rsa", "ak.pub", "ek.pub", "report-0", "report-1", "quote-0", "quote-1", "sig-0", "sig-1"} {
		b, ok := guestBlob(out, name)
		if !ok {
			t.Fatalf("the guest printed no %s", name)
		}
		blobs[name] = file(name, b)
	}

	// a report for another vTPM: a second vtpmd under the same manager, with tpm2-tools on the host
	otherWork := t.TempDir()
	otherState := filepath.Join(otherWork, "state")
	os.Mkdir(otherState, 0o700)
	other := startToolsTPM(t, env.bin, otherState, otherWork, []string{"--manager", m.sock})
	other.run("tpm2_startup", "-c")
	other.run("tpm2_createek", "-c", "ek.ctx", "-G", "rsa", "-u", "ek.pub")
	other.run("tpm2_createak", "-C", "ek.ctx", "-c", "ak.ctx", "-G", "rsa", "-g", "sha256", "-s", "rsassa", "-u", "ak.pub")
	other.run("tpm2_evictcontrol", "-C", "o", "-c", "ak.ctx", "0x81000003")
	n1, _ := hex.DecodeString(nonces[1])
	os.WriteFile(filepath.Join(otherWork, "nonce"), n1, 0o600)
	other.run("tpm2_nvwrite", "0x01400002", "-i", "nonce")
	other.run("tpm2_nvread", "-C", "o", "0x01400001", "-o", "report")
	blobs["report-other"] = filepath.Join(otherWork, "report")
	// a vTPM process that did not see the guest's startup (here: restarted after
	// TPM2_Shutdown(STATE), as after an incoming migration) still answers with a report
	other.stop()
	other = startToolsTPM(t, env.bin, otherState, otherWork, []string{"--manager", m.sock})
	other.run("tpm2_startup")
	n0, _ := hex.DecodeString(nonces[0])
	os.WriteFile(filepath.Join(otherWork, "nonce"), n0, 0o600)
	other.run("tpm2_nvwrite", "0x01400002", "-i", "nonce")
	other.run("tpm2_nvread", "-C", "o", "0x01400001", "-o", "report-resumed")
	first, err := attest.Decode(mustRead(t, blobs["report-other"]))
	if err != nil {
		t.Fatal(err)
	}
	resumed, err := attest.Decode(mustRead(t, filepath.Join(otherWork, "report-resumed")))
	if err != nil {
		t.Fatalf("no report after the vTPM process restarted: %v", err)
	}
	if !bytes.Equal(resumed.Nonce, n0) || !bytes.Equal(resumed.EKName, first.EKName) || !bytes.Equal(resumed.AKName, first.AKName) {
		t.Fatalf("report after the restart: nonce %x EK %x AK %x; before: EK %x AK %x", resumed.Nonce, resumed.EKName, resumed.AKName, first.EKName, first.AKName)
	}

	verify := func(over map[string]string) (string, error) {
		args := map[string]string{
			"--quote": blobs["quote-1"], "--signature": blobs["sig-1"], "--ak": blobs["ak.pub"], "--report": blobs["report-1"],
			"--nonce": nonces[1], "--host-ak": hostAK, "--eventlog": host.EventLog, "--ek": blobs["ek.pub"], "--vm": attestVM,
		}
		for k, v := range over {
			args[k] = v
		}
		argv := []string{"attest", "verify"}
		for k, v := range args {
			argv = append(argv, k, v)
		}
		b, err := exec.Command(env.bin, argv...).CombinedOutput()
		return string(b), err
	}
	res, err := verify(nil)
	if err != nil {
		t.Fatalf("vtpmd attest verify refused the guest's evidence: %v\n%s", err, res)
	}
	for _, want := range []string{"verified: deep attestation", attestVM, hex.EncodeToString(id.AKName), nonces[1]} {
		if !strings.Contains(res, want) {
			t.Fatalf("verify output lacks %q:\n%s", want, res)
		}
	}
	t.Logf("vtpmd attest verify:\n%s", res)

	flipped := func(name, path string, at func(n int) int) string {
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		b = bytes.Clone(b)
		b[at(len(b))] ^= 0x01
		return file(name, b)
	}
	// every chain: the host AK through the operator's certificate, the host CA's residency,
	// the vTPM's EK certificate from that CA, the host's quote over the guest's AK
	certifyAK := func(name, akPub string) string {
		p := filepath.Join(work, name)
		caRun(t, env.bin, "manager", "certify-vtpm-ak", "--socket", m.sock, "--ak-public", akPub, "--out", p)
		return p
	}
	chains := map[string]string{"--host-identity": idDir, "--ca": opCert, "--ek-cert": blobs["ekcert-rsa"],
		"--host-ak-certify": certifyAK("ak-certify.json", blobs["ak.pub"])}
	res, err = verify(chains)
	if err != nil {
		t.Fatalf("vtpmd attest verify with every chain: %v\n%s", err, res)
	}
	for _, want := range []string{"credential activation", "cannot leave", "the TPM is virtual", attestVM, "vouched for vTPM key"} {
		if !strings.Contains(res, want) {
			t.Fatalf("verify output lacks %q:\n%s", want, res)
		}
	}
	t.Logf("vtpmd attest verify, every chain:\n%s", res)
	withChains := func(over map[string]string) map[string]string {
		m := map[string]string{}
		for k, v := range chains {
			m[k] = v
		}
		for k, v := range over {
			m[k] = v
		}
		return m
	}
	badCertify := filepath.Join(work, "ca-certify-bad")
	os.MkdirAll(badCertify, 0o755)
	for _, n := range []string{"ak.pub", "ak.pem", "ca.pub", "ca-certify.attest", "ca-certify.sig", "ca-root.pem", "ca.pem"} {
		if b, err := os.ReadFile(filepath.Join(idDir, n)); err == nil {
			if n == "ca-certify.sig" {
				b[len(b)-5] ^= 1
			}
			os.WriteFile(filepath.Join(badCertify, n), b, 0o644)
		}
	}

	otherAK := measuredHostAK(t)
	// the host AK through the operator's certificate of it (a privacy CA made here)
	akKey, err := attest.ParsePublic(id.AKPublic)
	if err != nil {
		t.Fatal(err)
	}
	ca, rogue := newTestCA(t, "operator privacy CA"), newTestCA(t, "rogue CA")
	akCert, caPEM := file("host-ak.pem", ca.issue(t, akKey.Key)), file("operator-ca.pem", ca.pem())
	res, err = verify(map[string]string{"--host-ak-cert": akCert, "--ca": caPEM})
	if err != nil || !strings.Contains(res, "operator privacy CA") {
		t.Fatalf("vtpmd attest verify with the host AK's certificate: %v\n%s", err, res)
	}
	otherKey, _ := attest.ParsePublic(otherAK)
	cases := []struct {
		name string
		over map[string]string
		want string
	}{
		{"tampered quote", map[string]string{"--quote": flipped("quote-x", blobs["quote-1"], func(n int) int { return n - 40 })}, "invalid quote"},
		{"tampered quote signature", map[string]string{"--signature": flipped("sig-x", blobs["sig-1"], func(n int) int { return n / 2 })}, "invalid quote"},
		{"tampered report", map[string]string{"--report": flipped("report-x", blobs["report-1"], func(int) int { return 12 })}, "does not bind the report"},
		{"tampered report signature", map[string]string{"--report": flipped("report-y", blobs["report-1"], func(int) int { return reportSigByte(t, blobs["report-1"]) })}, "host attestation key not trusted"},
		{"another nonce", map[string]string{"--nonce": nonces[0]}, "not over the expected nonce"},
		{"tampered event log", map[string]string{"--eventlog": flipped("eventlog-x", host.EventLog, func(int) int { return eventDigestByte(t, host.EventLog) })}, "event log"},
		{"another host AK", map[string]string{"--host-ak": file("other-ak.pub", otherAK)}, "host attestation key not trusted"},
		{"host AK certificate of another CA", map[string]string{"--host-ak-cert": file("rogue.pem", rogue.issue(t, akKey.Key)), "--ca": caPEM}, "certificate chain does not verify"},
		{"host AK certificate over another key", map[string]string{"--host-ak-cert": file("other.pem", ca.issue(t, otherKey.Key)), "--ca": caPEM}, "over another key"},
		{"tampered host AK certificate", map[string]string{"--host-ak-cert": flipped("ak-cert-x.der", file("ak-cert.der", pemBody(t, mustRead(t, akCert))), func(n int) int { return n - 20 }), "--ca": caPEM}, "host attestation key not trusted"},
		{"tampered EK certificate", withChains(map[string]string{"--ek-cert": flipped("ekcert-x", blobs["ekcert-rsa"], func(n int) int { return n / 2 })}), "certificate"},
		{"EK certificate not chained to the anchors", withChains(map[string]string{"--host-identity": "", "--host-ak": hostAK}), "certificate chain does not verify"},
		{"tampered CA residency proof", withChains(map[string]string{"--host-identity": badCertify}), "residency proof does not verify"},
		{"host quote over another AK", withChains(map[string]string{"--host-ak-certify": certifyAK("other-certify.json", filepath.Join(otherWork, "ak.pub"))}), "host quote over the vTPM AK does not verify"},
		{"a report for another vTPM", map[string]string{"--report": blobs["report-other"]}, "for another vTPM"},
		{"the older report replayed", map[string]string{"--report": blobs["report-0"]}, "another nonce (replayed or stale)"},
		{"another vTPM expected", map[string]string{"--ek": file("other-ek.pub", mustRead(t, filepath.Join(otherWork, "ek.pub")))}, "for another vTPM"},
		{"another VM expected", map[string]string{"--vm": "00000000-0000-0000-0000-000000000001"}, "for another vTPM"},
	}
	for _, c := range cases {
		res, err := verify(c.over)
		if err == nil {
			t.Errorf("%s: accepted:\n%s", c.name, res)
			continue
		}
		if !strings.Contains(res, "NOT VERIFIED") || !strings.Contains(res, c.want) {
			t.Errorf("%s: refused, but not saying %q:\n%s", c.name, c.want, res)
			continue
		}
		t.Logf("%s: %s", c.name, strings.TrimSpace(res))
	}
}

// startManagerOn starts `vtpmd manager` on a measured host's TPM, naming VMs from regDir.
func startManagerOn(t *testing.T, host *hostTPM, regDir string) *hostManager {
	t.Helper()
	sockDir, err := os.MkdirTemp("", "vtpmd-mgr-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(sockDir) })
	m := &hostManager{t: t, bin: env.bin, dir: t.TempDir(), sock: filepath.Join(sockDir, "manager.sock")}
	m.log = filepath.Join(t.TempDir(), "manager.log")
	m.args = []string{"manager", "--tpm", host.Spec, "--dir", m.dir, "--listen", m.sock, "--group", "",
		"--registry", regDir, "--auto-enroll"}
	t.Cleanup(func() {
		if t.Failed() {
			b, _ := os.ReadFile(m.log)
			t.Logf("manager output:\n%s", tail(string(b), 4000))
		}
	})
	m.start()
	return m
}

// measuredHostAK is the AK public area of another host (a second manager's identity).
func measuredHostAK(t *testing.T) []byte {
	t.Helper()
	m := startHostManager(t)
	id, err := manager.NewClient(m.sock).HostIdentity(ctxTimeout(t, 30*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	return id.AKPublic
}

func randomHex(t *testing.T, n int) string {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

func mustRead(t *testing.T, p string) []byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// reportSigByte is the offset of a byte inside the hardware quote's signature in a report
// (its last field).
func reportSigByte(t *testing.T, p string) int {
	t.Helper()
	b := mustRead(t, p)
	n := int(b[5])<<8 | int(b[6]) // body length
	return 7 + n - 10
}

// eventDigestByte is the offset of a byte of the last extended event's SHA-256 digest in a
// log: a byte that changes what the log replays to, not its structure.
func eventDigestByte(t *testing.T, p string) int {
	t.Helper()
	raw := mustRead(t, p)
	l, err := eventlog.Parse(raw)
	if err != nil {
		t.Fatal(err)
	}
	for i := len(l.Events) - 1; i >= 0; i-- {
		if d := l.Events[i].Digest(eventlog.AlgSHA256); d != nil && eventlog.Extended(&l.Events[i]) {
			if at := bytes.LastIndex(raw, d); at >= 0 {
				return at + len(d) - 1
			}
		}
	}
	t.Fatalf("no SHA-256 event digest in %s", p)
	return 0
}

// testCA is a certificate authority made for a test (the operator's privacy CA).
type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
}

func newTestCA(t *testing.T, name string) *testCA {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: name}, IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := x509.ParseCertificate(der)
	return &testCA{c, k}
}

// issue certifies pub (PEM).
func (ca *testCA) issue(t *testing.T, pub crypto.PublicKey) []byte {
	t.Helper()
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "host AK"},
		KeyUsage: x509.KeyUsageDigitalSignature, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, pub, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}

func (ca *testCA) pem() []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.cert.Raw})
}

func pemBody(t *testing.T, b []byte) []byte {
	t.Helper()
	blk, _ := pem.Decode(b)
	if blk == nil {
		t.Fatal("not PEM")
	}
	return blk.Bytes
}
