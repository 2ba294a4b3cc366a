package manager

import (
	"context"
	"crypto/sha1"
	"crypto/sha256"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport/linuxudstpm"

	"github.com/vtpmd/vtpmd/internal/swtpmtest"
	"github.com/vtpmd/vtpmd/manager/eventlog"
	"github.com/vtpmd/vtpmd/manager/projection"
	"github.com/vtpmd/vtpmd/manager/registry"
)

// measure extends data's digests (SHA-1 and SHA-256) into a PCR of the swtpm and returns the
// event for the host's log.
func measure(t *testing.T, sock string, pcr int, data string) eventlog.Event {
	t.Helper()
	conn, err := linuxudstpm.Open(sock)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	s1, s2 := sha1.Sum([]byte(data)), sha256.Sum256([]byte(data))
	if _, err := (tpm2.PCRExtend{
		PCRHandle: tpm2.AuthHandle{Handle: tpm2.TPMHandle(pcr), Auth: tpm2.PasswordAuth(nil)},
		Digests: tpm2.TPMLDigestValues{Digests: []tpm2.TPMTHA{
			{HashAlg: tpm2.TPMAlgSHA1, Digest: s1[:]}, {HashAlg: tpm2.TPMAlgSHA256, Digest: s2[:]}}},
	}).Execute(conn); err != nil {
		t.Fatal(err)
	}
	return eventlog.Event{PCR: uint32(pcr), Type: 0x80000008, Data: []byte(data),
		Digests: []eventlog.Digest{{Alg: eventlog.AlgSHA1, Value: s1[:]}, {Alg: eventlog.AlgSHA256, Value: s2[:]}}}
}

// TestProjectionPlan: the manager's side of projection on a real (swtpm) hardware TPM: the
// host's log is checked against the hardware PCRs it reads, summary binds its EK name, and
// property needs its policy file.
func TestProjectionPlan(t *testing.T) {
	hw := swtpmtest.Start(t)
	evs := []eventlog.Event{measure(t, hw.Socket, 0, "firmware"), measure(t, hw.Socket, 7, "secure boot off")}
	dir := t.TempDir()
	good, _ := eventlog.Build([]uint16{eventlog.AlgSHA1, eventlog.AlgSHA256}, evs)
	bad, _ := eventlog.Build([]uint16{eventlog.AlgSHA1, eventlog.AlgSHA256}, evs[:1])
	for name, b := range map[string][]byte{"good": good, "bad": bad} {
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	m := startManager(t, hw, t.TempDir(), nil)
	ctx := context.Background()
	if err := m.srv.ConfigureProjection(ProjectionConfig{EventLog: filepath.Join(dir, "good")}); err != nil {
		t.Fatal(err)
	}
	p, err := m.srv.plan(ctx, &registry.Projection{Mode: projection.ModeMirror})
	if err != nil {
		t.Fatal(err)
	}
	if len(p.Events) != 2 || p.Events[0].PCR != 0 || p.Events[1].PCR != 7 {
		t.Fatalf("mirror plan %+v", p)
	}
	pcr := 23
	p, err = m.srv.plan(ctx, &registry.Projection{Mode: projection.ModeSummary, PCR: &pcr})
	if err != nil {
		t.Fatal(err)
	}
	id, err := m.srv.HostIdentity()
	if err != nil {
		t.Fatal(err)
	}
	pub, _ := tpm2.Unmarshal[tpm2.TPMTPublic](id.EKPublic)
	name, _ := tpm2.ObjectName(pub)
	host, _ := m.srv.hostMeasurements(ctx, false)
	want, _ := projection.SummaryPayload(host.PCRs[eventlog.AlgSHA256], name.Buffer)
	if d := sha256.Sum256(want); string(p.Events[0].Digest(eventlog.AlgSHA256)) != string(d[:]) {
		t.Fatal("summary does not bind the hardware PCRs and the EK's name")
	}
	if _, err := m.srv.plan(ctx, &registry.Projection{Mode: projection.ModeProperty}); !errors.Is(err, projection.ErrInput) {
		t.Fatalf("property without a policy file: %v", err)
	}
	// a log that misses an extend of the hardware's PCR 7
	if err := m.srv.ConfigureProjection(ProjectionConfig{EventLog: filepath.Join(dir, "bad")}); err != nil {
		t.Fatal(err)
	}
	if _, err := m.srv.plan(ctx, &registry.Projection{Mode: projection.ModeMirror}); !errors.Is(err, projection.ErrMismatch) {
		t.Fatalf("mirror of a log that does not replay: %v", err)
	}
	// a policy file that does not load is refused when configured
	os.WriteFile(filepath.Join(dir, "policy.json"), []byte(`{"rules":[{"property":"unknown","type":"EV_SEPARATOR"}]}`), 0o644)
	if err := m.srv.ConfigureProjection(ProjectionConfig{PropertyPolicy: filepath.Join(dir, "policy.json")}); !errors.Is(err, projection.ErrPolicy) {
		t.Fatalf("a policy naming unknown: %v", err)
	}
}
