//go:build integration

package integration

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/internal/tpmclient"
	"github.com/vtpmd/vtpmd/socket"
)

// TestMigrationLibvirt is issue 14's acceptance 1 under libvirt: `virsh migrate --live` A -> B
// with a vtpmd manager on each host (each on its own stand-in hardware TPM), with the emulator
// and the external backend. The guest (mode migloop) extends PCR16 and counts in an NV index,
// checking each boot's and each iteration's read against the last write its TPM acknowledged;
// both continue on B. QEMU's migration stream is recorded on its way (a TCP proxy between the
// two QEMUs) and the vTPM's blobs taken out of it: without the managers they must be useless
// (Debian's swtpm and vtpmd without a manager cannot load them, no plaintext in them).
//
// A first run without managers is the control: the same capture of today's plain stream loads
// in Debian's swtpm and holds the guest's NV counter, so the checks above can fail.
func TestMigrationLibvirt(t *testing.T) {
	h := lvSetupHosts(t, false, nil)
	emulator := "<backend type='emulator' version='2.0'/>"
	external := func(d string) string {
		return fmt.Sprintf("<backend type='external'><source type='unix' mode='connect' path='%s'/></backend>",
			filepath.Join(h.w, "A", "run", d, "ctrl.sock"))
	}
	ok := t.Run("PlainControl", func(t *testing.T) {
		hs := h.sub(t)
		sec := hs.migrateLoop(hs.domain("lv-mig-plain", "21", "migloop", emulator), 29321)
		if err := blobsLoad(t, refSwtpm(), sec); err != nil {
			t.Fatalf("the control: Debian's swtpm cannot load the plain stream's blobs: %v", err)
		}
		if !bytes.Contains(sec.Blobs[0].Data, []byte("swtpm-localca")) {
			t.Fatalf("the control: the plain permanent blob lacks the EK certificate's issuer")
		}
		t.Logf("the control: the plain stream's blobs load in Debian's swtpm and carry the guest's NV counter")
	})
	if !ok {
		t.Fatal("the control failed; the secure runs would prove nothing")
	}
	h.startManagers()
	t.Run("Emulator", func(t *testing.T) {
		hs := h.sub(t)
		hs.secureMigration(hs.domain("lv-mig-sec-emu", "22", "migloop", emulator), 29322)
	})
	t.Run("External", func(t *testing.T) {
		hs := h.sub(t)
		hs.secureMigration(hs.domain("lv-mig-sec-ext", "23", "migloop", external("lv-mig-sec-ext")), 29323)
	})
}

// sub returns the hosts bound to a subtest.
func (h *lvHosts) sub(t *testing.T) *lvHosts {
	c := *h
	c.lvEnv = h.lvEnv.sub(t)
	return &c
}

// secureMigration: with managers on both hosts, the guest continues on B, both managers know
// the vTPM, and the recorded blobs are useless without the managers.
func (h *lvHosts) secureMigration(d *lvDomain, port int) {
	t := h.t
	sec := h.migrateLoop(d, port)
	if rec := h.mgr["B"].record(d, 15*time.Second); rec == nil {
		t.Errorf("B's manager has no record of %s after the migration", d.Name)
	} else {
		t.Logf("B's manager's record: %+v", *rec)
	}
	h.checkUseless(sec)
}

// checkUseless: the captured blobs carry no plaintext and load neither in Debian's swtpm nor
// in vtpmd without a manager.
func (h *lvHosts) checkUseless(sec *qemuTPMSection) {
	t := h.t
	t.Helper()
	for k, b := range sec.Blobs {
		if bytes.Contains(b.Data, []byte("swtpm-localca")) {
			t.Errorf("captured blob %d holds plaintext (the EK certificate's issuer)", k+1)
		}
	}
	if err := blobsLoad(t, refSwtpm(), sec); err == nil {
		t.Errorf("Debian's swtpm loaded the captured blobs and read the guest's NV counter")
	} else {
		t.Logf("Debian's swtpm on the captured blobs: %v", err)
	}
	if err := blobsLoad(t, env.bin, sec, "--manager", "none"); err == nil {
		t.Errorf("vtpmd without a manager loaded the captured blobs and read the guest's NV counter")
	} else {
		t.Logf("vtpmd --manager none on the captured blobs: %v", err)
	}
}

// migrateLoop creates d on A (its guest in mode migloop), live-migrates it to B through the
// recorder, checks that the PCR chain and the NV counter continue on B, destroys it, and
// returns the vTPM's section of the recorded stream.
func (h *lvHosts) migrateLoop(d *lvDomain, port int) *qemuTPMSection {
	t := h.t
	t.Helper()
	os.MkdirAll(filepath.Join(h.w, "B", "run"), 0o755)
	h.virsh("A", "create", d.writeXML())
	t.Cleanup(func() {
		for _, host := range []string{"A", "B"} {
			h.virshErr(host, "destroy", d.Name)
		}
	})
	h.waitRows(d.serial("A"), 0, 3, 3*time.Minute)
	if m := h.mgr["A"]; m.running() {
		if rec := m.record(d, 15*time.Second); rec == nil {
			t.Fatalf("A's manager has no record of %s", d.Name)
		}
	}
	sec, out, err := h.migrateRecorded(d, port)
	if err != nil {
		t.Fatalf("virsh migrate: %v\n%s", err, out)
	}
	raw, _ := os.ReadFile(d.serial("A"))
	before := lvRows(string(raw))
	after := h.waitRows(d.serial("B"), before[len(before)-1].n, 2, 2*time.Minute)
	lvCheckChain(t, before, after)
	rawB, _ := os.ReadFile(d.serial("B"))
	checkNVCounter(t, string(raw), string(rawB))
	if st, _ := h.virshErr("A", "domstate", d.Name); strings.Contains(st, "running") {
		t.Errorf("%s still runs on A after the migration", d.Name)
	}
	if p := h.vtpmProcs(d.UUID); len(p) != 1 {
		t.Errorf("vTPM processes after the migration: %v, want B's only", p)
	}
	h.virsh("B", "destroy", d.Name)
	if !lvWait(15*time.Second, func() bool { return len(h.vtpmProcs(d.UUID)) == 0 }) {
		t.Errorf("vtpmd left after destroy on B: %v", h.vtpmProcs(d.UUID))
	}
	return sec
}

var migRowRE = regexp.MustCompile(`GUEST: iter=(\d+) PCR16=[0-9A-F]{64} nv=(\d+)`)

// checkNVCounter: the guest's NV counter, read back before every write, never fell below the
// last acknowledged write (no "nvlost" line, no NV errors), on A and then on B, and it went on
// one per iteration across the migration.
func checkNVCounter(t *testing.T, logs ...string) {
	t.Helper()
	last, lastIter := -1, -1
	for i, l := range logs {
		for _, bad := range []string{"GUEST: nvlost", "GUEST: nvread_error", "GUEST: nvwrite_error", "GUEST: error="} {
			if j := strings.Index(l, bad); j >= 0 {
				t.Fatalf("log %d: %s", i, strings.SplitN(l[j:], "\n", 2)[0])
			}
		}
		for _, m := range migRowRE.FindAllStringSubmatch(l, -1) {
			n, _ := strconv.Atoi(m[1])
			v, _ := strconv.Atoi(m[2])
			if n <= lastIter {
				continue // B's log may repeat nothing, but be safe
			}
			if last >= 0 && v != last+(n-lastIter) {
				t.Fatalf("log %d: iteration %d: NV counter %d after %d at iteration %d", i, n, v, last, lastIter)
			}
			last, lastIter = v, n
		}
	}
	if last < 0 {
		t.Fatal("no NV counter rows")
	}
	t.Logf("NV counter continuous up to %d (iteration %d)", last, lastIter)
}

// blobsLoad starts bin (a TPM 2, on an empty state) and gives it the blobs the way QEMU's
// destination does (STOP, SET_STATEBLOB of each non-empty blob with its flags, INIT with
// DELETE_VOLATILE), then reads the guest's NV counter: nil when all of it worked.
func blobsLoad(t *testing.T, bin string, sec *qemuTPMSection, args ...string) error {
	t.Helper()
	em := startEmulator(t, bin, "", append([]string{"--tpm2"}, args...)...)
	defer func() { em.cmd.Process.Kill(); em.cmd.Wait() }()
	c := ctrlClient(t, em.ctrl)
	conn := dataChannel(t, c)
	if err := c.Stop(); err != nil {
		return fmt.Errorf("STOP: %w", err)
	}
	for k, b := range sec.Blobs {
		if len(b.Data) == 0 {
			continue
		}
		if err := c.SetStateBlob(uint32(k+1), b.Flags, b.Data); err != nil {
			return fmt.Errorf("SET_STATEBLOB %d: %w", k+1, err)
		}
	}
	if err := c.Init(socket.InitFlagDeleteVolatile); err != nil {
		return fmt.Errorf("INIT: %w", err)
	}
	v, err := tpmclient.NVRead(tpmclient.Stream(conn), 0x01500098, 8, 0)
	if err != nil {
		return fmt.Errorf("NV_Read of the guest's counter: %w", err)
	}
	t.Logf("%s loaded the blobs; the guest's NV counter reads %d", filepath.Base(bin), binary.BigEndian.Uint64(v))
	return nil
}
