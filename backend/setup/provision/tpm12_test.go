//go:build cgo

// These tests run against libtpms itself (emulator/libtpms, cgo); the package does not need it.

package provision

import (
	"bytes"
	"context"
	"crypto"
	"crypto/x509"
	"encoding/binary"
	"errors"
	"testing"

	"github.com/vtpmd/vtpmd/emulator/libtpms"
	"github.com/vtpmd/vtpmd/internal/tpmwire"

	"github.com/vtpmd/vtpmd/backend/localca"
	"github.com/vtpmd/vtpmd/emulator"
)

func startTPM12(t *testing.T) (*libtpms.Engine, Send12) {
	t.Helper()
	eng, err := libtpms.Open(emulator.TPM12, emulator.NewMemStore(), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(eng.Close)
	if err := eng.Start(); err != nil {
		t.Fatal(err)
	}
	send := Send12(eng.Process)
	if err := Startup12(send); err != nil {
		t.Fatal(err)
	}
	return eng, send
}

var info12 = localca.TPMInfo{Family: "1.2", Level: 2, Revision: 116, Manufacturer: "id:00001014", Model: "swtpm", Version: "id:00740001"}

type caCertifier12 struct{ ca *localca.CA }

func (c caCertifier12) EKCertificate(ctx context.Context, ek crypto.PublicKey, sign, dec bool) ([]byte, error) {
	return c.ca.IssueEK(ctx, localca.EKRequest{PublicKey: ek, TPM: info12})
}

func (c caCertifier12) PlatformCertificate(ctx context.Context, ek crypto.PublicKey) ([]byte, error) {
	return c.ca.IssuePlatform(ctx, localca.PlatformRequest{PublicKey: ek, TPM: info12, Platform: localca.DefaultPlatform})
}

// readNV12 reads an index without authorization (possible only while nvLocked is FALSE).
func readNV12(send Send12, index, size uint32) ([]byte, error) {
	rsp, err := send.run("TPM_NV_ReadValue", tpmwire.Command(tag12RquCommand, 0xcf, tpmwire.U32(index), tpmwire.U32(0), tpmwire.U32(size)))
	if err != nil {
		return nil, err
	}
	return rsp[14 : 14+binary.BigEndian.Uint32(rsp[10:14])], nil
}

func nvSize12(t *testing.T, send Send12, index uint32) uint32 {
	t.Helper()
	pub, err := Capability12(send, 0x11, tpmwire.U32(index)) // TPM_CAP_NV_INDEX
	if err != nil {
		t.Fatalf("NV index 0x%x: %v", index, err)
	}
	return binary.BigEndian.Uint32(pub[len(pub)-4:])
}

func owned12(t *testing.T, send Send12) bool {
	t.Helper()
	b, err := Capability12(send, 5, tpmwire.U32(0x111)) // TPM_CAP_PROPERTY, TPM_CAP_PROP_OWNER
	if err != nil {
		t.Fatal(err)
	}
	return len(b) == 1 && b[0] == 1
}

func TestTPM12ManufacturesLikeSwtpmSetup(t *testing.T) {
	for _, lock := range []bool{false, true} {
		eng, send := startTPM12(t)
		res, err := TPM12(context.Background(), send, Options12{CreateEK: true, TakeOwnership: true,
			OwnerAuth: Secret12(DefaultOwnerPassword, false), SRKAuth: Secret12("", true),
			EKCert: true, PlatformCert: true, LockNVRAM: lock, Certifier: caCertifier12{testCA(t)}})
		if err != nil {
			t.Fatal(err)
		}
		// power cycle: everything is in the permanent state
		eng.Stop()
		if err := eng.Start(); err != nil {
			t.Fatal(err)
		}
		if err := Startup12(send); err != nil {
			t.Fatal(err)
		}
		if !owned12(t, send) {
			t.Fatal("the TPM has no owner after TakeOwnership")
		}
		for _, nv := range []struct {
			index uint32
			der   []byte
		}{{Index12EKCert, res.EKCert}, {Index12PlatformCert, res.PlatformCert}} {
			size := nvSize12(t, send, nv.index)
			if int(size) != len(nv.der)+7 {
				t.Fatalf("NV 0x%x holds %d bytes, want the certificate plus the 7-byte header (%d)", nv.index, size, len(nv.der)+7)
			}
			data, err := readNV12(send, nv.index, size)
			if lock {
				if err == nil {
					t.Fatalf("unauthorized read of 0x%x after --lock-nvram", nv.index)
				}
				continue
			}
			if err != nil {
				t.Fatal(err)
			}
			der, ok := ParseStoredCert12(data)
			if !ok || !bytes.Equal(der, nv.der) {
				t.Fatalf("NV 0x%x does not hold the stored certificate", nv.index)
			}
		}
		c, _ := x509.ParseCertificate(res.EKCert)
		if !c.PublicKey.(interface{ Equal(crypto.PublicKey) bool }).Equal(res.EK) {
			t.Fatal("EK certificate is not over the EK")
		}
		eng.Close()
	}
}

// TestTPM12WrongOwnerAuthRefused: the TPM checks the TakeOwnership HMAC, so a run that
// computed it wrongly could not pass the test above; a second TakeOwnership is refused.
func TestTPM12SecondOwnershipRefused(t *testing.T) {
	_, send := startTPM12(t)
	o := Options12{CreateEK: true, TakeOwnership: true, OwnerAuth: Secret12("ooo", false), SRKAuth: Secret12("sss", false)}
	if _, err := TPM12(context.Background(), send, o); err != nil {
		t.Fatal(err)
	}
	ek, err := createEK12(send)
	if err == nil || ek != nil {
		t.Fatal("a second EK was created")
	}
	if _, err := TPM12(context.Background(), send, Options12{EKCert: true}); !errors.Is(err, ErrOptions) {
		t.Fatalf("certificates without a CA: %v", err)
	}
}

func TestStoredCert12(t *testing.T) {
	der := bytes.Repeat([]byte{0x30}, 997)
	s := StoredCert12(der)
	if !bytes.Equal(s[:7], []byte{0x10, 0x01, 0x00, 0x03, 0xe7, 0x10, 0x02}) {
		t.Fatalf("header %x, want swtpm's 100100 03e7 1002 for 997 bytes", s[:7])
	}
	if got, ok := ParseStoredCert12(s); !ok || !bytes.Equal(got, der) {
		t.Fatal("round trip")
	}
	for _, bad := range [][]byte{nil, s[:6], append([]byte{0x10, 0x01, 0x00, 0xff, 0xff, 0x10, 0x02}, der...), append([]byte{0x11}, s[1:]...)} {
		if _, ok := ParseStoredCert12(bad); ok {
			t.Errorf("accepted %x...", bad[:min(len(bad), 8)])
		}
	}
	if s := Secret12("", true); s != [20]byte{0x67, 0x68, 0x03, 0x3e, 0x21, 0x64, 0x68, 0x24, 0x7b, 0xd0, 0x31, 0xa0, 0xa2, 0xd9, 0x87, 0x6d, 0x79, 0x81, 0x8f, 0x8f} {
		t.Fatalf("well-known secret %x", s)
	}
}

func FuzzParseStoredCert12(f *testing.F) {
	f.Add(StoredCert12([]byte{0x30, 0x00}))
	f.Add([]byte{0x10, 0x01})
	f.Fuzz(func(t *testing.T, data []byte) {
		der, ok := ParseStoredCert12(data)
		if ok && !bytes.Equal(StoredCert12(der), data[:len(der)+7]) {
			t.Fatal("parse/store mismatch")
		}
	})
}
