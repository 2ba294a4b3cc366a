package backend

import (
	"errors"

	"github.com/vtpmd/vtpmd/backend/blob"
	"github.com/vtpmd/vtpmd/emulator"
	"github.com/vtpmd/vtpmd/internal/tpmwire"
)

// ResultOf is the table of swtpm's control-channel result codes for the conditions an
// Instance reports; the socket's dispatcher applies it (socket.Options.ResultOf), so Instance
// methods return plain, wrapped errors. A libtpms result in the chain wins: it is what swtpm
// passes on.
func ResultOf(err error) tpmwire.Result {
	var r tpmwire.Result
	if errors.As(err, &r) {
		return r
	}
	for _, c := range resultTable {
		if errors.Is(err, c.cond) {
			return c.res
		}
	}
	return tpmwire.ResFail
}

var resultTable = []struct {
	cond error
	res  tpmwire.Result
}{
	{emulator.ErrNotRunning, tpmwire.ResBadOrdinal},
	{emulator.ErrRunning, tpmwire.ResBadOrdinal},
	{ErrLock, tpmwire.ResIOError},
	{blob.ErrKeyNotFound, tpmwire.ResKeyNotFound},
	{blob.ErrDecrypt, tpmwire.ResDecryptError},
	{blob.ErrKeyLength, tpmwire.ResBadKeyProperty},
	{blob.ErrHeaderSize, tpmwire.ResBadDataSize},
	{blob.ErrVersion, tpmwire.ResBadVersion},
	{blob.ErrMalformed, tpmwire.ResBadParameter},
}
