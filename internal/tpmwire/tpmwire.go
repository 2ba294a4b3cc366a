package tpmwire

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// HeaderSize is the size of a TPM command or response header: tag, size, code.
const HeaderSize = 10

// Tags of TPM 2 and TPM 1.2 commands and responses.
const (
	TagNoSessions uint16 = 0x8001 // TPM_ST_NO_SESSIONS
	TagSessions   uint16 = 0x8002 // TPM_ST_SESSIONS
	TagRquCommand uint16 = 0x00c1 // TPM 1.2 TPM_TAG_RQU_COMMAND
	TagRspCommand uint16 = 0x00c4 // TPM 1.2 TPM_TAG_RSP_COMMAND
)

// TPM 2 command codes and TPM 1.2 ordinals vtpmd looks at or issues.
const (
	CCStartup   uint32 = 0x0144 // TPM2_CC_Startup
	CCShutdown  uint32 = 0x0145 // TPM2_CC_Shutdown
	CCGetRandom uint32 = 0x017b // TPM2_CC_GetRandom
	// CCSetLocality is swtpm's vendor command TPM2_CC_SET_LOCALITY (data-channel locality).
	CCSetLocality uint32 = 0x20001000

	OrdStartup12 uint32 = 0x0099 // TPM_ORD_Startup
)

// TPM 2 startup and shutdown types (TPM_SU).
const (
	SUClear uint16 = 0 // TPM_SU_CLEAR
	SUState uint16 = 1 // TPM_SU_STATE
)

// TPM 1.2 startup types (TPM_STARTUP_TYPE).
const (
	STClear       uint16 = 1 // TPM_ST_CLEAR
	STState       uint16 = 2 // TPM_ST_STATE
	STDeactivated uint16 = 3 // TPM_ST_DEACTIVATED
)

// TPM 2 response codes vtpmd produces or branches on.
const (
	RCSuccess    uint32 = 0x000
	RCInitialize uint32 = 0x100 // TPM_RC_INITIALIZE: TPM2_Startup not done yet
	RCFailure    uint32 = 0x101 // TPM_RC_FAILURE: failure mode, or not powered on
	RCLocality   uint32 = 0x907 // TPM_RC_LOCALITY (RC_WARN + 7): the command's locality is not allowed
	// RCSetLocalityRefused is what swtpm answers a refused TPM2_CC_SET_LOCALITY: its own
	// TPM_RC_LOCALITY value, without the warning bit.
	RCSetLocalityRefused uint32 = 0x107
	RCCommandSize        uint32 = 0x142 // TPM_RC_COMMAND_SIZE
	RCYielded            uint32 = 0x908 // TPM_RC_YIELDED
	RCRetry              uint32 = 0x922 // TPM_RC_RETRY
)

// ErrShort is returned for a buffer shorter than a header or than the size it declares.
var ErrShort = errors.New("tpmwire: truncated TPM message")

// Header is the 10-byte header of a TPM command (Code is the command code or ordinal) or
// response (Code is the response code).
type Header struct {
	Tag  uint16
	Size uint32
	Code uint32
}

// ParseHeader reads the header at the start of b. It does not check Size against len(b).
func ParseHeader(b []byte) (Header, error) {
	if len(b) < HeaderSize {
		return Header{}, fmt.Errorf("%w: %d bytes", ErrShort, len(b))
	}
	return Header{
		Tag:  binary.BigEndian.Uint16(b),
		Size: binary.BigEndian.Uint32(b[2:]),
		Code: binary.BigEndian.Uint32(b[6:]),
	}, nil
}

// Append appends the header to b.
func (h Header) Append(b []byte) []byte {
	b = binary.BigEndian.AppendUint16(b, h.Tag)
	b = binary.BigEndian.AppendUint32(b, h.Size)
	return binary.BigEndian.AppendUint32(b, h.Code)
}

// Command builds a command: the header with its size filled in, then the parameters.
func Command(tag uint16, code uint32, params ...[]byte) []byte {
	n := HeaderSize
	for _, p := range params {
		n += len(p)
	}
	b := Header{Tag: tag, Size: uint32(n), Code: code}.Append(make([]byte, 0, n))
	for _, p := range params {
		b = append(b, p...)
	}
	return b
}

// U16 and U32 encode a parameter big-endian, as the TPM does.
func U16(v uint16) []byte { return binary.BigEndian.AppendUint16(nil, v) }

// U32 encodes a 32-bit parameter.
func U32(v uint32) []byte { return binary.BigEndian.AppendUint32(nil, v) }

// ResponseCode returns the response code of a response.
func ResponseCode(resp []byte) (uint32, error) {
	h, err := ParseHeader(resp)
	if err != nil {
		return 0, err
	}
	return h.Code, nil
}

// ErrorResponse is a 10-byte response carrying rc, tagged for the TPM family.
func ErrorResponse(tpm2 bool, rc uint32) []byte {
	tag := TagNoSessions
	if !tpm2 {
		tag = TagRspCommand
	}
	return Header{Tag: tag, Size: HeaderSize, Code: rc}.Append(make([]byte, 0, HeaderSize))
}

// Startup2 is TPM2_Startup(su).
func Startup2(su uint16) []byte { return Command(TagNoSessions, CCStartup, U16(su)) }

// Shutdown2 is TPM2_Shutdown(su).
func Shutdown2(su uint16) []byte { return Command(TagNoSessions, CCShutdown, U16(su)) }

// Startup12 is TPM_Startup(st) of TPM 1.2.
func Startup12(st uint16) []byte { return Command(TagRquCommand, OrdStartup12, U16(st)) }

// GetRandom2 is TPM2_GetRandom(n).
func GetRandom2(n uint16) []byte { return Command(TagNoSessions, CCGetRandom, U16(n)) }
