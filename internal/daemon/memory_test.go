package daemon

import (
	"context"
	"runtime/metrics"
	"sync/atomic"
	"testing"
	"time"
)

var sink [][]byte

// TestReturnIdleMemory: a burst of allocation followed by quiet is returned (once); a process
// that allocates little is never collected; a busy process is left alone until it goes quiet.
func TestReturnIdleMemory(t *testing.T) {
	var frees atomic.Int32
	m := memoryReturn{quiet: 20 * time.Millisecond, maxQuiet: 80 * time.Millisecond, minBurst: 4 << 20, quietAlloc: 64 << 10,
		free: func() { frees.Add(1) }}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go m.run(ctx)

	time.Sleep(300 * time.Millisecond) // quiet from the start: nothing to return
	if n := frees.Load(); n != 0 {
		t.Fatalf("%d returns without a burst", n)
	}
	// busy: 8 MiB over ~200 ms, more than quietAlloc per interval
	for i := 0; i < 40; i++ {
		sink = append(sink, make([]byte, 200<<10))
		time.Sleep(5 * time.Millisecond)
		if i == 30 && frees.Load() != 0 {
			t.Fatal("returned during the burst")
		}
	}
	sink = nil
	deadline := time.Now().Add(3 * time.Second)
	for frees.Load() == 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if frees.Load() != 1 {
		t.Fatalf("%d returns after the burst, want 1", frees.Load())
	}
	time.Sleep(300 * time.Millisecond)
	if n := frees.Load(); n != 1 {
		t.Fatalf("%d returns after one burst, want 1", n)
	}
}

// TestReturnIdleMemoryReleases: with the real return, the freed heap goes back to the OS.
func TestReturnIdleMemoryReleases(t *testing.T) {
	var frees atomic.Int32
	m := defaultMemoryReturn
	m.quiet, m.maxQuiet = 20*time.Millisecond, 40*time.Millisecond
	m.free = func() { defaultMemoryReturn.free(); frees.Add(1) }
	released := func() uint64 {
		s := []metrics.Sample{{Name: "/memory/classes/heap/released:bytes"}}
		metrics.Read(s)
		return s[0].Value.Uint64()
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go m.run(ctx)
	time.Sleep(50 * time.Millisecond)
	before := released()
	for i := 0; i < 64; i++ {
		sink = append(sink, make([]byte, 64<<10))
	}
	sink = nil
	deadline := time.Now().Add(3 * time.Second)
	for frees.Load() == 0 || released() < before+2<<20 {
		if time.Now().After(deadline) {
			t.Fatalf("%d returns; released %d bytes after the burst, want ≥ 2 MiB more than %d", frees.Load(), released(), before)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
