package libtpms

import (
	"bytes"
	"encoding/binary"
	"errors"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vtpmd/vtpmd/emulator"
)

// failingStore is a MemStore whose Store fails while fail is set.
type failingStore struct {
	*emulator.MemStore
	fail atomic.Bool
}

var errDiskGone = errors.New("disk gone")

func (f *failingStore) Store(t emulator.StateType, d []byte) error {
	if f.fail.Load() {
		return errDiskGone
	}
	return f.MemStore.Store(t, d)
}

// startedTPM2 opens a TPM 2 on st, powers it on and runs TPM2_Startup(CLEAR).
func startedTPM2(t *testing.T, st emulator.Store) *Engine {
	t.Helper()
	e, err := Open(emulator.TPM2, st, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.Close)
	if err := e.Start(); err != nil {
		t.Fatal(err)
	}
	if resp, err := e.Process(startupClear); err != nil || rc(resp) != 0 {
		t.Fatalf("Startup: %x %v", resp, err)
	}
	return e
}

// servedPair starts e serving one end of a socketpair; the other end is returned as a net.Conn.
func servedPair(t *testing.T, e *Engine, toGo []uint32, slow DataHandler) (*DataConn, net.Conn) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	d, err := e.ServeData(fds[0], 4096, toGo, slow)
	if err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(fds[1]), "client")
	c, err := net.FileConn(f)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	return d, c
}

func roundTrip(t *testing.T, c net.Conn, cmd []byte) []byte {
	t.Helper()
	if _, err := c.Write(cmd); err != nil {
		t.Fatal(err)
	}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 4096)
	n, err := c.Read(buf)
	if err != nil {
		t.Fatal(err)
	}
	return buf[:n]
}

func waitDone(t *testing.T, d *DataConn) {
	t.Helper()
	select {
	case <-d.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("the data thread did not end")
	}
}

// dataStep is one command on a served connection: how many messages Go has seen after it.
type dataStep struct {
	name     string
	before   func()
	cmd      []byte
	wantSlow int
	check    func(resp []byte) bool
}

func TestServeData(t *testing.T) {
	st := &failingStore{MemStore: emulator.NewMemStore()}
	e := startedTPM2(t, st)
	var mu sync.Mutex
	var slowMsgs [][]byte
	var buf []byte
	var staleEpoch atomic.Bool
	d, c := servedPair(t, e, nil, func(msg []byte) ([]byte, bool) {
		mu.Lock()
		slowMsgs = append(slowMsgs, append([]byte(nil), msg...))
		mu.Unlock()
		epoch := e.Epoch()
		if staleEpoch.Load() {
			e.LastOrdinal() // a control call between the check and the command
		}
		resp, err := e.ProcessAppendArmed(buf[:0], msg, epoch)
		if err != nil {
			return FatalResponseForTest, true
		}
		buf = resp
		return resp, true
	})
	slow := func() int { mu.Lock(); defer mu.Unlock(); return len(slowMsgs) }

	steps := []dataStep{
		{"first command: the engine is not armed", nil, getRandom8, 1, func(r []byte) bool { return rc(r) == 0 && len(r) == 20 }},
		{"armed: the thread runs it", nil, getRandom8, 1, func(r []byte) bool { return rc(r) == 0 && len(r) == 20 }},
		{"another Engine call disarms", func() {
			if got := e.LastOrdinal(); got != 0x17b {
				t.Errorf("LastOrdinal after the thread's GetRandom: %#x", got)
			}
		}, getRandom8, 2, func(r []byte) bool { return rc(r) == 0 && len(r) == 20 }},
		{"re-armed by the slow path", nil, getRandom8, 2, func(r []byte) bool { return rc(r) == 0 }},
		{"a control call between check and command", func() { e.LastOrdinal(); staleEpoch.Store(true) }, getRandom8, 3, func(r []byte) bool { return rc(r) == 0 }},
		{"leaves it disarmed", func() { staleEpoch.Store(false) }, getRandom8, 4, func(r []byte) bool { return rc(r) == 0 }},
		{"until a command checked at the current epoch", nil, getRandom8, 4, func(r []byte) bool { return rc(r) == 0 }},
		{"not a TPM 2 command tag: to Go", nil, []byte{0, 0xc1, 0, 0, 0, 10, 0, 0, 0, 0x46}, 5, func(r []byte) bool { return len(r) >= 10 }},
	}
	runSteps := func(steps []dataStep) {
		for _, s := range steps {
			if s.before != nil {
				s.before()
			}
			resp := roundTrip(t, c, s.cmd)
			if !s.check(resp) {
				t.Errorf("%s: response %x", s.name, resp)
			}
			if got := slow(); got != s.wantSlow {
				t.Errorf("%s: %d messages went to Go, want %d", s.name, got, s.wantSlow)
			}
		}
	}
	runSteps(steps)

	// a read shorter than a header is continued: the two halves are one command
	if _, err := c.Write(getRandom8[:4]); err != nil {
		t.Fatal(err)
	}
	time.Sleep(50 * time.Millisecond)
	if resp := roundTrip(t, c, getRandom8[4:]); rc(resp) != 0 || len(resp) != 20 {
		t.Errorf("split command: %x", resp)
	}
	// a short message is answered after the window, by Go
	before := slow()
	if resp := roundTrip(t, c, []byte{0x80, 0x01, 0}); len(resp) < 10 {
		t.Errorf("short message: %x", resp)
	}
	mu.Lock()
	last := slowMsgs[len(slowMsgs)-1]
	mu.Unlock()
	if slow() != before+1 || len(last) != 3 {
		t.Errorf("short message: Go saw %x (%d messages before, %d after)", last, before, slow())
	}

	// libtpms enters its failure mode when a store fails: last
	n := slow()
	runSteps([]dataStep{{"a failed store answers TPM_RC_FAILURE", func() { st.fail.Store(true) },
		[]byte{0x80, 0x01, 0, 0, 0, 0x0c, 0, 0, 0x01, 0x45, 0, 0}, n, func(r []byte) bool { return bytes.Equal(r, FatalResponseForTest) }},
		{"and disarms", func() { st.fail.Store(false) }, getRandom8, n + 1, func(r []byte) bool { return len(r) >= 10 }},
	})

	c.Close()
	waitDone(t, d)
}

func TestServeDataShutdown(t *testing.T) {
	e, err := Open(emulator.TPM2, emulator.NewMemStore(), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.Close)
	d, c := servedPair(t, e, nil, func([]byte) ([]byte, bool) { return nil, true })
	defer c.Close()
	d.Shutdown()
	waitDone(t, d)
	d.Shutdown() // after the end: nothing to do
	// a handler that ends the connection
	d, c2 := servedPair(t, e, nil, func([]byte) ([]byte, bool) { return []byte("bye"), false })
	defer c2.Close()
	if resp := roundTrip(t, c2, getRandom8); string(resp) != "bye" {
		t.Errorf("handler's response %q", resp)
	}
	waitDone(t, d)
	if _, err := e.ServeData(int(os.Stdin.Fd()), 4096, nil, nil); err == nil {
		t.Error("ServeData accepted a descriptor that is not a socket")
	}
}

// FatalResponseForTest is TPM_RC_FAILURE, what the thread answers when libtpms or the store fails.
var FatalResponseForTest = []byte{0x80, 0x01, 0, 0, 0, 10, 0, 0, 0x01, 0x01}

// TestServeDataToGo: the commands a guard must see go to Go even when the engine is armed.
func TestServeDataToGo(t *testing.T) {
	e := startedTPM2(t, emulator.NewMemStore())
	var seen atomic.Int32
	d, c := servedPair(t, e, []uint32{0x182, 0x17b}, func(msg []byte) ([]byte, bool) {
		seen.Add(1)
		resp, err := e.ProcessAppendArmed(nil, msg, e.Epoch())
		if err != nil {
			return FatalResponseForTest, true
		}
		return resp, true
	})
	pcrRead := []byte{0x80, 0x01, 0, 0, 0, 0x14, 0, 0, 0x01, 0x7e, 0, 0, 0, 1, 0, 0x0b, 3, 0, 0, 1}
	for i, tt := range []struct {
		cmd  []byte
		want int32
	}{{pcrRead, 1}, {pcrRead, 1}, {getRandom8, 2}, {getRandom8, 3}, {pcrRead, 3}, {pcrExtend16([32]byte{1}), 4}} {
		if resp := roundTrip(t, c, tt.cmd); rc(resp) != 0 {
			t.Fatalf("command %d: %x", i, resp)
		}
		if got := seen.Load(); got != tt.want {
			t.Errorf("command %d (%x): Go saw %d messages, want %d", i, tt.cmd[6:10], got, tt.want)
		}
	}
	c.Close()
	waitDone(t, d)
}

// fuzzEngine is the process's one Engine for FuzzServeData, started once.
var fuzzEngine = sync.OnceValues(func() (*Engine, error) {
	e, err := Open(emulator.TPM2, emulator.NewMemStore(), nil)
	if err != nil {
		return nil, err
	}
	if err := e.Start(); err != nil {
		return nil, err
	}
	_, err = e.Process(startupClear)
	return e, err
})

// FuzzServeData: whatever bytes a guest writes in one message, the native data thread answers
// with one TPM response (its size field telling its length) and serves the next command.
func FuzzServeData(f *testing.F) {
	for _, seed := range [][]byte{getRandom8, startupClear, pcrExtend16([32]byte{7}), {0x80, 0x01, 0, 0, 0, 0x0c},
		{0x80, 0x02, 0xff, 0xff, 0xff, 0xff, 0, 0, 0x01, 0x7b, 0, 8}, {0x80, 0x01, 0, 0, 0, 0x0a, 0x20, 0, 0x10, 0},
		{0, 0, 0, 8, 3, 0, 0, 0, 12, 0x80, 0x01, 0, 0, 0, 0x0c, 0, 0, 0x01, 0x7b, 0, 8}, make([]byte, 4096)} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, msg []byte) {
		if len(msg) < 10 || len(msg) > 4096 {
			return // shorter ones wait for the rest of a header (TestServeData); longer ones are two reads
		}
		e, err := fuzzEngine()
		if err != nil {
			t.Fatal(err)
		}
		d, c := servedPair(t, e, nil, func(m []byte) ([]byte, bool) {
			resp, err := e.ProcessAppendArmed(nil, m, e.Epoch())
			if err != nil {
				return FatalResponseForTest, true
			}
			return resp, true
		})
		defer func() { c.Close(); waitDone(t, d) }()
		for _, m := range [][]byte{msg, msg, getRandom8} { // the second may run on the thread alone
			resp := roundTrip(t, c, m)
			if len(resp) < 10 || int(binary.BigEndian.Uint32(resp[2:6])) != len(resp) {
				t.Fatalf("answer to %x: %x", m, resp)
			}
		}
	})
}
