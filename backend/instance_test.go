package backend

import (
	"bytes"
	"testing"

	"github.com/google/go-tpm/tpm2"

	"github.com/vtpmd/vtpmd/backend/store"
	"github.com/vtpmd/vtpmd/emulator"
	"github.com/vtpmd/vtpmd/internal/tpmclient"
	"github.com/vtpmd/vtpmd/socket"
)

func newInstance(t *testing.T, dir string, cfg Config) *Instance {
	t.Helper()
	st, err := store.Open(dir, store.Options{TPM2: true, Lock: true})
	if err != nil {
		t.Fatal(err)
	}
	cfg.Version, cfg.Store = emulator.TPM2, st
	in, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { in.Close(); st.Close() })
	return in
}

// TestAutoShutdown: a STOP or re-INIT after an unclean guest stop sends TPM2_Shutdown(STATE), so
// the next Startup(STATE) resumes (swtpm 0.8+: no DA lockout after power loss); with
// DisableAutoShutdown it does not.
func TestAutoShutdown(t *testing.T) {
	for _, disable := range []bool{false, true} {
		in := newInstance(t, t.TempDir(), Config{DisableAutoShutdown: disable})
		tp := tpmclient.SendFunc(in.Process)
		if err := in.Init(0); err != nil {
			t.Fatal(err)
		}
		if err := tpmclient.Startup(tp); err != nil {
			t.Fatal(err)
		}
		if err := in.Init(0); err != nil { // guest reset without TPM2_Shutdown
			t.Fatal(err)
		}
		_, err := tpm2.Startup{StartupType: tpm2.TPMSUState}.Execute(tp)
		if disable != (err != nil) {
			t.Fatalf("disable-auto-shutdown=%v: Startup(STATE) err=%v", disable, err)
		}
		in.Close()
	}
}

func TestStateBlobsAndLocking(t *testing.T) {
	dir := t.TempDir()
	in := newInstance(t, dir, Config{})
	if _, _, err := in.GetStateBlob(socket.BlobPermanent, true); err == nil {
		// not running: the server rejects this before calling, but the store has nothing yet
		t.Log("permanent blob available before INIT")
	}
	if err := in.Init(0); err != nil {
		t.Fatal(err)
	}
	tp := tpmclient.SendFunc(in.Process)
	tpmclient.Startup(tp)
	a := bytes.Repeat([]byte{1}, 32)
	if err := tpmclient.PCRExtend(tp, 16, a); err != nil {
		t.Fatal(err)
	}
	want, _ := tpmclient.PCRRead(tp, 16)
	perm, _, err := in.GetStateBlob(socket.BlobPermanent, true)
	if err != nil {
		t.Fatal(err)
	}
	vol, _, err := in.GetStateBlob(socket.BlobVolatile, true)
	if err != nil {
		t.Fatal(err)
	}
	if b, _, err := in.GetStateBlob(socket.BlobSavestate, true); err != nil || b != nil {
		t.Fatalf("TPM 2 savestate: %v %v", b, err)
	}
	if b, _, err := in.GetStateBlob(9, true); err != nil || b != nil { // no such blob, as swtpm
		t.Fatalf("unknown type: %v %v", b, err)
	}
	// savestate fetched: the lock is released, so a second instance's store can take it
	other, _ := store.Open(dir, store.Options{TPM2: true, Lock: true})
	if err := other.Lock(0); err != nil {
		t.Fatalf("lock not released after savestate: %v", err)
	}
	if err := in.SetStateBlob(socket.BlobPermanent, false, perm); err == nil {
		t.Fatal("SET_STATEBLOB accepted while another process holds the lock")
	}
	other.Close()
	in.Stop()
	if err := in.SetStateBlob(socket.BlobPermanent, false, perm); err != nil {
		t.Fatal(err)
	}
	if err := in.SetStateBlob(socket.BlobVolatile, false, vol); err != nil {
		t.Fatal(err)
	}
	if err := in.Init(socket.InitFlagDeleteVolatile); err != nil {
		t.Fatal(err)
	}
	if got, _ := tpmclient.PCRRead(tp, 16); !bytes.Equal(got, want) {
		t.Fatalf("PCR16 after SET_STATEBLOB+INIT = %x, want %x", got, want)
	}
}

// recordingStore remembers the last blob of each type libtpms handed over.
type recordingStore struct {
	*disk
	last map[emulator.StateType][]byte
}

type disk = store.Store

func (r *recordingStore) Store(t emulator.StateType, b []byte) error {
	r.last[t] = append([]byte(nil), b...)
	return r.disk.Store(t, b)
}

// TestStartWith: not-need-init with a startup command powers on and runs TPM2_Startup in one
// deferral, and returns only once the last permanent state libtpms wrote (the Startup's) is
// what a fresh reader loads from disk.
func TestStartWith(t *testing.T) {
	dir := t.TempDir()
	st, err := store.Open(dir, store.Options{TPM2: true, Lock: true})
	if err != nil {
		t.Fatal(err)
	}
	rec := &recordingStore{disk: st, last: map[emulator.StateType][]byte{}}
	in, err := New(Config{Version: emulator.TPM2, Store: rec})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { in.Close(); st.Close() })
	resp, err := in.StartWith([]byte{0x80, 0x01, 0, 0, 0, 0x0c, 0, 0, 0x01, 0x44, 0, 0})
	if err != nil {
		t.Fatal(err)
	}
	if len(resp) != 10 || !bytes.Equal(resp[6:10], []byte{0, 0, 0, 0}) {
		t.Fatalf("TPM2_Startup(CLEAR) answered %x", resp)
	}
	if _, err := tpmclient.GetRandom(tpmclient.SendFunc(in.Process), 8); err != nil {
		t.Fatalf("TPM not started: %v", err)
	}
	reader, err := store.Open(dir, store.Options{TPM2: true})
	if err != nil {
		t.Fatal(err)
	}
	defer reader.Close()
	onDisk, err := reader.Load(emulator.StatePermanent)
	if err != nil {
		t.Fatal(err)
	}
	if last := rec.last[emulator.StatePermanent]; len(last) == 0 || !bytes.Equal(last, onDisk) {
		t.Fatalf("permanent state on disk (%d bytes) is not the last one written (%d bytes)", len(onDisk), len(last))
	}
	// A power-on whose startup the TPM refuses (an unknown startup type) returns its answer.
	resp, err = in.StartWith([]byte{0x80, 0x01, 0, 0, 0, 0x0c, 0, 0, 0x01, 0x44, 0, 5})
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Equal(resp[6:10], []byte{0, 0, 0, 0}) {
		t.Fatalf("Startup(5) succeeded: %x", resp)
	}
}
