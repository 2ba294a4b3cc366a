package seccomp

import (
	"errors"
	"fmt"
)

// Action is what the filter does when a denied system call is made (--seccomp action=).
type Action int

// Actions, as in swtpm's --seccomp action=kill|log|none.
const (
	// Kill ends the whole process (SECCOMP_RET_KILL_PROCESS); swtpm's default.
	Kill Action = iota
	// Log lets the call proceed and has the kernel log it (SECCOMP_RET_LOG).
	Log
	// None installs no filter.
	None
)

func (a Action) String() string {
	switch a {
	case Kill:
		return "kill"
	case Log:
		return "log"
	case None:
		return "none"
	}
	return fmt.Sprintf("Action(%d)", int(a))
}

// ErrAction is wrapped when an action= value is none of kill, log and none.
var ErrAction = errors.New("unsupported seccomp action")

// ErrUnsupported is returned by Install when this platform has no filter to install.
var ErrUnsupported = errors.New("seccomp filtering is not supported on this platform")

// ParseAction reads --seccomp's action= value ("" is the default, kill).
func ParseAction(s string) (Action, error) {
	switch s {
	case "", "kill":
		return Kill, nil
	case "log":
		return Log, nil
	case "none":
		return None, nil
	}
	return 0, fmt.Errorf("%w '%s'", ErrAction, s)
}
