package setup

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"

	"github.com/vtpmd/vtpmd/internal/daemon"
)

// Run is swtpm_setup with the command line opts: it prints help, version or capabilities,
// writes the per-user config files, or manufactures (or reconfigures) the TPM's state. It
// reports every failure itself, in the log or on opts.Stderr as swtpm_setup does, and then
// returns an *ExitError with the exit status.
func Run(ctx context.Context, opts Options) error {
	if opts.Stdout == nil {
		opts.Stdout = io.Discard
	}
	if opts.Stderr == nil {
		opts.Stderr = io.Discard
	}
	if printInfo(opts) {
		return nil
	}
	if opts.CreateConfigFiles {
		return reportEarly(opts, createConfigFiles(opts.ConfigFilesFlags, opts.Stdout))
	}
	if opts.RunAs != "" {
		if opts.SwitchUser == nil {
			opts.SwitchUser = daemon.RunAs
		}
		if err := opts.SwitchUser(opts.RunAs); err != nil {
			return reportEarly(opts, err)
		}
	}
	log, closeLog, err := openLog(opts.LogFile, opts.Stdout, opts.Stderr)
	if err != nil {
		return reportEarly(opts, err)
	}
	defer closeLog()
	s := &session{opts: opts, log: log}
	return s.run(ctx)
}

// printInfo handles --help, --version and --print-capabilities, and says whether it did.
func printInfo(opts Options) bool {
	switch {
	case opts.Help:
		fmt.Fprint(opts.Stdout, Usage(opts.Program, opts.Release))
	case opts.Version:
		fmt.Fprintf(opts.Stdout, "TPM emulator setup tool version %s (vtpmd %s)\n", CompatVersion, opts.Release)
	case opts.PrintCapabilities:
		fmt.Fprintln(opts.Stdout, capabilities())
	default:
		return false
	}
	return true
}

// reportEarly reports a failure from before the log is open: on Stderr, as swtpm_setup.
func reportEarly(opts Options, err error) error {
	if err == nil {
		return nil
	}
	fmt.Fprintln(opts.Stderr, err)
	return failed(err)
}

// session is one run of swtpm_setup once its log is open.
type session struct {
	opts Options
	log  *slog.Logger
}

// fail logs err as swtpm_setup's error message and returns it as the run's failure.
func (s *session) fail(err error) error {
	s.log.Error(err.Error())
	return failed(err)
}

// failf is fail with a message of swtpm_setup's.
func (s *session) failf(format string, a ...any) error {
	return s.fail(messagef(format, a...))
}

// run checks the options in swtpm_setup's order, decides about existing state, and then
// manufactures the TPM.
func (s *session) run(ctx context.Context) error {
	state, err := s.checkOptions()
	if err != nil {
		return err
	}
	for _, o := range s.opts.IgnoredOptions {
		s.log.Info(fmt.Sprintf("Warning: --%s is deprecated and has no effect.", o))
	}
	// swtpm_setup decides about existing state before it reads its configuration or keys
	if kept, err := s.keepExisting(state); err != nil || kept {
		return err
	}
	cfg, err := s.manufactureConfig(ctx, state)
	if err != nil {
		return err
	}
	res, err := s.manufacture(ctx, cfg)
	if err != nil || res.Kept {
		return err
	}
	return s.finish(res)
}

// keepExisting is swtpm_setup's early look at the state location: existing state is kept
// with --not-overwrite (kept is true), and refused without --overwrite.
func (s *session) keepExisting(state string) (kept bool, err error) {
	o := s.opts
	if o.Reconfigure || (o.Overwrite && !o.NotOverwrite) {
		return false, nil
	}
	exists, err := HasState(state, o.TPM2)
	switch {
	case err != nil:
		return false, s.fail(err)
	case exists && o.NotOverwrite:
		s.log.Info("Not overwriting existing state file.")
		return true, nil
	case exists:
		return false, s.fail(errExistingState)
	}
	return false, nil
}

// errExistingState is ErrStateExists with swtpm_setup's message.
var errExistingState = &toolError{msg: "Found existing TPM state 'permall'.", cause: ErrStateExists}

// manufacture runs Manufacture and reports its failure as swtpm_setup does.
func (s *session) manufacture(ctx context.Context, cfg ManufactureConfig) (*ManufactureResult, error) {
	res, err := Manufacture(ctx, cfg)
	switch {
	case errors.Is(err, ErrStateExists):
		return nil, s.fail(errExistingState)
	case err != nil:
		s.log.Error(err.Error())
		s.log.Error("An error occurred. Authoring the TPM state failed.")
		s.logEnding()
		return nil, failed(err)
	}
	return res, nil
}

// finish writes the EK certificate files, displays what was made and logs success.
func (s *session) finish(res *ManufactureResult) error {
	if dir := s.opts.WriteEKCertFiles; dir != "" {
		if err := writeEKCertFiles(dir, res); err != nil {
			return s.failf("Could not write EK certificate file: %w", err)
		}
	}
	if s.opts.Display {
		displayResult(s.opts.Stdout, res)
	}
	s.log.Info("Successfully authored TPM state.")
	s.logEnding()
	return nil
}

func (s *session) logEnding() {
	s.log.Info(fmt.Sprintf("Ending vTPM manufacturing @ %s", logTime()))
}

func stringOr(s, def string) string {
	if s == "" {
		return def
	}
	return s
}
