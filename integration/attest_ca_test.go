//go:build integration

package integration

import (
	"bytes"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/vtpmd/vtpmd/backend/localca"
	"github.com/vtpmd/vtpmd/internal/swtpmtest"
	"github.com/vtpmd/vtpmd/internal/tpmclient"
	"github.com/vtpmd/vtpmd/manager"
	"github.com/vtpmd/vtpmd/manager/attest"
	"github.com/vtpmd/vtpmd/manager/hwtpm"
)

// TestAttestCA (issue 13, acceptance 5): `vtpmd setup --create-ek-cert --create-platform-cert`
// under a `vtpmd manager` (on Debian's swtpm as the hardware TPM) gets its certificates from
// the manager's CA, whose key lives in the hardware TPM: openssl verifies them up to the host
// CA's self-signed root, and, after `vtpmd manager certify-host` with an operator CA made by
// openssl, up to the operator's root through the host CA's certificate; they say the TPM is
// virtual and which host (AK) vouched for which VM; the CA key's residency and the AK
// certificate verify; a tampered certificate is refused by openssl and by the verifier; no
// private key is on disk (the manager's directory holds only TPM-wrapped blobs) and the
// file-key local CA was never used.
func TestAttestCA(t *testing.T) {
	need(t, "openssl")
	m := startHostManager(t)
	work := t.TempDir()
	conf, localCADir := caSetupConfig(t, work)
	const vmUUID = "0b7e9c1a-5d2f-4c3b-9e8a-1f2d3c4b5a69"

	// a vTPM made with the manager: its EK certificate, issued by the host CA
	state1 := filepath.Join(work, "vm1")
	ek1 := setupWithManager(t, m, conf, state1, "vm1:"+vmUUID, filepath.Join(work, "certs1"))

	// the host identity as files
	idDir := filepath.Join(work, "identity")
	caRun(t, env.bin, "manager", "identity", "--socket", m.sock, "--out", idDir)
	caRoot := filepath.Join(idDir, "ca-root.pem")

	// self-signed mode: openssl verifies the EK certificate up to the host CA's root
	for _, ek := range ek1 {
		opensslVerify(t, true, "-CAfile", caRoot, ek)
	}

	// the certificate names the host AK and the VM, and marks the TPM virtual
	var id manager.HostIdentity
	if err := json.Unmarshal([]byte(caRun(t, env.bin, "manager", "identity", "--socket", m.sock)), &id); err != nil {
		t.Fatal(err)
	}
	root := caReadCert(t, caRoot)
	for _, ek := range ek1 {
		c := caReadCert(t, ek)
		r, err := attest.VerifyVTPMCertificate(c, nil, []*x509.Certificate{root},
			attest.VTPMCertExpect{HostAKName: id.AKName, VMUUID: vmUUID})
		if err != nil {
			t.Fatalf("%s: %v", ek, err)
		}
		if !strings.Contains(c.Subject.String(), localca.VirtualTPMUnit) || !strings.HasPrefix(c.Issuer.CommonName, "vtpmd host CA") {
			t.Errorf("%s: subject %q, issuer %q", ek, c.Subject, c.Issuer)
		}
		t.Logf("%s: %s", filepath.Base(ek), strings.Join(r.Proves, "; "))
	}
	// the CA key is resident with the hardware AK
	res, err := attest.VerifyCAResidency(id.AKPublic, id.CAPublic, id.CACertify, root)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("residency: %s", res.Proves[0])

	// the platform certificate, read from the vTPM's NV, is from the same CA and names the VM
	var platform, vakPublic []byte
	vtpmdOnce(t, m, state1, func(tp tpmclient.SendFunc) {
		if err := tpmclient.Startup(tp); err != nil {
			t.Fatal(err)
		}
		platform = caReadNV(t, tp, 0x01c08000)
		// and an AK in the vTPM, for the host to vouch for
		ak, err := tpmclient.CreatePrimary(tp, tpm2.TPMRHEndorsement, vtpmAKTemplate)
		if err != nil {
			t.Fatal(err)
		}
		vakPublic = tpm2.Marshal(tpm2.New2B(ak.Public))
	})
	pc, err := x509.ParseCertificate(caFirstDER(t, platform))
	if err != nil {
		t.Fatalf("platform certificate: %v", err)
	}
	if _, err := attest.VerifyVTPMCertificate(pc, nil, []*x509.Certificate{root}, attest.VTPMCertExpect{VMUUID: vmUUID, HostAKName: id.AKName}); err != nil {
		t.Fatalf("platform certificate: %v", err)
	}

	// the hardware AK vouches for the vTPM's AK: a host quote over SHA-256 of its public area
	vakFile, quoteFile := filepath.Join(work, "vak.pub"), filepath.Join(work, "vak-quote.json")
	os.WriteFile(vakFile, vakPublic, 0o600)
	caRun(t, env.bin, "manager", "certify-vtpm-ak", "--socket", m.sock, "--ak-public", vakFile, "--pcrs", "0,7", "--out", quoteFile)
	var q manager.Quote
	if b, err := os.ReadFile(quoteFile); err != nil || json.Unmarshal(b, &q) != nil {
		t.Fatalf("quote file: %v", err)
	}
	vr, err := attest.VerifyHostCertifiedAK(id.AKPublic, vakPublic, hwtpm.Attestation{Attest: q.Attest, Signature: q.Signature})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("vTPM AK: %s", vr.Proves[0])
	q.Attest[len(q.Attest)-1] ^= 1
	if _, err := attest.VerifyHostCertifiedAK(id.AKPublic, vakPublic, hwtpm.Attestation{Attest: q.Attest, Signature: q.Signature}); err == nil {
		t.Fatal("a tampered host quote over the vTPM AK verified")
	}

	// operator mode: an operator CA (openssl) certifies the host's AK and CA key
	opKey, opCert := filepath.Join(work, "op-key.pem"), filepath.Join(work, "op-root.pem")
	caRun(t, "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
		"-keyout", opKey, "-out", opCert, "-days", "30", "-subj", "/O=Operator/CN=operator root CA")
	out := caRun(t, env.bin, "manager", "certify-host", "--socket", m.sock, "--ca-cert", opCert, "--ca-key", opKey)
	if !strings.Contains(out, "credential activated") {
		t.Fatalf("certify-host:\n%s", out)
	}
	caRun(t, env.bin, "manager", "identity", "--socket", m.sock, "--out", idDir)
	intermediate := filepath.Join(idDir, "ca.pem")

	// a new vTPM's EK certificate chains to the operator's root through the host CA's
	// certificate; the first vTPM's too (same CA name and key)
	state2 := filepath.Join(work, "vm2")
	ek2 := setupWithManager(t, m, conf, state2, "vm2:1d3c5b7a-9e8f-4a6b-8c2d-3e4f5a6b7c8d", filepath.Join(work, "certs2"))
	for _, ek := range append(ek2, ek1...) {
		opensslVerify(t, true, "-CAfile", opCert, "-untrusted", intermediate, ek)
		opensslVerify(t, false, "-CAfile", opCert, ek) // not without the host CA's certificate
	}
	// the AK certificate verifies with the operator's root
	if err := json.Unmarshal([]byte(caRun(t, env.bin, "manager", "identity", "--socket", m.sock)), &id); err != nil {
		t.Fatal(err)
	}
	akCert, _ := x509.ParseCertificate(id.AKCert)
	if akCert == nil {
		t.Fatal("no AK certificate after certify-host")
	}
	if _, err := attest.VerifyAKCertificate(akCert, nil, []*x509.Certificate{caReadCert(t, opCert)}, id.AKPublic, akCert.NotBefore); err != nil {
		t.Fatal(err)
	}
	opensslVerify(t, true, "-CAfile", opCert, filepath.Join(idDir, "ak.pem"))

	// tampered: one byte of the signed part of the EK certificate
	der, err := os.ReadFile(ek2[0])
	if err != nil {
		t.Fatal(err)
	}
	i := bytes.Index(der, []byte(localca.VirtualTPMUnit))
	if i < 0 {
		t.Fatal("no OU in the certificate")
	}
	der[i] ^= 0x20
	bad := filepath.Join(work, "tampered.crt")
	os.WriteFile(bad, der, 0o600)
	opensslVerify(t, false, "-CAfile", opCert, "-untrusted", intermediate, bad)
	if bc, err := x509.ParseCertificate(der); err == nil {
		if _, err := attest.VerifyVTPMCertificate(bc, []*x509.Certificate{caReadCert(t, intermediate)}, []*x509.Certificate{caReadCert(t, opCert)}, attest.VTPMCertExpect{}); err == nil {
			t.Fatal("the verifier accepted a tampered certificate")
		}
	}

	// no private key on disk: nothing in the manager's directory or the states parses as one,
	// and the file-key local CA made no key
	for _, dir := range []string{m.dir, state1, state2} {
		caNoPrivateKeys(t, dir)
	}
	if ents, _ := os.ReadDir(localCADir); len(ents) > 0 {
		var names []string
		for _, e := range ents {
			names = append(names, e.Name())
		}
		t.Fatalf("the file-key local CA was used: %v", names)
	}
	raw, err := os.ReadFile(filepath.Join(m.dir, "identity.json"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(raw, []byte(`"private"`)) || bytes.Contains(raw, []byte("PRIVATE KEY")) {
		t.Fatal("identity.json is not what it should be: TPM-wrapped blobs only")
	}
}

// setupConfig writes a swtpm_setup.conf whose local CA lives in an empty directory (to show
// it is not used) with a platform description.
func caSetupConfig(t *testing.T, dir string) (conf, caDir string) {
	t.Helper()
	caDir = filepath.Join(dir, "localca")
	os.MkdirAll(caDir, 0o700)
	files := map[string]string{
		"swtpm_setup.conf": "create_certs_tool = /usr/bin/swtpm_localca\n" +
			"create_certs_tool_config = " + filepath.Join(dir, "swtpm-localca.conf") + "\n" +
			"create_certs_tool_options = " + filepath.Join(dir, "swtpm-localca.options") + "\n",
		"swtpm-localca.conf": "statedir = " + caDir + "\nsigningkey = " + filepath.Join(caDir, "signkey.pem") + "\n" +
			"issuercert = " + filepath.Join(caDir, "issuercert.pem") + "\ncertserial = " + filepath.Join(caDir, "certserial") + "\n",
		"swtpm-localca.options": "--platform-manufacturer vtpmd-test\n--platform-version 2.1\n--platform-model QEMU\n",
	}
	for n, c := range files {
		if err := os.WriteFile(filepath.Join(dir, n), []byte(c), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return filepath.Join(dir, "swtpm_setup.conf"), caDir
}

// setupWithManager runs vtpmd setup with the manager m and returns the EK certificate files.
func setupWithManager(t *testing.T, m *hostManager, conf, state, vmid, certDir string) []string {
	t.Helper()
	os.MkdirAll(state, 0o700)
	os.MkdirAll(certDir, 0o700)
	cmd := exec.Command(env.bin, "setup", "--tpm2", "--tpm-state", state, "--create-ek-cert", "--create-platform-cert",
		"--vmid", vmid, "--config", conf, "--write-ek-cert-files", certDir)
	cmd.Env = append(os.Environ(), "VTPMD_MANAGER="+m.sock)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("vtpmd setup: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "sealed by the host's vtpmd manager") {
		t.Fatalf("vtpmd setup did not use the manager:\n%s", out)
	}
	certs, _ := filepath.Glob(filepath.Join(certDir, "ek-*.crt"))
	if len(certs) == 0 {
		t.Fatalf("no EK certificate written:\n%s", out)
	}
	return certs
}

func caRun(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// opensslVerify runs openssl verify on a DER or PEM certificate and wants it to pass or fail.
func opensslVerify(t *testing.T, pass bool, args ...string) {
	t.Helper()
	cert := args[len(args)-1]
	p := cert
	if b, err := os.ReadFile(cert); err == nil && !bytes.HasPrefix(b, []byte("-----")) {
		p = filepath.Join(t.TempDir(), "c.pem")
		os.WriteFile(p, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: b}), 0o600)
	}
	args = append(append([]string{"verify"}, args[:len(args)-1]...), p)
	out, err := exec.Command("openssl", args...).CombinedOutput()
	if pass && err != nil {
		t.Fatalf("openssl %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	if !pass && err == nil {
		t.Fatalf("openssl %s accepted it:\n%s", strings.Join(args, " "), out)
	}
}

func caReadCert(t *testing.T, path string) *x509.Certificate {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	cs, err := attest.CertPEMs(b)
	if err != nil || len(cs) == 0 {
		t.Fatalf("%s: %v", path, err)
	}
	return cs[0]
}

// firstDER is the first DER element of an NV certificate index (which may be padded).
func caFirstDER(t *testing.T, b []byte) []byte {
	t.Helper()
	if len(b) < 4 || b[0] != 0x30 || b[1] != 0x82 {
		t.Fatalf("not a DER certificate: % x", b[:min(len(b), 8)])
	}
	return b[:4+(int(b[2])<<8|int(b[3]))]
}

// readNVIndex reads a whole NV index of the vTPM with the owner's (empty) authorization.
func caReadNV(t *testing.T, tp transport.TPM, index uint32) []byte {
	t.Helper()
	pub, err := tpm2.NVReadPublic{NVIndex: tpm2.TPMHandle(index)}.Execute(tp)
	if err != nil {
		t.Fatalf("NV 0x%08x: %v", index, err)
	}
	info, _ := pub.NVPublic.Contents()
	var out []byte
	for len(out) < int(info.DataSize) {
		n := min(int(info.DataSize)-len(out), 512)
		r, err := tpm2.NVRead{
			AuthHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)},
			NVIndex:    tpm2.NamedHandle{Handle: tpm2.TPMHandle(index), Name: pub.NVName},
			Size:       uint16(n), Offset: uint16(len(out)),
		}.Execute(tp)
		if err != nil {
			t.Fatalf("NV 0x%08x: %v", index, err)
		}
		out = append(out, r.Data.Buffer...)
	}
	return out
}

// noPrivateKeys fails if any file under dir is a private key openssl can read, or holds a
// PEM private key.
func caNoPrivateKeys(t *testing.T, dir string) {
	t.Helper()
	filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() || !d.Type().IsRegular() {
			return nil
		}
		b, _ := os.ReadFile(p)
		if bytes.Contains(b, []byte("PRIVATE KEY")) {
			t.Errorf("%s holds a PEM private key", p)
		}
		for _, form := range []string{"PEM", "DER"} {
			if exec.Command("openssl", "pkey", "-inform", form, "-in", p, "-noout").Run() == nil {
				t.Errorf("%s is a private key (%s)", p, form)
			}
		}
		return nil
	})
}

// vtpmAKTemplate is an attestation key (restricted ECDSA P-256 signing) for the vTPM.
var vtpmAKTemplate = tpm2.TPMTPublic{
	Type: tpm2.TPMAlgECC, NameAlg: tpm2.TPMAlgSHA256,
	ObjectAttributes: tpm2.TPMAObject{FixedTPM: true, FixedParent: true, SensitiveDataOrigin: true, UserWithAuth: true,
		Restricted: true, SignEncrypt: true, NoDA: true},
	Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgECC, &tpm2.TPMSECCParms{
		Scheme: tpm2.TPMTECCScheme{Scheme: tpm2.TPMAlgECDSA,
			Details: tpm2.NewTPMUAsymScheme(tpm2.TPMAlgECDSA, &tpm2.TPMSSigSchemeECDSA{HashAlg: tpm2.TPMAlgSHA256})},
		CurveID: tpm2.TPMECCNistP256,
	}),
}

// TestAttestCAFallback: a vTPM the manager does not protect (its state encrypted with the
// operator's own --keyfile, so never enrolled) gets its EK certificate from the file-key
// local CA, as without a manager, not from the host CA.
func TestAttestCAFallback(t *testing.T) {
	need(t, "openssl")
	m := startHostManager(t)
	work := t.TempDir()
	conf, localCADir := caSetupConfig(t, work)
	state, certDir := filepath.Join(work, "vm"), filepath.Join(work, "certs")
	os.MkdirAll(state, 0o700)
	os.MkdirAll(certDir, 0o700)
	keyFile := filepath.Join(work, "key")
	os.WriteFile(keyFile, []byte(strings.Repeat("07", 16)), 0o600)
	cmd := exec.Command(env.bin, "setup", "--tpm2", "--tpm-state", state, "--create-ek-cert", "--keyfile", keyFile,
		"--vmid", "vm:0b7e9c1a-5d2f-4c3b-9e8a-1f2d3c4b5a69", "--config", conf, "--write-ek-cert-files", certDir)
	cmd.Env = append(os.Environ(), "VTPMD_MANAGER="+m.sock)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("vtpmd setup: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "The local CA issues the certificates") {
		t.Errorf("setup did not say the local CA issues:\n%s", out)
	}
	certs, _ := filepath.Glob(filepath.Join(certDir, "ek-*.crt"))
	if len(certs) == 0 {
		t.Fatalf("no EK certificate:\n%s", out)
	}
	if _, err := os.Stat(filepath.Join(localCADir, "signkey.pem")); err != nil {
		t.Fatalf("the local CA was not used: %v", err)
	}
	idDir := filepath.Join(work, "identity")
	caRun(t, env.bin, "manager", "identity", "--socket", m.sock, "--out", idDir)
	for _, c := range certs {
		opensslVerify(t, false, "-CAfile", filepath.Join(idDir, "ca-root.pem"), c)
		if strings.HasPrefix(caReadCert(t, c).Issuer.CommonName, "vtpmd host CA") {
			t.Errorf("%s: issued by the host CA", c)
		}
	}
}

// TestAttestHardwareEKCert: a stand-in hardware TPM manufactured by Debian's swtpm_setup with
// an EK certificate from Debian's swtpm_localca (the "manufacturer"): the manager reads that
// certificate from NV 0x01c00002 and derives the EK it certifies; certify-host with the
// manufacturer's roots verifies it before certifying the AK, and refuses other roots.
func TestAttestHardwareEKCert(t *testing.T) {
	need(t, "openssl", "/usr/bin/swtpm_setup", "/usr/bin/swtpm_localca")
	work := t.TempDir()
	hw := swtpmtest.Start(t)
	hw.Stop()
	conf := filepath.Join(work, "swtpm_setup.conf")
	mfr := filepath.Join(work, "manufacturer")
	os.MkdirAll(mfr, 0o700)
	for n, c := range map[string]string{
		"swtpm_setup.conf": "create_certs_tool = /usr/bin/swtpm_localca\ncreate_certs_tool_config = " + filepath.Join(work, "swtpm-localca.conf") +
			"\ncreate_certs_tool_options = " + filepath.Join(work, "swtpm-localca.options") + "\n",
		"swtpm-localca.conf": "statedir = " + mfr + "\nsigningkey = " + filepath.Join(mfr, "signkey.pem") + "\nissuercert = " +
			filepath.Join(mfr, "issuercert.pem") + "\ncertserial = " + filepath.Join(mfr, "certserial") + "\n",
		"swtpm-localca.options": "--platform-manufacturer t\n--platform-version 2.1\n--platform-model QEMU\n",
	} {
		os.WriteFile(filepath.Join(work, n), []byte(c), 0o600)
	}
	// Debian's own swtpm (a vtpmd installed as swtpm may come first in PATH)
	setup := exec.Command("/usr/bin/swtpm_setup", "--tpm2", "--tpm", swtpmtest.Binary+" socket", "--tpmstate", hw.StateDir,
		"--create-ek-cert", "--config", conf, "--overwrite")
	setup.Env = append(os.Environ(), "VTPMD_MANAGER=none")
	if out, err := setup.CombinedOutput(); err != nil {
		t.Fatalf("swtpm_setup: %v\n%s", err, out)
	}
	hw.Restart()

	sockDir, err := os.MkdirTemp("", "vtpmd-mgr-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(sockDir) })
	m := &hostManager{t: t, hw: hw, bin: env.bin, dir: t.TempDir(), sock: filepath.Join(sockDir, "manager.sock"),
		log: filepath.Join(work, "manager.log")}
	m.args = []string{"manager", "--tpm", hw.Spec(), "--dir", m.dir, "--listen", m.sock, "--group", "", "--auto-enroll"}
	m.start()

	idDir := filepath.Join(work, "identity")
	caRun(t, env.bin, "manager", "identity", "--socket", m.sock, "--out", idDir)
	ekPEM := filepath.Join(idDir, "ek.pem")
	// the manufacturer's chain: swtpm_localca's root and its intermediate
	roots := filepath.Join(work, "mfr-roots.pem")
	var b []byte
	for _, f := range []string{"swtpm-localca-rootca-cert.pem", "issuercert.pem"} {
		c, err := os.ReadFile(filepath.Join(mfr, f))
		if err != nil {
			t.Fatal(err)
		}
		b = append(b, c...)
	}
	os.WriteFile(roots, b, 0o600)
	if _, err := os.Stat(ekPEM); err != nil {
		t.Fatalf("the manager did not read the EK certificate from NV: %v", err)
	}

	opKey, opCert := filepath.Join(work, "op-key.pem"), filepath.Join(work, "op-root.pem")
	caRun(t, "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
		"-keyout", opKey, "-out", opCert, "-days", "30", "-subj", "/CN=operator root CA")
	// other roots: refused before anything is certified
	out, err := exec.Command(env.bin, "manager", "certify-host", "--socket", m.sock, "--ca-cert", opCert, "--ca-key", opKey,
		"--ek-roots", opCert).CombinedOutput()
	if err == nil {
		t.Fatalf("certify-host accepted an EK certificate against other roots:\n%s", out)
	}
	out2 := caRun(t, env.bin, "manager", "certify-host", "--socket", m.sock, "--ca-cert", opCert, "--ca-key", opKey, "--ek-roots", roots)
	if !strings.Contains(out2, "verified against the manufacturers' roots") {
		t.Fatalf("certify-host:\n%s", out2)
	}
	t.Logf("refused with other roots: %s", strings.TrimSpace(string(out)))
}
