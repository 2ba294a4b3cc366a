package libtpms

import (
	"bytes"
	"encoding/binary"
	"errors"
	"os"
	"testing"

	"github.com/vtpmd/vtpmd/emulator"
)

var (
	startupClear = []byte{0x80, 0x01, 0, 0, 0, 0x0c, 0, 0, 0x01, 0x44, 0, 0}
	getRandom8   = []byte{0x80, 0x01, 0, 0, 0, 0x0c, 0, 0, 0x01, 0x7b, 0, 8}
)

func rc(resp []byte) uint32 { return binary.BigEndian.Uint32(resp[6:10]) }

// pcrExtend16 builds TPM2_PCR_Extend(16, sha256 digest d) with a password session.
func pcrExtend16(d [32]byte) []byte {
	b := []byte{0x80, 0x02, 0, 0, 0, 0x41, 0, 0, 0x01, 0x82, 0, 0, 0, 0x10, 0, 0, 0, 9, 0x40, 0, 0, 9, 0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 0x0b}
	return append(b, d[:]...)
}

func pcrRead16(t *testing.T, e *Engine) []byte {
	t.Helper()
	cmd := []byte{0x80, 0x01, 0, 0, 0, 0x14, 0, 0, 0x01, 0x7e, 0, 0, 0, 1, 0, 0x0b, 3, 0, 0, 1}
	resp, err := e.Process(cmd)
	if err != nil || rc(resp) != 0 {
		t.Fatalf("PCR_Read: %x %v", resp, err)
	}
	return resp[len(resp)-32:]
}

func TestEngineLifecycle(t *testing.T) {
	st := emulator.NewMemStore()
	e, err := Open(emulator.TPM2, st, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.Close)
	if _, err := Open(emulator.TPM2, st, nil); !errors.Is(err, emulator.ErrInUse) {
		t.Fatalf("second Open: %v, want emulator.ErrInUse", err)
	}
	if _, err := e.Process(startupClear); !errors.Is(err, emulator.ErrNotRunning) {
		t.Fatalf("Process before Start: %v", err)
	}
	if err := e.Start(); err != nil {
		t.Fatal(err)
	}
	if _, err := st.Load(emulator.StatePermanent); err != nil {
		t.Fatal("manufacture did not store permall")
	}
	resp, err := e.Process(startupClear)
	if err != nil || rc(resp) != 0 {
		t.Fatalf("Startup: %x %v", resp, err)
	}
	resp, err = e.Process(getRandom8)
	if err != nil || rc(resp) != 0 || len(resp) != 20 {
		t.Fatalf("GetRandom: %x %v", resp, err)
	}
	if e.LastOrdinal() != 0x17b {
		t.Fatalf("LastOrdinal = %#x", e.LastOrdinal())
	}
	var a [32]byte
	copy(a[:], bytes.Repeat([]byte("A"), 32))
	resp, err = e.Process(pcrExtend16(a))
	if err != nil || rc(resp) != 0 {
		t.Fatalf("PCR_Extend: %x %v", resp, err)
	}
	pcr := pcrRead16(t, e)

	// volatile state carries PCRs across a stop/start.
	vol, err := e.VolatileState()
	if err != nil || len(vol) == 0 {
		t.Fatalf("VolatileState: %v", err)
	}
	perm, err := e.GetState(emulator.StatePermanent)
	if err != nil || len(perm) == 0 {
		t.Fatalf("GetState: %v", err)
	}
	e.Stop()
	if err := e.SetState(emulator.StatePermanent, perm); err != nil {
		t.Fatal(err)
	}
	if err := e.SetState(emulator.StateVolatile, vol); err != nil {
		t.Fatal(err)
	}
	if err := e.Start(); err != nil {
		t.Fatal(err)
	}
	if got := pcrRead16(t, e); !bytes.Equal(got, pcr) {
		t.Fatalf("PCR16 after resume = %x, want %x", got, pcr)
	}
	if err := e.SetState(emulator.StatePermanent, perm); !errors.Is(err, emulator.ErrRunning) {
		t.Fatalf("SetState while running: %v", err)
	}
	// a second Startup is refused by the TPM itself (TPM_RC_INITIALIZE), not as an error.
	resp, err = e.Process(startupClear)
	if err != nil || rc(resp) != 0x100 {
		t.Fatalf("second Startup: %x %v", resp, err)
	}
}

func TestEngineRejectsGarbageState(t *testing.T) {
	st := emulator.NewMemStore()
	e, err := Open(emulator.TPM2, st, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.Close)
	if err := e.SetState(emulator.StatePermanent, []byte("not a libtpms blob at all")); err == nil {
		t.Fatal("SetState accepted garbage")
	}
	if _, _, _, err := e.SetBufferSize(0); err != nil {
		t.Fatal(err)
	}
	sz, mn, mx, _ := e.SetBufferSize(1000)
	if sz != mn || mx < sz {
		t.Fatalf("SetBufferSize(1000) = %d [%d,%d], want clamped to min", sz, mn, mx)
	}
	if info := e.Info(1); !bytes.Contains([]byte(info), []byte(`"family":"2.0"`)) {
		t.Fatalf("Info(1) = %s", info)
	}
}

func TestEngineTPM12(t *testing.T) {
	st := emulator.NewMemStore()
	e, err := Open(emulator.TPM12, st, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.Close)
	if err := e.Start(); err != nil {
		t.Fatal(err)
	}
	// TPM_Startup(ST_CLEAR)
	resp, err := e.Process([]byte{0x00, 0xc1, 0, 0, 0, 0x0c, 0, 0, 0, 0x99, 0, 1})
	if err != nil || len(resp) < 10 || resp[1] != 0xc4 || rc(resp) != 0 {
		t.Fatalf("TPM_Startup: %x %v", resp, err)
	}
}

// TestSetDebug: libtpms' own messages (here: a permanent state it cannot read) go to the file
// SetDebug names, as swtpm's --log gets them.
func TestSetDebug(t *testing.T) {
	f, err := os.CreateTemp(t.TempDir(), "log")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	SetDebug(int(f.Fd()), 20)
	t.Cleanup(func() { SetDebug(2, 0) })
	st := emulator.NewMemStore()
	st.Store(emulator.StatePermanent, bytes.Repeat([]byte{0xab}, 64))
	e, err := Open(emulator.TPM2, st, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	if err := e.Start(); err == nil {
		t.Fatal("started on a garbage permanent state")
	}
	logged, _ := os.ReadFile(f.Name())
	if !bytes.Contains(logged, []byte("libtpms")) {
		t.Fatalf("libtpms wrote nothing to the debug file: %q", logged)
	}
}

// TestProcessAppend: the appending form answers as Process does, into the caller's buffer, and
// allocates nothing once the buffer is large enough (the data channel's hot path).
func TestProcessAppend(t *testing.T) {
	e, err := Open(emulator.TPM2, emulator.NewMemStore(), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.Close)
	if _, err := e.ProcessAppend(nil, getRandom8); !errors.Is(err, emulator.ErrNotRunning) {
		t.Fatalf("ProcessAppend before Start: %v", err)
	}
	if err := e.Start(); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 0, 4096)
	resp, err := e.ProcessAppend(buf, startupClear)
	if err != nil || rc(resp) != 0 || len(resp) != 10 {
		t.Fatalf("Startup: %x %v", resp, err)
	}
	prefix := []byte("kept")
	resp, err = e.ProcessAppend(append(buf[:0], prefix...), getRandom8)
	if err != nil || !bytes.HasPrefix(resp, prefix) || len(resp) != len(prefix)+20 || rc(resp[len(prefix):]) != 0 {
		t.Fatalf("GetRandom appended: %x %v", resp, err)
	}
	if &resp[0] != &buf[:1][0] {
		t.Fatal("the response was not written into the caller's buffer")
	}
	allocs := testing.AllocsPerRun(100, func() {
		if resp, err = e.ProcessAppend(buf[:0], getRandom8); err != nil || rc(resp) != 0 {
			t.Fatalf("GetRandom: %x %v", resp, err)
		}
	})
	if allocs != 0 {
		t.Fatalf("ProcessAppend allocates %.1f times per command, want 0", allocs)
	}
}
