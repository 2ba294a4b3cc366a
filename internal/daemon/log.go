package daemon

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"

	"github.com/vtpmd/vtpmd/internal/opts"
)

// LogOptions are --log's sub-options.
var LogOptions = []string{"file", "fd", "level", "prefix", "truncate"}

// OpenLog builds the logger from --log's sub-options (file=|fd=, level, prefix, truncate;
// file=- discards). Without --log (nil), warnings and errors go to stderr. The returned
// function closes a log file.
func OpenLog(s *opts.Set) (*slog.Logger, func(), error) {
	nop := func() {}
	if s == nil {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})), nop, nil
	}
	level, err := s.Int("level", 1)
	if err != nil {
		return nil, nop, fmt.Errorf("--log: %w", err)
	}
	var w io.Writer
	closer := nop
	switch {
	case s.String("file", "") == "-":
		return slog.New(slog.DiscardHandler), nop, nil
	case s.Has("file"):
		flags := os.O_WRONLY | os.O_CREATE | os.O_APPEND
		if s.Bool("truncate", false) {
			flags = os.O_WRONLY | os.O_CREATE | os.O_TRUNC
		}
		f, err := os.OpenFile(s.String("file", ""), flags, 0o600) // swtpm: S_IRUSR|S_IWUSR
		if err != nil {
			return nil, nop, fmt.Errorf("could not open logfile: %w", err)
		}
		w, closer = f, func() { f.Close() }
	case s.Has("fd"):
		fd, err := s.Int("fd", -1)
		if err != nil || fd < 0 {
			return nil, nop, fmt.Errorf("--log: invalid fd")
		}
		w = os.NewFile(uintptr(fd), "log")
	default:
		return nil, nop, errors.New("--log: file= or fd= is required")
	}
	lv := slog.LevelInfo
	if level >= 2 {
		lv = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: lv}))
	if p := s.String("prefix", ""); p != "" {
		log = log.With("prefix", p)
	}
	return log, closer, nil
}
