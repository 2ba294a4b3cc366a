//go:build integration

package integration

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/internal/tpmclient"
	"github.com/vtpmd/vtpmd/manager"
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
		d := hs.domain("lv-mig-plain", "21", "migloop", emulator)
		sec := hs.migrateLoop(d, 29321)
		hs.destroy("B", d)
		if err := blobsLoad(t, refSwtpm(), sec); err != nil {
			t.Fatalf("the control: Debian's swtpm cannot load the plain stream's blobs: %v", err)
		}
		if !bytes.Contains(sec.Blobs[0].Data, []byte("swtpm-localca")) {
			t.Fatalf("the control: the plain permanent blob lacks the EK certificate's issuer")
		}
		t.Logf("the control: the plain stream's blobs load in Debian's swtpm and carry the guest's NV counter")
	})
	if !ok {
		t.Error("the control failed: the secure runs' checks of the captured blobs prove less")
	}
	h.startManagers()
	t.Run("Emulator", func(t *testing.T) {
		hs := h.sub(t)
		hs.secureMigration(hs.domain("lv-mig-sec-emu", "22", "migloop", emulator), 29322)
	})
	t.Run("Refusals", func(t *testing.T) {
		hs := h.sub(t)
		hs.refusals(hs.domain("lv-mig-refuse", "24", "migloop", emulator), 29324)
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
// the vTPM and recorded the move (vtpmd history), subscribers on both got the event, the
// guest reads the move (counter, host identity) from NV 0x01400020, and the recorded blobs are
// useless without the managers.
func (h *lvHosts) secureMigration(d *lvDomain, port int) {
	t := h.t
	evA, evB := h.subscribe("A"), h.subscribe("B")
	sec := h.migrateLoop(d, port)
	if rec := h.mgr["B"].record(d, 15*time.Second); rec == nil {
		t.Errorf("B's manager has no record of %s after the migration", d.Name)
	} else {
		t.Logf("B's manager's record: %+v", *rec)
	}
	out, in := h.checkHistory(d)
	h.checkEvents(evA, "A", out)
	h.checkEvents(evB, "B", in)
	h.checkGuestNV(d, out)
	h.destroy("B", d)
	h.checkUseless(sec)
}

// lvEvents collects a manager's events.
type lvEvents struct {
	mu  sync.Mutex
	evs []manager.Event
	err error
}

func (e *lvEvents) list() []manager.Event {
	e.mu.Lock()
	defer e.mu.Unlock()
	return append([]manager.Event(nil), e.evs...)
}

// subscribe follows the event stream of host's manager until the test ends.
func (h *lvHosts) subscribe(host string) *lvEvents {
	ctx, cancel := context.WithCancel(context.Background())
	ev := &lvEvents{}
	done := make(chan struct{})
	go func() {
		defer close(done)
		err := manager.NewClient(h.mgr[host].sock).Events(ctx, func(e manager.Event) bool {
			ev.mu.Lock()
			ev.evs = append(ev.evs, e)
			ev.mu.Unlock()
			return true
		})
		ev.mu.Lock()
		ev.err = err
		ev.mu.Unlock()
	}()
	h.t.Cleanup(func() { cancel(); <-done })
	time.Sleep(200 * time.Millisecond) // subscribed before anything happens
	return ev
}

// history is `vtpmd history --json VM` of host's manager.
func (h *lvHosts) history(host, vm string) []manager.HistoryEntry {
	t := h.t
	t.Helper()
	out, err := h.mgr[host].ctl("history", "--socket", h.mgr[host].sock, "--json", vm)
	if err != nil {
		t.Fatalf("vtpmd history on %s: %v\n%s", host, err, out)
	}
	var es []manager.HistoryEntry
	if err := json.Unmarshal([]byte(out), &es); err != nil {
		t.Fatalf("vtpmd history on %s: %v\n%s", host, err, out)
	}
	return es
}

// checkHistory: A recorded the move out, B the move in, with the same ticket, hosts and state
// digest; it returns both entries.
func (h *lvHosts) checkHistory(d *lvDomain) (out, in manager.HistoryEntry) {
	t := h.t
	t.Helper()
	find := func(host, kind string) manager.HistoryEntry {
		var es []manager.HistoryEntry
		lvWait(10*time.Second, func() bool {
			es = h.history(host, d.UUID)
			return len(es) > 0
		})
		for _, e := range es {
			if e.Kind == kind {
				return e
			}
		}
		t.Fatalf("vtpmd history %s on %s: no %q entry: %+v", d.UUID, host, kind, es)
		return manager.HistoryEntry{}
	}
	out, in = find("A", "out"), find("B", "in")
	t.Logf("history on A: %+v", out)
	t.Logf("history on B: %+v", in)
	if out.Ticket == "" || out.Ticket != in.Ticket || out.Source != in.Source || out.Destination != in.Destination ||
		out.StateDigest == "" || out.StateDigest != in.StateDigest || out.Source == "" || out.Destination == "" || out.Source == out.Destination {
		t.Fatalf("the two hosts' history entries disagree or lack a field:\nA %+v\nB %+v", out, in)
	}
	if in.VM != d.UUID || in.Moves != 1 {
		t.Errorf("B's entry: vm %q moves %d, want %s and 1", in.VM, in.Moves, d.UUID)
	}
	if tx, _ := h.mgr["A"].ctl("history", "--socket", h.mgr["A"].sock, d.UUID); !strings.Contains(tx, d.UUID[:8]) && !strings.Contains(tx, d.Name) {
		t.Errorf("vtpmd history (text) on A does not name the VM:\n%s", tx)
	} else {
		t.Logf("vtpmd history on A:\n%s", tx)
	}
	return out, in
}

// checkEvents: the subscriber of host's manager got the event of entry.
func (h *lvHosts) checkEvents(ev *lvEvents, host string, want manager.HistoryEntry) {
	t := h.t
	t.Helper()
	ok := lvWait(10*time.Second, func() bool {
		for _, e := range ev.list() {
			if e.Type == "migration" && e.History.Ticket == want.Ticket && e.History.Kind == want.Kind {
				return true
			}
		}
		return false
	})
	if !ok {
		ev.mu.Lock()
		err := ev.err
		ev.mu.Unlock()
		t.Errorf("the subscriber on %s got no %q event for ticket %s: %+v (stream: %v)", host, want.Kind, want.Ticket, ev.list(), err)
		return
	}
	t.Logf("the subscriber on %s got the %q event", host, want.Kind)
}

var migNVRE = regexp.MustCompile(`GUEST: migration_nv=([0-9a-f]+|none)\s+GUEST: migration_nv_tools=(\S+)`)

// checkGuestNV: the guest read NV 0x01400020 (with go-tpm and with tpm2_nvread): on A no move
// and A's identity, on B one move, B's identity and the move's ticket.
func (h *lvHosts) checkGuestNV(d *lvDomain, move manager.HistoryEntry) {
	t := h.t
	t.Helper()
	last := func(host string) *manager.MigrationNV {
		var m [][]string
		lvWait(20*time.Second, func() bool {
			raw, _ := os.ReadFile(d.serial(host))
			m = migNVRE.FindAllStringSubmatch(strings.ReplaceAll(string(raw), "\r", ""), -1)
			return len(m) > 0 && m[len(m)-1][1] != "none"
		})
		if len(m) == 0 {
			t.Fatalf("the guest on %s never read the migration index", host)
		}
		v := m[len(m)-1]
		if v[1] != v[2] {
			t.Errorf("on %s go-tpm read %s, tpm2_nvread %s", host, v[1], v[2])
		}
		b, err := hex.DecodeString(v[1])
		if err != nil {
			t.Fatalf("on %s the guest read %q: %v", host, v[1], err)
		}
		nv, err := manager.ParseMigrationNV(b)
		if err != nil {
			t.Fatalf("on %s: %v", host, err)
		}
		t.Logf("the guest on %s reads the migration index: moves %d, host %q id %x, last move %v, ticket %x", host, nv.Moves, nv.Host, nv.HostID, nv.LastMove, nv.Ticket)
		return nv
	}
	a, b := last("A"), last("B")
	if a.Moves != 0 || hex.EncodeToString(a.HostID[:]) != move.Source {
		t.Errorf("on A the guest reads moves %d host id %x, want 0 and %s", a.Moves, a.HostID, move.Source)
	}
	if b.Moves != 1 || hex.EncodeToString(b.HostID[:]) != move.Destination || !strings.HasPrefix(move.Ticket, hex.EncodeToString(b.Ticket[:])) || b.LastMove.IsZero() {
		t.Errorf("on B the guest reads moves %d host id %x ticket %x, want 1, %s and %s", b.Moves, b.HostID, b.Ticket, move.Destination, move.Ticket)
	}
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
		h.logsOf(d)
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
	return sec
}

// logsOf logs the tails of d's QEMU and vTPM logs on both hosts (the environment's teardown
// removes host A's).
func (h *lvHosts) logsOf(d *lvDomain) {
	for _, p := range []string{
		"/var/log/libvirt/qemu/" + d.Name + ".log",
		"/var/log/swtpm/libvirt/qemu/" + d.Name + "-swtpm.log",
		filepath.Join(h.hostB, "log", "qemu", d.Name+".log"),
		filepath.Join(h.hostB, "logswtpm", "libvirt", "qemu", d.Name+"-swtpm.log"),
	} {
		b, _ := os.ReadFile(p)
		h.t.Logf("%s:\n%s", p, tail(string(b), 2500))
	}
}

// destroy destroys d on host and waits for its vTPM to end.
func (h *lvHosts) destroy(host string, d *lvDomain) {
	t := h.t
	t.Helper()
	h.virsh(host, "destroy", d.Name)
	if !lvWait(15*time.Second, func() bool { return len(h.vtpmProcs(d.UUID)) == 0 }) {
		t.Errorf("vtpmd left after destroy on %s: %v", host, h.vtpmProcs(d.UUID))
	}
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
func blobsLoad(t *testing.T, bin string, sec *qemuTPMSection, args ...string) (err error) {
	t.Helper()
	em := startEmulator(t, bin, "", append([]string{"--tpm2"}, args...)...)
	defer func() { em.cmd.Process.Kill(); em.cmd.Wait() }()
	defer func() {
		if err != nil { // the emulator's reason, from its log
			raw, _ := os.ReadFile(em.log)
			for _, l := range strings.Split(string(raw), "\n") {
				if strings.Contains(l, "level=ERROR") || strings.Contains(l, "level=WARN") {
					err = fmt.Errorf("%w [log: %s]", err, strings.TrimSpace(l))
				}
			}
		}
	}()
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

// migrateAsync starts virsh migrate --live of d from A to B through a recorder in mode; the
// channel gets virsh's output and error.
func (h *lvHosts) migrateAsync(d *lvDomain, port, mode int) (*streamRecorder, <-chan error) {
	rec := startRecorder(h.t, fmt.Sprintf("127.0.0.2:%d", port), fmt.Sprintf("127.0.0.1:%d", port), mode)
	done := make(chan error, 1)
	go func() {
		out, err := h.virshErr("A", "migrate", "--live", d.Name, lvURIB, "--listen-address", "127.0.0.1",
			"--migrateuri", fmt.Sprintf("tcp://127.0.0.2:%d", port))
		if err != nil {
			err = fmt.Errorf("%w: %s", err, strings.TrimSpace(out))
		}
		done <- err
	}()
	return rec, done
}

// refused feeds sec to a new vTPM under host's manager and wants INIT refused; it returns the
// reason.
func (h *lvHosts) refused(what, host string, sec *qemuTPMSection) string {
	t := h.t
	t.Helper()
	err := blobsLoad(t, h.vtpmd, sec, "--manager", h.mgr[host].sock)
	if err == nil {
		t.Errorf("%s: host %s's vTPM loaded it", what, host)
		return ""
	}
	if !strings.Contains(err.Error(), "INIT") {
		t.Errorf("%s: refused before INIT (QEMU's post_load would not get that far): %v", what, err)
	}
	t.Logf("%s on %s: refused: %v", what, host, err)
	return err.Error()
}

// refusals is acceptance 2 under libvirt, with managers on A, B and C:
//   - an older blob (exported by a migration cut short, after which the source ran on) is
//     refused later;
//   - while the real migration's stream is held after the source's export, altered copies of
//     its blobs (a byte flipped at several places, truncated, the volatile blob omitted, mixed
//     with the older blob) are refused by B's manager, and the migration then completes: the
//     refused attempts left the source's ticket as it was;
//   - after the migration, the captured blob is refused by B again (replay) and by host C, both
//     when A does not trust C and when it does.
func (h *lvHosts) refusals(d *lvDomain, port int) {
	t := h.t
	os.MkdirAll(filepath.Join(h.w, "B", "run"), 0o755)
	h.virsh("A", "create", d.writeSmallXML())
	t.Cleanup(func() {
		for _, host := range []string{"A", "B"} {
			h.virshErr(host, "destroy", d.Name)
		}
	})
	h.waitRows(d.serial("A"), 0, 3, 3*time.Minute)

	// a migration cut short after the export: the source runs on, its ticket cancelled
	rec, done := h.migrateAsync(d, port, recCut)
	older := rec.heldSection(3 * time.Minute)
	err := <-done
	rec.close()
	if older == nil {
		t.Fatalf("no vTPM section before the cut (virsh migrate: %v)", err)
	}
	if err == nil {
		t.Fatal("the migration cut short succeeded")
	}
	t.Logf("migration cut after the export: %v", err)
	raw, _ := os.ReadFile(d.serial("A"))
	rows := lvRows(string(raw))
	h.waitRows(d.serial("A"), rows[len(rows)-1].n, 2, time.Minute)
	raw, _ = os.ReadFile(d.serial("A"))
	checkNVCounter(t, string(raw))
	if !bytes.HasPrefix(older.Blobs[0].Data, []byte("VTPMDMIG")) {
		t.Fatalf("the exported blob is not sealed: % x", older.Blobs[0].Data[:16])
	}

	// the real migration, held after the export
	rec, done = h.migrateAsync(d, port+100, recHold)
	cur := rec.heldSection(3 * time.Minute)
	if cur == nil {
		rec.close()
		t.Fatalf("the migration never reached the vTPM's section: %v", <-done)
	}
	alter := func(k, at int) *qemuTPMSection {
		c := *cur
		b := append([]byte(nil), cur.Blobs[k].Data...)
		b[at] ^= 0x01
		c.Blobs[k].Data = b
		return &c
	}
	perm, vol := len(cur.Blobs[0].Data), len(cur.Blobs[1].Data)
	for _, a := range []struct {
		k, at int
	}{{0, 0}, {0, 9}, {0, perm / 2}, {0, perm - 1}, {1, 20}, {1, vol / 2}, {1, vol - 1}} {
		h.refused(fmt.Sprintf("blob %d with byte %d of %d flipped", a.k+1, a.at, len(cur.Blobs[a.k].Data)), "B", alter(a.k, a.at))
	}
	trunc := *cur
	trunc.Blobs[0].Data = cur.Blobs[0].Data[:perm-1]
	h.refused("the permanent blob truncated by one byte", "B", &trunc)
	omit := *cur
	omit.Blobs[1].Data = nil
	h.refused("the volatile blob omitted", "B", &omit)
	mixed := *cur
	mixed.Blobs[0] = older.Blobs[0]
	h.refused("the older permanent blob with the current volatile one", "B", &mixed)
	rec.release()
	if err := <-done; err != nil {
		rec.close()
		t.Fatalf("the held migration failed after the refused attempts: %v", err)
	}
	rec.close()
	raw, _ = os.ReadFile(d.serial("A"))
	before := lvRows(string(raw))
	after := h.waitRows(d.serial("B"), before[len(before)-1].n, 2, 2*time.Minute)
	lvCheckChain(t, before, after)
	rawB, _ := os.ReadFile(d.serial("B"))
	checkNVCounter(t, string(raw), string(rawB))

	// after the move: replay to B, the blob on C (untrusted by A, then trusted), the older one
	if r := h.refused("the captured blob replayed to B", "B", cur); !strings.Contains(r, "released") {
		t.Errorf("the replay's reason does not say the key was released")
	}
	h.refused("the captured blob on host C, which A does not trust", "C", cur)
	h.trust("A", "B", "C")
	if r := h.refused("the captured blob on host C, trusted by A", "C", cur); !strings.Contains(r, "released") {
		t.Errorf("C's refusal does not say the key was released")
	}
	h.trust("A", "B")
	if r := h.refused("the older blob", "B", older); !strings.Contains(r, "cancel") && !strings.Contains(r, "ran on") {
		t.Errorf("the older blob's refusal does not say its ticket was cancelled")
	}
	// the guest on B goes on with its TPM
	rowsB := lvRows(string(rawB))
	h.waitRows(d.serial("B"), rowsB[len(rowsB)-1].n, 2, time.Minute)
	rawB, _ = os.ReadFile(d.serial("B"))
	checkNVCounter(t, string(raw), string(rawB))
	h.destroy("B", d)
}
