package emulator

import (
	"errors"
	"fmt"
)

// Version selects the TPM family libtpms emulates.
type Version int

const (
	// TPM12 is a TPM 1.2 (libtpms' default, and swtpm's without --tpm2).
	TPM12 Version = iota
	// TPM2 is a TPM 2.0.
	TPM2
)

func (v Version) String() string {
	if v == TPM2 {
		return "2.0"
	}
	return "1.2"
}

// StateType names one of libtpms' state blobs.
type StateType int

const (
	// StatePermanent is the permanent state ("permall"): NV, hierarchies, persistent objects.
	StatePermanent StateType = 1
	// StateVolatile is the volatile state ("volatilestate"): PCRs, sessions, loaded objects.
	StateVolatile StateType = 2
	// StateSave is the TPM 1.2 TPM_SaveState blob ("savestate"); always empty for TPM 2.
	StateSave StateType = 3
)

// Name is the blob name libtpms passes to the NVRAM callbacks and swtpm uses in file names.
func (t StateType) Name() string {
	switch t {
	case StatePermanent:
		return "permall"
	case StateVolatile:
		return "volatilestate"
	case StateSave:
		return "savestate"
	}
	return fmt.Sprintf("state-%d", int(t))
}

// StateTypeByName maps a blob name back to its type.
func StateTypeByName(name string) (StateType, bool) {
	for _, t := range []StateType{StatePermanent, StateVolatile, StateSave} {
		if t.Name() == name {
			return t, true
		}
	}
	return 0, false
}

// Sentinel errors callers branch on.
var (
	// ErrInUse is returned by Open while another Engine of this process is open.
	ErrInUse = errors.New("emulator: libtpms already in use in this process")
	// ErrNotRunning is returned by calls that need a started TPM.
	ErrNotRunning = errors.New("emulator: tpm not running")
	// ErrRunning is returned by calls that need a stopped TPM.
	ErrRunning = errors.New("emulator: tpm running")
	// ErrNotExist is what a Store returns from Load when it holds no such blob.
	ErrNotExist = errors.New("emulator: no such state blob")
	// ErrClosed is returned after Close.
	ErrClosed = errors.New("emulator: engine closed")
)

// Store keeps libtpms' state blobs. Store must make data durable before it returns.
type Store interface {
	// Load returns the blob, or an error wrapping ErrNotExist.
	Load(t StateType) ([]byte, error)
	// Store writes the blob durably.
	Store(t StateType, data []byte) error
	// Delete removes the blob; a missing blob is not an error unless mustExist.
	Delete(t StateType, mustExist bool) error
}
