package daemon

import (
	"context"
	"math"
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
//
// A process that turns out to be busy (its first burst, e.g. durable NV writes, each leaving
// a few KiB of garbage) also gets a soft memory limit a little above what it held at start, so
// its heap is collected long before the 4 MiB GC goal (the bench's mixed load: RssAnon 3.6
// instead of 7.3 MiB right after it). It is not set from the start: the collections it causes
// would map the bookkeeping in every idle instance too. A GOMEMLIMIT the process was given
// stands.

// memoryReturn is when and how often the process checks.
type memoryReturn struct {
	quiet      time.Duration // first check interval after activity; a quiet interval ends a burst
	maxQuiet   time.Duration // the interval doubles up to this while nothing is allocated
	minBurst   uint64        // bytes allocated since the last return before one is worth a collection
	quietAlloc uint64        // bytes allocated within an interval that still count as quiet
	headroom   uint64        // the busy limit: Go's memory at start plus this
	free       func()        // debug.FreeOSMemory
	setLimit   func(int64) int64
}

var defaultMemoryReturn = memoryReturn{
	quiet:      2 * time.Second,
	maxQuiet:   64 * time.Second,
	minBurst:   1 << 20,
	quietAlloc: 16 << 10,
	headroom:   2 << 20,
	free:       debug.FreeOSMemory,
	setLimit:   debug.SetMemoryLimit,
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

// goMemory is the memory the Go runtime holds from the OS (mapped and not released).
func goMemory() uint64 {
	s := []metrics.Sample{{Name: "/memory/classes/total:bytes"}, {Name: "/memory/classes/heap/released:bytes"}}
	metrics.Read(s)
	if s[0].Value.Kind() != metrics.KindUint64 || s[1].Value.Kind() != metrics.KindUint64 {
		return 0
	}
	return s[0].Value.Uint64() - s[1].Value.Uint64()
}

// noLimit is debug.SetMemoryLimit's value when no limit was set.
const noLimit = math.MaxInt64

func (m memoryReturn) run(ctx context.Context) {
	returned := heapAllocated() // what start-up allocated is not a burst worth a collection
	busyLimit := int64(goMemory() + m.headroom)
	limited := m.setLimit(-1) != noLimit // GOMEMLIMIT given
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
		if !limited && now-returned >= m.minBurst {
			m.setLimit(busyLimit) // busy: collect before the GC goal
			limited = true
		}
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
