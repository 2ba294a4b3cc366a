package backend

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"time"

	"github.com/vtpmd/vtpmd/emulator/libtpms"

	"github.com/vtpmd/vtpmd/backend/seam"

	"github.com/vtpmd/vtpmd/backend/store"
	"github.com/vtpmd/vtpmd/emulator"
	"github.com/vtpmd/vtpmd/internal/daemon"
	"github.com/vtpmd/vtpmd/internal/tpmwire"
	"github.com/vtpmd/vtpmd/socket"
)

// Startup is the TPM startup that --flags not-need-init,startup-* runs when the process starts.
type Startup int

// Startup types (swtpm's --flags startup-*).
const (
	StartupNone        Startup = iota // power on only (not-need-init, or startup-none)
	StartupClear                      // TPM2_Startup(SU_CLEAR) / TPM_Startup(ST_CLEAR)
	StartupState                      // TPM2_Startup(SU_STATE) / TPM_Startup(ST_STATE)
	StartupDeactivated                // TPM 1.2 TPM_Startup(ST_DEACTIVATED)
)

func (s Startup) String() string {
	return [...]string{"startup-none", "startup-clear", "startup-state", "startup-deactivated"}[s]
}

// ErrStartupUnsupported is returned for a startup type the TPM family does not have.
var ErrStartupUnsupported = errors.New("--flags startup-deactivated is not supported for TPM 2")

// command is the startup command for the family, nil for StartupNone.
func (s Startup) command(v emulator.Version) ([]byte, error) {
	if s == StartupNone {
		return nil, nil
	}
	if v == emulator.TPM2 {
		switch s {
		case StartupClear:
			return tpmwire.Startup2(tpmwire.SUClear), nil
		case StartupState:
			return tpmwire.Startup2(tpmwire.SUState), nil
		}
		return nil, ErrStartupUnsupported
	}
	return tpmwire.Startup12(map[Startup]uint16{StartupClear: tpmwire.STClear, StartupState: tpmwire.STState,
		StartupDeactivated: tpmwire.STDeactivated}[s]), nil
}

// RunConfig is one served vTPM: swtpm socket's options as types, and the two seams the host
// manager fills (Keys, Guard).
type RunConfig struct {
	Version  emulator.Version
	StateURI string // dir://PATH or file://PATH
	// Store are the store's options; its StateKey comes from Keys.
	Store store.Options
	// Keys yields the state and migration keys (nil: none).
	Keys seam.KeySource
	// Guard sees the data channel's commands (nil: none).
	Guard seam.Guard
	// Blobs seals and opens state blobs for secure migration (nil: the Guard's, if it is
	// also a seam.BlobHook, else none).
	Blobs seam.BlobHook
	// IncomingMigration and DisableAutoShutdown are as in Config.
	IncomingMigration, DisableAutoShutdown bool
	// PowerOn starts the TPM before serving (--flags not-need-init), running Startup.
	PowerOn bool
	Startup Startup
	// Ctrl and Data are the channels (either may be nil, not both).
	Ctrl, Data *socket.ListenSpec
	// Server are the protocol behaviours (Log and ResultOf are filled in by Run).
	Server socket.Options
	// PidFile is written once the TPM is ready to be served.
	PidFile daemon.PidFile
	// Confine is called once the channels, the state and the pid file are open, before the TPM
	// is powered on and served: swtpm's --seccomp filter (nil: nothing).
	Confine func() error
	// DebugLog and DebugLevel hand libtpms' own debug output to the log, as swtpm does with
	// its --log (nil: libtpms' default, stderr).
	DebugLog   *os.File
	DebugLevel int
	// Ready is called once the channels are served (a --daemon parent waits for it).
	Ready func()
	Log   *slog.Logger
}

// ErrStartInterrupted is returned by Run when its context ends before the vTPM is served.
var ErrStartInterrupted = errors.New("start-up interrupted")

// Run serves one vTPM until ctx is done or the server finishes (CMD_SHUTDOWN, or the loss of a
// connection that ends the process): it loads the keys, opens the channels and the state,
// powers the TPM on if asked, and serves. Start-up may block in a system call that nothing
// can interrupt (a key read from a FIFO or a pipe, a state on a stalled file system): when ctx
// ends (SIGTERM) before the vTPM is served, Run returns at once with ErrStartInterrupted and
// leaves the blocked start-up to the process's exit; once served, it shuts down in order.
func Run(ctx context.Context, cfg RunConfig) error {
	serving := make(chan struct{})
	done := make(chan error, 1)
	go func() { done <- runVTPM(ctx, cfg, serving) }()
	select {
	case err := <-done:
		return err
	case <-serving:
		return <-done
	case <-ctx.Done():
	}
	select {
	case err := <-done:
		return err
	case <-serving:
		return <-done
	default:
		return fmt.Errorf("%w: %w", ErrStartInterrupted, context.Cause(ctx))
	}
}

// runVTPM is Run; it closes serving when start-up is over and the vTPM is served.
func runVTPM(ctx context.Context, cfg RunConfig, serving chan<- struct{}) error {
	log := cfg.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if cfg.Ctrl == nil && cfg.Data == nil {
		return socket.ErrNoChannel
	}
	startup, err := cfg.Startup.command(cfg.Version)
	if err != nil {
		return err
	}
	var keys seam.Keys
	if cfg.Keys != nil {
		if keys, err = cfg.Keys.Keys(ctx); err != nil {
			return err
		}
	}
	defer keys.Zero()
	ctrl, data, err := openChannels(cfg.Ctrl, cfg.Data)
	if err != nil {
		return err
	}
	defer ctrl.Close()
	defer data.Close()
	st, err := store.Open(cfg.StateURI, storeOptions(cfg.Store, keys))
	if err != nil {
		if errors.Is(err, store.ErrRollback) {
			return fmt.Errorf("refusing to start: %w; the record is kept by %s ('vtpmd manager accept' lets this state start)", err, keys.Owner)
		}
		return err
	}
	defer st.Close()
	if st.Formatted() {
		log.Info(st.FormatNotice())
	}
	if keys.Flush != nil {
		defer func() {
			fctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			keys.Flush(fctx)
		}()
	}
	if cfg.DebugLog != nil && cfg.DebugLevel > 1 {
		libtpms.SetDebug(int(cfg.DebugLog.Fd()), uint(cfg.DebugLevel))
	}
	inst, err := New(Config{
		Version: cfg.Version, Store: st, StateKey: keys.State, MigrationKey: keys.Migration,
		IncomingMigration: cfg.IncomingMigration, DisableAutoShutdown: cfg.DisableAutoShutdown,
		Guard: cfg.Guard, Blobs: blobHook(cfg), Log: log,
	})
	if err != nil {
		return err
	}
	defer inst.Close()
	removePid, err := cfg.PidFile.Write()
	if err != nil {
		return err
	}
	defer removePid()
	if cfg.Confine != nil {
		if err := cfg.Confine(); err != nil {
			return err
		}
	}
	if cfg.PowerOn {
		if err := powerOnAtStart(inst, cfg.Startup, startup); err != nil {
			return err
		}
	}
	close(serving)
	return serve(ctx, inst, ctrl, data, cfg, log)
}

// blobHook is the configured blob hook, or the guard's when the guard is also one (the
// manager's instance guard carries its migration hook).
func blobHook(cfg RunConfig) seam.BlobHook {
	if cfg.Blobs != nil {
		return cfg.Blobs
	}
	return seam.BlobHookOf(cfg.Guard)
}

// storeOptions adds what the key source asks for: the state key and, when someone records
// state versions (the manager), versioned writes reported to it and the version the state
// must have at least.
func storeOptions(o store.Options, keys seam.Keys) store.Options {
	o.StateKey = keys.State
	if keys.RecordVersion != nil && keys.State != nil {
		o.Versioned, o.MinVersion = true, keys.MinVersion
		o.OnWrite = func(_ emulator.StateType, v uint64) error {
			keys.RecordVersion(v)
			return nil
		}
	}
	return o
}

func openChannels(ctrlSpec, dataSpec *socket.ListenSpec) (ctrl, data *socket.Endpoint, err error) {
	if ctrlSpec != nil {
		if ctrl, err = ctrlSpec.Open(); err != nil {
			return nil, nil, err
		}
	}
	if dataSpec != nil {
		if data, err = dataSpec.Open(); err != nil {
			ctrl.Close()
			return nil, nil, err
		}
	}
	return ctrl, data, nil
}

// powerOnAtStart is --flags not-need-init[,startup-*]: power-on and the startup command share
// one durable state write.
func powerOnAtStart(inst *Instance, st Startup, startup []byte) error {
	resp, err := inst.StartWith(startup)
	if err != nil {
		return fmt.Errorf("could not initialize the TPM: %w", err)
	}
	if startup == nil {
		return nil
	}
	if rc, err := tpmwire.ResponseCode(resp); err != nil || rc != 0 {
		return fmt.Errorf("TPM startup (%s) failed: %x", st, resp)
	}
	return nil
}

func serve(ctx context.Context, inst *Instance, ctrl, data *socket.Endpoint, cfg RunConfig, log *slog.Logger) error {
	sopts := cfg.Server
	sopts.Log, sopts.ResultOf = log, ResultOf
	srv := socket.NewServer(inst, sopts)
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	if err := srv.Serve(sctx, ctrl, data); err != nil {
		return err
	}
	if cfg.Ready != nil {
		cfg.Ready()
	}
	log.Info("vtpmd socket ready", "state", cfg.StateURI, "tpm2", cfg.Version == emulator.TPM2)
	select {
	case <-ctx.Done():
		log.Info("exiting on signal")
	case <-srv.Done():
	}
	cancel()
	ctrl.Close()
	data.Close()
	srv.Wait()
	return nil
}
