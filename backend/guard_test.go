package backend

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"testing"

	"github.com/google/go-tpm/tpm2"

	"github.com/vtpmd/vtpmd/backend/seam"
	"github.com/vtpmd/vtpmd/internal/tpmclient"
	"github.com/vtpmd/vtpmd/internal/tpmwire"
)

// pcrZeroGuard projects a measurement into PCR 0 after every TPM2_Startup(CLEAR) and keeps
// PCR 0 read-only to the guest, the way host PCR projection will.
type pcrZeroGuard struct {
	measurement []byte
	started     int
	done        int
	failStart   error
}

func (g *pcrZeroGuard) Check(cmd []byte) []byte {
	h, err := tpmwire.ParseHeader(cmd)
	if err == nil && h.Code == uint32(tpm2.TPMCCPCRExtend) && len(cmd) >= 14 && binary.BigEndian.Uint32(cmd[10:]) == 0 {
		return tpmwire.ErrorResponse(true, tpmwire.RCLocality)
	}
	return nil
}

func (g *pcrZeroGuard) Done(cmd, rsp []byte, exec seam.Exec) { g.done++ }

func (g *pcrZeroGuard) Started(exec seam.Exec) error {
	g.started++
	if g.failStart != nil {
		return g.failStart
	}
	return tpmclient.PCRExtend(tpmclient.SendFunc(exec), 0, g.measurement)
}

func TestGuard(t *testing.T) {
	m := bytes.Repeat([]byte{7}, 32)
	g := &pcrZeroGuard{measurement: m}
	in := newInstance(t, t.TempDir(), Config{Guard: g})
	if err := in.Init(0); err != nil {
		t.Fatal(err)
	}
	tp := tpmclient.SendFunc(in.Process)
	if err := tpmclient.Startup(tp); err != nil {
		t.Fatal(err)
	}
	if g.started != 1 {
		t.Fatalf("guard ran %d times after Startup(CLEAR), want 1", g.started)
	}
	got, err := tpmclient.PCRRead(tp, 0)
	if err != nil {
		t.Fatal(err)
	}
	want := sha256.Sum256(append(make([]byte, 32), m...))
	if !bytes.Equal(got, want[:]) {
		t.Fatalf("PCR 0 = %x, want the projected %x", got, want)
	}
	err = tpmclient.PCRExtend(tp, 0, m)
	if !errors.Is(err, tpm2.TPMRCLocality) {
		t.Fatalf("guest extend of PCR 0: %v, want TPM_RC_LOCALITY", err)
	}
	doneBefore := g.done
	if err := tpmclient.PCRExtend(tp, 1, m); err != nil {
		t.Fatalf("guest extend of PCR 1: %v", err)
	}
	if g.done != doneBefore+1 {
		t.Fatalf("Done ran %d times for one successful command, want 1", g.done-doneBefore)
	}
	// a refused command (TPM_RC_LOCALITY above) and a failing one do not reach Done
	if err := tpmclient.PCRExtend(tp, 0, m); err == nil {
		t.Fatal("PCR 0 extend succeeded")
	}
	if g.done != doneBefore+1 {
		t.Fatalf("Done ran for a refused command")
	}
	// a Startup(STATE) after Shutdown(STATE) restores PCRs: the guard does not project twice
	if err := tpmclient.Shutdown(tp, true); err != nil {
		t.Fatal(err)
	}
	if err := in.Init(0); err != nil {
		t.Fatal(err)
	}
	if _, err := (tpm2.Startup{StartupType: tpm2.TPMSUState}).Execute(tp); err != nil {
		t.Fatal(err)
	}
	if g.started != 1 {
		t.Fatalf("guard ran after Startup(STATE)")
	}
	// a failing guard fails the guest's Startup(CLEAR) rather than leaving PCR 0 unprojected
	g.failStart = errors.New("no host measurements")
	if err := in.Init(0); err != nil {
		t.Fatal(err)
	}
	if _, err := in.Process(tpmwire.Startup2(tpmwire.SUClear)); err == nil {
		t.Fatal("Startup(CLEAR) answered although the guard failed")
	}
}

// TestGuardStartWith: the startup command of --flags startup-clear goes through the guard too.
func TestGuardStartWith(t *testing.T) {
	g := &pcrZeroGuard{measurement: bytes.Repeat([]byte{9}, 32)}
	in := newInstance(t, t.TempDir(), Config{Guard: g})
	resp, err := in.StartWith(tpmwire.Startup2(tpmwire.SUClear))
	if err != nil {
		t.Fatal(err)
	}
	if rc, _ := tpmwire.ResponseCode(resp); rc != 0 || g.started != 1 {
		t.Fatalf("startup rc %#x, guard ran %d times", rc, g.started)
	}
}
