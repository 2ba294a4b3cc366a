package manager

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/vtpmd/vtpmd/backend/localca"
	"github.com/vtpmd/vtpmd/backend/seam"
	"github.com/vtpmd/vtpmd/manager/hwtpm"
)

// Migration policies (MigrationConfig.Policy).
const (
	// PolicySealed seals every blob that leaves and refuses plain blobs that arrive (the
	// default when the manager has a migration identity).
	PolicySealed = "sealed"
	// PolicyAllowPlain seals every blob that leaves and accepts plain blobs that arrive (from a
	// host without a manager, or from swtpm) with a warning.
	PolicyAllowPlain = "allow-plain"
	// PolicyPlain seals nothing (to migrate to a host without a manager) and accepts plain
	// blobs with a warning; sealed blobs that arrive are still opened.
	PolicyPlain = "plain"
)

// MigrationConfig is the manager's part in secure migration.
type MigrationConfig struct {
	// Listen is the TCP address of the manager-to-manager TLS listener ("": none; blobs can
	// then only be opened on this host, e.g. virsh restore).
	Listen string
	// Address is the address other managers reach this one at, carried in the sealed blobs
	// (default: Listen).
	Address string
	// Identity signs sealed blobs and authenticates the TLS channel; nil: no secure migration
	// (blobs leave and arrive plain, as without a manager).
	Identity *Identity
	// Policy is PolicySealed (default), PolicyAllowPlain or PolicyPlain.
	Policy string
	// Webhook is a URL that gets every migration event as a JSON POST ("": none).
	Webhook string
}

// ParseMigrationPolicy checks a policy name ("" is the default, sealed).
func ParseMigrationPolicy(s string) (string, error) {
	switch s {
	case "":
		return PolicySealed, nil
	case PolicySealed, PolicyAllowPlain, PolicyPlain:
		return s, nil
	}
	return "", fmt.Errorf("migration policy %q: want %s, %s or %s", s, PolicySealed, PolicyAllowPlain, PolicyPlain)
}

// migration is a manager's migration state: its records, identity and subscribers.
type migration struct {
	s   *Server
	cfg MigrationConfig
	log *slog.Logger

	mu    sync.Mutex // guards rec and serializes its writes
	rec   *migrationRecords
	store *migrationStore

	events *eventHub
	// dial is how the destination reaches a source manager (tests replace it).
	peerTimeout time.Duration
}

// migrations are each server's migration state and configuration (by server).
var (
	migrationsMu     sync.Mutex
	migrations       = map[*Server]*migration{}
	migrationConfigs = map[*Server]MigrationConfig{}
)

// ConfigureMigration sets the server's migration configuration (before it serves). Without
// it (or without an identity there), the host's hardware identity (TLSCertificate,
// TrustedCAs) is used when it has one.
func (s *Server) ConfigureMigration(cfg MigrationConfig) error {
	if _, err := ParseMigrationPolicy(cfg.Policy); err != nil {
		return err
	}
	migrationsMu.Lock()
	defer migrationsMu.Unlock()
	if migrations[s] != nil {
		return errors.New("migration: configured after first use")
	}
	migrationConfigs[s] = cfg
	return nil
}

// migration is the server's migration state, made on first use from its configuration.
func (s *Server) migration() (*migration, error) {
	migrationsMu.Lock()
	defer migrationsMu.Unlock()
	if m := migrations[s]; m != nil {
		return m, nil
	}
	cfg := migrationConfigs[s]
	var err error
	if cfg.Policy, err = ParseMigrationPolicy(cfg.Policy); err != nil {
		return nil, err
	}
	if cfg.Address == "" {
		cfg.Address = advertisedAddress(cfg.Listen)
	}
	if cfg.Identity == nil {
		cfg.Identity = s.hardwareMigrationIdentity()
	}
	if cfg.Identity != nil {
		if err := cfg.Identity.check(); err != nil {
			return nil, err
		}
	}
	st, err := newMigrationStore(filepath.Join(s.cfg.Dir, migrationRecordsName), s.store.macKey)
	if err != nil {
		return nil, err
	}
	fresh := false
	if st.counter, fresh, err = s.migrationCounter(); err != nil {
		return nil, err
	}
	// a new manager directory (its ledger holds no vTPM yet: a new host, or a reinstalled one on
	// the same TPM) starts its records at the counter's current value, as the ledger does
	s.mu.Lock()
	newDir := len(s.ledger.VMs) == 0
	s.mu.Unlock()
	rec, err := st.load(fresh || newDir)
	if err != nil {
		return nil, err
	}
	m := &migration{s: s, cfg: cfg, log: s.log, rec: rec, store: st, peerTimeout: 20 * time.Second}
	m.events = newEventHub(cfg.Webhook, s.log)
	migrations[s] = m
	return m, nil
}

// advertisedAddress is where other managers reach a listener on listen: the address itself,
// or the host's name when it listens on every address.
func advertisedAddress(listen string) string {
	host, port, err := net.SplitHostPort(listen)
	if err != nil || (host != "" && !net.ParseIP(host).IsUnspecified()) {
		return listen
	}
	name, err := os.Hostname()
	if err != nil {
		return listen
	}
	return net.JoinHostPort(name, port)
}

// migrationCounter is the hardware counter that dates migration.json: the NV index after the
// ledger's (0x01500e02 by default), made on first use; nil for a Hardware without NV counters.
func (s *Server) migrationCounter() (Counter, bool, error) {
	hw, ok := s.hw.(*hardware)
	if !ok {
		return nil, false, nil
	}
	c := &nvCounter{tpm: hw.tpm, index: hw.index + 1}
	ctx, cancel := context.WithTimeout(context.Background(), saveTimeout)
	defer cancel()
	_, err := hw.tpm.ReadCounter(ctx, c.index)
	fresh := errors.Is(err, hwtpm.ErrNoCounter)
	if err := hw.tpm.DefineCounter(ctx, c.index); err != nil {
		return nil, false, fmt.Errorf("migration counter: %w", err)
	}
	return c, fresh, nil
}

// nvCounter is a hardware NV counter at one index.
type nvCounter struct {
	tpm   *hwtpm.TPM
	index uint32
}

func (c *nvCounter) Increment(ctx context.Context) (uint64, error) {
	return c.tpm.Increment(ctx, c.index)
}
func (c *nvCounter) Read(ctx context.Context) (uint64, error) { return c.tpm.ReadCounter(ctx, c.index) }

// hostAKOf is the hardware AK name (hex) a host identity's certificate names in its vTPM
// host attribute (the host CA issues it; docs/certificates.md), or "" (an operator-CA identity).
func hostAKOf(c *x509.Certificate) string {
	if c == nil {
		return ""
	}
	a, err := localca.FindHostAttribute(c)
	if err != nil || a == nil {
		return ""
	}
	return hex.EncodeToString(a.AKName)
}

// hardwareMigrationIdentity is the host identity's TLS key (resident in the hardware TPM)
// and chain, trusting what TrustedCAs trusts (read again at each use); nil when the host has
// no identity.
func (s *Server) hardwareMigrationIdentity() *Identity {
	tc, err := s.TLSCertificate()
	if err != nil {
		s.log.Info("no host identity: state blobs migrate unsealed, as without a manager", "err", err)
		return nil
	}
	signer, ok := tc.PrivateKey.(crypto.Signer)
	if !ok {
		return nil
	}
	var chain []*x509.Certificate
	for _, der := range tc.Certificate {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			return nil
		}
		chain = append(chain, c)
	}
	return &Identity{Chain: chain, Key: signer, rootsFn: s.TrustedCAs}
}

// startMigration serves the manager-to-manager listener when one is configured.
func (s *Server) startMigration(ctx context.Context) error {
	m, err := s.migration()
	if err != nil {
		return err
	}
	context.AfterFunc(ctx, m.events.close)
	if m.cfg.Listen == "" {
		return nil
	}
	if m.cfg.Identity == nil {
		return fmt.Errorf("--migration-listen: %w (the host identity could not be made)", ErrNoIdentity)
	}
	ln, err := net.Listen("tcp", m.cfg.Listen)
	if err != nil {
		return fmt.Errorf("migration listener: %w", err)
	}
	m.log.Info("migration listener ready", "listen", m.cfg.Listen, "address", m.cfg.Address, "identity", m.cfg.Identity.Subject(), "policy", m.cfg.Policy)
	go func() {
		if err := s.ServeMigration(ctx, ln); err != nil {
			m.log.Error("migration listener", "err", err)
		}
	}()
	return nil
}

// secure says whether blobs leave sealed.
func (m *migration) secure() bool { return m.cfg.Identity != nil && m.cfg.Policy != PolicyPlain }

// saveLocked writes the records durably (m.mu held).
func (m *migration) saveLocked() error { return m.store.save(m.rec) }

// mutateLocked applies f to the records and makes the result durable; if f or the write
// fails, the records in memory are as before (m.mu held).
func (m *migration) mutateLocked(f func() error) error {
	before, err := json.Marshal(m.rec)
	if err != nil {
		return err
	}
	if err = f(); err == nil {
		err = m.saveLocked()
	}
	if err != nil {
		restored := newMigrationRecords()
		if uerr := json.Unmarshal(before, restored); uerr == nil {
			m.rec = restored
		}
		return err
	}
	return nil
}

// vmOf names the vTPM at path from the registry and the ledger.
func (m *migration) vmOf(path string) (uuid, name string, version uint64) {
	m.s.mu.Lock()
	if r := m.s.ledger.findByPath(path); r != nil {
		uuid, name, version = r.UUID, r.Name, r.Version
	}
	m.s.mu.Unlock()
	if vm := m.s.vmOfPath(path); vm != nil {
		uuid, name = vm.UUID, vm.Name
	}
	return uuid, name, version
}

// export seals one state blob of the vTPM at path. cur is the ticket of the export under way
// in that vTPM ("" for none); the answer names the ticket the blob belongs to.
func (m *migration) export(ctx context.Context, path, cur string, typ uint32, b []byte) (string, []byte, error) {
	if typ < 1 || typ > 3 {
		return "", nil, fmt.Errorf("%w: blob type %d", errBadRequest, typ)
	}
	if !m.secure() {
		m.log.Warn("state blob leaves unsealed (no migration identity, or migration policy plain)", "state", path, "type", typ)
		return "", b, nil
	}
	uuid, name, version := m.vmOf(path)
	m.mu.Lock()
	defer m.mu.Unlock()
	now := time.Now().UTC()
	var sealed []byte
	var t *ticket
	err := m.mutateLocked(func() error {
		// the state here went to another host: exporting it again would clone it
		if v := m.rec.VTPMs[path]; v != nil && v.Away {
			return fmt.Errorf("%w (ticket %s): its state here cannot be exported again", ErrMovedAway, v.AwayTicket)
		}
		t = m.rec.openTicket(cur, path, typ)
		var key []byte
		if t == nil {
			// a new export: whatever export of this vTPM was still open can no longer be released
			m.rec.cancelExports(path, now)
			id, err := newTicketID()
			if err != nil {
				return err
			}
			key = make([]byte, oneTimeKeySize)
			if _, err := rand.Read(key); err != nil {
				return err
			}
			wrapped, err := m.store.wrap(key, "ticket "+id)
			if err != nil {
				clear(key)
				return err
			}
			v := m.rec.vtpm(path)
			v.VM, v.Name = uuid, name
			t = &ticket{ID: id, StatePath: path, VM: uuid, Name: name, State: ticketExporting, Created: now, Key: wrapped,
				Blobs: map[string]string{}, Digests: map[string]string{}, StateVersion: version, Moves: v.Moves}
			m.rec.Tickets[id] = t
			m.rec.prune(path)
		} else {
			var err error
			if key, err = m.store.unwrap(t.Key, "ticket "+t.ID); err != nil {
				return err
			}
		}
		defer clear(key)
		id := m.cfg.Identity
		hdr := envelopeHeader{Ticket: t.ID, Type: typ, VM: t.VM, Name: t.Name, Source: m.cfg.Address, SourceID: id.ID(),
			Chain: id.chainDER(), StateVersion: t.StateVersion, Moves: t.Moves, Created: now}
		var err error
		if sealed, err = sealEnvelope(hdr, key, b, id); err != nil {
			return err
		}
		d := sha256.Sum256(b)
		k := strconv.Itoa(int(typ))
		t.Blobs[k], t.Digests[k] = envelopeID(sealed), hex.EncodeToString(d[:])
		return nil
	})
	if err != nil {
		return "", nil, err
	}
	m.log.Info("state blob sealed for migration", "vm", t.Name, "state", path, "ticket", t.ID, "type", typ)
	m.pause(ctx, StepExportSealed)
	return t.ID, sealed, nil
}

// admit is the vTPM's question before it runs again (after start or export).
func (m *migration) admit(_ context.Context, path string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	changed := false
	err := m.mutateLocked(func() error {
		var err error
		changed, err = m.rec.admit(path, time.Now().UTC())
		return err
	})
	if err != nil {
		return err
	}
	if changed {
		m.log.Info("the vTPM runs on: its open export is cancelled, never releasable", "state", path)
	}
	return nil
}

// importBlobs opens the blobs SET_STATEBLOB received by the vTPM at path.
func (m *migration) importBlobs(ctx context.Context, path string, blobs map[uint32][]byte) (map[uint32][]byte, error) {
	sealed := 0
	for _, b := range blobs {
		if seam.IsSealed(b) {
			sealed++
		}
	}
	if sealed == 0 {
		if m.cfg.Policy == PolicySealed && m.cfg.Identity != nil {
			return nil, fmt.Errorf("%w: the source host sealed nothing (no vtpmd manager there, or swtpm); "+
				"--migration-policy allow-plain accepts it", ErrPlainRefused)
		}
		m.log.Warn("accepting a plain (unsealed) migrated state", "state", path)
		return blobs, nil
	}
	if sealed != len(blobs) {
		return nil, fmt.Errorf("%w: sealed and plain blobs mixed", ErrEnvelope)
	}
	m.pause(ctx, StepImportReceived)
	id := m.cfg.Identity
	if id == nil {
		return nil, fmt.Errorf("%w: a sealed state blob arrived; this manager cannot open it", ErrNoIdentity)
	}
	envs, err := parseSet(blobs, id)
	if err != nil {
		return nil, err
	}
	first := envs[0]
	hdr := first.hdr
	// the state of one VM does not go into another's vTPM (when both are known)
	if local := m.s.vmOfPath(path); local != nil && local.UUID != "" && hdr.VM != "" && local.UUID != hdr.VM {
		return nil, fmt.Errorf("%w: the blobs are VM %s's, this vTPM is VM %s's", ErrEnvelope, hdr.VM, local.UUID)
	}
	ids := map[string]string{}
	for _, e := range envs {
		ids[strconv.Itoa(int(e.hdr.Type))] = e.id
	}
	var key, nvAuth []byte
	var rel *ticket
	accepted := false
	local := hdr.SourceID == id.ID()
	if local {
		key, rel, accepted, err = m.releaseLocal(hdr.Ticket, ids, path)
	} else {
		if m.importedHere(hdr.Ticket) {
			return nil, fmt.Errorf("%w: ticket %s was imported on this host already", ErrTicketReleased, hdr.Ticket)
		}
		// the vTPM that asked may be gone (its QEMU killed): then no key is asked for, and the
		// source, never released, runs on
		if err := requesterGone(ctx); err != nil {
			return nil, err
		}
		var resp *releaseResponse
		resp, err = m.requestRelease(ctx, first, ids, path)
		if err == nil {
			key, nvAuth = resp.Key, resp.NVAuth
		}
	}
	if err != nil {
		return nil, err
	}
	defer clear(key)
	m.pause(ctx, StepKeyReceived)
	out := make(map[uint32][]byte, len(envs))
	for _, e := range envs {
		plain, err := e.env.open(key)
		if err != nil {
			for _, p := range out {
				clear(p)
			}
			return nil, err
		}
		out[e.hdr.Type] = plain
	}
	// the vTPM runs here now: recorded before its INIT loads the state
	now := time.Now().UTC()
	moves := hdr.Moves
	if !local || (rel != nil && rel.StatePath != path) {
		moves++
	}
	digest := stateDigest(envs)
	kind := "in"
	if local {
		kind = "restore"
	}
	h := HistoryEntry{Time: now, Kind: kind, Ticket: hdr.Ticket, VM: hdr.VM, Name: hdr.Name, StatePath: path,
		Source: hdr.SourceID, SourceSubject: first.signer, SourceAK: hostAKOf(first.leaf), SourceAddress: hdr.Source,
		Destination: id.ID(), DestinationSubject: id.Subject(), DestinationAK: hostAKOf(id.Chain[0]), StateDigest: digest, StateVersion: hdr.StateVersion, Moves: moves, Accepted: accepted}
	m.mu.Lock()
	err = m.mutateLocked(func() error {
		v := m.rec.imported(path, hdr.Ticket, moves, now)
		v.VM, v.Name = hdr.VM, hdr.Name
		if nvAuth != nil {
			var err error
			if v.NVAuth, err = m.store.wrap(nvAuth, "nv "+path); err != nil {
				return err
			}
		}
		m.rec.History = append(m.rec.History, h)
		return nil
	})
	m.mu.Unlock()
	clear(nvAuth)
	if err != nil {
		for _, p := range out {
			clear(p)
		}
		return nil, err
	}
	m.pause(ctx, StepImportRecorded)
	m.log.Info("migrated state opened", "kind", kind, "vm", hdr.Name, "state", path, "ticket", hdr.Ticket, "source", first.signer, "moves", moves)
	m.events.publish(eventOf(h))
	return out, nil
}

// sealedBlob is one verified envelope of a set.
type sealedBlob struct {
	env    *envelope
	hdr    envelopeHeader
	id     string // envelope ID
	signer string // the source certificate's subject
	leaf   *x509.Certificate
}

// parseSet parses and verifies the blobs of one migration: each is well formed, signed by a
// trusted identity, and all name one ticket, one source and their own blob type.
func parseSet(blobs map[uint32][]byte, id *Identity) ([]sealedBlob, error) {
	types := make([]uint32, 0, len(blobs))
	for t := range blobs {
		types = append(types, t)
	}
	sort.Slice(types, func(i, j int) bool { return types[i] < types[j] })
	var out []sealedBlob
	for _, typ := range types {
		e, err := parseEnvelope(blobs[typ])
		if err != nil {
			return nil, fmt.Errorf("blob type %d: %w", typ, err)
		}
		if e.hdr.Type != typ {
			return nil, fmt.Errorf("%w: a blob of type %d arrived as type %d", ErrEnvelope, e.hdr.Type, typ)
		}
		roots, err := id.roots()
		if err != nil {
			return nil, err
		}
		leaf, err := e.verify(roots)
		if err != nil {
			return nil, fmt.Errorf("blob type %d: %w", typ, err)
		}
		if len(out) > 0 {
			h0 := out[0].hdr
			if e.hdr.Ticket != h0.Ticket || e.hdr.SourceID != h0.SourceID || e.hdr.Source != h0.Source {
				return nil, fmt.Errorf("%w: blobs of different migrations mixed", ErrEnvelope)
			}
		}
		out = append(out, sealedBlob{env: e, hdr: e.hdr, id: envelopeID(blobs[typ]), signer: leaf.Subject.String(), leaf: leaf})
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("%w: no blob", ErrEnvelope)
	}
	return out, nil
}

// stateDigest is the SHA-256 over the moved blobs' plaintext digests, in type order.
func stateDigest(envs []sealedBlob) string {
	h := sha256.New()
	for _, e := range envs {
		h.Write(e.hdr.Digest)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// importedHere says whether this host imported ticket id before (a replay to this host).
func (m *migration) importedHere(id string) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, h := range m.rec.History {
		if h.Ticket == id && h.Kind == "in" {
			return true
		}
	}
	return false
}

// releaseLocal releases a ticket of this host to a vTPM of this host (a restore).
func (m *migration) releaseLocal(id string, blobs map[string]string, path string) ([]byte, *ticket, bool, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	self := m.cfg.Identity
	var t *ticket
	var accepted bool
	var key []byte
	err := m.mutateLocked(func() error {
		var err error
		if t, accepted, err = m.rec.release(id, blobs, self.ID(), self.Subject(), path, true, time.Now().UTC()); err != nil {
			return err
		}
		key, err = m.store.unwrap(t.Key, "ticket "+t.ID)
		return err
	})
	if err != nil {
		clear(key)
		if errors.Is(err, ErrTicketReleased) || errors.Is(err, ErrTicketCancelled) {
			err = fmt.Errorf("%w; restoring an older saved state is a rollback: 'vtpmd history accept %s' lets it in once", err, path)
		}
		return nil, nil, false, err
	}
	tc := *t
	return key, &tc, accepted, nil
}

// release is the source's side of a remote release: once, to the authenticated destination.
// The release is durable before the key is answered.
func (m *migration) release(ctx context.Context, req *releaseRequest, destCert *x509.Certificate) (*releaseResponse, error) {
	dest, destSubject := publicKeyID(destCert), destCert.Subject.String()
	m.pause(ctx, StepReleaseReceived)
	if err := requesterGone(ctx); err != nil {
		m.log.Warn("migration key release dropped: the destination went away", "ticket", req.Ticket, "destination", destCert.Subject)
		return nil, fmt.Errorf("the destination went away before the release: %w", err)
	}
	m.mu.Lock()
	now := time.Now().UTC()
	var wrapped []byte
	if t := m.rec.Tickets[req.Ticket]; t != nil {
		wrapped = t.Key
	}
	var h HistoryEntry
	var nvAuth []byte
	err := m.mutateLocked(func() error {
		t, _, err := m.rec.release(req.Ticket, req.Blobs, dest, destSubject, req.StatePath, false, now)
		if err != nil {
			return err
		}
		if v := m.rec.VTPMs[t.StatePath]; v != nil && len(v.NVAuth) > 0 {
			nvAuth, _ = m.store.unwrap(v.NVAuth, "nv "+t.StatePath)
		}
		h = HistoryEntry{Time: now, Kind: "out", Ticket: t.ID, VM: t.VM, Name: t.Name, StatePath: t.StatePath,
			Source: m.cfg.Identity.ID(), SourceSubject: m.cfg.Identity.Subject(), SourceAK: hostAKOf(m.cfg.Identity.Chain[0]),
			SourceAddress: m.cfg.Address, Destination: dest, DestinationSubject: destSubject, DestinationAK: hostAKOf(destCert), StateDigest: digestOfTicket(t), StateVersion: t.StateVersion,
			Moves: t.Moves + 1}
		m.rec.History = append(m.rec.History, h)
		return nil
	})
	m.mu.Unlock()
	if err != nil {
		m.log.Warn("migration key release refused", "ticket", req.Ticket, "destination", destSubject, "err", err)
		return nil, err
	}
	key, err := m.store.unwrap(wrapped, "ticket "+req.Ticket)
	if err != nil {
		return nil, err
	}
	m.pause(ctx, StepReleaseRecorded)
	m.log.Info("migration key released", "vm", h.Name, "ticket", h.Ticket, "destination", destSubject)
	m.events.publish(eventOf(h))
	return &releaseResponse{Key: key, NVAuth: nvAuth}, nil
}

// digestOfTicket is stateDigest from the ticket's record.
func digestOfTicket(t *ticket) string {
	h := sha256.New()
	for _, k := range []string{"1", "2", "3"} {
		if d, ok := t.Digests[k]; ok {
			b, _ := hex.DecodeString(d)
			h.Write(b)
		}
	}
	return hex.EncodeToString(h.Sum(nil))
}

// accept lets the next local import of an used ticket at the vTPM named vm through once.
func (m *migration) accept(path string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.mutateLocked(func() error {
		v := m.rec.vtpm(path)
		v.AcceptOnce = true
		v.Away, v.AwayTicket = false, ""
		return nil
	})
}

// nvInfo is the guest's migration index for the vTPM at path: its write authorization (made
// on first use) and contents.
func (m *migration) nvInfo(path string) (*NVInfoResponse, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	v := m.rec.vtpm(path)
	var auth []byte
	var err error
	if len(v.NVAuth) > 0 {
		if auth, err = m.store.unwrap(v.NVAuth, "nv "+path); err != nil {
			return nil, err
		}
	} else {
		auth = make([]byte, nvAuthSize)
		if _, err := rand.Read(auth); err != nil {
			return nil, err
		}
		if err := m.mutateLocked(func() error {
			var err error
			m.rec.vtpm(path).NVAuth, err = m.store.wrap(auth, "nv "+path)
			return err
		}); err != nil {
			return nil, err
		}
		v = m.rec.vtpm(path)
	}
	var idHash []byte
	host := ""
	if id := m.cfg.Identity; id != nil {
		d := sha256.Sum256(id.Chain[0].RawSubjectPublicKeyInfo)
		idHash = d[:]
		host = id.Chain[0].Subject.CommonName
	}
	var ticketID []byte
	if v.LastTicket != "" {
		ticketID, _ = hex.DecodeString(v.LastTicket)
	}
	return &NVInfoResponse{Auth: auth, Contents: nvContents(v.Moves, v.LastMove, idHash, ticketID, host)}, nil
}

// requesterKey carries the context of the vTPM's request, which ends when the vTPM goes away
// (the handler's own context does not: work that has begun finishes).
type requesterKey struct{}

// requesterGone says whether the vTPM whose request this is went away.
func requesterGone(ctx context.Context) error {
	if rc, ok := ctx.Value(requesterKey{}).(context.Context); ok && rc.Err() != nil {
		return fmt.Errorf("the vTPM that asked is gone (%w): no key asked for", rc.Err())
	}
	return nil
}

// pauseEnv names the handshake steps at which a manager stops (fault-injection tests):
// VTPMD_MIGRATION_PAUSE=step[,step]. At a step it logs "migration pause STEP", creates
// DIR/pause-STEP and waits until that file is removed (or ctx ends).
const pauseEnv = "VTPMD_MIGRATION_PAUSE"

// Pause steps, in protocol order.
const (
	StepExportSealed    = "export-sealed"    // source: a blob sealed and recorded, not yet answered
	StepReleaseReceived = "release-received" // source: an authenticated release request, not yet decided
	StepReleaseRecorded = "release-recorded" // source: release durable, key not yet sent
	StepReleaseSent     = "release-sent"     // source: key sent
	StepImportReceived  = "import-received"  // destination: blobs arrived, key not yet asked for
	StepKeyReceived     = "key-received"     // destination: key received, import not yet recorded
	StepImportRecorded  = "import-recorded"  // destination: import recorded, vTPM not yet answered
)

func (m *migration) pause(ctx context.Context, step string) {
	v := os.Getenv(pauseEnv)
	if v == "" || !slices.Contains(strings.Split(v, ","), step) {
		return
	}
	f := filepath.Join(m.s.cfg.Dir, "pause-"+step)
	if err := os.WriteFile(f, nil, 0o600); err != nil {
		m.log.Error("migration pause", "step", step, "err", err)
		return
	}
	m.log.Warn("migration pause " + step)
	fmt.Fprintf(os.Stderr, "migration pause %s\n", step)
	for {
		if _, err := os.Stat(f); err != nil {
			m.log.Warn("migration pause over " + step)
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(50 * time.Millisecond):
		}
	}
}
