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

// Guard is the seam for host PCR projection. It sees every data-channel command before the
// TPM runs it, and runs right after every successful TPM2_Startup(CLEAR), before the guest
// gets that answer. The manager's projection providers implement it; without one (nil) the
// guest owns every PCR.
type Guard interface {
	// Check returns the response for a command the TPM must not run (for example
	// TPM_RC_LOCALITY for an extend or reset of a projected PCR), or nil to let it run.
	Check(cmd []byte) []byte
	// Started runs after a successful TPM2_Startup(CLEAR); exec runs commands in the TPM
	// (extends of projected PCRs). An error fails the guest's startup.
	Started(exec func(cmd []byte) ([]byte, error)) error
}
