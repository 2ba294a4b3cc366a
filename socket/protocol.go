package socket

import "fmt"

// Cmd is a control-channel command code (swtpm's CMD_* from tpm_ioctl.h).
type Cmd uint32

// Control-channel commands.
const (
	CmdGetCapability       Cmd = 0x01 // CMD_GET_CAPABILITY
	CmdInit                Cmd = 0x02 // CMD_INIT
	CmdShutdown            Cmd = 0x03 // CMD_SHUTDOWN
	CmdGetTPMEstablished   Cmd = 0x04 // CMD_GET_TPMESTABLISHED
	CmdSetLocality         Cmd = 0x05 // CMD_SET_LOCALITY
	CmdHashStart           Cmd = 0x06 // CMD_HASH_START
	CmdHashData            Cmd = 0x07 // CMD_HASH_DATA
	CmdHashEnd             Cmd = 0x08 // CMD_HASH_END
	CmdCancelTPMCmd        Cmd = 0x09 // CMD_CANCEL_TPM_CMD
	CmdStoreVolatile       Cmd = 0x0a // CMD_STORE_VOLATILE
	CmdResetTPMEstablished Cmd = 0x0b // CMD_RESET_TPMESTABLISHED
	CmdGetStateBlob        Cmd = 0x0c // CMD_GET_STATEBLOB
	CmdSetStateBlob        Cmd = 0x0d // CMD_SET_STATEBLOB
	CmdStop                Cmd = 0x0e // CMD_STOP
	CmdGetConfig           Cmd = 0x0f // CMD_GET_CONFIG
	CmdSetDataFD           Cmd = 0x10 // CMD_SET_DATAFD
	CmdSetBufferSize       Cmd = 0x11 // CMD_SET_BUFFERSIZE
	CmdGetInfo             Cmd = 0x12 // CMD_GET_INFO
	CmdLockStorage         Cmd = 0x13 // CMD_LOCK_STORAGE
)

var cmdNames = map[Cmd]string{
	CmdGetCapability: "GET_CAPABILITY", CmdInit: "INIT", CmdShutdown: "SHUTDOWN",
	CmdGetTPMEstablished: "GET_TPMESTABLISHED", CmdSetLocality: "SET_LOCALITY",
	CmdHashStart: "HASH_START", CmdHashData: "HASH_DATA", CmdHashEnd: "HASH_END",
	CmdCancelTPMCmd: "CANCEL_TPM_CMD", CmdStoreVolatile: "STORE_VOLATILE",
	CmdResetTPMEstablished: "RESET_TPMESTABLISHED", CmdGetStateBlob: "GET_STATEBLOB",
	CmdSetStateBlob: "SET_STATEBLOB", CmdStop: "STOP", CmdGetConfig: "GET_CONFIG",
	CmdSetDataFD: "SET_DATAFD", CmdSetBufferSize: "SET_BUFFERSIZE", CmdGetInfo: "GET_INFO",
	CmdLockStorage: "LOCK_STORAGE",
}

func (c Cmd) String() string {
	if n, ok := cmdNames[c]; ok {
		return n
	}
	return fmt.Sprintf("CMD_0x%02x", uint32(c))
}

// Capability bits reported by GET_CAPABILITY (PTM_CAP_*).
const (
	CapInit                uint32 = 1 << 0
	CapShutdown            uint32 = 1 << 1
	CapGetTPMEstablished   uint32 = 1 << 2
	CapSetLocality         uint32 = 1 << 3
	CapHashing             uint32 = 1 << 4
	CapCancelTPMCmd        uint32 = 1 << 5
	CapStoreVolatile       uint32 = 1 << 6
	CapResetTPMEstablished uint32 = 1 << 7
	CapGetStateBlob        uint32 = 1 << 8
	CapSetStateBlob        uint32 = 1 << 9
	CapStop                uint32 = 1 << 10
	CapGetConfig           uint32 = 1 << 11
	CapSetDataFD           uint32 = 1 << 12
	CapSetBufferSize       uint32 = 1 << 13
	CapGetInfo             uint32 = 1 << 14
	CapSendCommandHeader   uint32 = 1 << 15
	CapLockStorage         uint32 = 1 << 16
	CapsTPM2                      = 0x1ffff // what swtpm 0.8+ reports for TPM 2
	CapsTPM12                     = CapsTPM2 &^ CapSendCommandHeader
)

// Init flags and state-blob flags.
const (
	InitFlagDeleteVolatile uint32 = 1 // PTM_INIT_FLAG_DELETE_VOLATILE

	StateFlagDecrypted uint32 = 1 // PTM_STATE_FLAG_DECRYPTED (request: remove the state key)
	StateFlagEncrypted uint32 = 2 // PTM_STATE_FLAG_ENCRYPTED (blob still encrypted with the state key)

	ConfigFlagFileKey      uint32 = 1 // PTM_CONFIG_FLAG_FILE_KEY
	ConfigFlagMigrationKey uint32 = 2 // PTM_CONFIG_FLAG_MIGRATION_KEY
)

// Blob types for GET/SET_STATEBLOB.
const (
	BlobPermanent uint32 = 1 // PTM_BLOB_TYPE_PERMANENT
	BlobVolatile  uint32 = 2 // PTM_BLOB_TYPE_VOLATILE
	BlobSavestate uint32 = 3 // PTM_BLOB_TYPE_SAVESTATE
)

// MaxStateBlob caps SET_STATEBLOB (swtpm master's limit).
const MaxStateBlob = 512 << 10

// TPM is what the server drives: one vTPM instance. backend.Instance implements it. Methods
// return errors; the control channel answers with the tpmwire.Result in an error's chain, or
// TPM_FAIL.
type TPM interface {
	// Capabilities is the GET_CAPABILITY word.
	Capabilities() uint32
	// Running reports whether the TPM is initialized (CMD_INIT done).
	Running() bool
	// IsTPM2 reports the TPM family, for the tag of error responses.
	IsTPM2() bool

	Init(flags uint32) error
	Stop() error
	Shutdown() error
	Established() (bool, error)
	SetLocality(loc uint8) error
	ResetEstablished(loc uint8) error
	HashStart() error
	HashData(data []byte) error
	HashEnd() error
	Cancel() error
	StoreVolatile() error
	// GetStateBlob returns the migration blob of a type; stillEncrypted reports whether the
	// inner data is encrypted with the state key (PTM_STATE_FLAG_ENCRYPTED).
	GetStateBlob(typ uint32, decrypt bool) (blob []byte, stillEncrypted bool, err error)
	SetStateBlob(typ uint32, encrypted bool, blob []byte) error
	Config() uint32
	SetBufferSize(wanted uint32) (size, min, max uint32, err error)
	Info(flags uint64) (string, error)
	LockStorage(retries uint32) error

	// Process runs one TPM command from the data channel and returns the full response.
	// The TPM is running when it is called; the server answers stopped TPMs itself.
	Process(cmd []byte) ([]byte, error)
	// BufferSize is the largest command the data channel accepts.
	BufferSize() uint32
}
