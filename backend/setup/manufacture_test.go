package setup

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/vtpmd/vtpmd/backend/setup/provision"
	"github.com/vtpmd/vtpmd/backend/store"
)

func TestManufacture(t *testing.T) {
	dir := t.TempDir()
	uri := "dir://" + dir
	perm := filepath.Join(dir, "tpm2-00.permall")
	res, err := Manufacture(context.Background(), ManufactureConfig{StateURI: uri, TPM2: true,
		Provision: provision.Options{CreateEK: true, PCRBanks: []string{"sha256"}}})
	if err != nil || res.Kept || len(res.EKs) != 2 {
		t.Fatalf("fresh: %+v, %v", res, err)
	}
	first, err := os.ReadFile(perm)
	if err != nil {
		t.Fatal(err)
	}
	// a stale volatile state of the old TPM is removed by an overwrite
	os.WriteFile(filepath.Join(dir, "tpm2-00.volatilestate"), []byte("stale"), 0o600)
	if _, err := Manufacture(context.Background(), ManufactureConfig{StateURI: uri, TPM2: true}); !errors.Is(err, ErrStateExists) {
		t.Fatalf("existing state: %v", err)
	}
	if res, err := Manufacture(context.Background(), ManufactureConfig{StateURI: uri, TPM2: true, NotOverwrite: true, Overwrite: true}); err != nil || !res.Kept {
		t.Fatalf("not-overwrite: %+v, %v", res, err)
	}
	if b, _ := os.ReadFile(perm); string(b) != string(first) {
		t.Fatal("kept state changed")
	}
	started := false
	if _, err := Manufacture(context.Background(), ManufactureConfig{StateURI: uri, TPM2: true, Overwrite: true, Started: func() { started = true }}); err != nil || !started {
		t.Fatalf("overwrite: %v (started %v)", err, started)
	}
	if b, _ := os.ReadFile(perm); string(b) == string(first) {
		t.Fatal("overwrite kept the old state")
	}
	if _, err := os.Stat(filepath.Join(dir, "tpm2-00.volatilestate")); err == nil {
		t.Fatal("overwrite kept the old volatile state")
	}
	// a failing run (bad bank) leaves the state as it was
	before, _ := os.ReadFile(perm)
	if _, err := Manufacture(context.Background(), ManufactureConfig{StateURI: uri, TPM2: true, Reconfigure: true,
		Provision: provision.Options{PCRBanks: []string{"sm3-256"}}}); err == nil {
		t.Fatal("allocating a bank libtpms lacks succeeded")
	}
	if after, _ := os.ReadFile(perm); string(after) != string(before) {
		t.Fatal("a failed reconfigure changed the state")
	}
	// TPM 1.2 files
	d12 := t.TempDir()
	if _, err := Manufacture(context.Background(), ManufactureConfig{StateURI: "dir://" + d12, Provision12: provision.Options12{CreateEK: true}}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(d12, "tpm-00.permall")); err != nil {
		t.Fatal(err)
	}
	if _, err := Manufacture(context.Background(), ManufactureConfig{StateURI: "dir://" + d12, Reconfigure: true}); err == nil {
		t.Fatal("TPM 1.2 reconfigure accepted")
	}
}

// TestManufactureRefusesLockedState: a state held by a running vtpmd or swtpm (its .lock) is
// never replaced.
func TestManufactureRefusesLockedState(t *testing.T) {
	dir := t.TempDir()
	uri := "dir://" + dir
	if _, err := Manufacture(context.Background(), ManufactureConfig{StateURI: uri, TPM2: true}); err != nil {
		t.Fatal(err)
	}
	before, _ := os.ReadFile(filepath.Join(dir, "tpm2-00.permall"))
	running, err := store.Open(uri, store.Options{TPM2: true, Lock: true})
	if err != nil {
		t.Fatal(err)
	}
	defer running.Close()
	if err := running.Lock(0); err != nil {
		t.Fatal(err)
	}
	if _, err := Manufacture(context.Background(), ManufactureConfig{StateURI: uri, TPM2: true, Overwrite: true}); err == nil {
		t.Fatal("overwrote a locked state")
	}
	if after, _ := os.ReadFile(filepath.Join(dir, "tpm2-00.permall")); string(after) != string(before) {
		t.Fatal("the locked state changed")
	}
}
