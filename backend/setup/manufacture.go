package setup

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"

	"github.com/vtpmd/vtpmd/emulator/libtpms"

	"github.com/google/go-tpm/tpm2/transport"

	"github.com/vtpmd/vtpmd/backend/blob"
	"github.com/vtpmd/vtpmd/backend/localca"
	"github.com/vtpmd/vtpmd/backend/setup/provision"
	"github.com/vtpmd/vtpmd/backend/store"
	"github.com/vtpmd/vtpmd/emulator"
	"github.com/vtpmd/vtpmd/internal/tpmclient"
)

// lockRetries is how often a released state lock is retried (300 x 10 ms, as a starting
// vTPM does), so a vTPM that is just stopping does not fail the run.
const lockRetries = 300

// Sentinel errors of Manufacture.
var (
	// ErrStateExists: the state location holds a TPM and neither overwriting nor keeping it
	// was asked for (swtpm_setup: "Found existing TPM state 'permall'").
	ErrStateExists = errors.New("found existing TPM state 'permall'")
)

// ManufactureConfig says how to make (or reconfigure) one vTPM's state.
type ManufactureConfig struct {
	// StateURI is dir://DIR or file://FILE.
	StateURI string
	TPM2     bool
	// StateKey encrypts the state files (swtpm_setup --keyfile/--pwdfile, or the manager's).
	StateKey *blob.Key
	// RecordVersion, with StateKey, versions each state write and is told its version (the
	// host manager's rollback record); nil: unversioned, as swtpm.
	RecordVersion func(version uint64)
	// Overwrite replaces existing state; NotOverwrite keeps it and succeeds (and wins over
	// Overwrite, as in swtpm_setup); with neither, existing state is ErrStateExists.
	Overwrite, NotOverwrite bool
	// Reconfigure changes only the PCR banks of existing state (of a fresh TPM when there is
	// none).
	Reconfigure bool
	// Provision says what to make; its Certifier is built by NewCertifier when certificates
	// are asked for, from what the TPM says about itself.
	Provision provision.Options
	// Provision12 says what to make in a TPM 1.2 (TPM2 false).
	Provision12  provision.Options12
	NewCertifier func(ctx context.Context, tpm localca.TPMInfo) (provision.Certifier, error)
	// Started, if set, is called once the state check has passed and work begins.
	Started func()
	Log     *slog.Logger
}

// ManufactureResult says what Manufacture did.
type ManufactureResult struct {
	// Kept is set when existing state was left alone (NotOverwrite).
	Kept bool
	*provision.Result
	// TPM12 is what a TPM 1.2 run made.
	TPM12 *provision.Result12
	TPM   localca.TPMInfo
}

// Manufacture makes a new TPM's (2.0 or 1.2) state the way swtpm_setup does, but in-process: libtpms runs
// on an in-memory store, and only when every step has succeeded is the permanent state
// written to the state location (one atomic, durable replacement, encrypted when a key is
// given). A failure at any step leaves the location as it was. The state lock is held
// throughout, so a running vtpmd or swtpm on the same state is never overwritten.
func Manufacture(ctx context.Context, cfg ManufactureConfig) (*ManufactureResult, error) {
	log := cfg.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if !cfg.TPM2 && cfg.Reconfigure {
		return nil, errors.New("manufacture: a TPM 1.2 cannot be reconfigured")
	}
	sopts := store.Options{TPM2: cfg.TPM2, Lock: true, StateKey: cfg.StateKey}
	if cfg.RecordVersion != nil && cfg.StateKey != nil {
		sopts.Versioned = true
		sopts.OnWrite = func(_ emulator.StateType, v uint64) error { cfg.RecordVersion(v); return nil }
	}
	st, err := store.Open(cfg.StateURI, sopts)
	if err != nil {
		return nil, fmt.Errorf("open TPM state %s: %w", cfg.StateURI, err)
	}
	defer st.Close()
	if err := st.Lock(lockRetries); err != nil {
		return nil, fmt.Errorf("lock TPM state %s: %w", cfg.StateURI, err)
	}
	mem, kept, err := startingState(st, cfg, log)
	switch {
	case err != nil:
		return nil, err
	case kept:
		return &ManufactureResult{Kept: true}, nil
	}
	if cfg.Started != nil {
		cfg.Started()
	}
	res, err := runTPM(ctx, cfg, mem, log)
	if err != nil {
		return nil, err
	}
	if err := replaceState(st, mem, cfg.StateURI); err != nil {
		return nil, err
	}
	return res, nil
}

// startingState is the in-memory store the TPM starts from: empty for a new TPM, the
// existing permanent state to reconfigure. Existing state is kept (kept is true) with
// NotOverwrite, and ErrStateExists without Overwrite.
func startingState(st *store.Store, cfg ManufactureConfig, log *slog.Logger) (mem *emulator.MemStore, kept bool, err error) {
	exists, err := hasPermanent(st)
	if err != nil {
		return nil, false, fmt.Errorf("read TPM state %s: %w", cfg.StateURI, err)
	}
	mem = emulator.NewMemStore()
	switch {
	case cfg.Reconfigure && !exists:
		// as swtpm_setup: reconfiguring nothing makes a fresh TPM with those banks
	case cfg.Reconfigure:
		perm, err := st.Load(emulator.StatePermanent)
		if err != nil {
			return nil, false, fmt.Errorf("load TPM state %s: %w", cfg.StateURI, err)
		}
		if err := mem.Store(emulator.StatePermanent, perm); err != nil {
			return nil, false, fmt.Errorf("copy TPM state %s: %w", cfg.StateURI, err)
		}
	case exists && cfg.NotOverwrite:
		log.Info("Not overwriting existing state file.")
		return nil, true, nil
	case exists && !cfg.Overwrite:
		return nil, false, ErrStateExists
	}
	return mem, false, nil
}

// runTPM powers on libtpms on mem, provisions (or reconfigures) it and powers it off, so
// that mem holds the new permanent state.
func runTPM(ctx context.Context, cfg ManufactureConfig, mem *emulator.MemStore, log *slog.Logger) (*ManufactureResult, error) {
	version := emulator.TPM12
	if cfg.TPM2 {
		version = emulator.TPM2
	}
	eng, err := libtpms.Open(version, mem, log)
	if err != nil {
		return nil, fmt.Errorf("open tpm engine: %w", err)
	}
	defer eng.Close()
	if err := eng.Start(); err != nil {
		return nil, err
	}
	res := &ManufactureResult{TPM: TPMInfo(eng)}
	if cfg.TPM2 {
		tpm := tpmclient.SendFunc(eng.Process)
		if err := tpmclient.Startup(tpm); err != nil {
			return nil, fmt.Errorf("TPM2_Startup: %w", err)
		}
		res.Result, err = manufactureTPM2(ctx, tpm, cfg, res.TPM, log)
	} else {
		res.TPM12, err = manufactureTPM12(ctx, provision.Send12(eng.Process), cfg, res.TPM, log)
	}
	if err != nil {
		return nil, err
	}
	eng.Stop()
	return res, nil
}

// replaceState makes mem's permanent state the one at the state location uri.
func replaceState(st *store.Store, mem *emulator.MemStore, uri string) error {
	perm, err := mem.Load(emulator.StatePermanent)
	if err != nil {
		return fmt.Errorf("manufactured TPM has no permanent state: %w", err)
	}
	// Stale volatile and saved state belong to the TPM being replaced (or, on reconfigure, to
	// a power cycle that the Startup(CLEAR) above superseded); they go first, so a crash before
	// the new permanent state lands leaves the old TPM whole.
	for _, t := range []emulator.StateType{emulator.StateVolatile, emulator.StateSave} {
		if err := st.Delete(t, false); err != nil {
			return fmt.Errorf("remove old %s state: %w", t.Name(), err)
		}
	}
	if err := st.Store(emulator.StatePermanent, perm); err != nil {
		return fmt.Errorf("store TPM state %s: %w", uri, err)
	}
	return nil
}

// manufactureTPM12 provisions a started TPM 1.2.
func manufactureTPM12(ctx context.Context, send provision.Send12, cfg ManufactureConfig, info localca.TPMInfo, log *slog.Logger) (*provision.Result12, error) {
	if err := provision.Startup12(send); err != nil {
		return nil, err
	}
	po := cfg.Provision12
	po.Log = log
	if po.EKCert && cfg.NewCertifier != nil {
		var err error
		if po.Certifier, err = cfg.NewCertifier(ctx, info); err != nil {
			return nil, err
		}
	}
	return provision.TPM12(ctx, send, po)
}

// manufactureTPM2 reconfigures or provisions a started TPM 2.
func manufactureTPM2(ctx context.Context, tpm transport.TPM, cfg ManufactureConfig, info localca.TPMInfo, log *slog.Logger) (*provision.Result, error) {
	if cfg.Reconfigure {
		return nil, provision.Reconfigure(tpm, cfg.Provision.PCRBanks, log)
	}
	po := cfg.Provision
	po.Log = log
	if (po.EKCert || po.PlatformCert) && cfg.NewCertifier != nil {
		var err error
		if po.Certifier, err = cfg.NewCertifier(ctx, info); err != nil {
			return nil, err
		}
	}
	return provision.TPM2(ctx, tpm, po)
}

// hasPermanent reports whether st holds a permanent state blob.
func hasPermanent(st *store.Store) (bool, error) {
	states, err := st.States()
	if err != nil {
		return false, err
	}
	return slices.ContainsFunc(states, func(s store.State) bool { return s.Name == emulator.StatePermanent.Name() }), nil
}

// HasState reports whether the state location holds a TPM's permanent state (of the given
// version), without taking its lock: swtpm_setup's early check, before anything else is read.
func HasState(uri string, tpm2 bool) (bool, error) {
	st, err := store.Open(uri, store.Options{TPM2: tpm2})
	if err != nil {
		return false, err
	}
	defer st.Close()
	return hasPermanent(st)
}

// TPMInfo is what libtpms says about the TPM (TPMLIB_INFO_TPMSPECIFICATION and
// TPMLIB_INFO_TPMATTRIBUTES), for its EK certificate.
func TPMInfo(eng *libtpms.Engine) localca.TPMInfo {
	info := localca.TPMInfo{Family: "2.0", Revision: 164, Manufacturer: "id:00001014", Model: "swtpm", Version: "id:20191023", TPM2: true}
	if eng.Version() == emulator.TPM12 {
		info = localca.TPMInfo{Family: "1.2", Level: 2, Revision: 116, Manufacturer: "id:00001014", Model: "swtpm", Version: "id:00740001"}
	}
	var v struct {
		Spec struct {
			Family   string `json:"family"`
			Level    int    `json:"level"`
			Revision int    `json:"revision"`
		} `json:"TPMSpecification"`
		Attrs struct {
			Manufacturer string `json:"manufacturer"`
			Version      string `json:"version"`
			Model        string `json:"model"`
		} `json:"TPMAttributes"`
	}
	if err := json.Unmarshal([]byte(eng.Info(1|2)), &v); err == nil && v.Spec.Family != "" {
		info.Family, info.Level, info.Revision = v.Spec.Family, v.Spec.Level, v.Spec.Revision
		info.Manufacturer, info.Version, info.Model = v.Attrs.Manufacturer, v.Attrs.Version, v.Attrs.Model
	}
	return info
}
