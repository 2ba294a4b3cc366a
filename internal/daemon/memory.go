package daemon

import (
	"context"
	"runtime/debug"
	"runtime/metrics"
	"time"
)

// Idle memory return, for a process that serves one vTPM: hundreds of them live on a host, each
// mostly idle. Go keeps the heap it grew during a burst (control-channel blobs, durable NV
// writes, a guard's own commands) until its background scavenger gets to it, and that scavenger
// keeps about the GC goal (4 MiB at the least) resident. Once the process has gone quiet after
// allocating enough to matter, ReturnIdleMemory collects and hands the free pages back to the
// OS at once (debug.FreeOSMemory).
//
// A collection is not free either: the first one maps the collector's own bookkeeping (about
// 0.5 MiB here), so a process that allocated little is left alone. The checks back off while
// nothing is allocated, so an idle process wakes about once a minute.

// memoryReturn is when and how often the process checks.
type memoryReturn struct {
	quiet      time.Duration // first check interval after activity; a quiet interval ends a burst
	maxQuiet   time.Duration // the interval doubles up to this while nothing is allocated
	minBurst   uint64        // bytes allocated since the last return before one is worth a collection
	quietAlloc uint64        // bytes allocated within an interval that still count as quiet
	free       func()        // debug.FreeOSMemory
}

var defaultMemoryReturn = memoryReturn{
	quiet:      2 * time.Second,
	maxQuiet:   64 * time.Second,
	minBurst:   1 << 20,
	quietAlloc: 16 << 10,
	free:       debug.FreeOSMemory,
}

// ReturnIdleMemory starts returning the heap's free pages to the OS whenever the process goes
// quiet after a burst of allocation, until ctx ends.
func ReturnIdleMemory(ctx context.Context) {
	go defaultMemoryReturn.run(ctx)
}

// heapAllocated is the bytes allocated on the heap since the process started.
func heapAllocated() uint64 {
	s := []metrics.Sample{{Name: "/gc/heap/allocs:bytes"}}
	metrics.Read(s)
	if s[0].Value.Kind() != metrics.KindUint64 {
		return 0
	}
	return s[0].Value.Uint64()
}

func (m memoryReturn) run(ctx context.Context) {
	returned := heapAllocated() // what start-up allocated is not a burst worth a collection
	prev, wait := returned, m.quiet
	t := time.NewTimer(wait)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		now := heapAllocated()
		switch {
		case now-prev > m.quietAlloc:
			wait = m.quiet // busy: check again soon, to catch the end of the burst
		case now-returned >= m.minBurst:
			m.free() // quiet after a burst
			returned = heapAllocated()
			now, wait = returned, m.quiet
		default:
			wait = min(2*wait, m.maxQuiet) // quiet and nothing to return
		}
		prev = now
		t.Reset(wait)
	}
}
