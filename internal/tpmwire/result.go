package tpmwire

import "fmt"

// Result is a result code in the TPM 1.2 error space: what libtpms' TPMLIB_* functions return
// and what swtpm's control channel answers (ptm_res). It is an error, so a failure can carry
// its code up to the one place that answers with it.
type Result uint32

// Result codes used by libtpms and the control channel.
const (
	ResSuccess         Result = 0x00  // TPM_SUCCESS
	ResBadParameter    Result = 0x03  // TPM_BAD_PARAMETER
	ResFail            Result = 0x09  // TPM_FAIL
	ResBadOrdinal      Result = 0x0a  // TPM_BAD_ORDINAL: unknown command or wrong TPM state
	ResKeyNotFound     Result = 0x0d  // TPM_KEYNOTFOUND
	ResSize            Result = 0x17  // TPM_SIZE
	ResIOError         Result = 0x1f  // TPM_IOERROR
	ResDecryptError    Result = 0x21  // TPM_DECRYPT_ERROR
	ResInvalidPostInit Result = 0x26  // TPM_INVALID_POSTINIT
	ResBadKeyProperty  Result = 0x28  // TPM_BAD_KEY_PROPERTY
	ResBadDataSize     Result = 0x2b  // TPM_BAD_DATASIZE
	ResBadVersion      Result = 0x2e  // TPM_BAD_VERSION
	ResBadType         Result = 0x34  // TPM_BAD_TYPE
	ResBadLocality     Result = 0x3d  // TPM_BAD_LOCALITY
	ResRetry           Result = 0x800 // TPM_RETRY: "no such blob" for GET_STATEBLOB
)

func (r Result) Error() string { return fmt.Sprintf("tpm result 0x%x", uint32(r)) }
