package ioctl

import (
	"errors"
	"fmt"
)

// Sentinel errors: every error this package returns has one of them in its chain.
var (
	// ErrInvalidArgs is a command line swtpm_ioctl rejects.
	ErrInvalidArgs = errors.New("ioctl: invalid arguments")
	// ErrDeviceUnsupported is a CUSE device (--tpm-device or a device path): vtpmd serves
	// sockets only.
	ErrDeviceUnsupported = errors.New("ioctl: CUSE devices are not supported")
	// ErrConnect is a control socket that could not be connected to.
	ErrConnect = errors.New("ioctl: cannot connect to the control channel")
	// ErrCommandFailed is a control command that failed: the TPM's tpmwire.Result, or the
	// exchange itself, is in the chain too.
	ErrCommandFailed = errors.New("ioctl: control command failed")
	// ErrStateFile is a --save or --load file that could not be written or read.
	ErrStateFile = errors.New("ioctl: state blob file")
)

// toolError is an error whose text is swtpm_ioctl's message, printed verbatim; it wraps a
// sentinel and, when there is one, the cause.
type toolError struct {
	text  string
	kind  error
	cause error
}

func (e *toolError) Error() string { return e.text }

func (e *toolError) Unwrap() []error {
	if e.cause == nil {
		return []error{e.kind}
	}
	return []error{e.kind, e.cause}
}

// failf builds a toolError with swtpm_ioctl's message.
func failf(kind, cause error, format string, args ...any) error {
	return &toolError{text: fmt.Sprintf(format, args...), kind: kind, cause: cause}
}

// Messages without arguments.
const (
	msgNoValidCommand = "No valid command."
	msgMissingDevice  = "Error: Missing device name."
	msgCUSE           = "CUSE devices are not supported by vtpmd; use --unix or --tcp"
	msgLocalityRange  = "Locality outside valid range of [0..4]."
)
