package hwtpm

import (
	"errors"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
)

const testIndex = 0x01000100 // in the owner range of NV indices

func TestCounter(t *testing.T) {
	sw := startSwtpm(t)
	tpm := sw.open()
	ctx := testContext(t)

	if _, err := tpm.ReadCounter(ctx, testIndex); !errors.Is(err, ErrNoCounter) {
		t.Fatalf("ReadCounter before DefineCounter: %v, want ErrNoCounter", err)
	}
	if _, err := tpm.Increment(ctx, testIndex); !errors.Is(err, ErrNoCounter) {
		t.Fatalf("Increment before DefineCounter: %v, want ErrNoCounter", err)
	}
	if err := tpm.DefineCounter(ctx, testIndex); err != nil {
		t.Fatal(err)
	}
	first, err := tpm.ReadCounter(ctx, testIndex)
	if err != nil {
		t.Fatal(err)
	}
	if err := tpm.DefineCounter(ctx, testIndex); err != nil {
		t.Fatalf("DefineCounter again: %v", err)
	}
	if v, err := tpm.ReadCounter(ctx, testIndex); err != nil || v != first {
		t.Fatalf("after a second DefineCounter: ReadCounter = %d, %v; want %d (kept as it was)", v, err, first)
	}

	last := first
	start := time.Now()
	const n = 5
	for range n {
		v, err := tpm.Increment(ctx, testIndex)
		if err != nil {
			t.Fatal(err)
		}
		if v != last+1 {
			t.Fatalf("Increment = %d after %d", v, last)
		}
		last = v
	}
	t.Logf("swtpm 0.7.1: increment %v each (counter started at %d)", time.Since(start)/n, first)
	start = time.Now()
	if v, err := tpm.ReadCounter(ctx, testIndex); err != nil || v != last {
		t.Fatalf("ReadCounter = %d, %v; want %d", v, err, last)
	}
	t.Logf("swtpm 0.7.1: read counter %v", time.Since(start))

	// The counter survives swtpm's restart (SIGTERM, no TPM2_Shutdown) on the same state.
	if err := tpm.Close(); err != nil {
		t.Fatal(err)
	}
	sw.restart()
	tpm = sw.open()
	v, err := tpm.ReadCounter(ctx, testIndex)
	if err != nil {
		t.Fatalf("after restart: %v", err)
	}
	if v < last {
		t.Fatalf("after restart: counter %d went back from %d", v, last)
	}
	if err := tpm.DefineCounter(ctx, testIndex); err != nil {
		t.Fatalf("DefineCounter after restart: %v", err)
	}
	if w, err := tpm.Increment(ctx, testIndex); err != nil || w <= v {
		t.Fatalf("Increment after restart = %d, %v; want more than %d", w, err, v)
	}
}

func TestDefineCounterRefusesOtherIndices(t *testing.T) {
	tpm := startSwtpm(t).open()
	ctx := testContext(t)
	// An ordinary NV index of someone else's.
	err := tpm.do(ctx, func(tp transportTPM) error {
		_, err := tpm2.NVDefineSpace{
			AuthHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)},
			PublicInfo: tpm2.New2B(tpm2.TPMSNVPublic{
				NVIndex:    tpm2.TPMHandle(testIndex),
				NameAlg:    tpm2.TPMAlgSHA256,
				Attributes: tpm2.TPMANV{NT: tpm2.TPMNTOrdinary, AuthRead: true, AuthWrite: true, NoDA: true},
				DataSize:   8,
			}),
		}.Execute(tp)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := tpm.DefineCounter(ctx, testIndex); !errors.Is(err, ErrIndexInUse) {
		t.Errorf("DefineCounter over an ordinary index: %v, want ErrIndexInUse", err)
	}
	if _, err := tpm.Increment(ctx, testIndex); !errors.Is(err, ErrIndexInUse) {
		t.Errorf("Increment of an ordinary index: %v, want ErrIndexInUse", err)
	}
	for _, bad := range []uint32{0, 0x81000001, 0x02000000} {
		if err := tpm.DefineCounter(ctx, bad); err == nil {
			t.Errorf("DefineCounter(0x%08x) succeeded", bad)
		}
	}
}
