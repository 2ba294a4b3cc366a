package seam

import (
	"context"
	"errors"
	"fmt"
	"slices"

	"github.com/vtpmd/vtpmd/backend/blob"
)

// Keys are an instance's keys: State encrypts its state files (swtpm's --key), Migration wraps
// its state blobs (--migration-key). Either may be nil. A key source that guards against
// rollback also says which state version the instance must find at least (MinVersion), and
// wants to hear of every version made durable (RecordVersion, called after the write; nil: no
// one listens).
type Keys struct {
	State, Migration *blob.Key
	MinVersion       uint64
	RecordVersion    func(version uint64)
	// Flush waits (bounded by ctx) until the versions recorded so far have reached whoever
	// listens; called once the instance stops writing. nil: nothing to wait for.
	Flush func(ctx context.Context)
	// Owner names who released the state key (for error messages), e.g. "the manager".
	Owner string
}

// Zero overwrites the keys' bytes; call it when the instance is done with them.
func (k Keys) Zero() {
	k.State.Zero()
	k.Migration.Zero()
}

// KeySource is the seam where an instance's keys come from: swtpm's key options today
// (KeyOptions), the host manager next (a key unsealed by the hardware TPM and released to the
// one process serving that VM).
type KeySource interface {
	Keys(ctx context.Context) (Keys, error)
}

// KeyOptions loads keys from swtpm's --key and --migration-key option strings (empty: none):
// files, inherited fds, or passphrases, read when Keys is called (after --runas).
type KeyOptions struct {
	State, Migration string
}

// Keys implements KeySource.
func (o KeyOptions) Keys(context.Context) (Keys, error) {
	var k Keys
	var err error
	if o.State != "" {
		if k.State, err = blob.LoadKeyOption(o.State); err != nil {
			return Keys{}, fmt.Errorf("--key: %w", err)
		}
	}
	if o.Migration != "" {
		if k.Migration, err = blob.LoadKeyOption(o.Migration); err != nil {
			k.Zero()
			return Keys{}, fmt.Errorf("--migration-key: %w", err)
		}
	}
	return k, nil
}

// Exec runs one command in the TPM on behalf of a guard, between the guest's commands.
type Exec func(cmd []byte) ([]byte, error)

// Guard is the seam for host PCR projection and the guest's attestation indices. It sees
// every data-channel command before the TPM runs it and every successful answer before the
// guest gets it, and runs right after every successful TPM2_Startup(CLEAR), before the guest
// gets that answer. The manager's projection and attestation parts implement it; without one
// (nil) the guest owns every PCR.
type Guard interface {
	// Check returns the response for a command the TPM must not run (for example
	// TPM_RC_LOCALITY for an extend or reset of a projected PCR), or nil to let it run.
	Check(cmd []byte) []byte
	// Started runs after a successful TPM2_Startup(CLEAR); exec runs commands in the TPM
	// (extends of projected PCRs). An error fails the guest's startup.
	Started(exec Exec) error
	// Done runs after the TPM answered cmd with success (rsp), before the guest gets rsp;
	// exec runs the guard's own commands (for example writing a report into an NV index
	// the guest reads next). It must not fail the guest's command.
	Done(cmd, rsp []byte, exec Exec)
}

// Guards combines guards: Check asks each in order and the first refusal wins; Started and
// Done run each in order (Started stops at the first error). Nil guards are skipped; no
// guards at all is nil.
func Guards(gs ...Guard) Guard {
	var list guardList
	for _, g := range gs {
		if g != nil {
			list = append(list, g)
		}
	}
	switch len(list) {
	case 0:
		return nil
	case 1:
		return list[0]
	}
	return list
}

type guardList []Guard

func (l guardList) Check(cmd []byte) []byte {
	for _, g := range l {
		if r := g.Check(cmd); r != nil {
			return r
		}
	}
	return nil
}

func (l guardList) Started(exec Exec) error {
	for _, g := range l {
		if err := g.Started(exec); err != nil {
			return err
		}
	}
	return nil
}

func (l guardList) Done(cmd, rsp []byte, exec Exec) {
	for _, g := range l {
		g.Done(cmd, rsp, exec)
	}
}

// CommandFilter is a Guard that needs to see only some commands. A vTPM may run any other
// command without the guard (its native data thread does) — except the first data command after
// the vTPM started and after every control-channel request, which always goes through it, so a
// Done that waits for "the next command" after an import or a restart still sees one.
type CommandFilter interface {
	// Commands are the command codes Check and Done must see; Started needs TPM2_Startup.
	Commands() []uint32
}

// CommandsOf is the command codes a guard must see (sorted, without repeats), and false when
// it must see every command: a guard that is not a CommandFilter, or combines one that is not.
func CommandsOf(g Guard) ([]uint32, bool) {
	var all []uint32
	switch g := g.(type) {
	case nil:
		return nil, true
	case guardList:
		for _, p := range g {
			cs, ok := CommandsOf(p)
			if !ok {
				return nil, false
			}
			all = append(all, cs...)
		}
	case CommandFilter:
		all = append(all, g.Commands()...)
	default:
		return nil, false
	}
	slices.Sort(all)
	return slices.Compact(all), true
}

// BlobHook is the seam for secure migration under a manager. It sees every state blob that
// leaves the instance (GET_STATEBLOB: QEMU's migration stream, virsh save) and every one that
// arrives (SET_STATEBLOB, handed over at the next INIT), and it decides whether the instance
// may go on after it exported its state. Blob types are swtpm's (1 permanent, 2 volatile, 3
// savestate); blobs are swtpm's migration blobs on the instance's side of the hook.
type BlobHook interface {
	// Export returns what leaves in place of b (typ's migration blob), opaque to QEMU. An
	// error fails GET_STATEBLOB (QEMU's migration fails; the instance goes on).
	Export(ctx context.Context, typ uint32, b []byte) ([]byte, error)
	// Import turns the blobs SET_STATEBLOB received since the last INIT (by type) back into
	// migration blobs, at that INIT, before anything is loaded. An error refuses them all and
	// fails the INIT; nothing was written.
	Import(ctx context.Context, blobs map[uint32][]byte) (map[uint32][]byte, error)
	// Admit is asked before the instance's first command (INIT or TPM command) after it
	// started and after every export: nil lets it run (an export that was not released is
	// cancelled, never releasable afterwards); an error refuses the command, for good when it
	// wraps ErrReleased.
	Admit(ctx context.Context) error
}

// ErrReleased says that this instance's state was handed to another instance (the key of its
// exported state was released): it must not execute another command.
var ErrReleased = errors.New("the vTPM's state was released to another instance (migrated away)")

// SealedMagic begins a blob sealed by a BlobHook (vtpmd's migration envelope): not swtpm's
// header (version 'V', min_version 'T' > 2), so swtpm and a vTPM without a manager refuse it.
const SealedMagic = "VTPMDMIG"

// IsSealed reports whether b is a sealed migration blob (a BlobHook's Export).
func IsSealed(b []byte) bool {
	return len(b) >= len(SealedMagic) && string(b[:len(SealedMagic)]) == SealedMagic
}

// BlobHookOf is the BlobHook among a guard's parts (a guard that is also a hook, alone or
// combined by Guards), or nil.
func BlobHookOf(g Guard) BlobHook {
	switch g := g.(type) {
	case BlobHook:
		return g
	case guardList:
		for _, p := range g {
			if h := BlobHookOf(p); h != nil {
				return h
			}
		}
	}
	return nil
}
