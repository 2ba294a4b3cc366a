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

// Log is what --log opens: vtpmd's structured logger, and swtpm's traffic dump writer.
type Log struct {
	*slog.Logger
	// Traffic receives swtpm's dumps of every control and data message (socket.Options.Dump)
	// at the levels where swtpm writes them (2 and up); nil below.
	Traffic io.Writer
	// File and Level are the log's file and --log level, which swtpm also hands to libtpms
	// for its own debug output (nil File: none).
	File  *os.File
	Level int
	close func()
}

// Close closes a log file.
func (l *Log) Close() {
	if l != nil && l.close != nil {
		l.close()
	}
}

// trafficLevel is the --log level from which swtpm dumps its traffic (observed with swtpm
// 0.7.1: level 1 writes none, 2 and up every message).
const trafficLevel = 2

// OpenLog builds the log from --log's sub-options (file=|fd=, level, prefix, truncate;
// file=- discards). Without --log (nil), warnings and errors go to stderr.
func OpenLog(s *opts.Set) (*Log, error) {
	if s == nil {
		return &Log{Logger: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))}, nil
	}
	level, err := s.Int("level", 1)
	if err != nil {
		return nil, fmt.Errorf("--log: %w", err)
	}
	l := &Log{}
	var w io.Writer
	switch {
	case s.String("file", "") == "-":
		return &Log{Logger: slog.New(slog.DiscardHandler)}, nil
	case s.Has("file"):
		flags := os.O_WRONLY | os.O_CREATE | os.O_APPEND
		if s.Bool("truncate", false) {
			flags = os.O_WRONLY | os.O_CREATE | os.O_TRUNC
		}
		f, err := os.OpenFile(s.String("file", ""), flags, 0o600) // swtpm: S_IRUSR|S_IWUSR
		if err != nil {
			return nil, fmt.Errorf("could not open logfile: %w", err)
		}
		w, l.close, l.File = f, func() { f.Close() }, f
	case s.Has("fd"):
		fd, err := s.Int("fd", -1)
		if err != nil || fd < 0 {
			return nil, fmt.Errorf("--log: invalid fd")
		}
		l.File = os.NewFile(uintptr(fd), "log")
		w = l.File
	default:
		return nil, errors.New("--log: file= or fd= is required")
	}
	lv := slog.LevelInfo
	if level >= 2 {
		lv = slog.LevelDebug
	}
	l.Logger = slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: lv}))
	if p := s.String("prefix", ""); p != "" {
		l.Logger = l.With("prefix", p)
	}
	l.Level = level
	if level >= trafficLevel {
		l.Traffic = w
	}
	return l, nil
}
