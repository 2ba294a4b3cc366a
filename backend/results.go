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
// passes on, except where libtpms itself passes on what swtpm's state callback answered
// (errNVResultPassedOn: loadTable).
func ResultOf(err error) tpmwire.Result {
	if errors.Is(err, errNVResultPassedOn) {
		for _, c := range loadTable {
			if errors.Is(err, c.cond) {
				return c.res
			}
		}
	}
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

type resultRow struct {
	cond error
	res  tpmwire.Result
}

var resultTable = []resultRow{
	{emulator.ErrNotRunning, tpmwire.ResBadOrdinal},
	{emulator.ErrRunning, tpmwire.ResBadOrdinal},
	{ErrLock, tpmwire.ResIOError},
	{ErrBlobType, tpmwire.ResBadParameter},
	{ErrCancelTPM12, tpmwire.ResFail},
	{blob.ErrKeyNotFound, tpmwire.ResKeyNotFound},
	{blob.ErrLegacyHash, tpmwire.ResFail},
	{blob.ErrDecrypt, tpmwire.ResDecryptError},
	{blob.ErrKeyLength, tpmwire.ResBadKeyProperty},
	{blob.ErrHeaderSize, tpmwire.ResBadDataSize},
	{blob.ErrVersion, tpmwire.ResBadVersion},
	{blob.ErrMalformed, tpmwire.ResBadParameter},
}

// loadTable is what swtpm's state callback (SWTPM_NVRAM_LoadData) answers libtpms for a stored
// blob it cannot open, where that differs from TPM_FAIL: a wrong key or tampered encrypted
// data (HMAC mismatch) and a key of the other length. libtpms 1.2 passes it on as CMD_INIT's
// result; every other load failure is TPM_FAIL there (swtpm reads a blob whose header does not
// check as a headerless one, which libtpms then refuses). libtpms 2 answers TPM_RC_FAILURE
// for all of them.
var loadTable = []resultRow{
	{blob.ErrNotEncrypted, tpmwire.ResFail},
	{blob.ErrLegacyHash, tpmwire.ResFail},
	{blob.ErrDecrypt, tpmwire.ResDecryptError},
	{blob.ErrKeyLength, tpmwire.ResBadKeyProperty},
}
