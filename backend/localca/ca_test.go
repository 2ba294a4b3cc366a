package localca

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
)

// swtpm_cert 0.7.1's encodings of the TPM attributes for id:00001014 / swtpm / id:20191023
// and of tpmSpecification 2.0 level 0 revision 164 (read off a certificate Debian's
// swtpm_localca issued).
const (
	swtpmSANHex = "3046a444304231163014060567810502010c0b69643a30303030313031343110300e060567810502020c05737774706d31163014060567810502030c0b69643a3230313931303233"
	swtpmSDAHex = "3019301706056781050210310e300c0c03322e30020100020200a4"
)

var testTPM = TPMInfo{Family: "2.0", Level: 0, Revision: 164, Manufacturer: "id:00001014", Model: "swtpm", Version: "id:20191023", TPM2: true}

// sharedCA is created once: RSA-3072 key generation is the slow part.
var (
	sharedOnce sync.Once
	sharedDir  string
	sharedErr  error
)

func testConfig(dir string) Config {
	return Config{StateDir: dir, SigningKey: filepath.Join(dir, "signkey.pem"),
		IssuerCert: filepath.Join(dir, "issuercert.pem"), CertSerial: filepath.Join(dir, "certserial")}
}

func TestMain(m *testing.M) {
	code := m.Run()
	if sharedDir != "" {
		os.RemoveAll(sharedDir)
	}
	os.Exit(code)
}

// copyCA gives a test its own copy of the shared CA.
func copyCA(t *testing.T) Config {
	t.Helper()
	sharedOnce.Do(func() {
		sharedDir, sharedErr = os.MkdirTemp("", "localca-")
		if sharedErr == nil {
			_, sharedErr = Open(context.Background(), testConfig(sharedDir), nil)
		}
	})
	if sharedErr != nil {
		t.Fatal(sharedErr)
	}
	dir := t.TempDir()
	ents, _ := os.ReadDir(sharedDir)
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join(sharedDir, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, e.Name()), b, 0o640); err != nil {
			t.Fatal(err)
		}
	}
	return testConfig(dir)
}

func mustOpen(t *testing.T, cfg Config) *CA {
	t.Helper()
	ca, err := Open(context.Background(), cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	return ca
}

func extension(t *testing.T, c *x509.Certificate, id []int) ([]byte, bool) {
	t.Helper()
	for _, e := range c.Extensions {
		if e.Id.Equal(id) {
			return e.Value, e.Critical
		}
	}
	t.Fatalf("certificate has no extension %v", id)
	return nil, false
}

func rootPool(t *testing.T, ca *CA) (*x509.CertPool, *x509.CertPool) {
	t.Helper()
	root, err := loadCert(ca.RootCertPath())
	if err != nil {
		t.Fatal(err)
	}
	roots, inter := x509.NewCertPool(), x509.NewCertPool()
	roots.AddCert(root)
	inter.AddCert(ca.Issuer())
	return roots, inter
}

// verified parses an issued certificate and verifies it against the CA.
func verified(t *testing.T, der []byte, err error, roots, inter *x509.CertPool) *x509.Certificate {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Verify(c, roots, inter); err != nil {
		t.Fatalf("verify: %v", err)
	}
	return c
}

func TestCreatedCAIssuesVerifiableEKCertificates(t *testing.T) {
	cfg := copyCA(t)
	ca := mustOpen(t, cfg)
	roots, inter := rootPool(t, ca)
	rsaKey, _ := rsa.GenerateKey(rand.Reader, 2048)
	ecKey, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	cases := []struct {
		name          string
		pub           any
		sign, decrypt bool
		wantUsage     x509.KeyUsage
	}{
		{"rsa2048", &rsaKey.PublicKey, false, false, x509.KeyUsageKeyEncipherment},
		{"p384", &ecKey.PublicKey, false, false, x509.KeyUsageKeyAgreement},
		{"rsa signing", &rsaKey.PublicKey, true, false, x509.KeyUsageDigitalSignature},
		{"rsa signing+decryption", &rsaKey.PublicKey, true, true, x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment},
		{"p384 signing+decryption", &ecKey.PublicKey, true, true, x509.KeyUsageDigitalSignature | x509.KeyUsageKeyAgreement},
	}
	var serials []string
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			der, err := ca.IssueEK(context.Background(), EKRequest{PublicKey: tc.pub, VMID: "vm+1,a", TPM: testTPM,
				AllowSigning: tc.sign, Decryption: tc.decrypt})
			c := verified(t, der, err, roots, inter)
			if c.Subject.CommonName != "vm_1_a" || len(c.Subject.OrganizationalUnit) != 1 || c.Subject.OrganizationalUnit[0] != VirtualTPMUnit {
				t.Fatalf("subject %v", c.Subject)
			}
			if c.KeyUsage != tc.wantUsage {
				t.Fatalf("key usage %b, want %b", c.KeyUsage, tc.wantUsage)
			}
			if len(c.UnknownExtKeyUsage) != 1 || !c.UnknownExtKeyUsage[0].Equal(oidEKCertificate) {
				t.Fatalf("EKU %v", c.UnknownExtKeyUsage)
			}
			san, crit := extension(t, c, oidSubjectAltName)
			if !crit || hex.EncodeToString(san) != swtpmSANHex {
				t.Fatalf("SAN critical=%v %x, want swtpm's %s", crit, san, swtpmSANHex)
			}
			if sda, _ := extension(t, c, oidSubjectDirectoryAttrs); hex.EncodeToString(sda) != swtpmSDAHex {
				t.Fatalf("subjectDirectoryAttributes %x, want swtpm's %s", sda, swtpmSDAHex)
			}
			if c.IsCA || !c.BasicConstraintsValid || c.NotAfter.Year() != 9999 {
				t.Fatalf("CA=%v constraints=%v notAfter=%v", c.IsCA, c.BasicConstraintsValid, c.NotAfter)
			}
			if !publicKeysEqual(c.PublicKey, tc.pub) {
				t.Fatal("certificate is not over the EK")
			}
			serials = append(serials, c.SerialNumber.String())
		})
	}
	if strings.Join(serials, ",") != "2,3,4,5,6" {
		t.Fatalf("serials %v, want 2..6 as swtpm_localca counts from a missing counter", serials)
	}
}

func TestPlatformCertificate(t *testing.T) {
	ca := mustOpen(t, copyCA(t))
	roots, inter := rootPool(t, ca)
	key, _ := rsa.GenerateKey(rand.Reader, 2048)
	der, err := ca.IssuePlatform(context.Background(), PlatformRequest{PublicKey: &key.PublicKey, VMID: "vm", TPM: testTPM, Platform: DefaultPlatform})
	c := verified(t, der, err, roots, inter)
	if len(c.UnknownExtKeyUsage) != 1 || !c.UnknownExtKeyUsage[0].Equal(oidPlatformCertificate) {
		t.Fatalf("EKU %v", c.UnknownExtKeyUsage)
	}
	san, _ := extension(t, c, oidSubjectAltName)
	for _, v := range []string{"Fedora", "QEMU", "2.1"} {
		if !bytes.Contains(san, []byte(v)) {
			t.Fatalf("SAN %x lacks %q", san, v)
		}
	}
	if _, err := ca.IssuePlatform(context.Background(), PlatformRequest{PublicKey: &key.PublicKey, TPM: testTPM}); !errors.Is(err, ErrRequest) {
		t.Fatalf("platform certificate without platform fields: %v", err)
	}
}

func TestOpenRefusesBrokenCA(t *testing.T) {
	other := copyCA(t)
	// an issuer certificate for another key
	key, _ := rsa.GenerateKey(rand.Reader, 2048)
	pemKey := pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(key)})
	cases := []struct {
		name  string
		setup func(cfg Config)
		want  error
	}{
		{"garbage key", func(cfg Config) { os.WriteFile(cfg.SigningKey, []byte("not a key"), 0o600) }, ErrSigningKey},
		{"key of another CA", func(cfg Config) { os.WriteFile(cfg.SigningKey, pemKey, 0o600) }, ErrIssuerCert},
		{"missing issuer", func(cfg Config) { os.Remove(cfg.IssuerCert) }, ErrIssuerCert},
		{"truncated issuer", func(cfg Config) {
			b, _ := os.ReadFile(other.IssuerCert)
			os.WriteFile(cfg.IssuerCert, b[:len(b)/2], 0o600)
		}, ErrIssuerCert},
		{"encrypted key", func(cfg Config) {
			os.WriteFile(cfg.SigningKey, []byte("-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n"), 0o600)
		}, ErrSigningKey},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			cfg := copyCA(t)
			tc.setup(cfg)
			before := snapshot(t, cfg.StateDir)
			if _, err := Open(context.Background(), cfg, nil); !errors.Is(err, tc.want) {
				t.Fatalf("Open: %v, want %v", err, tc.want)
			}
			if after := snapshot(t, cfg.StateDir); after != before {
				t.Fatalf("a refused CA was changed:\n%s\n%s", before, after)
			}
		})
	}
}

func snapshot(t *testing.T, dir string) string {
	t.Helper()
	var b strings.Builder
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		data, _ := os.ReadFile(filepath.Join(dir, e.Name()))
		fmt.Fprintf(&b, "%s %x\n", e.Name(), data)
	}
	return b.String()
}

func TestSerialsAreUniqueUnderConcurrency(t *testing.T) {
	ca := mustOpen(t, copyCA(t))
	const n = 40
	var mu sync.Mutex
	seen := map[string]bool{}
	var wg sync.WaitGroup
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// a second CA value on the same files: the flock, not a mutex, must serialize
			other := mustOpen(t, ca.cfg)
			s, err := other.NextSerial(context.Background())
			if err != nil {
				t.Error(err)
				return
			}
			mu.Lock()
			defer mu.Unlock()
			if seen[s.String()] {
				t.Errorf("serial %s handed out twice", s)
			}
			seen[s.String()] = true
		}()
	}
	wg.Wait()
	if len(seen) != n {
		t.Fatalf("%d distinct serials, want %d", len(seen), n)
	}
	b, _ := os.ReadFile(ca.cfg.CertSerial)
	if string(b) != fmt.Sprint(n+1) {
		t.Fatalf("counter %q, want %d", b, n+1)
	}
}

func TestSerialCounterQuirks(t *testing.T) {
	for _, tc := range []struct{ content, want string }{
		{"41", "42"}, {"41\n", "42"}, {"abc", "1"}, {"", "1"}, {"-5", "1"},
		{"18446744073709551615", "18446744073709551616"}, // beyond uint64: swtpm 0.9+ counters are 20 digits
	} {
		cfg := copyCA(t)
		os.WriteFile(cfg.CertSerial, []byte(tc.content), 0o644)
		s, err := mustOpen(t, cfg).NextSerial(context.Background())
		if err != nil || s.String() != tc.want {
			t.Errorf("counter %q: next %v, %v; want %s", tc.content, s, err, tc.want)
		}
		if b, _ := os.ReadFile(cfg.CertSerial); string(b) != tc.want {
			t.Errorf("counter %q: stored %q", tc.content, b)
		}
	}
	// a counter at the 20-octet limit restarts at a random 20-digit number
	cfg := copyCA(t)
	max := new(big.Int).Sub(new(big.Int).Lsh(big.NewInt(1), maxSerialBits), big.NewInt(1))
	os.WriteFile(cfg.CertSerial, []byte(max.String()), 0o644)
	s, err := mustOpen(t, cfg).NextSerial(context.Background())
	if err != nil || len(s.String()) != 20 {
		t.Fatalf("after the limit: %v, %v", s, err)
	}
}

// TestSerialCounterKeepsOwner: replacing certserial as root leaves it to the user who owned it
// (libvirt's swtpm_localca runs as tss and must still be able to write it).
func TestSerialCounterKeepsOwner(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to give the file away")
	}
	cfg := copyCA(t)
	os.WriteFile(cfg.CertSerial, []byte("7"), 0o664)
	os.Chown(cfg.CertSerial, 65534, 65534)
	os.Chmod(cfg.CertSerial, 0o664)
	if _, err := mustOpen(t, cfg).NextSerial(context.Background()); err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(cfg.CertSerial)
	if err != nil {
		t.Fatal(err)
	}
	sys := st.Sys().(*syscall.Stat_t)
	if sys.Uid != 65534 || sys.Gid != 65534 || st.Mode().Perm() != 0o664 {
		t.Fatalf("certserial now %d:%d %v, want 65534:65534 0664", sys.Uid, sys.Gid, st.Mode().Perm())
	}
}

func TestCancelledLockWait(t *testing.T) {
	cfg := copyCA(t)
	ca := mustOpen(t, cfg)
	unlock, err := lockCA(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer unlock()
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := ca.NextSerial(ctx); !errors.Is(err, context.Canceled) {
		t.Fatalf("NextSerial while locked with a cancelled context: %v", err)
	}
}

// TestOpensslVerifies checks the chain with an independent implementation.
func TestOpensslVerifies(t *testing.T) {
	openssl, err := exec.LookPath("openssl")
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("openssl missing in CI")
		}
		t.Skip("openssl not installed")
	}
	cfg := copyCA(t)
	ca := mustOpen(t, cfg)
	key, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	der, err := ca.IssueEK(context.Background(), EKRequest{PublicKey: &key.PublicKey, VMID: "x", TPM: testTPM})
	if err != nil {
		t.Fatal(err)
	}
	ek := filepath.Join(t.TempDir(), "ek.pem")
	os.WriteFile(ek, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600)
	out, err := exec.Command(openssl, "verify", "-CAfile", ca.RootCertPath(), "-untrusted", cfg.IssuerCert, ek).CombinedOutput()
	if err != nil || !strings.Contains(string(out), ": OK") {
		t.Fatalf("openssl verify: %v\n%s", err, out)
	}
}

// TestTPM12Certificates: TPM 1.2 certificates have an empty subject, an encipherment-only EK,
// the 1.2 tpmSpecification and, for the platform, TPM and platform attributes in one SAN, as
// swtpm_cert writes them.
func TestTPM12Certificates(t *testing.T) {
	ca := mustOpen(t, copyCA(t))
	roots, inter := rootPool(t, ca)
	info := TPMInfo{Family: "1.2", Level: 2, Revision: 116, Manufacturer: "id:00001014", Model: "swtpm", Version: "id:00740001"}
	key, _ := rsa.GenerateKey(rand.Reader, 2048)
	der, err := ca.IssueEK(context.Background(), EKRequest{PublicKey: &key.PublicKey, VMID: "ignored", TPM: info})
	if err != nil {
		t.Fatal(err)
	}
	c, _ := x509.ParseCertificate(der)
	if _, err := Verify(c, roots, inter); err != nil {
		t.Fatal(err)
	}
	if len(c.RawSubject) != 2 || c.KeyUsage != x509.KeyUsageKeyEncipherment {
		t.Fatalf("subject %x, key usage %b", c.RawSubject, c.KeyUsage)
	}
	// swtpm_cert's tpmSpecification for family 1.2 level 2 revision 116
	if sda, _ := extension(t, c, oidSubjectDirectoryAttrs); hex.EncodeToString(sda) != "3018301606056781050210310d300b0c03312e32020102020174" {
		t.Fatalf("1.2 subjectDirectoryAttributes %x", sda)
	}
	der, err = ca.IssuePlatform(context.Background(), PlatformRequest{PublicKey: &key.PublicKey, TPM: info, Platform: DefaultPlatform})
	if err != nil {
		t.Fatal(err)
	}
	p, _ := x509.ParseCertificate(der)
	san, _ := extension(t, p, oidSubjectAltName)
	// swtpm_cert's six-RDN SAN for TPM 1.2 platform certificates
	want := "307ea47c307a304231163014060567810502010c0b69643a30303030313031343110300e060567810502020c05737774706d31163014060567810502030c0b69643a3030373430303031" +
		"30343111300f060567810502040c064665646f7261310f300d060567810502050c0451454d55310e300c060567810502060c03322e31"
	if hex.EncodeToString(san) != want {
		t.Fatalf("1.2 platform SAN\n%x\nwant\n%s", san, want)
	}
}
