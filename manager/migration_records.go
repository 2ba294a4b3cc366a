package manager

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"sort"
	"strconv"
	"time"

	"github.com/vtpmd/vtpmd/internal/atomicfile"
)

// Ticket states. A ticket is made by the first blob a vTPM exports and leaves exporting
// exactly once: released (its key went to one destination) or cancelled (the source vTPM
// ran again first, or exported anew). Neither is ever undone.
const (
	ticketExporting = "exporting"
	ticketReleased  = "released"
	ticketCancelled = "cancelled"
)

// Sentinel errors of the ticket state machine (answered to the destination, which refuses
// the import with them).
var (
	// ErrTicketUnknown: the source manager has no such ticket.
	ErrTicketUnknown = errors.New("manager: migration ticket unknown to the source")
	// ErrTicketReleased: the ticket's key was released already (a replay, or a second destination).
	ErrTicketReleased = errors.New("manager: migration ticket already released (replayed blob or second destination)")
	// ErrTicketCancelled: the source vTPM ran on after this export (an older blob).
	ErrTicketCancelled = errors.New("manager: migration ticket cancelled: the source vTPM ran on after this export (older blob)")
	// ErrBlobSet: the blobs presented are not exactly the ones the ticket exported.
	ErrBlobSet = errors.New("manager: the blobs presented are not the ones exported (altered, omitted or mixed)")
	// ErrMovedAway: this vTPM's state was released to another host; it must not run here.
	ErrMovedAway = errors.New("manager: the vTPM migrated away from this host; its state here is stale")
	// ErrPlainRefused: a plain (unsealed) state blob arrived and the policy refuses it.
	ErrPlainRefused = errors.New("manager: plain state blob refused by the migration policy")
	// ErrNoIdentity: secure migration needs an identity on this host.
	ErrNoIdentity = errors.New("manager: no migration identity configured")
)

// keepTickets is how many tickets (and their keys, for a later restore on this host) are kept
// per vTPM; older ones are dropped (their blobs can no longer be opened).
const keepTickets = 16

// ticket is one export of a vTPM's state, on the source host.
type ticket struct {
	ID        string    `json:"id"`
	StatePath string    `json:"state_path"`
	VM        string    `json:"vm,omitempty"`
	Name      string    `json:"name,omitempty"`
	State     string    `json:"state"`
	Created   time.Time `json:"created"`
	// Key is the one-time key, wrapped (AES-GCM) under the records key; gone once released
	// to another host.
	Key []byte `json:"key,omitempty"`
	// Blobs are the sealed blobs exported (blob type -> envelope ID), Digests their
	// plaintexts' SHA-256.
	Blobs        map[string]string `json:"blobs"`
	Digests      map[string]string `json:"digests"`
	StateVersion uint64            `json:"state_version"`
	Moves        uint64            `json:"moves"`
	// Set at release: who got the key, when.
	ReleasedTo   string    `json:"released_to,omitempty"`
	ReleasedName string    `json:"released_name,omitempty"`
	ReleasedPath string    `json:"released_path,omitempty"`
	Finished     time.Time `json:"finished,omitzero"`
}

// vtpmMigration is this host's migration record of one vTPM (by state path).
type vtpmMigration struct {
	StatePath string `json:"state_path"`
	VM        string `json:"vm,omitempty"`
	Name      string `json:"name,omitempty"`
	// Moves counts the moves between hosts this vTPM made (the guest reads it).
	Moves    uint64    `json:"moves"`
	LastMove time.Time `json:"last_move,omitzero"`
	// LastTicket is the ticket of the last import here.
	LastTicket string `json:"last_ticket,omitempty"`
	// Away: the state was released to another host (AwayTicket); the copy here is stale.
	Away       bool   `json:"away,omitempty"`
	AwayTicket string `json:"away_ticket,omitempty"`
	// AcceptOnce lets the next local import of an already used ticket through (operator).
	AcceptOnce bool `json:"accept_once,omitempty"`
	// NVAuth is the write authorization of the guest's migration index, wrapped.
	NVAuth []byte `json:"nv_auth,omitempty"`
}

// HistoryEntry is one completed move of a vTPM, as `vtpmd history` shows it.
type HistoryEntry struct {
	Time time.Time `json:"time"`
	// Kind: "out" (released to another host), "in" (imported from another host), "restore"
	// (a saved state opened again on this host).
	Kind   string `json:"kind"`
	Ticket string `json:"ticket"`
	VM     string `json:"vm,omitempty"`
	Name   string `json:"name,omitempty"`
	// StatePath is the vTPM's state on this host.
	StatePath string `json:"state_path"`
	// Source and Destination are the hosts' identities (hex SHA-256 of their public keys)
	// and certificate subjects; SourceAddress the source manager's migration address.
	Source             string `json:"source"`
	SourceSubject      string `json:"source_subject,omitempty"`
	SourceAddress      string `json:"source_address,omitempty"`
	Destination        string `json:"destination"`
	DestinationSubject string `json:"destination_subject,omitempty"`
	// SourceAK and DestinationAK are the hosts' hardware AK names (hex), as their identity
	// certificates name them (empty for an operator-CA identity without the host attribute).
	SourceAK      string `json:"source_ak,omitempty"`
	DestinationAK string `json:"destination_ak,omitempty"`
	// StateDigest is the SHA-256 over the moved blobs' digests (type order).
	StateDigest  string `json:"state_digest"`
	StateVersion uint64 `json:"state_version"`
	// Moves is the vTPM's move count after this entry.
	Moves    uint64 `json:"moves"`
	Accepted bool   `json:"accepted,omitempty"`
}

// migrationRecords are a manager's tickets, per-vTPM records and history.
type migrationRecords struct {
	// Counter is the hardware counter's value this write carried (0: no counter).
	Counter uint64                    `json:"counter,omitempty"`
	Tickets map[string]*ticket        `json:"tickets"`
	VTPMs   map[string]*vtpmMigration `json:"vtpms"`
	History []HistoryEntry            `json:"history"`
}

func newMigrationRecords() *migrationRecords {
	return &migrationRecords{Tickets: map[string]*ticket{}, VTPMs: map[string]*vtpmMigration{}}
}

// vtpm is the record of the vTPM at path (made if missing).
func (r *migrationRecords) vtpm(path string) *vtpmMigration {
	v := r.VTPMs[path]
	if v == nil {
		v = &vtpmMigration{StatePath: path}
		r.VTPMs[path] = v
	}
	return v
}

// openTicket returns the exporting ticket id of path that has no blob of type typ yet, or
// nil: a new export begins with the first blob, or when a type comes again (QEMU fetches each
// type once per migration).
func (r *migrationRecords) openTicket(id, path string, typ uint32) *ticket {
	t := r.Tickets[id]
	if t == nil || t.StatePath != path || t.State != ticketExporting {
		return nil
	}
	if _, again := t.Blobs[strconv.Itoa(int(typ))]; again {
		return nil
	}
	return t
}

// cancelExports cancels every exporting ticket of path (the vTPM runs on); it reports
// whether any changed.
func (r *migrationRecords) cancelExports(path string, now time.Time) bool {
	changed := false
	for _, t := range r.Tickets {
		if t.StatePath == path && t.State == ticketExporting {
			t.State, t.Finished = ticketCancelled, now
			changed = true
		}
	}
	return changed
}

// admit decides whether the vTPM at path may run: not when its state was released away;
// otherwise its open exports are cancelled. It reports whether the records changed.
func (r *migrationRecords) admit(path string, now time.Time) (bool, error) {
	if v := r.VTPMs[path]; v != nil && v.Away {
		return false, fmt.Errorf("%w (ticket %s): 'vtpmd history accept' lets it run here again", ErrMovedAway, v.AwayTicket)
	}
	return r.cancelExports(path, now), nil
}

// release hands out ticket id's key once, to the destination named dest, for exactly the
// blobs the ticket exported. local says the destination is this host at destPath (a restore),
// where an operator's accept lets an used ticket through once. It returns the ticket.
func (r *migrationRecords) release(id string, blobs map[string]string, dest, destName, destPath string, local bool, now time.Time) (*ticket, bool, error) {
	t := r.Tickets[id]
	if t == nil {
		return nil, false, fmt.Errorf("%w: %s", ErrTicketUnknown, id)
	}
	if !maps.Equal(t.Blobs, blobs) {
		return nil, false, fmt.Errorf("%w: ticket %s", ErrBlobSet, id)
	}
	accepted := false
	switch t.State {
	case ticketExporting:
	case ticketReleased, ticketCancelled:
		v := r.VTPMs[destPath]
		if !local || t.StatePath != destPath || v == nil || !v.AcceptOnce || len(t.Key) == 0 {
			if t.State == ticketReleased {
				return nil, false, fmt.Errorf("%w: ticket %s went to %s at %s", ErrTicketReleased, id, t.ReleasedName, t.Finished.Format(time.RFC3339))
			}
			return nil, false, fmt.Errorf("%w: ticket %s", ErrTicketCancelled, id)
		}
		v.AcceptOnce, accepted = false, true
	default:
		return nil, false, fmt.Errorf("%w: ticket %s in state %q", ErrTicketUnknown, id, t.State)
	}
	// a newer export of the same vTPM that is still open can never be released after this one
	r.cancelExports(t.StatePath, now)
	t.State, t.Finished = ticketReleased, now
	t.ReleasedTo, t.ReleasedName, t.ReleasedPath = dest, destName, destPath
	if !local || destPath != t.StatePath {
		v := r.vtpm(t.StatePath)
		v.Away, v.AwayTicket = true, t.ID
		if !local {
			t.Key = nil // the key left this host; nothing here opens these blobs again
		}
	}
	return t, accepted, nil
}

// imported records an import of ticket id at path: the vTPM runs here now.
func (r *migrationRecords) imported(path, id string, moves uint64, now time.Time) *vtpmMigration {
	v := r.vtpm(path)
	v.Away, v.AwayTicket = false, ""
	v.LastTicket, v.Moves = id, moves
	if moves > 0 {
		v.LastMove = now
	}
	return v
}

// prune drops the oldest finished tickets of path beyond keepTickets.
func (r *migrationRecords) prune(path string) {
	var ts []*ticket
	for _, t := range r.Tickets {
		if t.StatePath == path {
			ts = append(ts, t)
		}
	}
	if len(ts) <= keepTickets {
		return
	}
	sort.Slice(ts, func(i, j int) bool { return ts[i].Created.Before(ts[j].Created) })
	for _, t := range ts[:len(ts)-keepTickets] {
		if t.State != ticketExporting {
			delete(r.Tickets, t.ID)
		}
	}
}

// historyOf is the history entries of a vTPM named by UUID, name, or state path.
func (r *migrationRecords) historyOf(vm string) []HistoryEntry {
	var out []HistoryEntry
	for _, h := range r.History {
		if vm == "" || h.VM == vm || h.Name == vm || h.StatePath == vm {
			out = append(out, h)
		}
	}
	return out
}

// migrationStore keeps the records in the manager's directory: JSON with an HMAC under a key
// derived from the ledger key (sealed by the hardware TPM), written atomically and durably.
// Wrapped secrets (one-time keys, NV auths) are AES-GCM under another derived key. With a
// hardware counter, every write first increments it and carries its value, as the ledger
// does: an older copy of the file put back (which could hold a released ticket as still
// open, with its key) no longer matches the counter and is refused.
type migrationStore struct {
	path            string
	macKey, wrapKey []byte
	counter         Counter // nil: none (a Hardware without NV counters)
	// hw is the counter's value when known; written the value the last write carried
	// (guarded by the migration's lock).
	hw, written uint64
	known       bool
}

// ErrMigrationRollback: migration.json is older than the hardware counter says.
var ErrMigrationRollback = errors.New("manager: migration records rolled back (hardware counter mismatch)")

const migrationRecordsName = "migration.json"

func newMigrationStore(path string, ledgerKey []byte) (*migrationStore, error) {
	mk, err := hkdf.Key(sha256.New, ledgerKey, nil, "vtpmd migration records mac", 32)
	if err != nil {
		return nil, err
	}
	wk, err := hkdf.Key(sha256.New, ledgerKey, nil, "vtpmd migration records wrap", 32)
	if err != nil {
		return nil, err
	}
	return &migrationStore{path: path, macKey: mk, wrapKey: wk}, nil
}

type migrationFile struct {
	Records json.RawMessage `json:"records"`
	MAC     []byte          `json:"mac"`
}

func (s *migrationStore) mac(b []byte) []byte {
	m := hmac.New(sha256.New, s.macKey)
	m.Write([]byte("vtpmd migration records v1\x00"))
	m.Write(b)
	return m.Sum(nil)
}

// load reads the records and checks them against the hardware counter. Writes go ahead of
// the counter (save), so the file carries the counter's value, or one more when a write was
// cut before its increment (which is then done now); anything older is a copy put back. A
// missing file is new only while the counter is new (fresh: just defined); the file is then
// written at once, so a file that disappears later is never taken for a new one.
func (s *migrationStore) load(fresh bool) (*migrationRecords, error) {
	raw, err := readLimited(s.path, maxLedgerSize)
	if errors.Is(err, fs.ErrNotExist) {
		if s.counter != nil && !fresh {
			return nil, fmt.Errorf("%w: %s is missing but its hardware counter exists", ErrMigrationRollback, s.path)
		}
		r := newMigrationRecords()
		return r, s.save(r)
	}
	if err != nil {
		return nil, err
	}
	var f migrationFile
	if err := json.Unmarshal(raw, &f); err != nil {
		return nil, fmt.Errorf("migration records %s: %w", s.path, err)
	}
	if !hmac.Equal(f.MAC, s.mac(f.Records)) {
		return nil, fmt.Errorf("migration records %s: authentication failed (edited, or from another TPM)", s.path)
	}
	r := newMigrationRecords()
	if err := json.Unmarshal(f.Records, r); err != nil {
		return nil, fmt.Errorf("migration records %s: %w", s.path, err)
	}
	if r.Tickets == nil {
		r.Tickets = map[string]*ticket{}
	}
	if r.VTPMs == nil {
		r.VTPMs = map[string]*vtpmMigration{}
	}
	if s.counter != nil {
		ctx, cancel := context.WithTimeout(context.Background(), saveTimeout)
		defer cancel()
		hw, err := s.counter.Read(ctx)
		if err != nil {
			return nil, fmt.Errorf("read the migration counter: %w", err)
		}
		switch r.Counter {
		case hw:
		case hw + 1: // written, not yet counted: count it now
			if hw, err = s.counter.Increment(ctx); err != nil {
				return nil, fmt.Errorf("migration counter: %w", err)
			}
			if hw != r.Counter {
				return nil, fmt.Errorf("%w: %s carries %d, the TPM's counter is %d", ErrMigrationRollback, s.path, r.Counter, hw)
			}
		default:
			return nil, fmt.Errorf("%w: %s carries %d, the TPM's counter is %d", ErrMigrationRollback, s.path, r.Counter, hw)
		}
		s.hw, s.known = hw, true
	}
	return r, nil
}

// save writes the records durably, ahead of the hardware counter: the file carries the
// counter's next value, then the counter is incremented to it. A crash between the two
// leaves a file one ahead, which load completes; the previous file is then refused, so no
// older copy can come back. An increment that fails after the write does not fail the save
// (the change is durable); the counter catches up before the next write.
func (s *migrationStore) save(r *migrationRecords) error {
	if s.counter == nil {
		return s.write(r)
	}
	ctx, cancel := context.WithTimeout(context.Background(), saveTimeout)
	defer cancel()
	if !s.known {
		hw, err := s.counter.Read(ctx)
		if err != nil {
			return fmt.Errorf("read the migration counter: %w", err)
		}
		if s.written != 0 && hw+1 == s.written {
			if hw, err = s.counter.Increment(ctx); err != nil {
				return fmt.Errorf("migration counter: %w", err)
			}
		}
		s.hw, s.known = hw, true
	}
	r.Counter = s.hw + 1
	if err := s.write(r); err != nil {
		return err
	}
	s.written = r.Counter
	hw, err := s.counter.Increment(ctx)
	if err != nil || hw != r.Counter {
		s.known = false
		return nil
	}
	s.hw = hw
	return nil
}

func (s *migrationStore) write(r *migrationRecords) error {
	body, err := json.Marshal(r)
	if err != nil {
		return err
	}
	out, err := json.Marshal(migrationFile{Records: body, MAC: s.mac(body)})
	if err != nil {
		return err
	}
	if err := atomicfile.Write(s.path, out, atomicfile.Options{Perm: 0o600, ExactPerm: true}); err != nil {
		return fmt.Errorf("write migration records: %w", err)
	}
	return nil
}

// wrap encrypts a secret for the records (label binds it to its use and owner).
func (s *migrationStore) wrap(secret []byte, label string) ([]byte, error) {
	c, err := aes.NewCipher(s.wrapKey)
	if err != nil {
		return nil, err
	}
	g, err := cipher.NewGCM(c)
	if err != nil {
		return nil, err
	}
	nonce := make([]byte, g.NonceSize())
	if _, err := rand.Read(nonce); err != nil {
		return nil, err
	}
	return g.Seal(nonce, nonce, secret, []byte(label)), nil
}

func (s *migrationStore) unwrap(wrapped []byte, label string) ([]byte, error) {
	c, err := aes.NewCipher(s.wrapKey)
	if err != nil {
		return nil, err
	}
	g, err := cipher.NewGCM(c)
	if err != nil {
		return nil, err
	}
	if len(wrapped) < g.NonceSize() {
		return nil, errors.New("wrapped secret too short")
	}
	out, err := g.Open(nil, wrapped[:g.NonceSize()], wrapped[g.NonceSize():], []byte(label))
	if err != nil {
		return nil, fmt.Errorf("unwrap %s: %w", label, err)
	}
	return out, nil
}

func newTicketID() (string, error) {
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		return "", err
	}
	return hex.EncodeToString(b), nil
}
