//go:build integration

package integration

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"regexp"
	"strings"
	"testing"
	"time"
)

// pcr16AfterOneExtend is sha256(0^32 || 'A'^32): what the guest must read after its extend.
const pcr16AfterOneExtend = "1F1A947C8DA51017FF4666FD2D32D58AF59CE6A749437971F6A93B30146151E1"

var reDone = regexp.MustCompile(`GUEST: done=`)

// TestBootMatrix boots the guest under SeaBIOS and OVMF with tpm-crb and tpm-tis against
// vtpmd socket; the guest extends PCR 16 and reads it back, and with OVMF the firmware's
// event log replays to the PCR 0-7 values the guest read.
func TestBootMatrix(t *testing.T) {
	for _, c := range []struct{ fw, model string }{
		{"seabios", "tpm-crb"}, {"seabios", "tpm-tis"}, {"ovmf", "tpm-crb"}, {"ovmf", "tpm-tis"},
	} {
		t.Run(c.fw+"/"+c.model, func(t *testing.T) {
			e := startEmulator(t, env.bin, "", "--tpm2", "--terminate")
			q := startQEMU(t, vm{firmware: c.fw, machine: "q35", model: c.model, ctrl: e.ctrl, noReboot: true})
			q.wait(t, 180*time.Second)
			out := q.serialText()
			g := guestValues(out)
			if g["tpm_version_major"] != "2" || g["extend_ok"] != "true" || g["after_extend_pcr16"] != pcr16AfterOneExtend {
				t.Fatalf("guest saw %v", g)
			}
			wantDrv := map[string]string{"tpm-crb": "tpm_crb", "tpm-tis": "tpm_tis"}[c.model]
			if g["driver"] != wantDrv {
				t.Fatalf("driver %q, want %q", g["driver"], wantDrv)
			}
			if c.fw != "ovmf" {
				return
			}
			log, ok := guestBlob(out, "eventlog")
			if !ok {
				t.Fatal("OVMF guest has no TPM event log")
			}
			replayed, n, err := replayEventLog(log)
			if err != nil {
				t.Fatal(err)
			}
			for i := 0; i < 8; i++ {
				got := g[fmt.Sprintf("pcr%d", i)]
				if want := strings.ToUpper(hex.EncodeToString(replayed[i][:])); got != want {
					t.Errorf("PCR%d: TPM %s, event log replay %s", i, got, want)
				}
			}
			t.Logf("replayed %d events; PCR0-7 match", n)
		})
	}
}

// replayEventLog replays the SHA-256 digests of a TCG crypto-agile event log.
func replayEventLog(b []byte) ([24][32]byte, int, error) {
	var pcrs [24][32]byte
	le := binary.LittleEndian
	if len(b) < 32 {
		return pcrs, 0, fmt.Errorf("event log of %d bytes", len(b))
	}
	// first event: TCG_PCR_EVENT with the Spec ID event
	size := le.Uint32(b[28:32])
	off := 32 + int(size)
	if off > len(b) {
		return pcrs, 0, fmt.Errorf("truncated spec id event")
	}
	spec := b[32:off]
	if len(spec) < 28 || !bytes.HasPrefix(spec, []byte("Spec ID Event03")) {
		return pcrs, 0, fmt.Errorf("not a crypto-agile log")
	}
	nalg := le.Uint32(spec[24:28])
	sizes := map[uint16]int{}
	for i := 0; i < int(nalg); i++ {
		p := 28 + 4*i
		if p+4 > len(spec) {
			return pcrs, 0, fmt.Errorf("truncated algorithm list")
		}
		sizes[le.Uint16(spec[p:])] = int(le.Uint16(spec[p+2:]))
	}
	n := 0
	for off+12 <= len(b) {
		pcr, typ, count := le.Uint32(b[off:]), le.Uint32(b[off+4:]), le.Uint32(b[off+8:])
		p := off + 12
		var sha []byte
		for i := 0; i < int(count); i++ {
			if p+2 > len(b) {
				return pcrs, n, fmt.Errorf("truncated digest")
			}
			alg := le.Uint16(b[p:])
			sz, ok := sizes[alg]
			if !ok || p+2+sz > len(b) {
				return pcrs, n, fmt.Errorf("unknown digest algorithm %#x", alg)
			}
			if alg == 0x000b {
				sha = b[p+2 : p+2+sz]
			}
			p += 2 + sz
		}
		if p+4 > len(b) {
			break
		}
		esz := int(le.Uint32(b[p:]))
		p += 4 + esz
		if p > len(b) {
			return pcrs, n, fmt.Errorf("truncated event data")
		}
		if typ != 3 && pcr < 24 && sha != nil { // EV_NO_ACTION is not extended
			pcrs[pcr] = sha256.Sum256(append(pcrs[pcr][:], sha...))
			n++
		}
		off = p
	}
	return pcrs, n, nil
}

// TestSystemResetAndSecondBoot resets the guest with HMP system_reset mid-run: PCR 16 starts
// from zero again, and an NV index written in the first boot is still there in the second.
func TestSystemResetAndSecondBoot(t *testing.T) {
	e := startEmulator(t, env.bin, "", "--tpm2")
	q := startQEMU(t, vm{firmware: "seabios", machine: "q35", model: "tpm-tis", ctrl: e.ctrl, cmdline: "nvmark hang"})
	re := regexp.MustCompile(`GUEST: extend_ok=true`)
	q.waitSerial(t, re, 1, 120*time.Second)
	q.hmp(t, "system_reset")
	out := q.waitSerial(t, re, 2, 120*time.Second)
	boots := strings.Split(out, "GUEST: booted")
	if len(boots) < 3 {
		t.Fatalf("expected two boots, serial:\n%s", out)
	}
	first, second := guestValues(boots[1]), guestValues(boots[2])
	if first["after_extend_pcr16"] != pcr16AfterOneExtend || second["after_extend_pcr16"] != pcr16AfterOneExtend {
		t.Fatalf("PCR16 was not reset by system_reset: first %s, second %s", first["after_extend_pcr16"], second["after_extend_pcr16"])
	}
	if first["nvmark_after"] == "" || second["nvmark_before"] != first["nvmark_after"] {
		t.Fatalf("NV index did not persist across the reset: first boot wrote %q, second boot read %q", first["nvmark_after"], second["nvmark_before"])
	}
	// The reset must have re-initialized the TPM (INIT again, without SHUTDOWN).
	log := readFile(t, e.log)
	if c := strings.Count(log, "cmd=INIT"); c < 2 {
		t.Fatalf("emulator saw %d INITs, want >= 2", c)
	}
}

// TestLiveMigration migrates the guest between two QEMUs, each with its own vtpmd; the
// guest's PCR 16 hash chain continues on the destination.
func TestLiveMigration(t *testing.T) {
	testMigration(t, env.bin, env.bin, nil, nil)
}

// testMigration migrates between two emulator binaries (vtpmd or swtpm) with extra args.
func testMigration(t *testing.T, srcBin, dstBin string, srcArgs, dstArgs []string) {
	src := startEmulator(t, srcBin, "", append([]string{"--tpm2"}, srcArgs...)...)
	dst := startEmulator(t, dstBin, "", append([]string{"--tpm2"}, dstArgs...)...)
	migrateChain(t, src, dst)
}

// migrateChain live-migrates a guest extending PCR 16 in a loop from src's vTPM to dst's and
// checks that the chain of extends continues on the destination.
func migrateChain(t *testing.T, src, dst *emulator) {
	t.Helper()
	mig := t.TempDir() + "/mig.sock"
	a := startQEMU(t, vm{firmware: "seabios", machine: "q35", model: "tpm-crb", ctrl: src.ctrl, cmdline: "tpmloop"})
	b := startQEMU(t, vm{firmware: "seabios", machine: "q35", model: "tpm-crb", ctrl: dst.ctrl, cmdline: "tpmloop", incoming: "unix:" + mig})
	iter := regexp.MustCompile(`GUEST: iter=\d+`)
	a.waitSerial(t, iter, 2, 120*time.Second)
	a.hmp(t, "migrate -d unix:"+mig)
	deadline := time.Now().Add(60 * time.Second)
	for {
		st := a.hmp(t, "info migrate")
		if strings.Contains(st, "Migration status: completed") {
			break
		}
		if strings.Contains(st, "failed") || time.Now().After(deadline) {
			t.Fatalf("migration did not complete:\n%s", st)
		}
		time.Sleep(300 * time.Millisecond)
	}
	srcRows := chainRows(a.serialText())
	b.waitSerial(t, iter, 3, 60*time.Second)
	dstRows := chainRows(b.serialText())
	if len(srcRows) == 0 || len(dstRows) == 0 {
		t.Fatal("no PCR16 rows")
	}
	chain := expectedChain(2000)
	for _, r := range append(srcRows, dstRows...) {
		if chain[r.n] != r.pcr {
			t.Fatalf("iter %d: PCR16 %s, chain expects %s", r.n, r.pcr, chain[r.n])
		}
	}
	if dstRows[0].n <= srcRows[0].n || dstRows[len(dstRows)-1].n <= srcRows[len(srcRows)-1].n {
		t.Fatalf("destination restarted the chain: source %d..%d, destination %d..%d",
			srcRows[0].n, srcRows[len(srcRows)-1].n, dstRows[0].n, dstRows[len(dstRows)-1].n)
	}
	t.Logf("source iters %d..%d, destination iters %d..%d: chain intact", srcRows[0].n, srcRows[len(srcRows)-1].n, dstRows[0].n, dstRows[len(dstRows)-1].n)
}

type chainRow struct {
	n   int
	pcr string
}

var reIter = regexp.MustCompile(`GUEST: iter=(\d+) PCR16=([0-9A-F]{64})`)

func chainRows(s string) []chainRow {
	var out []chainRow
	for _, m := range reIter.FindAllStringSubmatch(s, -1) {
		var n int
		fmt.Sscan(m[1], &n)
		out = append(out, chainRow{n, m[2]})
	}
	return out
}

func expectedChain(n int) map[int]string {
	m := map[int]string{}
	v := make([]byte, 32)
	a := bytes.Repeat([]byte("A"), 32)
	for i := 1; i <= n; i++ {
		s := sha256.Sum256(append(v, a...))
		v = s[:]
		m[i] = strings.ToUpper(hex.EncodeToString(v))
	}
	return m
}

// TestTPM12Guest boots SeaBIOS with tpm-tis against vtpmd without --tpm2: a TPM 1.2.
func TestTPM12Guest(t *testing.T) {
	e := startEmulator(t, env.bin, "", "--terminate")
	q := startQEMU(t, vm{firmware: "seabios", machine: "pc", model: "tpm-tis", ctrl: e.ctrl, noReboot: true})
	q.wait(t, 120*time.Second)
	g := guestValues(q.serialText())
	if g["tpm_version_major"] != "1" {
		t.Fatalf("guest saw TPM version %q, want 1 (%v)", g["tpm_version_major"], g)
	}
	if !strings.Contains(g["tpm12_caps"], "TCG version: 1.2") {
		t.Fatalf("guest TPM 1.2 caps %q", g["tpm12_caps"])
	}
}
