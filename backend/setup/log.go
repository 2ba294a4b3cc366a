package setup

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
)

// plainHandler writes swtpm_setup's plain log lines (the message alone): errors to err, the
// rest to out.
type plainHandler struct {
	out, err io.Writer
}

func (h plainHandler) Enabled(context.Context, slog.Level) bool { return true }

func (h plainHandler) Handle(_ context.Context, r slog.Record) error {
	w := h.out
	if r.Level >= slog.LevelError {
		w = h.err
	}
	_, e := fmt.Fprintln(w, r.Message)
	return e
}

func (h plainHandler) WithAttrs([]slog.Attr) slog.Handler { return h }
func (h plainHandler) WithGroup(string) slog.Handler      { return h }

// openLog is swtpm_setup's log: appended to path or, without one, stdout with errors on
// stderr. A symbolic link is refused, as swtpm_setup does.
func openLog(path string, stdout, stderr io.Writer) (*slog.Logger, func(), error) {
	if path == "" {
		return slog.New(plainHandler{stdout, stderr}), func() {}, nil
	}
	if st, err := os.Lstat(path); err == nil && st.Mode()&os.ModeSymlink != 0 {
		return nil, nil, messagef("Logfile must not be a symlink.")
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		return nil, nil, &toolError{msg: fmt.Sprintf("Cannot write to logfile %s.", path), cause: err}
	}
	return slog.New(plainHandler{f, f}), func() { f.Close() }, nil
}
