package ioctl

import "github.com/vtpmd/vtpmd/socket"

// Command is the one thing a swtpm_ioctl invocation does.
type Command int

// Commands, with the option that selects each.
const (
	NoCommand        Command = iota
	ShowHelp                 // --help
	ShowVersion              // --version
	GetCapability            // -c
	Init                     // -i
	Stop                     // --stop
	Shutdown                 // -s
	GetEstablished           // -e
	ResetEstablished         // -r <loc>
	StoreVolatile            // -v
	Cancel                   // -C
	SetLocality              // -l <loc>
	Hash                     // -h <data>
	SaveStateBlob            // --save <type> <file>
	LoadStateBlob            // --load <type> <file>
	GetConfig                // -g
	SetBufferSize            // -b <buffersize>
	GetInfo                  // --info <flags>
)

// Endpoint is the control socket a request is sent to.
type Endpoint struct {
	Network string // "unix" or "tcp"
	Address string // the socket path, or host:port
}

// Program is the running tool as swtpm_ioctl's messages name it.
type Program struct {
	Name    string // argv[0]: in the usage text and in option errors
	Version string // the swtpm version --help and --version report
}

// Request is one swtpm_ioctl invocation: the command, its argument and where to send it. Only
// the argument field of Command is used.
type Request struct {
	Program  Program
	Endpoint Endpoint
	Command  Command

	Locality   uint8  // SetLocality, ResetEstablished: 0..4
	HashData   string // Hash: the data to hash; "-" reads it from stdin
	BufferSize uint32 // SetBufferSize: 0 only queries
	InfoFlags  uint64 // GetInfo: SWTPM_INFO_* flags
	BlobType   uint32 // SaveStateBlob, LoadStateBlob: socket.BlobPermanent, BlobVolatile or BlobSavestate
	File       string // SaveStateBlob, LoadStateBlob: the blob's file
}

// blobTypes are the --save and --load type names.
var blobTypes = map[string]uint32{
	"permanent": socket.BlobPermanent,
	"volatile":  socket.BlobVolatile,
	"savestate": socket.BlobSavestate,
}
