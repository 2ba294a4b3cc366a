package manager

import (
	"context"
	"os/exec"
	"strings"
	"testing"

	"github.com/vtpmd/vtpmd/backend/blob"
	"github.com/vtpmd/vtpmd/backend/store"
)

// runningVTPM starts a process whose command line is a vTPM's serving state (proc.IsInstance:
// "socket" and dir=PATH), until the test ends.
func runningVTPM(t *testing.T, state string) *exec.Cmd {
	t.Helper()
	cmd := exec.Command("sh", "-c", "sleep 60; true", "socket", "--tpmstate", "dir="+state)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	return cmd
}

// TestEnrollRefusedWhileInUse: enroll and unenroll of a vTPM that is running are refused
// before anything changes. Before the fix the record was already saved (enrolling,
// unenrolling) when the running vTPM was found, so the VM's next start was refused as an
// incomplete enrolment, although its state had not changed.
func TestEnrollRefusedWhileInUse(t *testing.T) {
	hw := &fakeHardware{counter: 1}
	s := openFake(t, t.TempDir(), hw)
	st := stateDir(t)
	writeState(t, st, nil, "permanent", "volatile")
	ctx, root := context.Background(), Peer{UID: 0}

	vm := runningVTPM(t, st)
	if _, err := s.enroll(ctx, root, &VMRequest{VM: st}); err == nil || !strings.Contains(err.Error(), "in use") {
		t.Fatalf("enroll of a running vTPM: %v", err)
	}
	if rec := s.ledger.findByPath(st); rec != nil {
		t.Fatalf("a refused enroll left a record (%s): the VM's next start would be refused", rec.Phase)
	}
	checkState(t, st, nil, "permanent", "volatile")
	vm.Process.Kill()
	vm.Wait()

	if _, err := s.enroll(ctx, root, &VMRequest{VM: st}); err != nil {
		t.Fatal(err)
	}
	rec := s.ledger.findByPath(st)
	key, _ := hw.Unseal(ctx, rec.Sealed)
	k, _ := blob.NewKey(key)
	runningVTPM(t, st)
	if _, err := s.unenroll(ctx, root, &VMRequest{VM: st}); err == nil || !strings.Contains(err.Error(), "in use") {
		t.Fatalf("unenroll of a running vTPM: %v", err)
	}
	if rec := s.ledger.findByPath(st); rec == nil || rec.Phase != phaseEnrolled {
		t.Fatalf("a refused unenroll left the record %+v: the VM's next start would be refused", rec)
	}
	checkState(t, st, k, "permanent", "volatile")
}

// TestEnrollRefusedWhileLocked: a state whose lock is held (a vTPM that does not show as one
// in /proc, e.g. in another PID namespace) is refused the same way.
func TestEnrollRefusedWhileLocked(t *testing.T) {
	s := openFake(t, t.TempDir(), &fakeHardware{counter: 1})
	st := stateDir(t)
	writeState(t, st, nil, "permanent")
	held, err := store.Open("dir://"+st, store.Options{TPM2: true, Lock: true})
	if err != nil {
		t.Fatal(err)
	}
	if err := held.Lock(0); err != nil {
		t.Fatal(err)
	}
	if _, err := s.enroll(context.Background(), Peer{UID: 0}, &VMRequest{VM: st}); err == nil {
		t.Fatal("enrolled a locked state")
	}
	if rec := s.ledger.findByPath(st); rec != nil {
		t.Fatalf("a refused enroll left a record (%s)", rec.Phase)
	}
	held.Close()
	if _, err := s.enroll(context.Background(), Peer{UID: 0}, &VMRequest{VM: st}); err != nil {
		t.Fatal(err)
	}
}
