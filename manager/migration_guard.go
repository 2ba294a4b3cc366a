package manager

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/vtpmd/vtpmd/backend/seam"
)

// The guest's migration index: an NV index the vTPM process defines with platform
// authorization right after every TPM2_Startup(CLEAR) (before the firmware changes or
// disables the platform hierarchy) and rewrites after every import. The guest reads it with
// owner authorization (tpm2_nvread -C o -s 136 0x01400020); only the managers know its write
// authorization (a random per-vTPM value that travels with a migration over the managers'
// TLS channel), so the guest cannot change it. Layout (136 bytes, big-endian):
//
//	 0  4  "VTMG"
//	 4  1  format (1)
//	 5  1  n, the length of the host name (at most 64)
//	 6  2  reserved (0)
//	 8  8  migration counter: how often the vTPM moved between hosts
//	16  8  time of the last move, Unix seconds (0: never moved)
//	24 32  SHA-256 of the current host's identity public key (SubjectPublicKeyInfo); zeros when
//	       the host has no identity
//	56 16  ticket of the last import (zeros: none)
//	72 64  the current host's name (its identity certificate's common name), n bytes, zero padded
const (
	MigrationNVIndex = 0x01400020
	migrationNVSize  = 136
	nvAuthSize       = 32
	nvHostMax        = 64
)

// nvContents encodes the migration index.
func nvContents(moves uint64, last time.Time, idHash, ticket []byte, host string) []byte {
	b := make([]byte, migrationNVSize)
	copy(b, "VTMG")
	b[4] = 1
	if len(host) > nvHostMax {
		host = host[:nvHostMax]
	}
	b[5] = byte(len(host))
	binary.BigEndian.PutUint64(b[8:], moves)
	if !last.IsZero() {
		binary.BigEndian.PutUint64(b[16:], uint64(last.Unix()))
	}
	copy(b[24:56], idHash)
	copy(b[56:72], ticket)
	copy(b[72:], host)
	return b
}

// MigrationNV is the decoded migration index (for tests and tools).
type MigrationNV struct {
	Moves    uint64
	LastMove time.Time
	HostID   [32]byte
	Ticket   [16]byte
	Host     string
}

// ParseMigrationNV decodes the migration index's contents.
func ParseMigrationNV(b []byte) (*MigrationNV, error) {
	if len(b) != migrationNVSize || string(b[:4]) != "VTMG" || b[4] != 1 || int(b[5]) > nvHostMax {
		return nil, errors.New("migration index: not vtpmd's format 1")
	}
	n := &MigrationNV{Moves: binary.BigEndian.Uint64(b[8:]), Host: string(b[72 : 72+int(b[5])])}
	if s := binary.BigEndian.Uint64(b[16:]); s != 0 {
		n.LastMove = time.Unix(int64(s), 0).UTC()
	}
	copy(n.HostID[:], b[24:56])
	copy(n.Ticket[:], b[56:72])
	return n, nil
}

func init() {
	registerGuardPart(func(cfg GuardConfig) seam.Guard {
		// no manager on this host (no socket): no hook, blobs as without a manager; a manager
		// that exists but does not answer refuses exports instead (no silent downgrade)
		if cfg.Client == nil || !Available(cfg.Client.Socket) {
			return nil
		}
		return &migrationGuard{c: cfg.Client, path: statePathOfURI(cfg.StateURI), log: cfg.Log}
	})
}

// migrationGuard is the vTPM process's part in migration: a seam.Guard (the guest's
// migration index) and the seam.BlobHook that asks the manager to seal, open and admit.
type migrationGuard struct {
	c    *Client
	path string
	log  *slog.Logger

	mu        sync.Mutex
	ticket    string // the export under way ("": none)
	exported  bool   // a sealed blob left since the last admission
	pendingNV bool   // imported: the index is rewritten after the next guest command
}

// nvTimeout bounds the guard's question to the manager at startup.
const nvTimeout = 10 * time.Second

// Check implements seam.Guard: nothing is refused.
func (g *migrationGuard) Check([]byte) []byte { return nil }

// Commands implements seam.CommandFilter: TPM2_Startup for Started. Done's command (the first
// after an import) is the first after INIT, which always reaches the guard.
func (g *migrationGuard) Commands() []uint32 { return []uint32{uint32(tpm2.TPMCCStartup)} }

// Started implements seam.Guard: define (if needed) and write the migration index while the
// platform hierarchy is still open. A manager that does not answer leaves the index as it is.
func (g *migrationGuard) Started(exec seam.Exec) error {
	g.writeNV(exec, true)
	return nil
}

// Done implements seam.Guard: after an import, the first successful guest command is followed
// by the index's rewrite (a live migration has no TPM2_Startup on the destination).
func (g *migrationGuard) Done(_, _ []byte, exec seam.Exec) {
	g.mu.Lock()
	pending := g.pendingNV
	g.pendingNV = false
	g.mu.Unlock()
	if pending {
		g.writeNV(exec, false)
	}
}

// execTPM is a go-tpm transport over the guard's exec.
type execTPM seam.Exec

func (e execTPM) Send(cmd []byte) ([]byte, error) { return e(cmd) }

var _ transport.TPM = execTPM(nil)

func (g *migrationGuard) writeNV(exec seam.Exec, define bool) {
	ctx, cancel := context.WithTimeout(context.Background(), nvTimeout)
	defer cancel()
	info, err := g.c.NVInfo(ctx, g.path)
	if err != nil {
		g.log.Debug("migration index: no answer from the manager", "err", err)
		return
	}
	defer clear(info.Auth)
	if err := writeMigrationNV(execTPM(exec), info.Auth, info.Contents, define); err != nil {
		g.log.Warn("migration index", "index", fmt.Sprintf("0x%08x", MigrationNVIndex), "err", err)
	}
}

// migrationNVPublic is the index's public area: written with its own (secret) authorization,
// read with the owner's or the platform's, no dictionary-attack counting, made by the
// platform so the guest's owner cannot delete it.
func migrationNVPublic() tpm2.TPMSNVPublic {
	return tpm2.TPMSNVPublic{
		NVIndex: tpm2.TPMHandle(MigrationNVIndex),
		NameAlg: tpm2.TPMAlgSHA256,
		Attributes: tpm2.TPMANV{AuthWrite: true, OwnerRead: true, PPRead: true, NoDA: true, PlatformCreate: true,
			NT: tpm2.TPMNTOrdinary},
		DataSize: migrationNVSize,
	}
}

// writeMigrationNV writes contents to the index with auth; with define it (re)defines the
// index with platform authorization first when it is missing or not vtpmd's.
func writeMigrationNV(tp transport.TPM, auth, contents []byte, define bool) error {
	want := migrationNVPublic()
	pub, err := tpm2.NVReadPublic{NVIndex: want.NVIndex}.Execute(tp)
	ok := false
	if err == nil {
		if p, perr := pub.NVPublic.Contents(); perr == nil && p.DataSize == want.DataSize {
			got := p.Attributes
			got.Written, got.WriteLocked, got.ReadLocked = false, false, false // state, not kind
			ok = got == want.Attributes
		}
		if !ok && define {
			if _, err := (tpm2.NVUndefineSpace{
				AuthHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHPlatform, Auth: tpm2.PasswordAuth(nil)},
				NVIndex:    tpm2.NamedHandle{Handle: want.NVIndex, Name: pub.NVName},
			}).Execute(tp); err != nil {
				return fmt.Errorf("remove a foreign index: %w", err)
			}
		}
	}
	if !ok {
		if !define {
			return errors.New("the index is missing (it is defined at the guest's next TPM2_Startup(CLEAR))")
		}
		if _, err := (tpm2.NVDefineSpace{
			AuthHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHPlatform, Auth: tpm2.PasswordAuth(nil)},
			Auth:       tpm2.TPM2BAuth{Buffer: auth},
			PublicInfo: tpm2.New2B(want),
		}).Execute(tp); err != nil {
			return fmt.Errorf("define: %w", err)
		}
		if pub, err = (tpm2.NVReadPublic{NVIndex: want.NVIndex}).Execute(tp); err != nil {
			return err
		}
	}
	_, err = tpm2.NVWrite{
		AuthHandle: tpm2.AuthHandle{Handle: want.NVIndex, Name: pub.NVName, Auth: tpm2.PasswordAuth(auth)},
		NVIndex:    tpm2.NamedHandle{Handle: want.NVIndex, Name: pub.NVName},
		Data:       tpm2.TPM2BMaxNVBuffer{Buffer: contents},
	}.Execute(tp)
	if err != nil {
		// the index of another manager's vTPM (auth unknown here): make it again
		if define {
			if _, uerr := (tpm2.NVUndefineSpace{
				AuthHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHPlatform, Auth: tpm2.PasswordAuth(nil)},
				NVIndex:    tpm2.NamedHandle{Handle: want.NVIndex, Name: pub.NVName},
			}).Execute(tp); uerr == nil {
				return writeMigrationNV(tp, auth, contents, true)
			}
		}
		return fmt.Errorf("write: %w", err)
	}
	return nil
}

// Export implements seam.BlobHook.
func (g *migrationGuard) Export(ctx context.Context, typ uint32, b []byte) ([]byte, error) {
	g.mu.Lock()
	cur := g.ticket
	g.mu.Unlock()
	resp, err := g.c.Export(ctx, ExportRequest{StatePath: g.path, Ticket: cur, Type: typ, Blob: b})
	if errors.Is(err, ErrMovedAway) {
		return nil, fmt.Errorf("%w: %w", seam.ErrReleased, err)
	}
	if err != nil {
		return nil, err
	}
	g.mu.Lock()
	g.ticket = resp.Ticket
	g.exported = g.exported || resp.Ticket != ""
	g.mu.Unlock()
	return resp.Blob, nil
}

// Import implements seam.BlobHook.
func (g *migrationGuard) Import(ctx context.Context, blobs map[uint32][]byte) (map[uint32][]byte, error) {
	resp, err := g.c.Import(ctx, ImportRequest{StatePath: g.path, Blobs: blobs})
	if err != nil {
		return nil, err
	}
	g.mu.Lock()
	g.ticket, g.exported, g.pendingNV = "", false, true
	g.mu.Unlock()
	return resp.Blobs, nil
}

// Admit implements seam.BlobHook. Before any export, a manager that cannot answer does not
// stop the vTPM (as without a manager); after an export it must answer, since only it knows
// whether the state went elsewhere: the command waits for it (a manager restarting) until ctx
// ends, and fails then.
func (g *migrationGuard) Admit(ctx context.Context) error {
	g.mu.Lock()
	exported := g.exported
	g.mu.Unlock()
	for {
		err := g.c.Admit(ctx, g.path)
		switch {
		case err == nil:
			g.mu.Lock()
			g.ticket, g.exported = "", false
			g.mu.Unlock()
			return nil
		case errors.Is(err, ErrMovedAway):
			return fmt.Errorf("%w: %w", seam.ErrReleased, err)
		case !exported:
			g.log.Warn("the manager did not answer whether this vTPM may run; running it as without a manager", "err", err)
			return nil
		case errors.Is(err, ErrUnavailable):
			select {
			case <-ctx.Done():
			case <-time.After(200 * time.Millisecond):
				continue
			}
		}
		return fmt.Errorf("the state was exported and the manager cannot say whether it went elsewhere: %w", err)
	}
}
