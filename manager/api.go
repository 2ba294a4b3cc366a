package manager

import (
	"errors"
	"time"
)

// DefaultSocket and DefaultDir are where a host's manager listens and keeps its records.
const (
	DefaultSocket = "/run/vtpmd/manager.sock"
	DefaultDir    = "/var/lib/vtpmd/manager"
)

// API paths.
const (
	pathKey      = "/v1/key"
	pathVersion  = "/v1/version"
	pathStatus   = "/v1/status"
	pathEnroll   = "/v1/enroll"
	pathUnenroll = "/v1/unenroll"
	pathAccept   = "/v1/accept"
)

// Sentinel errors the client and the instance branch on; the server answers them with HTTP
// status codes and the client maps them back.
var (
	// ErrNotEnrolled: the vTPM has no sealed key; it runs with its own options.
	ErrNotEnrolled = errors.New("manager: vTPM not enrolled")
	// ErrRollback: the state is older than the manager's record of it.
	ErrRollback = errors.New("manager: state older than the manager's record (rollback)")
	// ErrForbidden: the peer may not make this request.
	ErrForbidden = errors.New("manager: request refused for this peer")
	// ErrUnavailable: no manager answers on the socket.
	ErrUnavailable = errors.New("manager: not reachable")
	// ErrIncomplete: an enrolment or unenrolment was interrupted; run it again.
	ErrIncomplete = errors.New("manager: enrolment incomplete")
	// ErrLedgerRollback: the ledger on disk is older than the hardware counter says.
	ErrLedgerRollback = errors.New("manager: ledger rolled back (hardware counter mismatch)")
)

// KeyRequest asks for the state key of the vTPM whose state lives at StatePath. The peer must
// be the process serving it.
type KeyRequest struct {
	StatePath string `json:"state_path"`
	TPM2      bool   `json:"tpm2"`
	// Version is the highest state version the instance found on disk (0: none, or new).
	Version uint64 `json:"version"`
	// Fresh says the state directory holds no state yet: a new vTPM that the manager enrols
	// when auto-enrolment is on.
	Fresh bool `json:"fresh"`
}

// KeyResponse carries the key in the clear over the unix socket (never on disk).
type KeyResponse struct {
	VM  string `json:"vm"`
	Key []byte `json:"key"`
	// Version is the manager's record; the instance continues from max(it, its own).
	Version uint64 `json:"version"`
}

// VersionReport records the state version an instance has made durable.
type VersionReport struct {
	StatePath string `json:"state_path"`
	Version   uint64 `json:"version"`
}

// VMRequest names a vTPM for the operator's requests: a registry UUID or name, or its state
// directory.
type VMRequest struct {
	VM string `json:"vm"`
	// Source is the key option (swtpm's --key syntax) the state is encrypted with now
	// (enrol) or is to be encrypted with afterwards (unenrol); empty: plain.
	Source string `json:"source,omitempty"`
}

// VMStatus is the manager's view of one vTPM.
type VMStatus struct {
	ID        string    `json:"id"`
	Name      string    `json:"name,omitempty"`
	UUID      string    `json:"uuid,omitempty"`
	StatePath string    `json:"state_path"`
	Sealed    bool      `json:"sealed"`
	Phase     string    `json:"phase"`
	Policy    string    `json:"policy"`
	Version   uint64    `json:"version"`
	LastSeen  time.Time `json:"last_seen,omitzero"`
	Recovery  bool      `json:"recovery"`
}

// Status is the manager's answer to a status request.
type Status struct {
	TPM     string     `json:"tpm"`
	Counter uint64     `json:"counter"`
	VMs     []VMStatus `json:"vms"`
}

// apiError is the body of every error answer.
type apiError struct {
	Error string `json:"error"`
	Kind  string `json:"kind,omitempty"`
}
