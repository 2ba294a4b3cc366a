package backend

import (
	"errors"
	"fmt"
	"testing"

	"github.com/vtpmd/vtpmd/backend/blob"
	"github.com/vtpmd/vtpmd/emulator"
	"github.com/vtpmd/vtpmd/internal/tpmwire"
)

func TestResultOf(t *testing.T) {
	tests := []struct {
		name string
		err  error
		want tpmwire.Result
	}{
		{"libtpms result wins", fmt.Errorf("init: %w (%w)", tpmwire.ResDecryptError, blob.ErrMalformed), tpmwire.ResDecryptError},
		{"not running", fmt.Errorf("x: %w", emulator.ErrNotRunning), tpmwire.ResBadOrdinal},
		{"running", emulator.ErrRunning, tpmwire.ResBadOrdinal},
		{"lock", fmt.Errorf("%w: %w", ErrLock, errors.New("EAGAIN")), tpmwire.ResIOError},
		{"wrong key", fmt.Errorf("load permall: %w", blob.ErrDecrypt), tpmwire.ResDecryptError},
		{"no key", blob.ErrKeyNotFound, tpmwire.ResKeyNotFound},
		{"key length", blob.ErrKeyLength, tpmwire.ResBadKeyProperty},
		{"header size", blob.ErrHeaderSize, tpmwire.ResBadDataSize},
		{"version", blob.ErrVersion, tpmwire.ResBadVersion},
		{"malformed", blob.ErrMalformed, tpmwire.ResBadParameter},
		{"anything else", errors.New("disk full"), tpmwire.ResFail},
		{"unknown blob type", fmt.Errorf("%w 9", ErrBlobType), tpmwire.ResBadParameter},
		{"cancel on TPM 1.2", ErrCancelTPM12, tpmwire.ResFail},
		// a TPM 1.2 start: libtpms passes its state callback's result on
		{"TPM 1.2 start, wrong key", fmt.Errorf("%w: start tpm: %w (%w)", errNVResultPassedOn, tpmwire.ResFail, blob.ErrDecrypt), tpmwire.ResDecryptError},
		{"TPM 1.2 start, plain state with a key", fmt.Errorf("%w: start tpm: %w (%w)", errNVResultPassedOn, tpmwire.ResFail, blob.ErrNotEncrypted), tpmwire.ResFail},
		{"SET_STATEBLOB, plain blob with a key", fmt.Errorf("unwrap: %w", blob.ErrNotEncrypted), tpmwire.ResDecryptError},
		{"TPM 1.2 start, key length", fmt.Errorf("%w: start tpm: %w (%w)", errNVResultPassedOn, tpmwire.ResFail, blob.ErrKeyLength), tpmwire.ResBadKeyProperty},
		{"TPM 1.2 start, no key", fmt.Errorf("%w: start tpm: %w (%w)", errNVResultPassedOn, tpmwire.ResFail, blob.ErrKeyNotFound), tpmwire.ResFail},
		{"TPM 1.2 start, malformed", fmt.Errorf("%w: start tpm: %w (%w)", errNVResultPassedOn, tpmwire.ResFail, blob.ErrMalformed), tpmwire.ResFail},
		{"TPM 2 start, wrong key", fmt.Errorf("start tpm: %w (%w)", tpmwire.Result(0x101), blob.ErrDecrypt), 0x101},
	}
	for _, tt := range tests {
		if got := ResultOf(tt.err); got != tt.want {
			t.Errorf("%s: ResultOf = %#x, want %#x", tt.name, uint32(got), uint32(tt.want))
		}
	}
}
