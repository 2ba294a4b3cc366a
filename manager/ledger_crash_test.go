package manager

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"
)

// fakeHardware is a Hardware in memory: sealing is a copy (no secrecy), the counter a number
// that starts at 1, as hwtpm.DefineCounter leaves a new one. cut makes that many Increments
// count and then fail, as a manager killed between a save's increment and its write, or a TPM
// command cut short after the TPM ran it; so does an Increment under a cancelled context.
type fakeHardware struct {
	counter uint64
	cut     int
}

func (h *fakeHardware) Seal(_ context.Context, secret []byte) (json.RawMessage, error) {
	return json.Marshal(secret)
}

func (h *fakeHardware) Unseal(_ context.Context, sealed json.RawMessage) ([]byte, error) {
	var b []byte
	err := json.Unmarshal(sealed, &b)
	return b, err
}

func (h *fakeHardware) Increment(ctx context.Context) (uint64, error) {
	h.counter++
	if ctx.Err() != nil {
		return 0, fmt.Errorf("increment cut short after it counted: %w", ctx.Err())
	}
	if h.cut > 0 {
		h.cut--
		return 0, errors.New("killed between the increment and the ledger's write")
	}
	return h.counter, nil
}

func (h *fakeHardware) Read(context.Context) (uint64, error) { return h.counter, nil }
func (h *fakeHardware) PolicyName() string                   { return "none" }
func (h *fakeHardware) Describe() string                     { return "fake" }
func (h *fakeHardware) Close() error                         { return nil }

func openFake(t *testing.T, dir string, hw *fakeHardware) *Server {
	t.Helper()
	s, err := New(context.Background(), Config{Dir: dir, InstanceExe: "/bin/true"}, hw)
	if err != nil {
		t.Fatalf("the manager does not start (counter %d): %v", hw.counter, err)
	}
	return s
}

// addFake adds a record, as an enrolment does; it reports whether it was acknowledged.
func addFake(s *Server, i int) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	rec := &vmRecord{ID: fmt.Sprint("vm", i), StatePath: fmt.Sprint("/state/", i), Phase: phaseEnrolled, Sealed: json.RawMessage(`"a2V5"`)}
	return s.addRecord(context.Background(), rec) == nil
}

// TestLedgerKilledBetweenIncrementAndWrite: a manager killed between a save's increment and
// its write starts again, however often that happens in a row, from its first save on, and
// keeps every acknowledged record. Before the fix, a first save cut there left no ledger and
// a counter at 2 ("ledger.json is missing but the counter is at 2"), and two cuts in a row
// left the ledger two behind: both refused as a rollback, for good.
func TestLedgerKilledBetweenIncrementAndWrite(t *testing.T) {
	hw, dir := &fakeHardware{counter: 1}, t.TempDir()
	s := openFake(t, dir, hw)
	acked := 0
	for i := 0; i < 8; i++ {
		if i%3 == 1 { // between cuts (the first save, then two in a row), a save that completes
			if !addFake(s, i) {
				t.Fatalf("save %d failed", i)
			}
			acked++
		} else {
			hw.cut = 1
			if addFake(s, i) {
				t.Fatalf("save %d was acknowledged though cut", i)
			}
		}
		s = openFake(t, dir, hw) // killed: a new manager on the same directory and TPM
		if len(s.ledger.VMs) != acked {
			t.Fatalf("after save %d: %d records, %d acknowledged", i, len(s.ledger.VMs), acked)
		}
		if s.ledger.Counter != hw.counter {
			t.Fatalf("after save %d: the ledger carries %d, the counter is %d", i, s.ledger.Counter, hw.counter)
		}
	}
	// a rollback is still refused: the ledger as it was two saves ago
	old, _ := os.ReadFile(filepath.Join(dir, ledgerName))
	addFake(s, 100)
	addFake(s, 101)
	os.WriteFile(filepath.Join(dir, ledgerName), old, 0o600)
	if _, err := New(context.Background(), Config{Dir: dir, InstanceExe: "/bin/true"}, hw); !errors.Is(err, ErrLedgerRollback) {
		t.Fatalf("a ledger two saves old: %v", err)
	}
}

// TestLedgerFailedSavesStayOneBehind: saves that fail after their increment counted, one after
// another in a running manager, leave the ledger at most one behind: the manager starts again.
// A save is not cut short by its request going away (a vTPM killed while it reports a version).
func TestLedgerFailedSavesStayOneBehind(t *testing.T) {
	hw, dir := &fakeHardware{counter: 1}, t.TempDir()
	s := openFake(t, dir, hw)
	acked := 0
	for i := 0; i < 6; i++ {
		hw.cut = 1 // every increment fails after it counted
		if addFake(s, i) {
			acked++
		}
	}
	if acked == 0 {
		t.Fatal("no save completed after a failed one")
	}
	s = openFake(t, dir, hw)
	if len(s.ledger.VMs) != acked {
		t.Fatalf("%d records, %d acknowledged", len(s.ledger.VMs), acked)
	}

	hw.cut = 0
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	s.mu.Lock()
	err := s.addRecord(ctx, &vmRecord{ID: "gone", StatePath: "/state/gone", Phase: phaseEnrolled})
	s.mu.Unlock()
	if err != nil {
		t.Fatalf("a save whose request went away: %v", err)
	}
	if s = openFake(t, dir, hw); s.ledger.VMs["gone"] == nil {
		t.Fatal("the save whose request went away is not in the ledger")
	}
}
