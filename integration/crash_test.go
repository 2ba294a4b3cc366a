//go:build integration

package integration

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"math/rand"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"

	"github.com/vtpmd/vtpmd/internal/tpmclient"
	"github.com/vtpmd/vtpmd/socket"
)

const crashNV = 0x01500042

type crashProc struct {
	cmd        *exec.Cmd
	data, ctrl string
}

func startCrashProc(t *testing.T, bin, dir string) *crashProc {
	t.Helper()
	p := &crashProc{data: filepath.Join(dir, "d.sock"), ctrl: filepath.Join(dir, "c.sock")}
	p.cmd = exec.Command(bin, "socket", "--tpm2", "--tpmstate", "dir="+filepath.Join(dir, "state"),
		"--server", "type=unixio,path="+p.data, "--ctrl", "type=unixio,path="+p.ctrl)
	p.cmd.Stderr = os.Stderr
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	return p
}

func dialRetry(network, addr string) (net.Conn, error) {
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := net.Dial(network, addr)
		if err == nil || time.Now().After(deadline) {
			return c, err
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// crashState is what the client knows was acknowledged, and what was in flight.
type crashState struct {
	ackedNV, sentNV      uint64
	ackedPCR, pendingPCR []byte // PCR10 at the last acknowledged / the sent TPM2_Shutdown(STATE)
	shutdownLast         bool   // the last acknowledged command was Shutdown(STATE)
	inFlightAfterShut    bool   // a command was sent after that shutdown
}

func nvValue(v uint64) []byte { return binary.BigEndian.AppendUint64(nil, v) }

// TestCrashSafety kills vtpmd with SIGKILL at random moments while a client writes NV and
// extends PCRs with TPM2_Shutdown(STATE), at least 200 times. Every restart must load, and
// every write whose response reached the client must be there.
func TestCrashSafety(t *testing.T) {
	bin := env.bin
	kills := 200
	if testing.Short() {
		kills = 20
	}
	dir := t.TempDir()
	os.MkdirAll(filepath.Join(dir, "state"), 0o700)
	rng := rand.New(rand.NewSource(time.Now().UnixNano()))
	st := &crashState{}
	var roundsWithWrites, resumes int
	digest := sha256.Sum256([]byte("crash"))
	for round := 0; round <= kills; round++ {
		p := startCrashProc(t, bin, dir)
		ctrlConn, err := dialRetry("unix", p.ctrl)
		if err != nil {
			t.Fatalf("round %d: restart did not come up: %v", round, err)
		}
		ctrl := socket.NewClient(ctrlConn)
		if err := ctrl.Init(0); err != nil {
			t.Fatalf("round %d: INIT after kill failed (state not loadable?): %v", round, err)
		}
		dataConn, err := dialRetry("unix", p.data)
		if err != nil {
			t.Fatal(err)
		}
		tp := tpmclient.Stream(dataConn)
		// Resume if the last acknowledged command was an orderly shutdown.
		_, serr := tpm2.Startup{StartupType: tpm2.TPMSUState}.Execute(tp)
		if st.shutdownLast && !st.inFlightAfterShut && serr != nil {
			t.Fatalf("round %d: Startup(STATE) refused after an acknowledged Shutdown(STATE): %v", round, serr)
		}
		resumed := serr == nil
		if resumed {
			resumes++
		}
		if !resumed {
			if err := tpmclient.Startup(tp); err != nil {
				t.Fatalf("round %d: Startup(CLEAR): %v", round, err)
			}
		}
		if round == 0 {
			if err := tpmclient.NVDefine(tp, crashNV, 8); err != nil {
				t.Fatal(err)
			}
			if err := tpmclient.NVWrite(tp, crashNV, nvValue(0), 0); err != nil {
				t.Fatal(err)
			}
		} else {
			b, err := tpmclient.NVRead(tp, crashNV, 8, 0)
			if err != nil {
				t.Fatalf("round %d: NV index lost: %v", round, err)
			}
			got := binary.BigEndian.Uint64(b)
			if got < st.ackedNV || got > st.sentNV {
				t.Fatalf("round %d: NV holds %d; acknowledged %d, sent %d", round, got, st.ackedNV, st.sentNV)
			}
			st.ackedNV, st.sentNV = got, got
			pcr, err := tpmclient.PCRRead(tp, 10)
			if err != nil {
				t.Fatal(err)
			}
			if resumed && !bytes.Equal(pcr, st.ackedPCR) && !bytes.Equal(pcr, st.pendingPCR) {
				t.Fatalf("round %d: PCR10 after resume %x; acknowledged shutdown had %x", round, pcr, st.ackedPCR)
			}
		}
		if round == kills {
			ctrl.Shutdown()
			p.cmd.Wait()
			t.Logf("%d kills: %d rounds had acknowledged NV writes (last value %d), %d restarts resumed from Shutdown(STATE)",
				kills, roundsWithWrites, st.ackedNV, resumes)
			if roundsWithWrites < kills/2 || resumes == 0 {
				t.Fatalf("the kills mostly missed the write loop: %d of %d rounds wrote, %d resumes", roundsWithWrites, kills, resumes)
			}
			break
		}
		// Work until killed: NV write, PCR extend, Shutdown(STATE), TPM reset, Startup(STATE).
		delay := time.Duration(rng.Intn(40000)) * time.Microsecond
		killed := make(chan struct{})
		time.AfterFunc(delay, func() {
			p.cmd.Process.Signal(syscall.SIGKILL)
			close(killed)
		})
		before := st.ackedNV
		for i := 0; ; i++ {
			next := st.sentNV + 1
			st.sentNV = next
			st.inFlightAfterShut = true
			if err := tpmclient.NVWrite(tp, crashNV, nvValue(next), 0); err != nil {
				break
			}
			st.ackedNV = next
			st.shutdownLast = false
			if err := tpmclient.PCRExtend(tp, 10, digest[:]); err != nil {
				break
			}
			pcr, err := tpmclient.PCRRead(tp, 10)
			if err != nil {
				break
			}
			st.pendingPCR = pcr
			if err := tpmclient.Shutdown(tp, true); err != nil {
				break
			}
			st.ackedPCR, st.shutdownLast, st.inFlightAfterShut = pcr, true, false
			if err := ctrl.Init(0); err != nil {
				break
			}
			st.inFlightAfterShut = true
			if _, err := (tpm2.Startup{StartupType: tpm2.TPMSUState}).Execute(tp); err != nil {
				break
			}
			st.shutdownLast = false
		}
		<-killed
		if st.ackedNV > before {
			roundsWithWrites++
		}
		p.cmd.Wait()
		dataConn.Close()
		ctrlConn.Close()
	}
}
