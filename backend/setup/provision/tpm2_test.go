//go:build cgo

// These tests run against libtpms itself (emulator/libtpms, cgo); the package does not need it.

package provision

import (
	"bytes"
	"context"
	"crypto"
	"crypto/x509"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"testing"

	"github.com/vtpmd/vtpmd/emulator/libtpms"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/vtpmd/vtpmd/backend/localca"
	"github.com/vtpmd/vtpmd/backend/store"
	"github.com/vtpmd/vtpmd/emulator"
	"github.com/vtpmd/vtpmd/internal/tpmclient"
)

// startTPM starts libtpms in-process on mem (empty: a new TPM) and sends TPM2_Startup(CLEAR).
func startTPM(t *testing.T, mem *emulator.MemStore) (*libtpms.Engine, transport.TPM) {
	t.Helper()
	eng, err := libtpms.Open(emulator.TPM2, mem, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(eng.Close)
	if err := eng.Start(); err != nil {
		t.Fatal(err)
	}
	tpm := tpmclient.SendFunc(eng.Process)
	if err := tpmclient.Startup(tpm); err != nil {
		t.Fatal(err)
	}
	return eng, tpm
}

// restart powers the TPM off and on again (Startup(CLEAR)).
func restart(t *testing.T, eng *libtpms.Engine, tpm transport.TPM) {
	t.Helper()
	eng.Stop()
	if err := eng.Start(); err != nil {
		t.Fatal(err)
	}
	if err := tpmclient.Startup(tpm); err != nil {
		t.Fatal(err)
	}
}

// caCertifier adapts the local CA.
type caCertifier struct {
	ca *localca.CA
}

var info = localca.TPMInfo{Family: "2.0", Revision: 164, Manufacturer: "id:00001014", Model: "swtpm", Version: "id:20191023", TPM2: true}

func (c caCertifier) EKCertificate(ctx context.Context, ek crypto.PublicKey, sign, dec bool) ([]byte, error) {
	return c.ca.IssueEK(ctx, localca.EKRequest{PublicKey: ek, VMID: "test", TPM: info, AllowSigning: sign, Decryption: dec})
}

func (c caCertifier) PlatformCertificate(ctx context.Context, ek crypto.PublicKey) ([]byte, error) {
	return c.ca.IssuePlatform(ctx, localca.PlatformRequest{PublicKey: ek, VMID: "test", TPM: info, Platform: localca.DefaultPlatform})
}

var (
	caOnce sync.Once
	ca     *localca.CA
	caErr  error
)

func testCA(t *testing.T) *localca.CA {
	t.Helper()
	caOnce.Do(func() {
		dir, err := os.MkdirTemp("", "provision-ca-")
		if err != nil {
			caErr = err
			return
		}
		ca, caErr = localca.Open(context.Background(), localca.Config{StateDir: dir, SigningKey: filepath.Join(dir, "k.pem"),
			IssuerCert: filepath.Join(dir, "c.pem"), CertSerial: filepath.Join(dir, "serial")}, nil)
	})
	if caErr != nil {
		t.Fatal(caErr)
	}
	return ca
}

func readPublic(t *testing.T, tpm transport.TPM, h tpm2.TPMHandle) tpm2.TPMTPublic {
	t.Helper()
	r, err := tpm2.ReadPublic{ObjectHandle: h}.Execute(tpm)
	if err != nil {
		t.Fatalf("ReadPublic 0x%x: %v", uint32(h), err)
	}
	p, err := r.OutPublic.Contents()
	if err != nil {
		t.Fatal(err)
	}
	return *p
}

func readNV(t *testing.T, tpm transport.TPM, index uint32) ([]byte, tpm2.TPMSNVPublic) {
	t.Helper()
	rp, err := tpm2.NVReadPublic{NVIndex: tpm2.TPMHandle(index)}.Execute(tpm)
	if err != nil {
		t.Fatalf("NVReadPublic 0x%x: %v", index, err)
	}
	pub, _ := rp.NVPublic.Contents()
	var out []byte
	for off := uint16(0); off < pub.DataSize; {
		n := min(pub.DataSize-off, 1024)
		r, err := tpm2.NVRead{
			AuthHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)},
			NVIndex:    tpm2.NamedHandle{Handle: tpm2.TPMHandle(index), Name: rp.NVName},
			Size:       n, Offset: off,
		}.Execute(tpm)
		if err != nil {
			t.Fatalf("NVRead 0x%x: %v", index, err)
		}
		out = append(out, r.Data.Buffer...)
		off += n
	}
	return out, *pub
}

func TestTPM2ManufacturesLikeSwtpmSetup(t *testing.T) {
	cases := []struct {
		name      string
		bits      int
		firstEK   tpm2.TPMHandle
		firstCert uint32
		banks     []string
	}{
		{"rsa2048 libvirt default", 2048, HandleEKRSA2048, IndexEKCertRSA2048, []string{"sha256"}},
		{"rsa3072, two banks", 3072, HandleEKRSA3072, IndexEKCertRSA3072, []string{"sha1", "sha256"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			eng, tpm := startTPM(t, emulator.NewMemStore())
			res, err := TPM2(context.Background(), tpm, Options{CreateEK: true, RSAKeyBits: tc.bits, EKCert: true, PlatformCert: true,
				LockNVRAM: true, PCRBanks: tc.banks, Certifier: caCertifier{testCA(t)}})
			if err != nil {
				t.Fatal(err)
			}
			if len(res.EKs) != 2 || res.PlatformCert == nil {
				t.Fatalf("made %d EKs, platform cert %v", len(res.EKs), res.PlatformCert != nil)
			}
			restart(t, eng, tpm)
			for _, ek := range []struct {
				h     tpm2.TPMHandle
				index uint32
				got   EK
			}{{tc.firstEK, tc.firstCert, res.EKs[0]}, {HandleEKP384, IndexEKCertP384, res.EKs[1]}} {
				pub, err := tpm2.Pub(readPublic(t, tpm, ek.h))
				if err != nil {
					t.Fatal(err)
				}
				der, nvpub := readNV(t, tpm, ek.index)
				if !bytes.Equal(der, ek.got.Cert) {
					t.Fatalf("NV 0x%x does not hold the issued certificate", ek.index)
				}
				cert, err := x509.ParseCertificate(der)
				if err != nil {
					t.Fatal(err)
				}
				if !cert.PublicKey.(interface{ Equal(crypto.PublicKey) bool }).Equal(pub) {
					t.Fatalf("certificate in 0x%x is not over the EK at 0x%x", ek.index, uint32(ek.h))
				}
				// swtpm_setup's attributes after writing and locking: 0x62072801
				if a := binaryAttrs(nvpub.Attributes); a != 0x62072801 {
					t.Fatalf("NV 0x%x attributes 0x%08x, want 0x62072801", ek.index, a)
				}
			}
			if _, nvpub := readNV(t, tpm, IndexPlatformCert); binaryAttrs(nvpub.Attributes) != 0x62072801 {
				t.Fatal("platform certificate index attributes")
			}
			// a locked index refuses writes
			if err := rawPlatformWrite(tpm, IndexPlatformCert); err == nil {
				t.Fatal("write to a locked certificate index succeeded")
			}
			if tc.bits == 2048 {
				// go-tpm's EK helper way: recreate the EK from go-tpm's TCG RSA EK template and
				// compare it with the key the NV certificate certifies
				k, err := tpmclient.CreatePrimary(tpm, tpm2.TPMRHEndorsement, tpm2.RSAEKTemplate)
				if err != nil {
					t.Fatal(err)
				}
				tpmclient.Flush(tpm, k.Handle)
				pub, _ := tpm2.Pub(k.Public)
				der, _ := readNV(t, tpm, IndexEKCertRSA2048)
				cert, _ := x509.ParseCertificate(der)
				if !cert.PublicKey.(interface{ Equal(crypto.PublicKey) bool }).Equal(pub) {
					t.Fatal("the EK from go-tpm's RSAEKTemplate is not the certified EK")
				}
			}
			active := activeBanks(t, tpm)
			if !slices.Equal(active, tc.banks) {
				t.Fatalf("active banks %v, want %v", active, tc.banks)
			}
		})
	}
}

// rawPlatformWrite writes one byte to a defined index with platform authorization.
func rawPlatformWrite(tpm transport.TPM, index uint32) error {
	rp, err := tpm2.NVReadPublic{NVIndex: tpm2.TPMHandle(index)}.Execute(tpm)
	if err != nil {
		return err
	}
	_, err = tpm2.NVWrite{AuthHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHPlatform, Auth: tpm2.PasswordAuth(nil)},
		NVIndex: tpm2.NamedHandle{Handle: tpm2.TPMHandle(index), Name: rp.NVName}, Data: tpm2.TPM2BMaxNVBuffer{Buffer: []byte{1}}}.Execute(tpm)
	return err
}

func binaryAttrs(a tpm2.TPMANV) uint32 {
	b := tpm2.Marshal(a)
	return uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])
}

func activeBanks(t *testing.T, tpm transport.TPM) []string {
	t.Helper()
	sel, err := pcrAllocation(tpm)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, s := range sel.PCRSelections {
		if slices.ContainsFunc(s.PCRSelect, func(b byte) bool { return b != 0 }) {
			for name, alg := range bankAlgs {
				if alg == s.Hash {
					out = append(out, name)
				}
			}
		}
	}
	slices.Sort(out)
	return out
}

// TestEKAlgorithms: swtpm master's --ek1keyalgo/--ek2keyalgo choices, P-256 among them, made
// from the TCG template (go-tpm's ECCEKTemplate is the same L-2 template).
func TestEKAlgorithms(t *testing.T) {
	_, tpm := startTPM(t, emulator.NewMemStore())
	res, err := TPM2(context.Background(), tpm, Options{CreateEK: true, EK1: "secp256r1", EK2: "rsa3072", EKCert: true, Certifier: caCertifier{testCA(t)}})
	if err != nil {
		t.Fatal(err)
	}
	if len(res.EKs) != 2 || res.EKs[0].Kind != "secp256r1" || res.EKs[0].Handle != HandleEKP256 || res.EKs[0].CertIndex != IndexEKCertP256 || res.EKs[1].Kind != "rsa3072" {
		t.Fatalf("EKs %+v", res.EKs)
	}
	if err := tpmclient.Startup(tpm); err != nil {
		t.Fatal(err)
	}
	k, err := tpmclient.CreatePrimary(tpm, tpm2.TPMRHEndorsement, tpm2.ECCEKTemplate)
	if err != nil {
		t.Fatal(err)
	}
	tpmclient.Flush(tpm, k.Handle)
	pub, _ := tpm2.Pub(k.Public)
	if !res.EKs[0].Public.(interface{ Equal(crypto.PublicKey) bool }).Equal(pub) {
		t.Fatal("the P-256 EK is not what go-tpm's ECCEKTemplate makes")
	}
	if !bytes.Equal(tpm2.Marshal(readPublic(t, tpm, HandleEKP256)), tpm2.Marshal(k.Public)) {
		t.Fatal("persisted P-256 EK differs")
	}
	// the same algorithm twice is one EK; unknown names are refused
	for _, o := range []Options{{CreateEK: true, EK1: "secp521r1"}, {CreateEK: true, EK2: "dsa"}} {
		if _, err := TPM2(context.Background(), tpm, o); !errors.Is(err, ErrOptions) {
			t.Errorf("%+v: %v", o, err)
		}
	}
	if specs, _ := ekSpecs(Options{EK1: "secp384r1"}); len(specs) != 1 {
		t.Fatalf("EK1 = EK2 = secp384r1 makes %d EKs", len(specs))
	}
}

func TestSigningEKStoresItsTemplate(t *testing.T) {
	first, tpm := startTPM(t, emulator.NewMemStore())
	res, err := TPM2(context.Background(), tpm, Options{CreateEK: true, AllowSigning: true, EKCert: true, Certifier: caCertifier{testCA(t)}})
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(res.EKs[0].Cert)
	if cert.KeyUsage != x509.KeyUsageDigitalSignature {
		t.Fatalf("signing EK certificate key usage %b", cert.KeyUsage)
	}
	if err := tpmclient.Startup(tpm); err != nil {
		t.Fatal(err)
	}
	tmpl, _ := readNV(t, tpm, IndexEKTemplateRSA2048)
	if !bytes.Equal(tmpl, tpm2.Marshal(EKTemplateRSA(2048, true, false))) {
		t.Fatal("NV 0x01c00004 does not hold the signing EK's template")
	}
	if p := readPublic(t, tpm, HandleEKRSA2048); !p.ObjectAttributes.SignEncrypt || p.ObjectAttributes.Restricted || p.ObjectAttributes.Decrypt {
		t.Fatalf("signing EK attributes %+v", p.ObjectAttributes)
	}
	if err := rawPlatformWrite(tpm, IndexEKTemplateRSA2048); err != nil {
		t.Fatalf("template index without --lock-nvram: %v", err)
	}
	// with --lock-nvram the template index is write-locked too, as swtpm_setup does
	first.Close()
	_, tpm = startTPM(t, emulator.NewMemStore())
	if _, err := TPM2(context.Background(), tpm, Options{CreateEK: true, AllowSigning: true, LockNVRAM: true}); err != nil {
		t.Fatal(err)
	}
	if err := rawPlatformWrite(tpm, IndexEKTemplateRSA2048); err == nil {
		t.Fatal("template index writable after --lock-nvram")
	}
}

func TestBadOptions(t *testing.T) {
	_, tpm := startTPM(t, emulator.NewMemStore())
	if _, err := TPM2(context.Background(), tpm, Options{CreateEK: true, RSAKeyBits: 1024}); !errors.Is(err, ErrOptions) {
		t.Fatalf("1024-bit EK: %v", err)
	}
	if _, err := TPM2(context.Background(), tpm, Options{CreateEK: true, EKCert: true}); !errors.Is(err, ErrOptions) {
		t.Fatalf("certificates without a CA: %v", err)
	}
	if _, err := AllocatePCRBanks(tpm, []string{"sm3-256", "sha3-256"}); !errors.Is(err, ErrOptions) {
		t.Fatalf("only banks libtpms lacks: %v", err)
	}
	if got, err := AllocatePCRBanks(tpm, []string{"sm3-256", "sha384"}); err != nil || !slices.Equal(got, []string{"sha384"}) {
		t.Fatalf("a missing bank among usable ones is skipped, as swtpm_setup does: %v, %v", got, err)
	}
	// swtpm_setup's parsing: unknown, untrimmed and repeated names are dropped
	for in, want := range map[string][]string{"md5": {}, "sha256,": {"sha256"}, "": {}, "sha1, sha384": {"sha1"}, "sha1,sha256,sha1": {"sha1", "sha256"}, "SHA256": {}} {
		if got, err := ParseBanks(in); err != nil || !slices.Equal(got, want) {
			t.Errorf("ParseBanks(%q) = %v, %v; want %v", in, got, err, want)
		}
	}
	if b, err := ParseBanks("-"); err != nil || b != nil {
		t.Fatalf("ParseBanks(-) = %v, %v", b, err)
	}
}

// TestTemplatesMatchSwtpmSetup: the EKs Debian's swtpm_setup persisted are exactly what our
// templates create from the same TPM (same endorsement seed), so tools that recreate an EK
// from the TCG template find the certified key.
func TestTemplatesMatchSwtpmSetup(t *testing.T) {
	bin := "/usr/bin/swtpm_setup"
	if _, err := os.Stat(bin); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("Debian's swtpm_setup is missing in CI")
		}
		t.Skip("swtpm_setup not installed")
	}
	for _, tc := range []struct {
		bits   int
		handle tpm2.TPMHandle
	}{{2048, HandleEKRSA2048}, {3072, HandleEKRSA3072}} {
		dir := t.TempDir()
		conf := filepath.Join(dir, "setup.conf")
		os.WriteFile(conf, []byte("active_pcr_banks = sha256\n"), 0o600)
		args := []string{"--tpm", "/usr/bin/swtpm socket", "--tpm2", "--tpm-state", dir, "--createek", "--config", conf, "--rsa-keysize", strconv.Itoa(tc.bits)}
		if out, err := exec.Command(bin, args...).CombinedOutput(); err != nil {
			t.Fatalf("swtpm_setup: %v\n%s", err, out)
		}
		st, err := store.Open("dir://"+dir, store.Options{TPM2: true})
		if err != nil {
			t.Fatal(err)
		}
		perm, err := st.Load(emulator.StatePermanent)
		st.Close()
		if err != nil {
			t.Fatal(err)
		}
		mem := emulator.NewMemStore()
		mem.Store(emulator.StatePermanent, perm)
		func() {
			eng, tpm := startTPM(t, mem)
			defer eng.Close()
			for _, ek := range []struct {
				h    tpm2.TPMHandle
				tmpl tpm2.TPMTPublic
			}{{tc.handle, EKTemplateRSA(tc.bits, false, false)}, {HandleEKP384, EKTemplateP384(false, false)}} {
				want := readPublic(t, tpm, ek.h)
				k, err := tpmclient.CreatePrimary(tpm, tpm2.TPMRHEndorsement, ek.tmpl)
				if err != nil {
					t.Fatal(err)
				}
				tpmclient.Flush(tpm, k.Handle)
				if !bytes.Equal(tpm2.Marshal(k.Public), tpm2.Marshal(want)) {
					t.Fatalf("RSA %d run: our template for 0x%x makes another key than swtpm_setup's:\n%x\n%x", tc.bits, uint32(ek.h), tpm2.Marshal(k.Public), tpm2.Marshal(want))
				}
			}
		}()
	}
}

func FuzzParseBanks(f *testing.F) {
	f.Add("sha256")
	f.Add("sha1,sha256,sha384,sha512")
	f.Add("-")
	f.Fuzz(func(t *testing.T, s string) {
		banks, err := ParseBanks(s)
		if err != nil {
			if !errors.Is(err, ErrOptions) {
				t.Fatalf("error without ErrOptions: %v", err)
			}
			return
		}
		for _, b := range banks {
			if _, ok := bankAlgs[b]; !ok {
				t.Fatalf("accepted unknown bank %q", b)
			}
		}
	})
}
