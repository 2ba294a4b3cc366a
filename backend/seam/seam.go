package seam

import (
	"context"
	"fmt"

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
