//go:build cgo

package manager

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"log/slog"
	"os"
	"testing"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/vtpmd/vtpmd/backend"
	"github.com/vtpmd/vtpmd/backend/store"
	"github.com/vtpmd/vtpmd/emulator"
	"github.com/vtpmd/vtpmd/internal/tpmclient"
	"github.com/vtpmd/vtpmd/internal/tpmwire"
	"github.com/vtpmd/vtpmd/manager/eventlog"
	"github.com/vtpmd/vtpmd/manager/projection"
)

func guardedInstance(t *testing.T, g *projectionGuard) (*backend.Instance, transport.TPM) {
	t.Helper()
	st, err := store.Open(t.TempDir(), store.Options{TPM2: true, Lock: true})
	if err != nil {
		t.Fatal(err)
	}
	in, err := backend.New(backend.Config{Version: emulator.TPM2, Store: st, Guard: g})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { in.Close(); st.Close() })
	return in, tpmclient.SendFunc(in.Process)
}

func startTPM(t *testing.T, in *backend.Instance, tp transport.TPM) {
	t.Helper()
	if err := in.Init(0); err != nil {
		t.Fatal(err)
	}
	if err := tpmclient.Startup(tp); err != nil {
		t.Fatal(err)
	}
}

// hostOVMF is the host of the captured OVMF log: its hardware PCRs are the log's replay.
func hostOVMF(t *testing.T) projection.Host {
	t.Helper()
	raw, err := os.ReadFile("eventlog/testdata/ovmf-q35.bin")
	if err != nil {
		t.Fatal(err)
	}
	l, err := eventlog.Parse(raw)
	if err != nil {
		t.Fatal(err)
	}
	h := projection.Host{Log: l, PCRs: map[uint16][][]byte{}, Identity: []byte("\x00\x0bEK")}
	for _, a := range l.Spec.Algorithms {
		if h.PCRs[a.ID], err = l.Replay(a.ID); err != nil {
			t.Fatal(err)
		}
	}
	return h
}

func readGuestLog(t *testing.T, tp transport.TPM) []byte {
	t.Helper()
	var out []byte
	for i := range uint32(ProjectionLogCount) {
		idx := tpm2.TPMHandle(ProjectionLogFirst + i)
		pub, err := tpm2.NVReadPublic{NVIndex: idx}.Execute(tp)
		if err != nil {
			break
		}
		c, _ := pub.NVPublic.Contents()
		if !c.Attributes.PlatformCreate || !c.Attributes.WriteLocked || !c.Attributes.Written || c.Attributes.OwnerWrite || c.Attributes.AuthWrite {
			t.Fatalf("index %#x attributes %+v", uint32(idx), c.Attributes)
		}
		// as tpm2_nvread -C o reads it
		r, err := tpm2.NVRead{
			AuthHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)},
			NVIndex:    tpm2.NamedHandle{Handle: idx, Name: pub.NVName},
			Size:       c.DataSize,
		}.Execute(tp)
		if err != nil {
			t.Fatalf("owner read of %#x: %v", uint32(idx), err)
		}
		out = append(out, r.Data.Buffer...)
	}
	return out
}

func isLocality(err error) bool { return errors.Is(err, tpm2.TPMRCLocality) }

// TestProjectionGuardMirror: after TPM2_Startup(CLEAR) the vTPM's PCRs 0-7 equal a real OVMF
// host's in every bank both have; the guest cannot extend, event, reset or complete a sequence
// into them (TPM_RC_LOCALITY) but can into PCR 8; the guest-visible log, read with owner
// authorization, replays to them; the guest cannot write or remove its indices; a second
// startup projects the same again, and "off" removes everything.
func TestProjectionGuardMirror(t *testing.T) {
	host := hostOVMF(t)
	plan, err := projection.Mirror(host)
	if err != nil {
		t.Fatal(err)
	}
	resp := planResponse(plan)
	g := &projectionGuard{cfg: GuardConfig{Client: fakeProjection(t, &resp)}, path: "/state", log: slog.New(slog.DiscardHandler)}
	in, tp := guardedInstance(t, g)
	for boot := range 2 {
		startTPM(t, in, tp)
		banks, err := activeBanks(tp)
		if err != nil {
			t.Fatal(err)
		}
		for _, b := range banks {
			for i := range 8 {
				r, err := tpm2.PCRRead{PCRSelectionIn: tpm2.TPMLPCRSelection{PCRSelections: []tpm2.TPMSPCRSelection{{
					Hash: tpm2.TPMIAlgHash(b), PCRSelect: tpm2.PCClientCompatible.PCRs(uint(i))}}}}.Execute(tp)
				if err != nil {
					t.Fatal(err)
				}
				if got := r.PCRValues.Digests[0].Buffer; !bytes.Equal(got, host.PCRs[b][i]) {
					t.Fatalf("boot %d: vTPM PCR %d (%s) = %x, host %x", boot, i, eventlog.AlgName(b), got, host.PCRs[b][i])
				}
			}
		}
		d := bytes.Repeat([]byte{1}, 32)
		if err := tpmclient.PCRExtend(tp, 0, d); !isLocality(err) {
			t.Fatalf("extend PCR 0: %v, want TPM_RC_LOCALITY", err)
		}
		if err := tpmclient.PCRExtend(tp, 8, d); err != nil {
			t.Fatalf("extend PCR 8: %v", err)
		}
		pcr7 := tpm2.AuthHandle{Handle: 7, Auth: tpm2.PasswordAuth(nil)}
		if _, err := (tpm2.PCREvent{PCRHandle: pcr7, EventData: tpm2.TPM2BEvent{Buffer: []byte("x")}}).Execute(tp); !isLocality(err) {
			t.Fatalf("PCR_Event 7: %v", err)
		}
		if _, err := (tpm2.PCRReset{PCRHandle: pcr7}).Execute(tp); !isLocality(err) {
			t.Fatalf("PCR_Reset 7: %v", err)
		}
		seq, err := tpm2.HashSequenceStart{HashAlg: tpm2.TPMAlgNull}.Execute(tp)
		if err != nil {
			t.Fatal(err)
		}
		pw := []byte{0x40, 0, 0, 9, 0, 0, 0, 0, 0} // TPM_RS_PW, no nonce, no attributes, empty auth
		esc := tpmwire.Command(0x8002, uint32(tpm2.TPMCCEventSequenceComplete), tpmwire.U32(7), tpmwire.U32(uint32(seq.SequenceHandle)),
			tpmwire.U32(18), pw, pw, tpmwire.U16(0))
		if r, _ := tp.Send(esc); func() uint32 { c, _ := tpmwire.ResponseCode(r); return c }() != tpmwire.RCLocality {
			t.Fatalf("EventSequenceComplete 7: %x", r)
		}
		tpm2.FlushContext{FlushHandle: seq.SequenceHandle}.Execute(tp)

		log := readGuestLog(t, tp)
		l, err := eventlog.Parse(log)
		if err != nil {
			t.Fatalf("guest-visible log: %v", err)
		}
		replayed, err := l.Replay(eventlog.AlgSHA256)
		if err != nil {
			t.Fatal(err)
		}
		for i := range 8 {
			if !bytes.Equal(replayed[i], host.PCRs[eventlog.AlgSHA256][i]) {
				t.Fatalf("guest log replays PCR %d to %x, host %x", i, replayed[i], host.PCRs[eventlog.AlgSHA256][i])
			}
		}
		// the guest can neither remove nor write the log (platform auth is still empty here)
		pub, _ := tpm2.NVReadPublic{NVIndex: tpm2.TPMHandle(ProjectionLogFirst)}.Execute(tp)
		nv := tpm2.NamedHandle{Handle: tpm2.TPMHandle(ProjectionLogFirst), Name: pub.NVName}
		platform := tpm2.AuthHandle{Handle: tpm2.TPMRHPlatform, Auth: tpm2.PasswordAuth(nil)}
		if _, err := (tpm2.NVUndefineSpace{AuthHandle: platform, NVIndex: nv}).Execute(tp); err == nil {
			t.Fatal("the guest removed the log's first index")
		}
		if _, err := (tpm2.NVWrite{AuthHandle: platform, NVIndex: nv, Data: tpm2.TPM2BMaxNVBuffer{Buffer: []byte("forged")}}).Execute(tp); err == nil {
			t.Fatal("the guest wrote the log's first index")
		}
		owner := tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)}
		if _, err := (tpm2.NVWrite{AuthHandle: owner, NVIndex: nv, Data: tpm2.TPM2BMaxNVBuffer{Buffer: []byte("forged")}}).Execute(tp); err == nil {
			t.Fatal("the owner wrote the log's first index")
		}
	}
	// the VM's projection is turned off: the next startup projects nothing and removes the log
	resp = &ProjectionResponse{Mode: projection.ModeOff}
	startTPM(t, in, tp)
	if v, _ := tpmclient.PCRRead(tp, 0); !bytes.Equal(v, make([]byte, 32)) {
		t.Fatalf("PCR 0 after off: %x", v)
	}
	if _, err := (tpm2.NVReadPublic{NVIndex: tpm2.TPMHandle(ProjectionLogFirst)}).Execute(tp); err == nil {
		t.Fatal("the log's index survived projection off")
	}
	if err := tpmclient.PCRExtend(tp, 0, bytes.Repeat([]byte{1}, 32)); err != nil {
		t.Fatalf("extend PCR 0 after off: %v", err)
	}
}

// TestProjectionGuardSummary: summary's one extend reaches the policy's PCR in every active
// bank (banks the manager gives no digest for are capped), only that PCR is closed, and a
// manager error fails the guest's TPM2_Startup(CLEAR).
func TestProjectionGuardSummary(t *testing.T) {
	host := hostOVMF(t)
	plan, err := projection.Summary(host, 23)
	if err != nil {
		t.Fatal(err)
	}
	resp := planResponse(plan)
	delete(resp.Events[0].Digests, "sha1") // as if the manager knew no SHA-1 digest
	g := &projectionGuard{cfg: GuardConfig{Client: fakeProjection(t, &resp)}, path: "/state", log: slog.New(slog.DiscardHandler)}
	in, tp := guardedInstance(t, g)
	startTPM(t, in, tp)
	payload, _ := projection.SummaryPayload(host.PCRs[eventlog.AlgSHA256], host.Identity)
	d := sha256.Sum256(payload)
	want := sha256.Sum256(append(make([]byte, 32), d[:]...))
	if v, _ := tpmclient.PCRRead(tp, 23); !bytes.Equal(v, want[:]) {
		t.Fatalf("PCR 23 = %x, want %x", v, want)
	}
	if err := tpmclient.PCRExtend(tp, 23, d[:]); !isLocality(err) {
		t.Fatalf("extend PCR 23: %v", err)
	}
	if err := tpmclient.PCRExtend(tp, 0, d[:]); err != nil {
		t.Fatalf("extend PCR 0 (the firmware's): %v", err)
	}
	banks, _ := activeBanks(tp)
	for _, b := range banks {
		if b != eventlog.AlgSHA1 {
			continue
		}
		r, err := tpm2.PCRRead{PCRSelectionIn: tpm2.TPMLPCRSelection{PCRSelections: []tpm2.TPMSPCRSelection{{
			Hash: tpm2.TPMAlgSHA1, PCRSelect: tpm2.PCClientCompatible.PCRs(23)}}}}.Execute(tp)
		if err != nil {
			t.Fatal(err)
		}
		if bytes.Equal(r.PCRValues.Digests[0].Buffer, make([]byte, 20)) {
			t.Fatal("the SHA-1 bank of PCR 23 was left open (zero)")
		}
		l, err := eventlog.Parse(readGuestLog(t, tp))
		if err != nil {
			t.Fatal(err)
		}
		if l.HasAlgorithm(eventlog.AlgSHA1) || !l.HasAlgorithm(eventlog.AlgSHA256) {
			t.Fatalf("guest log banks %v", l.Spec.Algorithms)
		}
	}
	// the manager answers an error: the guest's startup fails
	resp = nil
	if err := in.Init(0); err != nil {
		t.Fatal(err)
	}
	if _, err := in.Process(tpmwire.Startup2(tpmwire.SUClear)); err == nil {
		t.Fatal("TPM2_Startup(CLEAR) answered although the projection could not be had")
	}
}
