package manager

import (
	"bytes"
	"context"
	"errors"
	"testing"

	"github.com/vtpmd/vtpmd/internal/swtpmtest"
	"github.com/vtpmd/vtpmd/manager/attest"
	"github.com/vtpmd/vtpmd/manager/registry"
)

// TestAttestReport: the manager's report for a vTPM carries the VM's UUID from the registry
// and a quote by its hardware AK over host PCRs 0-7 whose qualifying data binds the request;
// a request out of bounds is refused before the hardware TPM is asked.
func TestAttestReport(t *testing.T) {
	m := startManager(t, swtpmtest.Start(t), t.TempDir(), nil)
	path := stateDir(t)
	const uuid = "0f1e2d3c-4b5a-4968-8776-655443322110"
	if _, err := m.reg.Update(context.Background(), uuid, func(r *registry.Record) error { r.StateDir = path; return nil }); err != nil {
		t.Fatal(err)
	}
	name := func(c byte) []byte { return append([]byte{0, 0x0b}, bytes.Repeat([]byte{c}, 32)...) }
	req := &AttestRequest{StatePath: path, Nonce: []byte("nonce"), EKName: name(1), AKName: name(2),
		PCRHash: 0x000b, PCRMask: 0xffffff, PCRDigest: bytes.Repeat([]byte{3}, 32)}
	b, err := m.srv.buildReport(context.Background(), path, req)
	if err != nil {
		t.Fatal(err)
	}
	r, err := attest.Decode(b)
	if err != nil {
		t.Fatal(err)
	}
	want, _ := attest.ParseUUID(uuid)
	if !bytes.Equal(r.VMUUID, want) || !bytes.Equal(r.Nonce, req.Nonce) || r.HostPCRs.Mask != 0xff || len(r.HostPCRValues) != 8 {
		t.Fatalf("report %+v", r)
	}
	id, err := m.srv.HostIdentity()
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(r.HostAKName, id.AKName) {
		t.Fatalf("host AK name %x, identity's %x", r.HostAKName, id.AKName)
	}
	q, err := attest.ParseQuote(r.Attest)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(q.ExtraData, attest.QualifyingData(r)) {
		t.Fatal("the hardware quote does not carry the report's qualifying data")
	}
	if got, _ := attest.PCRDigest(0x000b, r.HostPCRValues); !bytes.Equal(got, q.PCRDigest) {
		t.Fatal("the host PCR values are not the quoted ones")
	}
	// out of bounds: refused as a bad request
	for _, mod := range []func(r *AttestRequest){
		func(r *AttestRequest) { r.Nonce = make([]byte, attest.MaxNonce+1) },
		func(r *AttestRequest) { r.EKName = []byte{1} },
		func(r *AttestRequest) { r.PCRHash = 0x1234 },
	} {
		bad := *req
		mod(&bad)
		if _, err := m.srv.buildReport(context.Background(), path, &bad); !errors.Is(err, errBadRequest) {
			t.Errorf("bad request: %v", err)
		}
	}
	// the endpoint itself refuses a peer that does not serve the state
	if _, err := m.client().AttestReport(context.Background(), *req); !errors.Is(err, ErrForbidden) {
		t.Fatalf("a foreign peer asked: %v", err)
	}
}
