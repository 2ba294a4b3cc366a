package hwtpm

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/internal/swtpmtest"

	"github.com/google/go-tpm/tpm2"
)

// getRandom is TPM2_GetRandom(8), raw.
var getRandom = []byte{0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x7b, 0, 8}

// TestSwtpmSendCommandHeader: Debian's swtpm 0.7.1 answers the MS simulator's data-port
// framing (its tpm-send-command-header feature), trailing u32 0 included. Its control port
// speaks swtpm's own protocol, not the simulator's platform signals, so Open(mssim) is tested
// against a simulator front (TestOpenMssim).
func TestSwtpmSendCommandHeader(t *testing.T) {
	sw := startSwtpmTCP(t)
	c, err := net.Dial("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(sw.Port)))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	for range 3 {
		resp, err := exchangeMssim(c, getRandom, 0)
		if err != nil {
			t.Fatal(err)
		}
		if len(resp) != 10+2+8 || binary.BigEndian.Uint32(resp[6:10]) != 0 {
			t.Fatalf("GetRandom response % x", resp)
		}
	}
}

// TestOpenSwtpmTCP: swtpm's data channel on TCP, by spec string.
func TestOpenSwtpmTCP(t *testing.T) {
	sw := startSwtpmTCP(t)
	spec, err := ParseSpec("swtpm:host=127.0.0.1,port=" + strconv.Itoa(sw.Port))
	if err != nil {
		t.Fatal(err)
	}
	tpm, err := Open(testContext(t), spec)
	if err != nil {
		t.Fatal(err)
	}
	defer tpm.Close()
	roundTrip(t, tpm)
}

// TestOpenMssim: Open powers the simulator up on the platform port, starts the TPM, and runs
// commands in the simulator's framing; every operation's connection ends its session. The simulator here is a front
// that checks the framing strictly and relays each command to a real swtpm.
func TestOpenMssim(t *testing.T) {
	sw := startSwtpm(t)
	sim := startMssimFront(t, sw.Socket)
	tpm, err := Open(testContext(t), sim.spec)
	if err != nil {
		t.Fatal(err)
	}
	roundTrip(t, tpm)
	if err := tpm.Close(); err != nil {
		t.Fatal(err)
	}
	sim.wait(t)
	want := []uint32{mssimPowerOn, mssimNVOn, mssimSessionEnd}
	if got := sim.platformSignals(); !slices.Equal(got, want) {
		t.Errorf("platform signals %v, want %v", got, want)
	}
	// One connection for Open, one for each operation, each ended with TPM_SESSION_END.
	if n, ended := sim.dataSessions(); n != 3 || ended != n {
		t.Errorf("%d data connections, %d ended with TPM_SESSION_END; want 3 and 3", n, ended)
	}
	if sim.startups() != 1 {
		t.Errorf("%d TPM2_Startup commands, want 1", sim.startups())
	}
}

func TestExchangeMssimRefusesBadFraming(t *testing.T) {
	resp := []byte{0x80, 0x01, 0, 0, 0, 10, 0, 0, 0, 0}
	frame := func(size uint32, body []byte, ack uint32) []byte {
		b := binary.BigEndian.AppendUint32(nil, size)
		b = append(b, body...)
		return binary.BigEndian.AppendUint32(b, ack)
	}
	tests := map[string][]byte{
		"size too small":         frame(4, resp[:4], 0),
		"size beyond max":        frame(maxResponse+1, nil, 0),
		"size differs from body": frame(12, append(bytes.Clone(resp), 0, 0), 0),
		"nonzero ack":            frame(10, resp, 1),
		"truncated":              frame(10, resp, 0)[:12],
	}
	for name, in := range tests {
		rw := &fakeRW{r: bytes.NewReader(in)}
		if _, err := exchangeMssim(rw, getRandom, 0); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	rw := &fakeRW{r: bytes.NewReader(frame(10, resp, 0))}
	got, err := exchangeMssim(rw, getRandom, 3)
	if err != nil || !bytes.Equal(got, resp) {
		t.Fatalf("good frame: %x, %v", got, err)
	}
	wantCmd := append([]byte{0, 0, 0, 8, 3, 0, 0, 0, byte(len(getRandom))}, getRandom...)
	if !bytes.Equal(rw.w.Bytes(), wantCmd) {
		t.Errorf("wrote % x, want % x", rw.w.Bytes(), wantCmd)
	}
}

func TestExchangeDevice(t *testing.T) {
	resp := []byte{0x80, 0x01, 0, 0, 0, 12, 0, 0, 0, 0, 0xaa, 0xbb}
	// A kernel that hands out the response in pieces is read on until its size.
	rw := &fakeRW{r: io.MultiReader(bytes.NewReader(resp[:10]), bytes.NewReader(resp[10:]))}
	got, err := exchangeDevice(rw, getRandom)
	if err != nil || !bytes.Equal(got, resp) {
		t.Fatalf("exchangeDevice = %x, %v", got, err)
	}
	for name, in := range map[string][]byte{"short": resp[:6], "size too small": {0x80, 1, 0, 0, 0, 2, 0, 0, 0, 0}} {
		if _, err := exchangeDevice(&fakeRW{r: bytes.NewReader(in)}, getRandom); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

// TestContextEndsCommand: a TPM that does not answer holds a command only until its context
// ends; the connection is then dropped and the next command gets a new one.
func TestContextEndsCommand(t *testing.T) {
	sock := filepath.Join(swtpmtest.ShortDir(t), "mute")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	var accepts sync.WaitGroup
	accepted := 0
	accepts.Go(func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			accepted++
			go func() { _, _ = io.Copy(io.Discard, c) }() // reads, never answers
		}
	})
	lk := &link{spec: Spec{Kind: KindSwtpm, Path: sock}}
	for i := range 2 {
		ctx, cancel := context.WithTimeout(t.Context(), 50*time.Millisecond)
		start := time.Now()
		_, err := lk.send(ctx, getRandom)
		cancel()
		if !errors.Is(err, ErrTransport) || !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("#%d: %v, want ErrTransport and DeadlineExceeded", i, err)
		}
		if d := time.Since(start); d > 2*time.Second {
			t.Fatalf("#%d: took %v", i, d)
		}
	}
	_ = lk.close()
	l.Close()
	accepts.Wait()
	if accepted != 2 {
		t.Errorf("%d connections, want 2 (a new one after the dropped one)", accepted)
	}
}

func TestReconnectAfterSwtpmRestart(t *testing.T) {
	sw := startSwtpm(t)
	tpm := sw.open()
	ctx := testContext(t)
	sealed, err := tpm.Seal(ctx, []byte("secret"), PolicyNone{})
	if err != nil {
		t.Fatal(err)
	}
	sw.restart()
	// Each operation has a connection of its own: the restart goes unnoticed.
	if got, err := tpm.Unseal(ctx, sealed); err != nil || string(got) != "secret" {
		t.Fatalf("unseal after swtpm restarted: %q, %v", got, err)
	}
}

// TestSwtpmFreeBetweenOperations: swtpm serves one connection at a time, and the TPM does not
// hold one between operations.
func TestSwtpmFreeBetweenOperations(t *testing.T) {
	sw := startSwtpm(t)
	tpm := sw.open()
	if _, err := tpm.Seal(testContext(t), []byte("x"), PolicyNone{}); err != nil {
		t.Fatal(err)
	}
	c, err := net.Dial("unix", sw.Socket)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := exchangeStream(c, getRandom); err != nil {
		t.Fatalf("another client between operations: %v", err)
	}
}

func TestClosed(t *testing.T) {
	tpm := startSwtpm(t).open()
	if err := tpm.Close(); err != nil {
		t.Fatal(err)
	}
	ctx := testContext(t)
	if _, err := tpm.Seal(ctx, []byte("x"), PolicyNone{}); !errors.Is(err, ErrClosed) {
		t.Errorf("Seal after Close: %v, want ErrClosed", err)
	}
	if _, err := tpm.ReadCounter(ctx, testIndex); !errors.Is(err, ErrClosed) {
		t.Errorf("ReadCounter after Close: %v, want ErrClosed", err)
	}
}

// TestOpenRefusesUnstartedSwtpm: a swtpm that needs CMD_INIT, or TPM2_Startup, is refused
// with a hint at the flag it lacks.
func TestOpenRefusesUnstartedSwtpm(t *testing.T) {
	for flags, hint := range map[string]string{"": "not-need-init", "not-need-init": "startup-clear"} {
		sw := startSwtpmFlags(t, flags)
		_, err := Open(testContext(t), sw.spec())
		if err == nil || !strings.Contains(err.Error(), hint) {
			t.Errorf("--flags %q: Open: %v; want a hint at %s", flags, err, hint)
		}
	}
}

func TestOpenFailsClearly(t *testing.T) {
	ctx := testContext(t)
	dir := swtpmtest.ShortDir(t)
	for _, spec := range []Spec{
		{Kind: KindSwtpm, Path: filepath.Join(dir, "nothing")},
		{Kind: KindDevice, Path: filepath.Join(dir, "tpm0")},
		{Kind: KindSwtpm, Host: "127.0.0.1", Port: swtpmtest.FreePortPair(t)},
	} {
		if _, err := Open(ctx, spec); !errors.Is(err, ErrTransport) {
			t.Errorf("Open(%s): %v, want ErrTransport", spec, err)
		}
	}
	if _, err := Open(ctx, Spec{}); !errors.Is(err, ErrBadSpec) {
		t.Errorf("Open(Spec{}): %v, want ErrBadSpec", err)
	}
	if _, err := Open(ctx, Spec{Kind: KindMssim, Host: "h", Port: 65535}); !errors.Is(err, ErrBadSpec) {
		t.Errorf("Open(mssim port 65535): %v, want ErrBadSpec", err)
	}
}

// TestConcurrentOperations: operations from many goroutines take turns on one connection.
func TestConcurrentOperations(t *testing.T) {
	tpm := startSwtpm(t).open()
	ctx := testContext(t)
	if err := tpm.DefineCounter(ctx, testIndex); err != nil {
		t.Fatal(err)
	}
	sealed, err := tpm.Seal(ctx, []byte("shared"), PolicyPCR{PCRs: []int{0}})
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	errs := make(chan error, 12)
	for range 4 {
		wg.Go(func() {
			_, err := tpm.Unseal(ctx, sealed)
			errs <- err
		})
		wg.Go(func() {
			_, err := tpm.Increment(ctx, testIndex)
			errs <- err
		})
		wg.Go(func() {
			_, err := tpm.Seal(ctx, []byte("x"), PolicyNone{})
			errs <- err
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
}

func roundTrip(t *testing.T, tpm *TPM) {
	t.Helper()
	ctx := testContext(t)
	sealed, err := tpm.Seal(ctx, []byte("secret"), PolicyPCR{PCRs: []int{0, 7}})
	if err != nil {
		t.Fatal(err)
	}
	got, err := tpm.Unseal(ctx, sealed)
	if err != nil || string(got) != "secret" {
		t.Fatalf("Unseal = %q, %v", got, err)
	}
}

type fakeRW struct {
	r io.Reader
	w bytes.Buffer
}

func (f *fakeRW) Read(p []byte) (int, error)  { return f.r.Read(p) }
func (f *fakeRW) Write(p []byte) (int, error) { return f.w.Write(p) }

// mssimFront is an MS simulator front: it speaks the simulator's protocol on a data port and
// the platform port next to it, checks the framing, and relays TPM commands to a swtpm.
type mssimFront struct {
	t         *testing.T
	spec      Spec
	done      sync.WaitGroup
	closeData func()

	mu          sync.Mutex
	signals     []uint32
	sessions    int
	sessionEnds int
	nStartup    int
}

func startMssimFront(t *testing.T, swtpmSock string) *mssimFront {
	t.Helper()
	port := swtpmtest.FreePortPair(t)
	data, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
	if err != nil {
		t.Fatal(err)
	}
	platform, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port+1)))
	if err != nil {
		t.Fatal(err)
	}
	f := &mssimFront{t: t, spec: Spec{Kind: KindMssim, Host: "127.0.0.1", Port: port}}
	t.Cleanup(func() { data.Close(); platform.Close() })
	f.done.Go(func() {
		c, err := platform.Accept()
		if err != nil {
			t.Error(err)
			return
		}
		defer c.Close()
		for {
			sig, err := readU32(c)
			if err != nil {
				t.Errorf("platform port: %v", err)
				return
			}
			f.mu.Lock()
			f.signals = append(f.signals, sig)
			f.mu.Unlock()
			if sig == mssimSessionEnd {
				return
			}
			if _, err := c.Write([]byte{0, 0, 0, 0}); err != nil {
				t.Error(err)
				return
			}
		}
	})
	f.done.Go(func() {
		for {
			c, err := data.Accept()
			if err != nil {
				return // the listener closed
			}
			f.serveData(c, swtpmSock)
		}
	})
	f.closeData = func() { data.Close() }
	return f
}

// serveData serves one data connection (the simulator serves one at a time) until
// TPM_SESSION_END, relaying commands to a new connection to swtpm.
func (f *mssimFront) serveData(c net.Conn, swtpmSock string) {
	t := f.t
	defer c.Close()
	f.mu.Lock()
	f.sessions++
	f.mu.Unlock()
	backend, err := net.Dial("unix", swtpmSock)
	if err != nil {
		t.Error(err)
		return
	}
	defer backend.Close()
	for {
		code, err := readU32(c)
		if err != nil {
			t.Errorf("data port: %v", err)
			return
		}
		if code == mssimSessionEnd {
			f.mu.Lock()
			f.sessionEnds++
			f.mu.Unlock()
			return
		}
		var loc [1]byte
		size, err := func() (uint32, error) {
			if code != mssimSendCommand {
				return 0, errors.New("not TPM_SEND_COMMAND: " + strconv.Itoa(int(code)))
			}
			if _, err := io.ReadFull(c, loc[:]); err != nil {
				return 0, err
			}
			return readU32(c)
		}()
		if err != nil || loc[0] != 0 || size < 10 || size > 4096 {
			t.Errorf("data port: bad frame: code %d locality %d size %d: %v", code, loc[0], size, err)
			return
		}
		cmd := make([]byte, size)
		if _, err := io.ReadFull(c, cmd); err != nil {
			t.Errorf("data port: %v", err)
			return
		}
		if binary.BigEndian.Uint32(cmd[2:6]) != size {
			t.Errorf("data port: frame size %d around a command of %d", size, binary.BigEndian.Uint32(cmd[2:6]))
			return
		}
		if tpm2.TPMCC(binary.BigEndian.Uint32(cmd[6:10])) == tpm2.TPMCCStartup {
			f.mu.Lock()
			f.nStartup++
			f.mu.Unlock()
		}
		resp, err := exchangeStream(backend, cmd)
		if err != nil {
			t.Errorf("relay to swtpm: %v", err)
			return
		}
		out := binary.BigEndian.AppendUint32(nil, uint32(len(resp)))
		out = append(out, resp...)
		if _, err := c.Write(binary.BigEndian.AppendUint32(out, 0)); err != nil {
			t.Error(err)
			return
		}
	}
}

// wait closes the data port and waits for the front's sessions to end.
func (f *mssimFront) wait(t *testing.T) {
	t.Helper()
	f.closeData()
	done := make(chan struct{})
	go func() { f.done.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("the simulator front's sessions did not end")
	}
}

func (f *mssimFront) platformSignals() []uint32 {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]uint32(nil), f.signals...)
}

// dataSessions returns how many data connections there were and how many ended with
// TPM_SESSION_END.
func (f *mssimFront) dataSessions() (n, ended int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.sessions, f.sessionEnds
}

func (f *mssimFront) startups() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.nStartup
}

func readU32(r io.Reader) (uint32, error) {
	var b [4]byte
	if _, err := io.ReadFull(r, b[:]); err != nil {
		return 0, err
	}
	return binary.BigEndian.Uint32(b[:]), nil
}
