package manager

import (
	"log/slog"

	"github.com/vtpmd/vtpmd/backend/seam"
)

// GuardConfig says which vTPM a guard serves: the process serving the state at StatePath (a
// directory, as KeySource's StateURI names it), asking the manager at Client.
type GuardConfig struct {
	Client   *Client
	StateURI string
	TPM2     bool
	Log      *slog.Logger
}

// guardParts make the parts of a vTPM's guard under a manager (host PCR projection, the
// guest's attestation indices), each registered by its own file's init.
var guardParts []func(GuardConfig) seam.Guard

// registerGuardPart adds a part to every InstanceGuard.
func registerGuardPart(f func(GuardConfig) seam.Guard) { guardParts = append(guardParts, f) }

// InstanceGuard is the seam.Guard of a vTPM process on a host with a manager: the parts the
// manager's features contribute, combined with seam.Guards (nil when none applies, or for a
// TPM 1.2). A part asks the manager what applies to this vTPM when the guest starts its TPM,
// so a vTPM the manager does not know runs unguarded.
func InstanceGuard(cfg GuardConfig) seam.Guard {
	if !cfg.TPM2 || cfg.Client == nil {
		return nil
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	parts := make([]seam.Guard, 0, len(guardParts))
	for _, f := range guardParts {
		parts = append(parts, f(cfg))
	}
	return seam.Guards(parts...)
}
