package store

import (
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/vtpmd/vtpmd/internal/opts"
)

// TPMStateOptions are the sub-options of swtpm's --tpmstate.
var TPMStateOptions = []string{"dir", "backend-uri", "mode", "lock", "backup", "fsync"}

// ParseTPMState turns --tpmstate's sub-options into a backend URI and store Options, as swtpm
// reads them: backend-uri= wins over dir=, and TPM_PATH is the fallback; the lock is on by
// default for dir:// and off for file://. A nil set means --tpmstate was not given.
func ParseTPMState(s *opts.Set, tpm2 bool) (string, Options, error) {
	var uri string
	switch {
	case s.Has("backend-uri"):
		uri = s.String("backend-uri", "")
	case s.Has("dir"):
		uri = "dir://" + s.String("dir", "")
	case os.Getenv("TPM_PATH") != "":
		uri = "dir://" + os.Getenv("TPM_PATH")
	default:
		return "", Options{}, errors.New("missing TPM state location: use --tpmstate dir=<dir> or set TPM_PATH")
	}
	isDir := strings.HasPrefix(uri, "dir://")
	if !isDir && !strings.HasPrefix(uri, "file://") {
		return "", Options{}, fmt.Errorf("unsupported tpmstate backend URI '%s': use dir:// or file://", uri)
	}
	mode, err := s.Mode("mode", 0o640)
	if err != nil {
		return "", Options{}, err
	}
	if !isDir && (s.Has("backup") || s.Has("fsync")) {
		return "", Options{}, errors.New("tpmstate options backup and fsync apply to dir:// backends only")
	}
	// fsync is vtpmd's default; "fsync=false" turns it off (for measurements only).
	return uri, Options{TPM2: tpm2, Mode: mode, ModeSet: s.Has("mode"), Lock: s.Bool("lock", isDir),
		NoFsync: s.Has("fsync") && !s.Bool("fsync", true)}, nil
}
