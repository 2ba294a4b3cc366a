//go:build integration

package integration

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/backend/seam"
	"github.com/vtpmd/vtpmd/internal/tpmclient"
	"github.com/vtpmd/vtpmd/internal/tpmwire"
	"github.com/vtpmd/vtpmd/manager"
	"github.com/vtpmd/vtpmd/socket"
)

// migHost is a host for the migration tests: a `vtpmd manager` on its own stand-in hardware
// TPM with a migration listener on 127.0.0.1.
type migHost struct {
	name string
	m    *hostManager
	addr string
}

func startMigHost(t *testing.T, name string, extra ...string) *migHost {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	m := startHostManager(t, append([]string{"--migration-listen", addr, "--log", "fd=2"}, extra...)...)
	h := &migHost{name: name, m: m, addr: addr}
	waitFor(t, 20*time.Second, func() bool {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			return false
		}
		c.Close()
		return true
	})
	return h
}

// caRoot is the host CA's root certificate (PEM), from the manager's identity record.
func (h *migHost) caRoot(t *testing.T) []byte {
	t.Helper()
	var rec struct {
		CARoot []byte `json:"ca_root"`
	}
	if err := json.Unmarshal([]byte(readFile(t, filepath.Join(h.m.dir, "identity.json"))), &rec); err != nil || len(rec.CARoot) == 0 {
		t.Fatalf("%s: no host CA root: %v", h.name, err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: rec.CARoot})
}

// trust makes h trust the other hosts' roots (trusted-cas.pem, read at each use).
func (h *migHost) trust(t *testing.T, others ...*migHost) {
	t.Helper()
	var b []byte
	for _, o := range others {
		b = append(b, o.caRoot(t)...)
	}
	if err := os.WriteFile(filepath.Join(h.m.dir, manager.TrustedCAsName), b, 0o600); err != nil {
		t.Fatal(err)
	}
}

func (h *migHost) managerLog(t *testing.T) string { return readFile(t, h.m.log) }

// migVTPM is a vtpmd socket process under a host's manager, driven as QEMU drives it.
type migVTPM struct {
	t     *testing.T
	e     *emulator
	c     *socket.Client
	state string
	tp    tpmclient.SendFunc
}

func startMigVTPM(t *testing.T, h *migHost, state string) *migVTPM {
	t.Helper()
	if state == "" {
		state = filepath.Join(t.TempDir(), "tpm2")
		os.MkdirAll(state, 0o700)
	}
	e := startEmulator(t, env.bin, state, "--tpm2", "--manager", h.m.sock)
	return &migVTPM{t: t, e: e, c: ctrlClient(t, e.ctrl), state: state}
}

// data opens the data channel (QEMU's SET_DATAFD).
func (v *migVTPM) data() tpmclient.SendFunc {
	conn := dataChannel(v.t, v.c)
	v.tp = func(cmd []byte) ([]byte, error) { return tpmclient.RoundTrip(conn, cmd) }
	return v.tp
}

// export is QEMU's pre_save: GET_STATEBLOB permanent, volatile, savestate (decrypted).
func (v *migVTPM) export() map[uint32][]byte {
	v.t.Helper()
	out := map[uint32][]byte{}
	for _, typ := range []uint32{socket.BlobPermanent, socket.BlobVolatile, socket.BlobSavestate} {
		b, _, err := v.c.GetStateBlob(typ, socket.StateFlagDecrypted)
		if typ == socket.BlobSavestate && len(b) == 0 {
			continue // TPM 2: no savestate (TPM_RETRY), QEMU skips it
		}
		if err != nil {
			v.t.Fatalf("GET_STATEBLOB %d: %v\n%s", typ, err, readFile(v.t, v.e.log))
		}
		out[typ] = b
	}
	return out
}

// load is QEMU's post_load on the destination: STOP, SET_STATEBLOB each, INIT(DELETE_VOLATILE).
func (v *migVTPM) load(blobs map[uint32][]byte) error {
	v.t.Helper()
	if err := v.c.Stop(); err != nil {
		v.t.Fatal(err)
	}
	for _, typ := range []uint32{socket.BlobPermanent, socket.BlobVolatile, socket.BlobSavestate} {
		if b, ok := blobs[typ]; ok {
			if err := v.c.SetStateBlob(typ, 0, b); err != nil {
				return err
			}
		}
	}
	return v.c.Init(socket.InitFlagDeleteVolatile)
}

func (v *migVTPM) stateFiles() []string {
	names, _ := filepath.Glob(filepath.Join(v.state, "tpm2-*"))
	return names
}

const guestCounter = 0x01500098

// readMigNV reads the migration index as a guest does (owner authorization).
func readMigNV(t *testing.T, tp tpmclient.SendFunc) *manager.MigrationNV {
	t.Helper()
	b, err := tpmclient.NVRead(tp, manager.MigrationNVIndex, 136, 0)
	if err != nil {
		t.Fatalf("read the migration index: %v", err)
	}
	n, err := manager.ParseMigrationNV(b)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func counterOf(t *testing.T, tp tpmclient.SendFunc) uint64 {
	t.Helper()
	b, err := tpmclient.NVRead(tp, guestCounter, 8, 0)
	if err != nil {
		t.Fatal(err)
	}
	return binary.BigEndian.Uint64(b)
}

// TestMigrationSecure: three hosts, each with a manager on its own hardware TPM stand-in;
// A and B trust each other, C trusts A but A does not trust C (later it does), D trusts nobody. A vTPM moves
// from A to B through sealed blobs as QEMU carries them: PCRs, NV and the guest's migration
// index continue on B, the source refuses every command after the release, and every misuse
// is refused without writing anything: the blobs without a manager or on swtpm, an altered
// byte, an omitted blob, an older (cancelled) export, the blobs fed to C, and fed again to B.
// Both managers record the move and B announces it to a subscriber.
func TestMigrationSecure(t *testing.T) {
	needRefSwtpm(t)
	a, b, c, d := startMigHost(t, "A"), startMigHost(t, "B"), startMigHost(t, "C"), startMigHost(t, "D")
	a.trust(t, b)
	b.trust(t, a)
	c.trust(t, a)

	events := make(chan manager.Event, 4)
	ectx, ecancel := context.WithCancel(context.Background())
	defer ecancel()
	go manager.NewClient(b.m.sock).Events(ectx, func(e manager.Event) bool { events <- e; return true })
	select {
	case e := <-events:
		if e.Type != "subscribed" {
			t.Fatalf("first event %+v", e)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("no subscription")
	}

	// a relying party follows A's announcements with the CLI
	follow := exec.Command(env.bin, "history", "--follow", "--socket", a.m.sock)
	var followOut bytes.Buffer
	follow.Stdout = &followOut
	followErr, _ := follow.StderrPipe()
	if err := follow.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { follow.Process.Kill(); follow.Wait() })
	line := make([]byte, 256)
	if n, _ := followErr.Read(line); !strings.Contains(string(line[:n]), "following") {
		t.Fatalf("vtpmd history --follow: %q", line[:n])
	}

	src := startMigVTPM(t, a, "")
	if err := src.c.Init(0); err != nil {
		t.Fatal(err)
	}
	tp := src.data()
	if err := tpmclient.Startup(tp); err != nil {
		t.Fatal(err)
	}
	ext := bytes.Repeat([]byte("A"), 32)
	for range 3 {
		if err := tpmclient.PCRExtend(tp, 16, ext); err != nil {
			t.Fatal(err)
		}
	}
	if err := tpmclient.NVDefine(tp, guestCounter, 8); err != nil {
		t.Fatal(err)
	}
	if err := tpmclient.NVWrite(tp, guestCounter, binary.BigEndian.AppendUint64(nil, 41), 0); err != nil {
		t.Fatal(err)
	}
	nvA := readMigNV(t, tp)
	if nvA.Moves != 0 || nvA.Host == "" || nvA.HostID == [32]byte{} {
		t.Fatalf("the migration index on A: %+v", nvA)
	}

	// an export the source ran on after (a failed migration): its blobs are older
	older := src.export()
	if err := tpmclient.NVWrite(tp, guestCounter, binary.BigEndian.AppendUint64(nil, 42), 0); err != nil {
		t.Fatalf("the source after a failed migration: %v\n%s", err, readFile(t, src.e.log))
	}
	pcr, _ := tpmclient.PCRRead(tp, 16)

	blobs := src.export()
	for typ, bl := range blobs {
		if !seam.IsSealed(bl) {
			t.Fatalf("blob %d left unsealed: %x", typ, bl[:16])
		}
	}

	// what the stream carries is useless without the managers: vtpmd without a manager and
	// Debian's swtpm refuse it, nothing written
	var res tpmwire.Result
	lone := startEmulator(t, env.bin, "", "--tpm2", "--manager", "none")
	lc := ctrlClient(t, lone.ctrl)
	lc.Stop()
	if err := lc.SetStateBlob(socket.BlobPermanent, 0, blobs[socket.BlobPermanent]); !errors.As(err, &res) || res != tpmwire.ResBadParameter {
		t.Fatalf("vtpmd without a manager on a sealed blob: %v, want TPM_BAD_PARAMETER", err)
	}
	if !strings.Contains(readFile(t, lone.log), "sealed by a vtpmd manager") {
		t.Fatalf("no reason given:\n%s", readFile(t, lone.log))
	}
	ref := startEmulator(t, refSwtpm(), "", "--tpm2")
	rc := ctrlClient(t, ref.ctrl)
	rc.Stop()
	// [observed] swtpm 0.7.1 checks the header's total length first: TPM_BAD_PARAMETER
	if err := rc.SetStateBlob(socket.BlobPermanent, 0, blobs[socket.BlobPermanent]); !errors.As(err, &res) || res != tpmwire.ResBadParameter {
		t.Fatalf("Debian's swtpm on a sealed blob: %v, want TPM_BAD_PARAMETER", err)
	}

	refused := func(h *migHost, in map[uint32][]byte, want string) {
		t.Helper()
		v := startMigVTPM(t, h, "")
		before := h.managerLog(t)
		if err := v.load(in); err == nil {
			t.Fatalf("%s took the blobs (want %q)", h.name, want)
		}
		if n := v.stateFiles(); len(n) != 0 {
			t.Fatalf("a refused import on %s wrote %v", h.name, n)
		}
		if log := strings.TrimPrefix(h.managerLog(t), before); !strings.Contains(log, want) {
			t.Fatalf("%s: refusal %q not in the manager's log:\n%s", h.name, want, tail(log, 3000))
		}
		v.c.Shutdown()
	}
	alt := map[uint32][]byte{socket.BlobPermanent: bytes.Clone(blobs[socket.BlobPermanent]), socket.BlobVolatile: blobs[socket.BlobVolatile]}
	alt[socket.BlobPermanent][len(alt[socket.BlobPermanent])-40] ^= 0x01
	refused(b, alt, "malformed or altered")
	refused(b, map[uint32][]byte{socket.BlobPermanent: blobs[socket.BlobPermanent]}, "not the ones exported")
	refused(b, older, "cancelled")
	refused(c, blobs, "refused this host's identity") // A does not trust C
	refused(d, blobs, "identity not trusted")         // D trusts nobody: A's blobs are foreign there
	if h := history(t, a, ""); len(h) != 0 {
		t.Fatalf("refused attempts left a record on the source: %+v", h)
	}
	trunc := map[uint32][]byte{socket.BlobPermanent: blobs[socket.BlobPermanent][:100], socket.BlobVolatile: blobs[socket.BlobVolatile]}
	refused(b, trunc, "malformed or altered")

	// the move: STOP, SET_STATEBLOB, INIT(DELETE_VOLATILE) on B
	dst := startMigVTPM(t, b, "")
	start := time.Now()
	if err := dst.load(blobs); err != nil {
		t.Fatalf("the move: %v\n%s\n%s", err, readFile(t, dst.e.log), tail(b.managerLog(t), 3000))
	}
	t.Logf("SET_STATEBLOB..INIT on B with the key release: %v", time.Since(start))
	dtp := dst.data()
	if got, err := tpmclient.PCRRead(dtp, 16); err != nil || !bytes.Equal(got, pcr) {
		t.Fatalf("PCR16 on B %x, on A %x (%v)", got, pcr, err)
	}
	if n := counterOf(t, dtp); n != 42 {
		t.Fatalf("the guest's NV counter on B: %d, want 42 (the last acknowledged write)", n)
	}
	nvB := readMigNV(t, dtp)
	if nvB.Moves != 1 || nvB.HostID == nvA.HostID || nvB.LastMove.IsZero() {
		t.Fatalf("the migration index on B: %+v (A: %+v)\n%s", nvB, nvA, tail(readFile(t, dst.e.log), 3000))
	}
	if err := tpmclient.PCRExtend(dtp, 16, ext); err != nil {
		t.Fatal(err)
	}

	// the source runs nothing more: TPM commands fail, INIT fails
	if _, err := tpmclient.PCRRead(tp, 16); err == nil {
		t.Fatal("the source answered a command after the release")
	}
	if err := src.c.Init(0); err == nil {
		t.Fatal("the source INIT after the release")
	}
	if b, _, err := src.c.GetStateBlob(socket.BlobPermanent, socket.StateFlagDecrypted); err == nil || len(b) != 0 {
		t.Fatal("the source exported its state again after the release")
	}
	if !strings.Contains(readFile(t, src.e.log), "released to another instance") {
		t.Fatalf("the source does not say why:\n%s", tail(readFile(t, src.e.log), 2000))
	}

	// replays: B again, C (now trusted by A as well): refused, the key went once
	refused(b, blobs, "already")
	a.trust(t, b, c)
	refused(c, blobs, "already released")

	// both managers recorded the move: the same ticket, state, and hardware identities
	histA, histB := history(t, a, ""), history(t, b, "")
	if len(histA) != 1 || len(histB) != 1 || histA[0].Kind != "out" || histB[0].Kind != "in" ||
		histA[0].Ticket != histB[0].Ticket || histA[0].StateDigest != histB[0].StateDigest ||
		histA[0].Source != histB[0].Source || histA[0].Destination != histB[0].Destination {
		t.Fatalf("history:\nA %+v\nB %+v", histA, histB)
	}
	if out, err := exec.Command(env.bin, "history", "--socket", b.m.sock, dst.state).CombinedOutput(); err != nil ||
		!strings.Contains(string(out), histB[0].Ticket) {
		t.Fatalf("vtpmd history: %v\n%s", err, out)
	}
	select {
	case e := <-events:
		if e.History.Ticket != histB[0].Ticket || e.History.Kind != "in" {
			t.Fatalf("event: %+v", e)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no event for the subscriber")
	}
	follow.Process.Kill()
	follow.Wait()
	var followed manager.HistoryEntry
	if err := json.Unmarshal(followOut.Bytes(), &followed); err != nil || followed.Ticket != histA[0].Ticket || followed.Kind != "out" {
		t.Fatalf("vtpmd history --follow printed %q (%v)", followOut.String(), err)
	}

	// the stale state left on A cannot start again there (the vTPM lives on B)
	src.c.Shutdown()
	src.e.cmd.Wait()
	again := startMigVTPM(t, a, src.state)
	if err := again.c.Init(0); err == nil {
		t.Fatal("the moved-away state started again on A")
	}
}

// history is `vtpmd history --json` on a host.
func history(t *testing.T, h *migHost, vm string) []manager.HistoryEntry {
	t.Helper()
	args := []string{"history", "--json", "--socket", h.m.sock}
	if vm != "" {
		args = append(args, vm)
	}
	out, err := exec.Command(env.bin, args...).Output()
	if err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			t.Fatalf("vtpmd history: %v\n%s", err, ee.Stderr)
		}
		t.Fatal(err)
	}
	var es []manager.HistoryEntry
	if err := json.Unmarshal(out, &es); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	return es
}

// TestMigrationSaveRestore: virsh save/restore on one host: the saved blobs open once on the
// host that sealed them (no listener needed), again only once the operator accepts; a save
// the vTPM ran on after is an older state, refused the same way.
func TestMigrationSaveRestore(t *testing.T) {
	needRefSwtpm(t)
	a := startMigHost(t, "A")
	v := startMigVTPM(t, a, "")
	if err := v.c.Init(0); err != nil {
		t.Fatal(err)
	}
	tp := v.data()
	tpmclient.Startup(tp)
	tpmclient.NVDefine(tp, guestCounter, 8)
	tpmclient.NVWrite(tp, guestCounter, binary.BigEndian.AppendUint64(nil, 7), 0)
	saved := v.export() // virsh save: then QEMU quits
	v.c.Shutdown()
	v.e.cmd.Wait()

	restore := func() (*migVTPM, error) {
		r := startMigVTPM(t, a, v.state)
		return r, r.load(saved)
	}
	r, err := restore()
	if err != nil {
		t.Fatalf("restore: %v\n%s", err, tail(a.managerLog(t), 2000))
	}
	rtp := r.data()
	if n := counterOf(t, rtp); n != 7 {
		t.Fatalf("restored counter %d", n)
	}
	tpmclient.NVWrite(rtp, guestCounter, binary.BigEndian.AppendUint64(nil, 8), 0)
	r.c.Shutdown()
	r.e.cmd.Wait()
	r1, err := restore()
	if err == nil {
		t.Fatal("the same save file restored twice (rollback of the write that followed)")
	}
	r1.c.Shutdown()
	r1.e.cmd.Wait()
	if out, err := exec.Command(env.bin, "history", "accept", "--socket", a.m.sock, v.state).CombinedOutput(); err != nil {
		t.Fatalf("history accept: %v %s", err, out)
	}
	r2, err := restore()
	if err != nil {
		t.Fatalf("accepted restore: %v\n%s", err, tail(a.managerLog(t), 2000))
	}
	if n := counterOf(t, r2.data()); n != 7 {
		t.Fatalf("accepted restore counter %d", n)
	}
	h := history(t, a, v.state)
	if len(h) != 2 || h[0].Kind != "restore" || !h[1].Accepted {
		t.Fatalf("history: %+v", h)
	}
}

// TestMigrationPolicy: a manager on one side only. By default the destination's manager
// refuses plain blobs (a source without a manager, or swtpm); allow-plain takes them with a
// warning; a source manager with policy plain seals nothing, so a destination without a
// manager takes its blobs. A source manager restarted between export and release still
// releases the key (tickets are durable).
func TestMigrationPolicy(t *testing.T) {
	needRefSwtpm(t)
	strict := startMigHost(t, "strict")
	lax := startMigHost(t, "lax", "--migration-policy", "allow-plain")
	plainSrc := startMigHost(t, "plain", "--migration-policy", "plain")

	// a source without a manager: Debian's swtpm
	ref := startEmulator(t, refSwtpm(), "", "--tpm2")
	rc := ctrlClient(t, ref.ctrl)
	if err := rc.Init(0); err != nil {
		t.Fatal(err)
	}
	conn := dataChannel(t, rc)
	rtp := tpmclient.SendFunc(func(cmd []byte) ([]byte, error) { return tpmclient.RoundTrip(conn, cmd) })
	tpmclient.Startup(rtp)
	tpmclient.PCRExtend(rtp, 16, bytes.Repeat([]byte("A"), 32))
	want, _ := tpmclient.PCRRead(rtp, 16)
	plain := map[uint32][]byte{}
	for _, typ := range []uint32{socket.BlobPermanent, socket.BlobVolatile} {
		b, _, err := rc.GetStateBlob(typ, socket.StateFlagDecrypted)
		if err != nil {
			t.Fatal(err)
		}
		plain[typ] = b
	}
	v := startMigVTPM(t, strict, "")
	if err := v.load(plain); err == nil || len(v.stateFiles()) != 0 {
		t.Fatalf("the strict manager took plain blobs: %v %v", err, v.stateFiles())
	}
	if !strings.Contains(strict.managerLog(t), "plain state blob refused") {
		t.Fatalf("no reason:\n%s", tail(strict.managerLog(t), 2000))
	}
	w := startMigVTPM(t, lax, "")
	if err := w.load(plain); err != nil {
		t.Fatalf("allow-plain: %v", err)
	}
	if got, _ := tpmclient.PCRRead(w.data(), 16); !bytes.Equal(got, want) {
		t.Fatalf("allow-plain: PCR16 %x, want %x", got, want)
	}
	if !strings.Contains(lax.managerLog(t), "accepting a plain") {
		t.Fatal("no warning for the plain import")
	}

	// a source manager with policy plain, to a vTPM without a manager
	s := startMigVTPM(t, plainSrc, "")
	if err := s.c.Init(0); err != nil {
		t.Fatal(err)
	}
	stp := s.data()
	tpmclient.Startup(stp)
	tpmclient.PCRExtend(stp, 16, bytes.Repeat([]byte("B"), 32))
	want2, _ := tpmclient.PCRRead(stp, 16)
	out := s.export()
	lone := startEmulator(t, env.bin, "", "--tpm2", "--manager", "none")
	lv := &migVTPM{t: t, e: lone, c: ctrlClient(t, lone.ctrl), state: lone.dir}
	if err := lv.load(out); err != nil {
		t.Fatalf("plain policy to a vTPM without a manager: %v", err)
	}
	if got, _ := tpmclient.PCRRead(lv.data(), 16); !bytes.Equal(got, want2) {
		t.Fatal("PCR16 lost")
	}

	// tickets survive the source manager's restart
	a, b := startMigHost(t, "A"), startMigHost(t, "B")
	a.trust(t, b)
	b.trust(t, a)
	src := startMigVTPM(t, a, "")
	if err := src.c.Init(0); err != nil {
		t.Fatal(err)
	}
	tpmclient.Startup(src.data())
	sealed := src.export()
	a.m.restart()
	waitFor(t, 20*time.Second, func() bool {
		c, err := net.Dial("tcp", a.addr)
		if err != nil {
			return false
		}
		c.Close()
		return true
	})
	dst := startMigVTPM(t, b, "")
	if err := dst.load(sealed); err != nil {
		t.Fatalf("after the source manager's restart: %v\n%s", err, tail(b.managerLog(t), 2000))
	}
}

// TestMigrationFaults: a manager killed at each step of the key release. At most one host runs
// the vTPM afterwards, and no acknowledged write is lost: before the release is durable the
// source runs on (its export cancelled); after it, neither runs until the operator accepts the
// source's copy (docs/migration.md, "Which failure leaves which host running").
func TestMigrationFaults(t *testing.T) {
	needRefSwtpm(t)
	for _, tc := range []struct {
		step       string
		onSource   bool // the paused manager is the source's
		killVTPM   bool // the destination's vTPM (its QEMU) dies, not the paused manager
		sourceRuns bool // without the operator
	}{
		{manager.StepReleaseReceived, true, false, true},
		{manager.StepReleaseRecorded, true, false, false},
		{manager.StepKeyReceived, false, false, false},
		{manager.StepImportRecorded, false, false, false},
		{manager.StepImportReceived, false, true, true},
		{manager.StepReleaseReceived, true, true, true},
	} {
		name := tc.step
		if tc.killVTPM {
			name += "-vtpm"
		}
		t.Run(name, func(t *testing.T) {
			start := func(name string, pause bool) *migHost {
				if pause {
					os.Setenv("VTPMD_MIGRATION_PAUSE", tc.step)
					defer os.Unsetenv("VTPMD_MIGRATION_PAUSE")
				}
				return startMigHost(t, name)
			}
			a, b := start("A", tc.onSource), start("B", !tc.onSource)
			a.trust(t, b)
			b.trust(t, a)
			src := startMigVTPM(t, a, "")
			if err := src.c.Init(0); err != nil {
				t.Fatal(err)
			}
			tp := src.data()
			tpmclient.Startup(tp)
			tpmclient.NVDefine(tp, guestCounter, 8)
			if err := tpmclient.NVWrite(tp, guestCounter, binary.BigEndian.AppendUint64(nil, 5), 0); err != nil {
				t.Fatal(err)
			}
			blobs := src.export()

			dst := startMigVTPM(t, b, "")
			loaded := make(chan error, 1)
			go func() { loaded <- dst.load(blobs) }()
			paused := a
			if !tc.onSource {
				paused = b
			}
			waitFor(t, 30*time.Second, func() bool {
				_, err := os.Stat(filepath.Join(paused.m.dir, "pause-"+tc.step))
				return err == nil
			})
			if tc.killVTPM {
				// QEMU B dies with its vTPM; the paused manager then goes on
				dst.e.cmd.Process.Kill()
				dst.e.cmd.Wait()
				time.Sleep(200 * time.Millisecond)
				os.Remove(filepath.Join(paused.m.dir, "pause-"+tc.step))
			} else {
				paused.m.cmd.Process.Kill()
				paused.m.cmd.Wait()
			}
			select {
			case err := <-loaded:
				if err == nil {
					t.Fatal("the destination's INIT succeeded without its managers")
				}
			case <-time.After(60 * time.Second):
				t.Fatal("the destination's INIT hangs")
			}
			if n := dst.stateFiles(); len(n) != 0 {
				t.Fatalf("the failed import wrote %v", n)
			}
			if !tc.killVTPM {
				dst.c.Shutdown()
				paused.m.start()
			}
			waitFor(t, 20*time.Second, func() bool {
				return exec.Command(env.bin, "history", "--socket", paused.m.sock).Run() == nil
			})

			// QEMU resumes the source VM
			_, err := tpmclient.NVRead(tp, guestCounter, 8, 0)
			if (err == nil) != tc.sourceRuns {
				t.Fatalf("source runs: %v, want %v\n%s", err == nil, tc.sourceRuns, tail(readFile(t, src.e.log), 1500))
			}
			if tc.sourceRuns {
				if n := counterOf(t, tp); n != 5 {
					t.Fatalf("the source's counter %d", n)
				}
				// and its blobs are no longer releasable (the paused manager restarted without pauses)
				if tc.killVTPM {
					paused.m.restart()
					waitFor(t, 20*time.Second, func() bool {
						return exec.Command(env.bin, "history", "--socket", paused.m.sock).Run() == nil
					})
				}
				before := b.managerLog(t)
				late := startMigVTPM(t, b, "")
				if err := late.load(blobs); err == nil {
					t.Fatal("the cancelled export was imported")
				}
				if log := strings.TrimPrefix(b.managerLog(t), before); !strings.Contains(log, "ticket cancelled") {
					t.Fatalf("the late import was not refused as cancelled:\n%s", tail(log, 2000))
				}
				return
			}
			// neither runs: the operator takes the source's copy back
			src.c.Shutdown()
			src.e.cmd.Wait()
			if out, err := exec.Command(env.bin, "history", "accept", "--socket", a.m.sock, src.state).CombinedOutput(); err != nil {
				t.Fatalf("accept: %v %s", err, out)
			}
			back := startMigVTPM(t, a, src.state)
			if err := back.c.Init(0); err != nil {
				t.Fatalf("the accepted source: %v\n%s", err, tail(readFile(t, back.e.log), 1500))
			}
			btp := back.data()
			tpmclient.Startup(btp)
			if n := counterOf(t, btp); n != 5 {
				t.Fatalf("the accepted source's counter %d, want 5 (the last acknowledged write)", n)
			}
		})
	}
}

// TestMigrationIndexTools: the guest's migration index as tpm2-tools read it (owner
// authorization), and the guest cannot write it.
func TestMigrationIndexTools(t *testing.T) {
	need(t, "tpm2_nvread", "tpm2_nvwrite", "tpm2_startup")
	a := startMigHost(t, "A")
	state := filepath.Join(t.TempDir(), "tpm2")
	os.MkdirAll(state, 0o700)
	work := t.TempDir()
	tt := startToolsTPM(t, env.bin, state, work, []string{"--manager", a.m.sock})
	tt.run("tpm2_startup", "-c")
	tt.run("tpm2_nvread", "-C", "o", "-s", "136", "-o", "mig.bin", "0x01400020")
	n, err := manager.ParseMigrationNV([]byte(readFile(t, filepath.Join(work, "mig.bin"))))
	if err != nil || n.Moves != 0 || n.HostID == [32]byte{} || n.Host == "" {
		t.Fatalf("the index read by tpm2_nvread: %+v %v", n, err)
	}
	for _, hier := range []string{"o", "p", "0x01400020"} {
		c := exec.Command("tpm2_nvwrite", "-C", hier, "-i", "mig.bin", "0x01400020")
		c.Dir, c.Env = work, append(os.Environ(), fmt.Sprintf("TPM2TOOLS_TCTI=swtpm:host=127.0.0.1,port=%d", tt.port))
		if out, err := c.CombinedOutput(); err == nil {
			t.Fatalf("the guest wrote the index with -C %s: %s", hier, out)
		}
	}
}
