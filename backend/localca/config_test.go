package localca

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

func TestParseConfig(t *testing.T) {
	t.Setenv("CA_ROOT", "/srv/ca")
	cases := []struct {
		name, in string
		want     Config
		err      bool
	}{
		{name: "debian", in: "statedir = /var/lib/swtpm-localca\nsigningkey = /var/lib/swtpm-localca/signkey.pem\nissuercert = /var/lib/swtpm-localca/issuercert.pem\ncertserial = /var/lib/swtpm-localca/certserial\n",
			want: DefaultConfig()},
		{name: "env, comments, blanks, default serial", in: "# CA\n\n  statedir=${CA_ROOT}\nsigningkey =${CA_ROOT}/k.pem\nissuercert= ${CA_ROOT}/c.pem\nstatedir = /ignored\n",
			want: Config{StateDir: "/srv/ca", SigningKey: "/srv/ca/k.pem", IssuerCert: "/srv/ca/c.pem", CertSerial: "/srv/ca/certserial"}},
		{name: "missing issuercert", in: "statedir = /a\nsigningkey = /a/k\n", err: true},
		{name: "no equals: ignored, so statedir is missing", in: "statedir /a\n", err: true},
		{name: "inline comments, stray lines", in: "statedir = /c # the CA\nnot an assignment\nsigningkey=/c/k.pem#x\nissuercert = /c/i.pem\n",
			want: Config{StateDir: "/c", SigningKey: "/c/k.pem", IssuerCert: "/c/i.pem", CertSerial: "/c/certserial"}},
		{name: "pkcs11 key", in: "statedir = /a\nsigningkey = pkcs11:token=x\nissuercert = /a/c\n", err: true},
		{name: "tpm key", in: "statedir = /a\nsigningkey = tpmkey:uuid=1\nissuercert = /a/c\n", err: true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseConfig([]byte(tc.in))
			if tc.err {
				if !errors.Is(err, ErrConfig) {
					t.Fatalf("err %v, want ErrConfig", err)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("got %+v, %v; want %+v", got, err, tc.want)
			}
		})
	}
}

func TestParseOptions(t *testing.T) {
	p, err := ParseOptions([]byte("--platform-manufacturer Fedora\n--platform-version 2.1\n--platform-model QEMU\n"))
	if err != nil || p != DefaultPlatform {
		t.Fatalf("debian options: %+v, %v", p, err)
	}
	for _, bad := range []string{"--platform-model", "--subject x", "stray"} {
		if _, err := ParseOptions([]byte(bad)); !errors.Is(err, ErrConfig) {
			t.Errorf("%q: %v, want ErrConfig", bad, err)
		}
	}
	if p, err := LoadOptions(filepath.Join(t.TempDir(), "none")); err != nil || p != (Platform{}) {
		t.Fatalf("missing options file: %+v, %v", p, err)
	}
}

func TestLoadConfigTooLarge(t *testing.T) {
	p := filepath.Join(t.TempDir(), "big.conf")
	os.WriteFile(p, []byte(strings.Repeat("#", maxConfigSize+1)), 0o600)
	if _, err := LoadConfig(p); !errors.Is(err, ErrConfig) {
		t.Fatalf("oversized config: %v", err)
	}
}

func FuzzParseConfig(f *testing.F) {
	f.Add([]byte("statedir = /a\nsigningkey = /a/k\nissuercert = /a/c\n"))
	f.Add([]byte("statedir=${HOME}\n#x\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := ParseConfig(data)
		if err != nil {
			if !errors.Is(err, ErrConfig) {
				t.Fatalf("error without ErrConfig: %v", err)
			}
			return
		}
		if c.StateDir == "" || c.SigningKey == "" || c.IssuerCert == "" || c.CertSerial == "" {
			t.Fatalf("accepted config with an empty path: %+v", c)
		}
	})
}

func FuzzParseOptions(f *testing.F) {
	f.Add([]byte("--platform-manufacturer Fedora\n--platform-version 2.1\n--platform-model QEMU\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		if _, err := ParseOptions(data); err != nil && !errors.Is(err, ErrConfig) {
			t.Fatalf("error without ErrConfig: %v", err)
		}
	})
}

// swtpmLocalCA is Debian's swtpm_localca, for interop in both directions.
func swtpmLocalCA(t *testing.T) string {
	t.Helper()
	p := "/usr/bin/swtpm_localca"
	if _, err := os.Stat(p); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("Debian's swtpm_localca is missing in CI (swtpm-tools)")
		}
		t.Skip("swtpm_localca not installed")
	}
	return p
}

func writeConfig(t *testing.T, cfg Config) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "swtpm-localca.conf")
	content := "statedir = " + cfg.StateDir + "\nsigningkey = " + cfg.SigningKey + "\nissuercert = " + cfg.IssuerCert + "\ncertserial = " + cfg.CertSerial + "\n"
	if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// runLocalCA has swtpm_localca issue an EK certificate over key and returns it.
func runLocalCA(t *testing.T, bin, conf string, key *rsa.PublicKey) *x509.Certificate {
	t.Helper()
	out := t.TempDir()
	opts := filepath.Join(t.TempDir(), "opts")
	os.WriteFile(opts, []byte("--platform-manufacturer Fedora\n"), 0o600)
	cmd := exec.Command(bin, "--type", "ek", "--ek", key.N.Text(16), "--dir", out, "--vmid", "interop",
		"--tpm-spec-family", "2.0", "--tpm-spec-level", "0", "--tpm-spec-revision", "164",
		"--tpm-manufacturer", "id:00001014", "--tpm-model", "swtpm", "--tpm-version", "id:20191023",
		"--tpm2", "--configfile", conf, "--optsfile", opts)
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("swtpm_localca: %v\n%s", err, b)
	}
	der, err := os.ReadFile(filepath.Join(out, "ek.cert"))
	if err != nil {
		t.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// TestSwtpmLocalCAInterop: a CA that Debian's swtpm_localca created keeps signing under
// vtpmd, with the serial counter shared; and a CA vtpmd created is usable by swtpm_localca.
func TestSwtpmLocalCAInterop(t *testing.T) {
	bin := swtpmLocalCA(t)
	key, _ := rsa.GenerateKey(rand.Reader, 2048)

	t.Run("swtpm's CA signs in vtpmd", func(t *testing.T) {
		cfg := testConfig(t.TempDir())
		first := runLocalCA(t, bin, writeConfig(t, cfg), &key.PublicKey) // creates the CA
		ca := mustOpen(t, cfg)
		if ca.Created {
			t.Fatal("vtpmd created a CA over swtpm_localca's")
		}
		der, err := ca.IssueEK(context.Background(), EKRequest{PublicKey: &key.PublicKey, VMID: "interop", TPM: testTPM})
		if err != nil {
			t.Fatal(err)
		}
		c, _ := x509.ParseCertificate(der)
		roots, inter := rootPool(t, ca)
		if _, err := Verify(c, roots, inter); err != nil {
			t.Fatal(err)
		}
		if c.SerialNumber.Int64() != first.SerialNumber.Int64()+1 {
			t.Fatalf("serial %v after swtpm_localca's %v", c.SerialNumber, first.SerialNumber)
		}
		if _, err := Verify(first, roots, inter); err != nil {
			t.Fatalf("swtpm_localca's certificate under the same roots: %v", err)
		}
	})
	t.Run("vtpmd's CA signs in swtpm_localca", func(t *testing.T) {
		cfg := copyCA(t)
		ca := mustOpen(t, cfg)
		c := runLocalCA(t, bin, writeConfig(t, cfg), &key.PublicKey)
		roots, inter := rootPool(t, ca)
		if _, err := Verify(c, roots, inter); err != nil {
			t.Fatalf("swtpm_localca with vtpmd's CA: %v", err)
		}
	})
}

func FuzzParseSigner(f *testing.F) {
	key, _ := rsa.GenerateKey(rand.Reader, 1024)
	f.Add(pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(key)}))
	f.Add([]byte("Public Key Info:\n\tgarbage\n-----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY-----\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		s, err := ParseSigner(data)
		if err != nil {
			if !errors.Is(err, ErrSigningKey) {
				t.Fatalf("error without ErrSigningKey: %v", err)
			}
			return
		}
		if s.Public() == nil {
			t.Fatal("signer without a public key")
		}
	})
}
