package qemu

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// Sentinel errors of Run.
var (
	// ErrNoQEMU is returned when no QEMU command line is given.
	ErrNoQEMU = errors.New("no QEMU command line")
	// ErrHasTPM is returned when QEMU's command line already has a TPM.
	ErrHasTPM = errors.New("the QEMU command line already has a TPM (-tpmdev or a tpm-* -device): remove it, vtpmd run adds its own")
	// ErrBadPath is wrapped when a path cannot be handed to vtpmd or QEMU.
	ErrBadPath = errors.New("unusable path")
	// ErrVTPM is wrapped when the vTPM does not start.
	ErrVTPM = errors.New("vTPM did not start")
)

// Defaults.
const (
	// DefaultGrace is how long QEMU, then the vTPM, get between SIGTERM and SIGKILL.
	DefaultGrace = 10 * time.Second
	// startTimeout bounds the wait for the vTPM to be ready.
	startTimeout = 30 * time.Second
)

// DefaultPCRBanks are the PCR banks a new TPM 2 keeps active: swtpm_setup's default.
var DefaultPCRBanks = []string{"sha256"}

// Config is one `vtpmd run`.
type Config struct {
	// QEMU is QEMU's command line: the program (looked up in PATH) and its arguments.
	QEMU []string
	// TPM2 emulates a TPM 2.0; false a TPM 1.2.
	TPM2 bool
	// StateDir keeps the TPM's state across runs: created (0700) when missing, manufactured
	// when it holds no TPM of this version, never removed. "" is an ephemeral state in the
	// run's temporary directory.
	StateDir string
	// EKCerts manufactures a new TPM as libvirt's swtpm_setup call does: EKs with their
	// certificates and a platform certificate, certificate indices locked. Without it the
	// TPM starts empty, as swtpm makes one without swtpm_setup (no EK in NV).
	EKCerts bool
	// CADir is the local CA (swtpm-localca's layout) that signs the certificates, created on
	// first use and kept; "" is a CA made for this run and removed with it.
	CADir string
	// PCRBanks are the banks a new TPM 2 keeps active (nil: DefaultPCRBanks).
	PCRBanks []string
	// Model is QEMU's TPM device (tpm-crb, tpm-tis, ...); "" chooses by target and machine.
	Model string
	// Vtpmd is the program started as `vtpmd socket`; "" is this executable.
	Vtpmd string
	// VTPMLog is where the vTPM logs (appended, kept); "" is a log in the temporary directory,
	// whose end is shown when the vTPM fails.
	VTPMLog string
	// TempDir is where the run's temporary directory is made; "" is os.TempDir().
	TempDir string
	// Stdin, Stdout and Stderr are QEMU's (nil: this process's).
	Stdin          io.Reader
	Stdout, Stderr io.Writer
	// Grace is how long QEMU, then the vTPM, get between SIGTERM and SIGKILL (0: DefaultGrace).
	Grace time.Duration
	// Log receives Run's own messages (nil: none).
	Log *slog.Logger
}

// check validates c and fills in defaults.
func (c *Config) check() error {
	if len(c.QEMU) == 0 || c.QEMU[0] == "" {
		return ErrNoQEMU
	}
	if hasTPM(c.QEMU[1:]) {
		return ErrHasTPM
	}
	if c.Model != "" && (strings.ContainsAny(c.Model, ",= ") || !strings.HasPrefix(c.Model, "tpm-")) {
		return fmt.Errorf("TPM model %q: want a QEMU TPM device such as %s or %s", c.Model, ModelCRB, ModelTIS)
	}
	if c.Model == ModelCRB && !c.TPM2 {
		return fmt.Errorf("%s needs a TPM 2.0: use --tpm2 or %s", ModelCRB, ModelTIS)
	}
	for _, b := range c.PCRBanks {
		if b == "" || strings.ContainsAny(b, ", ") {
			return fmt.Errorf("PCR bank %q", b)
		}
	}
	if len(c.PCRBanks) == 0 {
		c.PCRBanks = DefaultPCRBanks
	}
	if c.Vtpmd == "" {
		exe, err := os.Executable()
		if err != nil {
			return fmt.Errorf("find vtpmd: %w", err)
		}
		c.Vtpmd = exe
	}
	for _, p := range []*string{&c.StateDir, &c.CADir, &c.VTPMLog, &c.TempDir} {
		if *p == "" {
			continue
		}
		abs, err := filepath.Abs(*p)
		if err != nil {
			return fmt.Errorf("%w: %q: %w", ErrBadPath, *p, err)
		}
		*p = abs
	}
	for _, p := range []string{c.StateDir, c.VTPMLog, c.TempDir} {
		if strings.ContainsAny(p, ",\n") {
			return fmt.Errorf("%w: %q contains a comma", ErrBadPath, p)
		}
	}
	if c.Stdin == nil {
		c.Stdin = os.Stdin
	}
	if c.Stdout == nil {
		c.Stdout = os.Stdout
	}
	if c.Stderr == nil {
		c.Stderr = os.Stderr
	}
	if c.Grace <= 0 {
		c.Grace = DefaultGrace
	}
	if c.Log == nil {
		c.Log = slog.New(slog.DiscardHandler)
	}
	return nil
}
