package daemon

import (
	"context"
	"runtime/metrics"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

var sink [][]byte

// TestReturnIdleMemory: a burst of allocation followed by quiet is returned (once); a process
// that allocates little is never collected; a busy process is left alone until it goes quiet.
func TestReturnIdleMemory(t *testing.T) {
	var frees atomic.Int32
	var limits []int64 // guarded by limitMu
	var limitMu sync.Mutex
	m := memoryReturn{quiet: 20 * time.Millisecond, maxQuiet: 80 * time.Millisecond, minBurst: 4 << 20, quietAlloc: 64 << 10,
		headroom: 1 << 20, free: func() { frees.Add(1) },
		setLimit: func(l int64) int64 {
			if l >= 0 {
				limitMu.Lock()
				limits = append(limits, l)
				limitMu.Unlock()
			}
			return noLimit
		}}
	setLimits := func() []int64 { limitMu.Lock(); defer limitMu.Unlock(); return append([]int64(nil), limits...) }
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go m.run(ctx)

	time.Sleep(300 * time.Millisecond) // quiet from the start: nothing to return
	if n := frees.Load(); n != 0 {
		t.Fatalf("%d returns without a burst", n)
	}
	if l := setLimits(); len(l) != 0 {
		t.Fatalf("memory limit %v set on a quiet process", l)
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
	// the burst set the busy limit once: above what the runtime held, by the headroom
	if l := setLimits(); len(l) != 1 || uint64(l[0]) < m.headroom || uint64(l[0]) > goMemory()+m.headroom+16<<20 {
		t.Fatalf("memory limits set %v, want one a little above %d", l, goMemory())
	}
}

// TestReturnIdleMemoryKeepsGivenLimit: a GOMEMLIMIT the process was given is not replaced.
func TestReturnIdleMemoryKeepsGivenLimit(t *testing.T) {
	var set atomic.Int32
	m := defaultMemoryReturn
	m.quiet, m.maxQuiet, m.minBurst = 10*time.Millisecond, 20*time.Millisecond, 1<<20
	m.free = func() {}
	m.setLimit = func(l int64) int64 {
		if l >= 0 {
			set.Add(1)
		}
		return 64 << 20 // as if GOMEMLIMIT=64MiB
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go m.run(ctx)
	for i := 0; i < 32; i++ {
		sink = append(sink, make([]byte, 128<<10))
		time.Sleep(2 * time.Millisecond)
	}
	sink = nil
	time.Sleep(100 * time.Millisecond)
	if n := set.Load(); n != 0 {
		t.Fatalf("the given memory limit was replaced %d times", n)
	}
}

// TestReturnIdleMemoryReleases: with the real return, the freed heap goes back to the OS.
func TestReturnIdleMemoryReleases(t *testing.T) {
	var frees atomic.Int32
	m := defaultMemoryReturn
	m.quiet, m.maxQuiet = 20*time.Millisecond, 40*time.Millisecond
	m.free = func() { defaultMemoryReturn.free(); frees.Add(1) }
	m.setLimit = func(int64) int64 { return noLimit } // the test process keeps its own
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
