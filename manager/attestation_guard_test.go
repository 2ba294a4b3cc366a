package manager

import (
	"bytes"
	"crypto/rand"
	"encoding/binary"
	"log/slog"
	"testing"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
	"github.com/google/go-tpm/tpm2/transport/linuxudstpm"

	"github.com/vtpmd/vtpmd/internal/swtpmtest"
	"github.com/vtpmd/vtpmd/internal/tpmwire"
	"github.com/vtpmd/vtpmd/manager/attest"
)

// recorder keeps the last command sent through it.
type recorder struct {
	tp   transport.TPM
	last []byte
}

func (r *recorder) Send(cmd []byte) ([]byte, error) {
	r.last = bytes.Clone(cmd)
	return r.tp.Send(cmd)
}

// TestAttestIndices: the guard's indices as a guest sees them, on Debian's swtpm as the vTPM
// right after TPM2_Startup(CLEAR): the guest writes a nonce (plain and in a session with
// encrypted parameters) and the guard reads it back; the guard writes the report and the
// guest reads it with owner authorization but can neither write it nor, once the firmware
// set platform auth, delete it; a second startup defines both afresh.
func TestAttestIndices(t *testing.T) {
	sw := swtpmtest.Start(t)
	conn, err := linuxudstpm.Open(sw.Socket)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	exec := conn.Send
	auth := bytes.Repeat([]byte{0x5a}, 32)
	if err := defineIndices(conn, auth); err != nil {
		t.Fatal(err)
	}
	if got, err := readReportAuth(conn); err != nil || !bytes.Equal(got, auth) {
		t.Fatalf("key index holds %x, %v", got, err)
	}
	// the firmware sets platform auth (as OVMF does)
	platAuth := make([]byte, 32)
	rand.Read(platAuth)
	if _, err := (tpm2.HierarchyChangeAuth{AuthHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHPlatform, Auth: tpm2.PasswordAuth(nil)},
		NewAuth: tpm2.TPM2BAuth{Buffer: platAuth}}).Execute(conn); err != nil {
		t.Fatal(err)
	}
	guest := &recorder{tp: conn}
	nonce := []byte("a fresh nonce of 29 bytes....")
	pub, err := (tpm2.NVReadPublic{NVIndex: nonceNV}).Execute(guest)
	if err != nil {
		t.Fatal(err)
	}
	// the guest's write, as tpm2_nvwrite sends it (index auth), with encrypted parameters
	sess := tpm2.HMAC(tpm2.TPMAlgSHA256, 16, tpm2.AESEncryption(128, tpm2.EncryptIn))
	if _, err := (tpm2.NVWrite{
		AuthHandle: tpm2.AuthHandle{Handle: nonceNV, Name: pub.NVName, Auth: sess},
		NVIndex:    tpm2.NamedHandle{Handle: nonceNV, Name: pub.NVName},
		Data:       tpm2.TPM2BMaxNVBuffer{Buffer: nonce},
	}).Execute(guest); err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(guest.last, nonce) {
		t.Fatal("the nonce went in the clear: parameter encryption not in use")
	}
	end, ok := nonceWrite(guest.last)
	if !ok || end != len(nonce) {
		t.Fatalf("nonceWrite = %d, %v; want %d, true", end, ok, len(nonce))
	}
	got, err := readNonce(conn, end)
	if err != nil || !bytes.Equal(got, nonce) {
		t.Fatalf("nonce read back %q, %v", got, err)
	}
	if end, ok := nonceWrite(nvWriteTo(NonceIndex)); !ok || end != 4 {
		t.Fatalf("a password-session write of 4 bytes: %d, %v", end, ok)
	}
	if _, ok := nonceWrite(nvWriteTo(ReportIndex)); ok {
		t.Fatal("a write to another index taken for a nonce")
	}

	// the guard writes the report; the guest reads it with owner auth
	report := bytes.Repeat([]byte("report "), 200)
	if err := writeReport(conn, auth, report); err != nil {
		t.Fatal(err)
	}
	read := guestReadReport(t, conn)
	if !bytes.Equal(read[:len(report)], report) || !bytes.Equal(read[len(report):], make([]byte, attest.MaxReportSize-len(report))) {
		t.Fatal("report read back differs")
	}
	// the guest cannot write it (no auth, owner auth) nor delete it
	rpub, _ := tpm2.NVReadPublic{NVIndex: reportNV}.Execute(conn)
	for _, h := range []tpm2.TPMHandle{reportNV, tpm2.TPMRHOwner} {
		if _, err := (tpm2.NVWrite{AuthHandle: tpm2.AuthHandle{Handle: h, Name: nameOf(h, rpub.NVName), Auth: tpm2.PasswordAuth(nil)},
			NVIndex: tpm2.NamedHandle{Handle: reportNV, Name: rpub.NVName}, Data: tpm2.TPM2BMaxNVBuffer{Buffer: []byte("forged")}}).Execute(conn); err == nil {
			t.Fatalf("the guest wrote the report index with handle 0x%x", h)
		}
	}
	for _, h := range []tpm2.TPMHandle{tpm2.TPMRHOwner, tpm2.TPMRHPlatform} {
		if _, err := (tpm2.NVUndefineSpace{AuthHandle: tpm2.AuthHandle{Handle: h, Auth: tpm2.PasswordAuth(nil)},
			NVIndex: tpm2.NamedHandle{Handle: reportNV, Name: rpub.NVName}}).Execute(conn); err == nil {
			t.Fatalf("the guest deleted the report index with 0x%x", h)
		}
	}
	// the EK: the template's, as no persistent one exists here
	ek, err := ekName(conn)
	if err != nil || len(ek) != 34 {
		t.Fatalf("ek name %x, %v", ek, err)
	}
	d, err := pcrDigest(conn, vtpmPCRs)
	if err != nil || len(d) != 32 {
		t.Fatalf("pcr digest %x, %v", d, err)
	}

	// a reboot: Startup(CLEAR) resets platform auth; the guard defines both indices afresh
	sw.Restart()
	g := &attestGuard{log: slog.New(slog.DiscardHandler)}
	if err := g.Started(exec); err != nil || g.auth == nil {
		t.Fatalf("Started: %v (auth set: %v)", err, g.auth != nil)
	}
	// a new authValue, kept for a process that takes over (an incoming migration)
	if got, err := readReportAuth(conn); err != nil || !bytes.Equal(got, g.auth) || bytes.Equal(got, auth) {
		t.Fatalf("key index after a new startup: %x, %v", got, err)
	}
	if err := writeReport(conn, g.auth, []byte("second boot")); err != nil {
		t.Fatal(err)
	}
	if _, err := (tpm2.NVReadPublic{NVIndex: reportNV}).Execute(conn); err != nil {
		t.Fatal(err)
	}
	if _, err := readNonce(conn, 4); err == nil { // never written since
		t.Fatal("the nonce index kept its old contents across a startup")
	}
}

func nameOf(h tpm2.TPMHandle, nvName tpm2.TPM2BName) tpm2.TPM2BName {
	if h == reportNV {
		return nvName
	}
	return tpm2.HandleName(h)
}

func guestReadReport(t *testing.T, tp transport.TPM) []byte {
	t.Helper()
	pub, err := tpm2.NVReadPublic{NVIndex: reportNV}.Execute(tp)
	if err != nil {
		t.Fatal(err)
	}
	var out []byte
	for off := 0; off < attest.MaxReportSize; off += 1024 {
		r, err := tpm2.NVRead{AuthHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)},
			NVIndex: tpm2.NamedHandle{Handle: reportNV, Name: pub.NVName}, Size: 1024, Offset: uint16(off)}.Execute(tp)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, r.Data.Buffer...)
	}
	return out
}

// nvWriteTo is an NV_Write command of "abcd" at offset 0 to index, in a password session.
func nvWriteTo(index uint32) []byte {
	body := binary.BigEndian.AppendUint32(nil, index)
	body = binary.BigEndian.AppendUint32(body, index)
	body = binary.BigEndian.AppendUint32(body, 9)
	body = append(body, 0x40, 0, 0, 0x09, 0, 0, 0, 0, 0)
	body = append(body, 0, 4, 'a', 'b', 'c', 'd', 0, 0)
	return tpmwire.Command(uint16(tpm2.TPMSTSessions), uint32(tpm2.TPMCCNVWrite), body)
}

// failing answers every command with TPM_RC_FAILURE and keeps the last one.
type failing struct{ last []byte }

func (f *failing) Send(cmd []byte) ([]byte, error) {
	f.last = bytes.Clone(cmd)
	return tpmwire.ErrorResponse(true, 0x101), nil
}

// commandOf is the bytes go-tpm sends for one command.
func commandOf(run func(tp transport.TPM)) []byte {
	f := &failing{}
	run(f)
	return f.last
}

// TestAttestCheck: the guest's removal, change or re-definition of the attestation indices is
// refused with TPM_RC_NV_AUTHORIZATION (also under firmware that leaves platform auth empty);
// reads, nonce writes and other indices pass.
func TestAttestCheck(t *testing.T) {
	g := &attestGuard{log: slog.New(slog.DiscardHandler)}
	pw := tpm2.PasswordAuth(nil)
	nv := func(h tpm2.TPMHandle) tpm2.NamedHandle { return tpm2.NamedHandle{Handle: h, Name: tpm2.HandleName(h)} }
	hier := func(h tpm2.TPMHandle) tpm2.AuthHandle {
		return tpm2.AuthHandle{Handle: h, Name: tpm2.HandleName(h), Auth: pw}
	}
	idx := hier // an index authorizing itself
	define := func(h tpm2.TPMHandle, auth []byte) func(tp transport.TPM) {
		return func(tp transport.TPM) {
			tpm2.NVDefineSpace{AuthHandle: hier(tpm2.TPMRHOwner), Auth: tpm2.TPM2BAuth{Buffer: auth},
				PublicInfo: tpm2.New2B(tpm2.TPMSNVPublic{NVIndex: h, NameAlg: tpm2.TPMAlgSHA256,
					Attributes: tpm2.TPMANV{OwnerWrite: true, OwnerRead: true, NT: tpm2.TPMNTOrdinary}, DataSize: 8})}.Execute(tp)
		}
	}
	for _, c := range []struct {
		name    string
		run     func(tp transport.TPM)
		refused bool
	}{
		{"undefine the report (platform)", func(tp transport.TPM) {
			tpm2.NVUndefineSpace{AuthHandle: hier(tpm2.TPMRHPlatform), NVIndex: nv(reportNV)}.Execute(tp)
		}, true},
		{"undefine the nonce index (owner)", func(tp transport.TPM) {
			tpm2.NVUndefineSpace{AuthHandle: hier(tpm2.TPMRHOwner), NVIndex: nv(nonceNV)}.Execute(tp)
		}, true},
		{"write the report (owner)", func(tp transport.TPM) {
			tpm2.NVWrite{AuthHandle: hier(tpm2.TPMRHOwner), NVIndex: nv(reportNV), Data: tpm2.TPM2BMaxNVBuffer{Buffer: []byte("x")}}.Execute(tp)
		}, true},
		{"write the report (index)", func(tp transport.TPM) {
			tpm2.NVWrite{AuthHandle: idx(reportNV), NVIndex: nv(reportNV), Data: tpm2.TPM2BMaxNVBuffer{Buffer: []byte("x")}}.Execute(tp)
		}, true},
		{"change the report's auth", func(tp transport.TPM) {
			body := binary.BigEndian.AppendUint32(nil, ReportIndex)
			body = append(body, 0, 0, 0, 9, 0x40, 0, 0, 0x09, 0, 0, 0, 0, 0, 0, 1, 'x')
			tp.Send(tpmwire.Command(uint16(tpm2.TPMSTSessions), uint32(tpm2.TPMCCNVChangeAuth), body))
		}, true},
		{"define the report index", define(reportNV, []byte("guest")), true},
		{"define the nonce index", define(nonceNV, nil), true},
		{"write the nonce", func(tp transport.TPM) {
			tpm2.NVWrite{AuthHandle: idx(nonceNV), NVIndex: nv(nonceNV), Data: tpm2.TPM2BMaxNVBuffer{Buffer: []byte("nonce")}}.Execute(tp)
		}, false},
		{"read the report", func(tp transport.TPM) {
			tpm2.NVRead{AuthHandle: hier(tpm2.TPMRHOwner), NVIndex: nv(reportNV), Size: 16}.Execute(tp)
		}, false},
		{"define another index", define(0x01500000, []byte("guest")), false},
		{"read the key (index)", func(tp transport.TPM) {
			tpm2.NVRead{AuthHandle: idx(keyNV), NVIndex: nv(keyNV), Size: 32}.Execute(tp)
		}, true},
		{"read the key (owner)", func(tp transport.TPM) {
			tpm2.NVRead{AuthHandle: hier(tpm2.TPMRHOwner), NVIndex: nv(keyNV), Size: 32}.Execute(tp)
		}, true},
		{"compare the key (PolicyNV)", func(tp transport.TPM) {
			tpm2.PolicyNV{AuthHandle: idx(keyNV), NVIndex: nv(keyNV), PolicySession: tpm2.TPMHandle(0x03000000),
				OperandB: tpm2.TPM2BOperand{Buffer: []byte{0}}, Operation: tpm2.TPMEOUnsignedGT}.Execute(tp)
		}, true},
		{"certify the key", func(tp transport.TPM) {
			tpm2.NVCertify{SignHandle: hier(0x80000001), AuthHandle: idx(keyNV), NVIndex: nv(keyNV), Size: 32,
				InScheme: tpm2.TPMTSigScheme{Scheme: tpm2.TPMAlgNull}}.Execute(tp)
		}, true},
		{"undefine the key", func(tp transport.TPM) {
			tpm2.NVUndefineSpace{AuthHandle: hier(tpm2.TPMRHPlatform), NVIndex: nv(keyNV)}.Execute(tp)
		}, true},
		{"define the key index", define(keyNV, nil), true},
		{"undefine another index", func(tp transport.TPM) {
			tpm2.NVUndefineSpace{AuthHandle: hier(tpm2.TPMRHOwner), NVIndex: nv(0x01400004)}.Execute(tp)
		}, false},
	} {
		cmd := commandOf(c.run)
		if len(cmd) == 0 {
			t.Fatalf("%s: no command", c.name)
		}
		rsp := g.Check(cmd)
		if got := rsp != nil; got != c.refused {
			t.Errorf("%s: refused %v, want %v", c.name, got, c.refused)
		}
		if rsp != nil {
			if rc, _ := tpmwire.ResponseCode(rsp); rc != rcNVAuth {
				t.Errorf("%s: rc %#x", c.name, rc)
			}
		}
	}
}
