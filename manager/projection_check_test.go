package manager

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"log/slog"
	"net"
	"net/http"
	"path/filepath"
	"testing"

	"github.com/google/go-tpm/tpm2"

	"github.com/vtpmd/vtpmd/internal/swtpmtest"
	"github.com/vtpmd/vtpmd/internal/tpmwire"
)

// pcrCommand is a command with the given code whose first handle is h (and a password session).
func pcrCommand(code tpm2.TPMCC, h uint32) []byte {
	pw := []byte{0x40, 0, 0, 9, 0, 0, 0, 0, 0}
	return tpmwire.Command(0x8002, uint32(code), tpmwire.U32(h), tpmwire.U32(9), pw, tpmwire.U32(0))
}

func nvCommand(code tpm2.TPMCC, auth, index uint32) []byte {
	return tpmwire.Command(0x8002, uint32(code), tpmwire.U32(auth), tpmwire.U32(index), tpmwire.U32(0))
}

func rcOf(t *testing.T, rsp []byte) uint32 {
	t.Helper()
	if rsp == nil {
		return 0
	}
	rc, err := tpmwire.ResponseCode(rsp)
	if err != nil {
		t.Fatal(err)
	}
	return rc
}

// TestProjectionCheckResumed: a vTPM that resumed a saved state never saw TPM2_Startup(CLEAR);
// its guard asks the manager at the first PCR change and refuses the projected PCR only.
func TestProjectionCheckResumed(t *testing.T) {
	resp := &ProjectionResponse{Mode: "summary", ReadOnly: []int{23}}
	g := &projectionGuard{cfg: GuardConfig{Client: fakeProjection(t, &resp)}, path: "/state", log: slog.New(slog.DiscardHandler)}
	if rc := rcOf(t, g.Check(pcrCommand(tpm2.TPMCCPCRExtend, 23))); rc != tpmwire.RCLocality {
		t.Fatalf("extend of PCR 23: rc %#x, want TPM_RC_LOCALITY", rc)
	}
	for _, c := range []tpm2.TPMCC{tpm2.TPMCCPCRExtend, tpm2.TPMCCPCRReset, tpm2.TPMCCPCREvent} {
		if rsp := g.Check(pcrCommand(c, 16)); rsp != nil {
			t.Fatalf("%v of PCR 16 refused: %x", c, rsp)
		}
	}
	// the manager is gone: nothing is projected (and nothing refused)
	g2 := &projectionGuard{cfg: GuardConfig{Client: NewClient("/nonexistent/manager.sock")}, path: "/state", log: slog.New(slog.DiscardHandler)}
	if rsp := g2.Check(pcrCommand(tpm2.TPMCCPCRExtend, 23)); rsp != nil {
		t.Fatalf("without a manager: %x", rsp)
	}
	// the log's indices
	g.logIdx = []uint32{ProjectionLogFirst}
	if rc := rcOf(t, g.Check(nvCommand(tpm2.TPMCCNVUndefineSpace, uint32(tpm2.TPMRHPlatform), ProjectionLogFirst))); rc != rcNVAuthorization {
		t.Fatalf("undefine of the log: rc %#x", rc)
	}
	if rc := rcOf(t, g.Check(nvCommand(tpm2.TPMCCNVUndefineSpaceSpecial, ProjectionLogFirst, uint32(tpm2.TPMRHPlatform)))); rc != rcNVAuthorization {
		t.Fatalf("undefine special of the log: rc %#x", rc)
	}
	if rsp := g.Check(nvCommand(tpm2.TPMCCNVWrite, 0x01500000, 0x01500000)); rsp != nil {
		t.Fatal("a write of another index refused")
	}
}

// fakeProjection serves /v1/projection with whatever *resp holds (the providers are tested in
// their package, the endpoint in the integration tests); the guard under test is real, and
// so is the TPM (libtpms through backend.Instance).
func fakeProjection(t *testing.T, resp **ProjectionResponse) *Client {
	t.Helper()
	sock := filepath.Join(swtpmtest.ShortDir(t), "api")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("POST "+pathProjection, func(w http.ResponseWriter, r *http.Request) {
		if *resp == nil {
			w.WriteHeader(http.StatusInternalServerError)
			w.Write([]byte(`{"error":"projection: the host event log does not replay to the hardware TPM's PCRs"}`))
			return
		}
		json.NewEncoder(w).Encode(*resp)
	})
	srv := &http.Server{Handler: mux}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return NewClient(sock)
}

// FuzzProjectionCheck: the guard parses every command the guest sends; whatever the bytes, it
// answers nil or a well-formed error response, and only for the commands it guards.
func FuzzProjectionCheck(f *testing.F) {
	f.Add(pcrCommand(tpm2.TPMCCPCRExtend, 3))
	f.Add(pcrCommand(tpm2.TPMCCEventSequenceComplete, 0x40000007))
	f.Add(nvCommand(tpm2.TPMCCNVWrite, 0x40000001, ProjectionLogFirst))
	f.Add([]byte{0x80, 0x01, 0, 0, 0, 10, 0, 0, 1, 0x82})
	g := &projectionGuard{asked: true, readOnly: 1<<3 | 1<<23, logIdx: []uint32{ProjectionLogFirst}, log: slog.New(slog.DiscardHandler)}
	f.Fuzz(func(t *testing.T, cmd []byte) {
		rsp := g.Check(cmd)
		if rsp == nil {
			return
		}
		h, err := tpmwire.ParseHeader(cmd)
		if err != nil {
			t.Fatalf("refused an unparsable command")
		}
		rc, err := tpmwire.ResponseCode(rsp)
		if err != nil || (rc != tpmwire.RCLocality && rc != rcNVAuthorization) || len(rsp) != 10 {
			t.Fatalf("response %x (%v)", rsp, err)
		}
		first := binary.BigEndian.Uint32(cmd[10:])
		if rc == tpmwire.RCLocality && first != 3 && first != 23 {
			t.Fatalf("refused PCR %d (code %#x)", first, h.Code)
		}
		if rc == rcNVAuthorization && !bytes.Contains(cmd[10:min(len(cmd), 18)], tpmwire.U32(ProjectionLogFirst)) {
			t.Fatalf("refused an NV command not naming the log: %x", cmd)
		}
	})
}
