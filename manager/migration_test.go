package manager

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/backend/seam"
	"github.com/vtpmd/vtpmd/internal/swtpmtest"
	"github.com/vtpmd/vtpmd/manager/registry"
)

// TestTicketStateMachine: a ticket leaves exporting once, to released or cancelled, and is
// released only for exactly the blobs it exported.
func TestTicketStateMachine(t *testing.T) {
	now := time.Now()
	r := newMigrationRecords()
	mk := func(id, path string, state string) *ticket {
		tk := &ticket{ID: id, StatePath: path, State: state, Created: now, Key: []byte("wrapped"),
			Blobs: map[string]string{"1": "p-" + id, "2": "v-" + id}}
		r.Tickets[id] = tk
		return tk
	}
	blobs := func(id string) map[string]string { return map[string]string{"1": "p-" + id, "2": "v-" + id} }

	mk("t1", "/a", ticketExporting)
	// a partial, mixed or altered set releases nothing and changes nothing
	for _, bad := range []map[string]string{{"1": "p-t1"}, {"1": "p-t1", "2": "v-other"}, {"1": "p-t1", "2": "v-t1", "3": "s"}} {
		if _, _, err := r.release("t1", bad, "B", "host B", "/b", false, now); !errors.Is(err, ErrBlobSet) {
			t.Fatalf("blob set %v: %v", bad, err)
		}
	}
	if r.Tickets["t1"].State != ticketExporting {
		t.Fatal("a refused release changed the ticket")
	}
	if _, _, err := r.release("nope", blobs("nope"), "B", "host B", "/b", false, now); !errors.Is(err, ErrTicketUnknown) {
		t.Fatalf("unknown ticket: %v", err)
	}
	tk, _, err := r.release("t1", blobs("t1"), "B", "host B", "/b", false, now)
	if err != nil || tk.State != ticketReleased || tk.ReleasedTo != "B" || tk.Key != nil {
		t.Fatalf("release: %v %+v", err, tk)
	}
	// once: the same destination again (replay) or a second destination
	for _, dest := range []string{"B", "C"} {
		if _, _, err := r.release("t1", blobs("t1"), dest, "host", "/x", false, now); !errors.Is(err, ErrTicketReleased) {
			t.Fatalf("second release to %s: %v", dest, err)
		}
	}
	// the source vTPM may not run any more
	if _, err := r.admit("/a", now); !errors.Is(err, ErrMovedAway) {
		t.Fatalf("source after release: %v", err)
	}

	// an export the source ran on after is cancelled and never releasable
	mk("t2", "/c", ticketExporting)
	if changed, err := r.admit("/c", now); err != nil || !changed || r.Tickets["t2"].State != ticketCancelled {
		t.Fatalf("admit: %v %v %s", changed, err, r.Tickets["t2"].State)
	}
	if _, _, err := r.release("t2", blobs("t2"), "B", "host B", "/b", false, now); !errors.Is(err, ErrTicketCancelled) {
		t.Fatalf("cancelled ticket released: %v", err)
	}
	if changed, err := r.admit("/c", now); err != nil || changed {
		t.Fatalf("second admit: %v %v", changed, err)
	}

	// an older export is cancelled by a newer release of the same vTPM
	mk("t3", "/d", ticketExporting)
	mk("t4", "/d", ticketExporting)
	if _, _, err := r.release("t4", blobs("t4"), "B", "host B", "/b", false, now); err != nil {
		t.Fatal(err)
	}
	if r.Tickets["t3"].State != ticketCancelled {
		t.Fatal("an older open export of a released vTPM stayed releasable")
	}

	// a restore on the same host: released to itself once, the vTPM stays; again only with accept
	mk("t5", "/e", ticketExporting)
	if _, _, err := r.release("t5", blobs("t5"), "A", "host A", "/e", true, now); err != nil {
		t.Fatal(err)
	}
	if _, err := r.admit("/e", now); err != nil {
		t.Fatalf("a restored vTPM may run: %v", err)
	}
	if _, _, err := r.release("t5", blobs("t5"), "A", "host A", "/e", true, now); !errors.Is(err, ErrTicketReleased) {
		t.Fatalf("second restore: %v", err)
	}
	r.vtpm("/e").AcceptOnce = true
	if _, acc, err := r.release("t5", blobs("t5"), "A", "host A", "/e", true, now); err != nil || !acc {
		t.Fatalf("accepted restore: %v %v", acc, err)
	}
	if _, _, err := r.release("t5", blobs("t5"), "A", "host A", "/e", true, now); !errors.Is(err, ErrTicketReleased) {
		t.Fatalf("accept is for one restore: %v", err)
	}
	// accept never opens a ticket to another host
	r.vtpm("/a").AcceptOnce = true
	if _, _, err := r.release("t1", blobs("t1"), "C", "host C", "/a", false, now); !errors.Is(err, ErrTicketReleased) {
		t.Fatalf("accept let a released ticket go to another host: %v", err)
	}
}

// testCA is an operator CA for file identities.
type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
}

func newTestCA(t *testing.T, name string) *testCA {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), IsCA: true,
		BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := x509.ParseCertificate(der)
	return &testCA{cert: c, key: key}
}

func (ca *testCA) identity(t *testing.T, host string, trust ...*testCA) *Identity {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: host},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, key.Public(), ca.key)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := x509.ParseCertificate(der)
	pool := x509.NewCertPool()
	for _, tc := range trust {
		pool.AddCert(tc.cert)
	}
	return &Identity{Chain: []*x509.Certificate{c}, Key: key, Roots: pool}
}

// TestEnvelope: a sealed blob opens with its key; any altered or missing byte, another key,
// or an untrusted signer is refused.
func TestEnvelope(t *testing.T) {
	ca := newTestCA(t, "ops")
	id := ca.identity(t, "hostA", ca)
	key := make([]byte, oneTimeKeySize)
	rand.Read(key)
	plain := bytes.Repeat([]byte("state"), 300)
	hdr := envelopeHeader{Ticket: strings.Repeat("ab", 16), Type: 1, VM: "uuid", SourceID: id.ID(), Chain: id.chainDER(),
		Source: "127.0.0.1:1", Created: time.Now().UTC()}
	sealed, err := sealEnvelope(hdr, key, plain, id)
	if err != nil {
		t.Fatal(err)
	}
	if !seam.IsSealed(sealed) || bytes.Contains(sealed, plain[:64]) {
		t.Fatal("the envelope is not sealed")
	}
	open := func(b []byte, k []byte, roots *x509.CertPool) ([]byte, error) {
		e, err := parseEnvelope(b)
		if err != nil {
			return nil, err
		}
		if _, err := e.verify(roots); err != nil {
			return nil, err
		}
		return e.open(k)
	}
	got, err := open(sealed, key, id.Roots)
	if err != nil || !bytes.Equal(got, plain) {
		t.Fatalf("open: %v", err)
	}
	// every byte matters, and is caught before the key is needed (verify), except none
	for i := range sealed {
		b := bytes.Clone(sealed)
		b[i] ^= 0x01
		e, err := parseEnvelope(b)
		if err == nil {
			_, err = e.verify(id.Roots)
		}
		if err == nil {
			t.Fatalf("byte %d altered: accepted before the key release", i)
		}
	}
	for _, n := range []int{0, 5, len(seam.SealedMagic) + 2, 100, len(sealed) - 1} {
		if _, err := open(sealed[:n], key, id.Roots); err == nil {
			t.Fatalf("truncated to %d: accepted", n)
		}
	}
	other := make([]byte, oneTimeKeySize)
	if _, err := open(sealed, other, id.Roots); !errors.Is(err, ErrEnvelope) {
		t.Fatalf("another key: %v", err)
	}
	stranger := newTestCA(t, "other ops")
	if _, err := open(sealed, key, stranger.identity(t, "x", stranger).Roots); !errors.Is(err, ErrUntrusted) {
		t.Fatalf("untrusted signer: %v", err)
	}
	// a blob signed by an untrusted host that claims a trusted host's identity
	evil := stranger.identity(t, "hostA", stranger)
	hdr2 := hdr
	hdr2.Chain = id.chainDER()
	forged, _ := sealEnvelope(hdr2, key, plain, evil)
	if _, err := open(forged, key, id.Roots); !errors.Is(err, ErrEnvelope) {
		t.Fatalf("forged signature: %v", err)
	}
}

// migHost is an in-process manager with a hardware TPM stand-in and its migration listener.
type migHost struct {
	tm   *testManager
	mig  *migration
	addr string
}

func startMigHost(t *testing.T, policy string) *migHost {
	return startMigHostWith(t, MigrationConfig{Policy: policy})
}

func startMigHostWith(t *testing.T, cfg MigrationConfig) *migHost {
	t.Helper()
	tm := startManager(t, swtpmtest.Start(t), t.TempDir(), nil)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cfg.Listen = ln.Addr().String()
	if err := tm.srv.ConfigureMigration(cfg); err != nil {
		t.Fatal(err)
	}
	m, err := tm.srv.migration()
	if err != nil {
		t.Fatal(err)
	}
	if m.cfg.Identity == nil {
		t.Fatal("the manager made no hardware identity")
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { tm.srv.ServeMigration(ctx, ln); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	return &migHost{tm: tm, mig: m, addr: ln.Addr().String()}
}

// trust adds the other hosts' CA roots to h's trusted-cas.pem.
func (h *migHost) trust(t *testing.T, others ...*migHost) {
	t.Helper()
	var pemData []byte
	for _, o := range others {
		hi, err := o.tm.srv.HostIdentity()
		if err != nil {
			t.Fatal(err)
		}
		pemData = append(pemData, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: hi.CARoot})...)
	}
	if err := os.WriteFile(filepath.Join(h.tm.dir, TrustedCAsName), pemData, 0o600); err != nil {
		t.Fatal(err)
	}
}

func (h *migHost) export(t *testing.T, path string, blobs map[uint32][]byte) map[uint32][]byte {
	t.Helper()
	out := map[uint32][]byte{}
	cur := ""
	for _, typ := range []uint32{1, 2} {
		id, s, err := h.mig.export(context.Background(), path, cur, typ, blobs[typ])
		if err != nil {
			t.Fatal(err)
		}
		if cur != "" && id != cur {
			t.Fatal("one export got two tickets")
		}
		cur, out[typ] = id, s
	}
	return out
}

// TestMigrationChannel: two managers with hardware identities (TPM-resident TLS keys) trust
// each other; a third is trusted by nobody, and a fourth is trusted but late. The key goes
// once, to the first trusted destination; every other attempt is refused, and the source
// vTPM may not run after the release.
func TestMigrationChannel(t *testing.T) {
	a, b, c, d, e := startMigHost(t, ""), startMigHost(t, ""), startMigHost(t, ""), startMigHost(t, ""), startMigHost(t, "")
	a.trust(t, b, d)
	b.trust(t, a)
	c.trust(t, a)
	d.trust(t, a)
	ctx := context.Background()
	src, dst := "/srv/a/vm1", "/srv/b/vm1"
	blobs := map[uint32][]byte{1: bytes.Repeat([]byte{1}, 6000), 2: bytes.Repeat([]byte{2}, 9000)}

	// an export the source ran on after: cancelled, refused to B, B unchanged
	old := a.export(t, src, blobs)
	if err := a.mig.admit(ctx, src); err != nil {
		t.Fatal(err)
	}
	if _, err := b.mig.importBlobs(ctx, dst, old); !errors.Is(err, ErrTicketCancelled) {
		t.Fatalf("older blob: %v", err)
	}
	if len(b.mig.rec.History) != 0 {
		t.Fatal("a refused import was recorded")
	}

	sealed := a.export(t, src, blobs)
	// A does not trust C: C cannot get the key
	if _, err := c.mig.importBlobs(ctx, "/srv/c/vm1", sealed); !errors.Is(err, ErrUntrusted) || !strings.Contains(err.Error(), "refused this host's identity") {
		t.Fatalf("untrusted destination: %v", err)
	}
	// E does not trust A: E refuses the blob itself
	if _, err := e.mig.importBlobs(ctx, "/srv/e/vm1", sealed); !errors.Is(err, ErrUntrusted) || strings.Contains(err.Error(), "refused this host's identity") {
		t.Fatalf("untrusted source: %v", err)
	}
	// an altered blob is refused before the key is asked for
	alt := map[uint32][]byte{1: bytes.Clone(sealed[1]), 2: sealed[2]}
	alt[1][len(alt[1])/2] ^= 0x80
	if _, err := b.mig.importBlobs(ctx, dst, alt); !errors.Is(err, ErrEnvelope) {
		t.Fatalf("altered blob: %v", err)
	}
	// an omitted blob: refused by the source (not the set it exported)
	if _, err := b.mig.importBlobs(ctx, dst, map[uint32][]byte{1: sealed[1]}); !errors.Is(err, ErrBlobSet) {
		t.Fatalf("omitted blob: %v", err)
	}
	// a blob of the older, cancelled export mixed in
	if _, err := b.mig.importBlobs(ctx, dst, map[uint32][]byte{1: sealed[1], 2: old[2]}); !errors.Is(err, ErrEnvelope) {
		t.Fatalf("mixed blobs: %v", err)
	}
	// the source still may run: nothing was released
	if a.mig.rec.Tickets[ticketOf(sealed)].State != ticketExporting {
		t.Fatal("a refused attempt changed the source's ticket")
	}

	got, err := b.mig.importBlobs(ctx, dst, sealed)
	if err != nil {
		t.Fatal(err)
	}
	for typ, want := range blobs {
		if !bytes.Equal(got[typ], want) {
			t.Fatalf("blob %d differs after the move", typ)
		}
	}
	// once: B again (replay), D (trusted, second destination)
	if _, err := b.mig.importBlobs(ctx, dst, sealed); !errors.Is(err, ErrTicketReleased) {
		t.Fatalf("replay to B: %v", err)
	}
	if _, err := d.mig.importBlobs(ctx, "/srv/d/vm1", sealed); !errors.Is(err, ErrTicketReleased) {
		t.Fatalf("second destination: %v", err)
	}
	if err := a.mig.admit(ctx, src); !errors.Is(err, ErrMovedAway) {
		t.Fatalf("the source ran after the release: %v", err)
	}
	// nor exports its stale state again (a second migration of the paused source QEMU)
	if _, _, err := a.mig.export(ctx, src, "", 1, blobs[1]); !errors.Is(err, ErrMovedAway) {
		t.Fatalf("the moved-away state exported again: %v", err)
	}
	// history on both sides names both hardware identities and the same state
	ha, hb := a.mig.rec.historyOf(src), b.mig.rec.historyOf(dst)
	if len(ha) != 1 || len(hb) != 1 || ha[0].Kind != "out" || hb[0].Kind != "in" ||
		ha[0].Destination != hb[0].Destination || ha[0].Source != hb[0].Source || ha[0].StateDigest != hb[0].StateDigest ||
		ha[0].Source != a.mig.cfg.Identity.ID() || hb[0].Destination != b.mig.cfg.Identity.ID() || hb[0].Moves != 1 ||
		ha[0].SourceAK == "" || ha[0].SourceAK != hb[0].SourceAK || ha[0].DestinationAK != hb[0].DestinationAK || ha[0].SourceAK == ha[0].DestinationAK {
		t.Fatalf("history:\nA %+v\nB %+v", ha, hb)
	}
	if hi, err := a.tm.srv.HostIdentity(); err != nil || ha[0].SourceAK != hex.EncodeToString(hi.AKName) {
		t.Fatalf("the source's hardware AK in the history: %s, identity %x (%v)", ha[0].SourceAK, hi.AKName, err)
	}
	// and survives a restart of B's manager
	b.tm.close()
	b.tm.start()
	m2, err := b.tm.srv.migration()
	if err != nil || len(m2.rec.historyOf(dst)) != 1 || m2.rec.VTPMs[dst].Moves != 1 {
		t.Fatalf("records after restart: %v", err)
	}
}

// ticketOf is the ticket named in a set of sealed blobs.
func ticketOf(sealed map[uint32][]byte) string {
	e, err := parseEnvelope(sealed[1])
	if err != nil {
		return ""
	}
	return e.hdr.Ticket
}

// TestMigrationRestore: a saved state opens once on the host that sealed it (no listener
// needed); again only after the operator accepts; a vTPM that ran on cancels the save.
func TestMigrationRestore(t *testing.T) {
	a := startMigHost(t, "")
	ctx := context.Background()
	path := "/srv/a/vm2"
	blobs := map[uint32][]byte{1: []byte("permanent"), 2: []byte("volatile")}
	saved := a.export(t, path, blobs)
	got, err := a.mig.importBlobs(ctx, path, saved)
	if err != nil || !bytes.Equal(got[1], blobs[1]) {
		t.Fatalf("restore: %v", err)
	}
	if err := a.mig.admit(ctx, path); err != nil {
		t.Fatalf("a restored vTPM runs: %v", err)
	}
	if _, err := a.mig.importBlobs(ctx, path, saved); !errors.Is(err, ErrTicketReleased) || !strings.Contains(err.Error(), "accept") {
		t.Fatalf("second restore: %v", err)
	}
	if err := a.mig.accept(path); err != nil {
		t.Fatal(err)
	}
	if _, err := a.mig.importBlobs(ctx, path, saved); err != nil {
		t.Fatalf("accepted restore: %v", err)
	}
	// saved, then started afresh: the save is cancelled
	saved2 := a.export(t, path, blobs)
	if err := a.mig.admit(ctx, path); err != nil {
		t.Fatal(err)
	}
	if _, err := a.mig.importBlobs(ctx, path, saved2); !errors.Is(err, ErrTicketCancelled) {
		t.Fatalf("restore after the vTPM ran on: %v", err)
	}
	h := a.mig.rec.historyOf(path)
	if len(h) != 2 || h[0].Kind != "restore" || h[1].Kind != "restore" || !h[1].Accepted {
		t.Fatalf("history: %+v", h)
	}
	// plain blobs under the default policy are refused; allowed with allow-plain
	if _, err := a.mig.importBlobs(ctx, path, blobs); !errors.Is(err, ErrPlainRefused) {
		t.Fatalf("plain blobs: %v", err)
	}
}

// TestMigrationNVContents: the guest's index encodes and decodes.
func TestMigrationNVContents(t *testing.T) {
	ts := time.Unix(1764662400, 0).UTC()
	b := nvContents(3, ts, bytes.Repeat([]byte{7}, 32), bytes.Repeat([]byte{9}, 16), "hostB")
	n, err := ParseMigrationNV(b)
	if err != nil || n.Moves != 3 || !n.LastMove.Equal(ts) || n.Host != "hostB" || n.HostID[0] != 7 || n.Ticket[15] != 9 {
		t.Fatalf("%v %+v", err, n)
	}
	if _, err := ParseMigrationNV(b[:100]); err == nil {
		t.Fatal("short index accepted")
	}
}

func TestAdvertisedAddress(t *testing.T) {
	name, _ := os.Hostname()
	for in, want := range map[string]string{"127.0.0.1:1": "127.0.0.1:1", "[::1]:2": "[::1]:2", "host:3": "host:3",
		":4": net.JoinHostPort(name, "4"), "0.0.0.0:5": net.JoinHostPort(name, "5"), "[::]:6": net.JoinHostPort(name, "6"), "": ""} {
		if got := advertisedAddress(in); got != want {
			t.Errorf("%q: %q, want %q", in, got, want)
		}
	}
}

// TestMigrationHookNeedsManager: without a manager on the host (no socket) a vTPM has no blob
// hook (plain blobs, as without vtpmd's manager); with one it has.
func TestMigrationHookNeedsManager(t *testing.T) {
	if h := seam.BlobHookOf(InstanceGuard(GuardConfig{Client: NewClient(filepath.Join(t.TempDir(), "none.sock")), StateURI: "dir:///x", TPM2: true})); h != nil {
		t.Fatal("a blob hook without a manager")
	}
	m := startManager(t, swtpmtest.Start(t), t.TempDir(), nil)
	if h := seam.BlobHookOf(InstanceGuard(GuardConfig{Client: m.client(), StateURI: "dir:///x", TPM2: true})); h == nil {
		t.Fatal("no blob hook with a manager")
	}
}

// TestMigrationEvents: a move is announced to the API's event stream and to the webhook.
func TestMigrationEvents(t *testing.T) {
	hook := make(chan Event, 2)
	ws := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var e Event
		json.NewDecoder(r.Body).Decode(&e)
		hook <- e
	}))
	defer ws.Close()
	a := startMigHostWith(t, MigrationConfig{Webhook: ws.URL})
	stream := make(chan Event, 2)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go a.tm.client().Events(ctx, func(e Event) bool { stream <- e; return true })
	if e := <-stream; e.Type != "subscribed" {
		t.Fatalf("first event %+v", e)
	}
	path := "/srv/a/vm3"
	if _, err := a.mig.importBlobs(ctx, path, a.export(t, path, map[uint32][]byte{1: []byte("p"), 2: []byte("v")})); err != nil {
		t.Fatal(err)
	}
	for name, ch := range map[string]chan Event{"stream": stream, "webhook": hook} {
		select {
		case e := <-ch:
			if e.Type != "migration" || e.History.Kind != "restore" || e.History.StatePath != path {
				t.Fatalf("%s: %+v", name, e)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("no event on the %s", name)
		}
	}
}

// TestMigrationVMMismatch: the registry names the VMs on both hosts; one VM's blobs do not go
// into another VM's vTPM, and the history names the VM.
func TestMigrationVMMismatch(t *testing.T) {
	a, b := startMigHost(t, ""), startMigHost(t, "")
	a.trust(t, b)
	b.trust(t, a)
	ctx := context.Background()
	reg := func(h *migHost, uuid, name, dir string) {
		if _, err := h.tm.reg.Update(ctx, uuid, func(r *registry.Record) error { r.Name, r.StateDir = name, dir; return nil }); err != nil {
			t.Fatal(err)
		}
	}
	reg(a, "11111111-1111-4111-8111-111111111111", "vm-one", "/srv/a/one")
	reg(b, "22222222-2222-4222-8222-222222222222", "vm-two", "/srv/b/two")
	reg(b, "11111111-1111-4111-8111-111111111111", "vm-one", "/srv/b/one")
	sealed := a.export(t, "/srv/a/one", map[uint32][]byte{1: []byte("p"), 2: []byte("v")})
	if _, err := b.mig.importBlobs(ctx, "/srv/b/two", sealed); !errors.Is(err, ErrEnvelope) || !strings.Contains(err.Error(), "VM") {
		t.Fatalf("another VM's blobs: %v", err)
	}
	if _, err := b.mig.importBlobs(ctx, "/srv/b/one", sealed); err != nil {
		t.Fatal(err)
	}
	if h := b.mig.rec.historyOf("vm-one"); len(h) != 1 || h[0].VM != "11111111-1111-4111-8111-111111111111" {
		t.Fatalf("history by name: %+v", h)
	}
}

// TestMigrationFileIdentity: an operator-CA identity from PEM files in place of the hardware one.
func TestMigrationFileIdentity(t *testing.T) {
	ca := newTestCA(t, "ops")
	dir := t.TempDir()
	write := func(name string, blocks ...*pem.Block) string {
		var b []byte
		for _, bl := range blocks {
			b = append(b, pem.EncodeToMemory(bl)...)
		}
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	trust := write("ca.pem", &pem.Block{Type: "CERTIFICATE", Bytes: ca.cert.Raw})
	load := func(host string) *Identity {
		id := ca.identity(t, host)
		der, err := x509.MarshalPKCS8PrivateKey(id.Key)
		if err != nil {
			t.Fatal(err)
		}
		got, err := LoadIdentityFiles(write(host+".crt", &pem.Block{Type: "CERTIFICATE", Bytes: id.Chain[0].Raw}),
			write(host+".key", &pem.Block{Type: "PRIVATE KEY", Bytes: der}), trust)
		if err != nil {
			t.Fatal(err)
		}
		return got
	}
	idA, idB := load("hostA"), load("hostB")
	if _, err := LoadIdentityFiles(filepath.Join(dir, "hostA.crt"), filepath.Join(dir, "hostB.key"), trust); err == nil {
		t.Fatal("a key that does not match the certificate was taken")
	}
	a, b := startMigHostWith(t, MigrationConfig{Identity: idA}), startMigHostWith(t, MigrationConfig{Identity: idB})
	blobs := map[uint32][]byte{1: []byte("permanent"), 2: []byte("volatile")}
	got, err := b.mig.importBlobs(context.Background(), "/srv/b/vm", a.export(t, "/srv/a/vm", blobs))
	if err != nil || !bytes.Equal(got[2], blobs[2]) {
		t.Fatalf("move with file identities: %v", err)
	}
	if h := b.mig.rec.historyOf(""); len(h) != 1 || h[0].SourceSubject != "CN=hostA" || h[0].SourceAK != "" {
		t.Fatalf("history: %+v", h)
	}
}

// TestMigrationRecordsRollback: an older copy of migration.json (one where a released ticket
// was still open, with its key) is refused at the next start: the hardware counter moved on.
func TestMigrationRecordsRollback(t *testing.T) {
	a := startMigHost(t, "")
	// a vTPM enrolled: the directory is no longer new
	st := stateDir(t)
	keyOf(t, a.tm.ask(st, KeyRequest{StatePath: st, TPM2: true, Fresh: true}, "", nil))
	path := "/srv/a/vm4"
	a.export(t, path, map[uint32][]byte{1: []byte("p"), 2: []byte("v")})
	file := filepath.Join(a.tm.dir, migrationRecordsName)
	old, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	if err := a.mig.admit(context.Background(), path); err != nil { // cancels the export: one more write
		t.Fatal(err)
	}
	a.tm.close()
	// a copy of the current file is fine (the manager restarts on it)
	a.tm.start()
	if _, err := a.tm.srv.migration(); err != nil {
		t.Fatal(err)
	}
	a.tm.close()
	if err := os.WriteFile(file, old, 0o600); err != nil {
		t.Fatal(err)
	}
	a.tm.start()
	if _, err := a.tm.srv.migration(); !errors.Is(err, ErrMigrationRollback) {
		t.Fatalf("rolled back records: %v", err)
	}
	// nor may the file disappear (the vTPMs' moved-away marks with it)
	a.tm.close()
	os.Remove(file)
	a.tm.start()
	if _, err := a.tm.srv.migration(); !errors.Is(err, ErrMigrationRollback) {
		t.Fatalf("removed records: %v", err)
	}
}

// TestMigrationWrongManager: the address in the blobs leads to another manager (a hijacked
// name, a trusted but wrong host): the destination talks only to the key that sealed them.
func TestMigrationWrongManager(t *testing.T) {
	d := startMigHost(t, "")
	a := startMigHostWith(t, MigrationConfig{Address: d.addr})
	b := startMigHost(t, "")
	b.trust(t, a, d)
	d.trust(t, a, b)
	a.trust(t, b)
	sealed := a.export(t, "/srv/a/vm5", map[uint32][]byte{1: []byte("p"), 2: []byte("v")})
	_, err := b.mig.importBlobs(context.Background(), "/srv/b/vm5", sealed)
	if !errors.Is(err, ErrUntrusted) || !strings.Contains(err.Error(), "not the one that sealed") {
		t.Fatalf("a manager other than the source: %v", err)
	}
}

// TestMigrationNewDirectory: a new manager directory on a TPM whose migration counter exists
// (a reinstalled host) starts new records, as the ledger does.
func TestMigrationNewDirectory(t *testing.T) {
	hw := swtpmtest.Start(t)
	m1 := startManager(t, hw, t.TempDir(), nil)
	if _, err := m1.srv.migration(); err != nil {
		t.Fatal(err)
	}
	m1.close()
	m2 := startManager(t, hw, t.TempDir(), nil)
	if _, err := m2.srv.migration(); err != nil {
		t.Fatalf("a new directory on the same TPM: %v", err)
	}
}

// TestMigrationRequesterGone: a vTPM that went away before its manager asked for the key
// (its QEMU killed) gets none: the source's ticket stays open, the source runs on.
func TestMigrationRequesterGone(t *testing.T) {
	a, b := startMigHost(t, ""), startMigHost(t, "")
	a.trust(t, b)
	b.trust(t, a)
	sealed := a.export(t, "/srv/a/vm6", map[uint32][]byte{1: []byte("p"), 2: []byte("v")})
	gone, cancel := context.WithCancel(context.Background())
	cancel()
	ctx := context.WithValue(context.Background(), requesterKey{}, gone)
	if _, err := b.mig.importBlobs(ctx, "/srv/b/vm6", sealed); err == nil || !strings.Contains(err.Error(), "gone") {
		t.Fatalf("import for a vTPM that is gone: %v", err)
	}
	if st := a.mig.rec.Tickets[ticketOf(sealed)].State; st != ticketExporting {
		t.Fatalf("the source's ticket is %s", st)
	}
	if err := a.mig.admit(context.Background(), "/srv/a/vm6"); err != nil {
		t.Fatalf("the source may not run: %v", err)
	}
}
