package setup

import "fmt"

// ExitError is how Run fails. Run has already reported the failure the way swtpm_setup does
// (in its log, or on Stderr before the log is open), so a command only exits with Code.
type ExitError struct {
	Code int
	// Err is what was reported; it wraps the cause (ErrStateExists, a store or libtpms error).
	Err error
}

func (e *ExitError) Error() string {
	if e.Err == nil {
		return fmt.Sprintf("setup: exit status %d", e.Code)
	}
	return e.Err.Error()
}

func (e *ExitError) Unwrap() error { return e.Err }

// failed is Run's exit status 1 for a reported failure.
func failed(err error) *ExitError { return &ExitError{Code: 1, Err: err} }

// messagef is fmt.Errorf for swtpm_setup's own messages, which are capitalized and
// punctuated as the C tool prints them (Go's error style would have neither).
func messagef(format string, a ...any) error { return fmt.Errorf(format, a...) }

// toolError is a failure reported with swtpm_setup's message, verbatim, over its cause,
// where the message has no room for the cause's text.
type toolError struct {
	msg   string
	cause error
}

func (e *toolError) Error() string { return e.msg }
func (e *toolError) Unwrap() error { return e.cause }
