package backend

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/vtpmd/vtpmd/backend/seam"

	"github.com/vtpmd/vtpmd/emulator/libtpms"
	"github.com/vtpmd/vtpmd/internal/tpmwire"

	"github.com/vtpmd/vtpmd/backend/blob"
	"github.com/vtpmd/vtpmd/emulator"
	"github.com/vtpmd/vtpmd/socket"
)

// Storage is the state store an Instance keeps its blobs in; store.Store implements it.
type Storage interface {
	emulator.Store
	// Lock takes the state lock, trying retries more times 10 ms apart.
	Lock(retries int) error
	// Unlock releases it (after an outgoing migration fetched the last blob).
	Unlock()
	// Locked reports whether the lock is held.
	Locked() bool
}

// deferredSyncer is a Storage that can batch fsyncs (store.Store).
type deferredSyncer interface {
	Defer()
	Sync() error
}

// Config describes one instance.
type Config struct {
	Version emulator.Version
	Store   Storage
	// StateKey encrypts stored files (--key); MigrationKey wraps state blobs (--migration-key).
	StateKey, MigrationKey *blob.Key
	// IncomingMigration defers taking the state lock until state arrives (--migration incoming).
	IncomingMigration bool
	// DisableAutoShutdown turns off the TPM2_Shutdown(SU_STATE) sent before a re-INIT, STOP or
	// exit (--flags disable-auto-shutdown).
	DisableAutoShutdown bool
	// Guard sees every data-channel command and every successful TPM2_Startup(CLEAR); nil:
	// none.
	Guard seam.Guard
	// Blobs seals the state blobs that leave and opens those that arrive (secure migration
	// under a manager); nil: swtpm's blobs as they are.
	Blobs seam.BlobHook
	Log   *slog.Logger
}

// relockRetries is how often a released lock is retried (300 x 10 ms, as swtpm and QEMU).
const relockRetries = 300

// Instance is one vTPM: libtpms plus its state.
type Instance struct {
	cfg Config
	eng *libtpms.Engine
	log *slog.Logger

	// guardCommands are the commands the guard must see (seam.CommandsOf, taken once);
	// guardFiltered is false when it must see every one, and then no data thread runs commands.
	guardCommands []uint32
	guardFiltered bool

	mu          sync.Mutex // serializes lifecycle transitions
	lockRetries int        // guarded by mu; retries for the next lock attempt
	deferLock   bool       // guarded by mu; --migration incoming and no state received yet

	// with a BlobHook (guarded by mu): blobs SET_STATEBLOB received, opened at the next INIT;
	// whether the hook must admit the next command; the final refusal once released
	incoming  map[uint32]incomingBlob
	needAdmit bool
	released  error
}

// incomingBlob is one SET_STATEBLOB kept for the hook until INIT.
type incomingBlob struct {
	encrypted bool
	b         []byte
}

// hookTimeout bounds one call of the blob hook (a round trip to the manager, which may ask
// another host's manager).
const hookTimeout = 45 * time.Second

// New opens libtpms for this process with the instance's configuration. The TPM is stopped.
func New(cfg Config) (*Instance, error) {
	log := cfg.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	eng, err := libtpms.Open(cfg.Version, cfg.Store, log)
	if err != nil {
		return nil, fmt.Errorf("open tpm engine: %w", err)
	}
	in := &Instance{cfg: cfg, eng: eng, log: log, deferLock: cfg.IncomingMigration, needAdmit: cfg.Blobs != nil}
	in.guardCommands, in.guardFiltered = seam.CommandsOf(cfg.Guard)
	return in, nil
}

// Engine exposes the engine (for in-process tools such as provisioning and benchmarks).
func (in *Instance) Engine() *libtpms.Engine { return in.eng }

// Close shuts the TPM down the way swtpm does at exit and releases libtpms and the lock.
func (in *Instance) Close() {
	in.mu.Lock()
	defer in.mu.Unlock()
	in.autoShutdownLocked()
	in.eng.Close()
	in.cfg.Store.Unlock()
}

// Capabilities implements socket.TPM.
func (in *Instance) Capabilities() uint32 {
	if in.cfg.Version == emulator.TPM2 {
		return socket.CapsTPM2
	}
	return socket.CapsTPM12
}

// Running implements socket.TPM.
func (in *Instance) Running() bool { return in.eng.Running() }

// IsTPM2 implements socket.TPM.
func (in *Instance) IsTPM2() bool { return in.cfg.Version == emulator.TPM2 }

// BufferSize implements socket.TPM: the largest command the data channel takes.
func (in *Instance) BufferSize() uint32 {
	_, _, mx, _ := in.eng.SetBufferSize(0)
	return mx
}

// Start powers the TPM on as --flags not-need-init does, taking the lock first.
func (in *Instance) Start() error { return in.Init(0) }

// Init implements CMD_INIT: a TPM reset. A running TPM is shut down first.
func (in *Instance) Init(flags uint32) error {
	_, err := in.powerOn(flags, nil)
	return err
}

// StartWith powers the TPM on as --flags not-need-init does and runs startup (a
// TPM2_Startup or TPM_Startup command) before anything is made durable, so that both land in
// one state write. It returns the startup command's response; with a nil startup it is Start.
func (in *Instance) StartWith(startup []byte) ([]byte, error) { return in.powerOn(0, startup) }

func (in *Instance) powerOn(flags uint32, startup []byte) ([]byte, error) {
	in.mu.Lock()
	defer in.mu.Unlock()
	imported, err := in.admitOrImportLocked()
	if err != nil {
		return nil, err
	}
	if in.eng.Running() {
		in.autoShutdownLocked()
		in.eng.Stop()
	}
	if imported != nil {
		// the opened blobs go to libtpms now, permanent first, for this INIT to load
		if err := in.setImportedLocked(imported); err != nil {
			return nil, err
		}
	}
	// the startup command is a TPM command: like Process, it needs the lock even while an
	// incoming migration defers it
	if !in.deferLock || startup != nil {
		if err := in.lockLocked(); err != nil {
			return nil, err
		}
	}
	// libtpms may write its state several times while it powers on (and runs the startup
	// command); nobody is answered in between, so one fsync at the end keeps the guarantee.
	ds, deferrable := in.cfg.Store.(deferredSyncer)
	if deferrable {
		ds.Defer()
	}
	err = in.eng.Start()
	if err != nil && in.cfg.Version == emulator.TPM12 {
		// libtpms 1.2 passes its state callback's result on as its own (ResultOf's loadTable)
		err = fmt.Errorf("%w: %w", errNVResultPassedOn, err)
	}
	var resp []byte
	if err == nil && startup != nil {
		resp, err = in.process(startup)
	}
	if deferrable {
		if serr := ds.Sync(); serr != nil && err == nil {
			in.eng.Stop()
			err = fmt.Errorf("make tpm state durable: %w", serr)
		}
	}
	if err != nil {
		in.log.Error("tpm init failed", "err", err)
		return nil, err
	}
	if flags&socket.InitFlagDeleteVolatile != 0 {
		if err := in.cfg.Store.Delete(emulator.StateVolatile, false); err != nil {
			in.log.Warn("delete volatile state", "err", err)
		}
	}
	return resp, nil
}

// Stop implements CMD_STOP.
func (in *Instance) Stop() error {
	in.mu.Lock()
	defer in.mu.Unlock()
	in.autoShutdownLocked()
	in.eng.Stop()
	return nil
}

// Shutdown implements CMD_SHUTDOWN (the process exits afterwards).
func (in *Instance) Shutdown() error { return in.Stop() }

// autoShutdownLocked sends TPM2_Shutdown(SU_STATE), or SU_CLEAR if that fails, unless the
// guest's last command already was a shutdown: a lost guest must not cost DA lockout counts.
func (in *Instance) autoShutdownLocked() {
	if in.cfg.Version != emulator.TPM2 || in.cfg.DisableAutoShutdown || !in.eng.Running() {
		return
	}
	if in.needAdmit || in.released != nil {
		return // exported state: the TPM runs nothing more unless the hook admits it
	}
	if in.eng.LastOrdinal() == tpmwire.CCShutdown {
		return
	}
	for _, su := range []uint16{tpmwire.SUState, tpmwire.SUClear} {
		resp, err := in.eng.Process(tpmwire.Shutdown2(su))
		var rc uint32
		if err == nil {
			rc, err = tpmwire.ResponseCode(resp)
		}
		if err != nil {
			in.log.Warn("automatic TPM2_Shutdown", "err", err)
			return
		}
		if rc == tpmwire.RCSuccess || rc == tpmwire.RCInitialize { // never started up
			return
		}
		in.log.Warn("automatic TPM2_Shutdown refused", "su", su, "rc", fmt.Sprintf("0x%x", rc))
	}
}

func (in *Instance) lockLocked() error {
	if in.cfg.Store.Locked() {
		return nil
	}
	if err := in.cfg.Store.Lock(in.lockRetries); err != nil {
		in.log.Error("lock tpm state", "err", err)
		return fmt.Errorf("%w: %w", ErrLock, err)
	}
	in.deferLock = false
	return nil
}

// Process implements socket.TPM: one TPM command, after making sure the state is locked.
func (in *Instance) Process(cmd []byte) ([]byte, error) {
	if err := in.admit(); err != nil {
		return nil, err
	}
	return in.process(cmd)
}

// ProcessAppend is Process with the response appended to dst (socket's data channel reuses
// one buffer per connection): without a guard nothing is allocated per command.
func (in *Instance) ProcessAppend(dst, cmd []byte) ([]byte, error) {
	// admitted at epoch: unless a control call comes between, a native data thread may run the
	// next commands itself (those a guard does not need to see)
	epoch := in.eng.Epoch()
	if err := in.admit(); err != nil {
		return dst, err
	}
	if in.cfg.Guard == nil {
		return in.eng.ProcessAppendArmed(dst, cmd, epoch)
	}
	resp, err := in.process(cmd)
	if err == nil && in.guardFiltered {
		in.eng.ArmIf(epoch)
	}
	return append(dst, resp...), err
}

// ErrGuarded is returned by ServeNative when a guard must see every command.
var ErrGuarded = errors.New("backend: a guard sees every data command")

// ServeNative implements socket.NativeDataServer: the connection is served on a native thread
// (libtpms.Engine.ServeData). Commands the thread runs itself are the ones ProcessAppend would
// pass straight to libtpms: the engine is armed only by ProcessAppend after admit, and any
// control call disarms it; the commands a guard must see (seam.CommandsOf) always go to Go. A
// guard that must see every command keeps the connection on goroutines (ErrGuarded).
func (in *Instance) ServeNative(fd, bufSize int, slow func([]byte) ([]byte, bool)) (<-chan struct{}, func(), error) {
	if !in.guardFiltered {
		return nil, nil, ErrGuarded
	}
	d, err := in.eng.ServeData(fd, bufSize, in.guardCommands, slow)
	if err != nil {
		return nil, nil, err
	}
	return d.Done(), d.Shutdown, nil
}

// admit makes sure a command may run and the state is locked.
func (in *Instance) admit() error {
	in.mu.Lock()
	defer in.mu.Unlock()
	if err := in.admitLocked(); err != nil {
		return err
	}
	if err := in.lockLocked(); err != nil {
		return fmt.Errorf("%w: %w", ErrLockLost, err)
	}
	return nil
}

// process runs a command through the guard: refused commands are answered by the guard, and
// a successful TPM2_Startup(CLEAR) is followed by the guard's own commands.
func (in *Instance) process(cmd []byte) ([]byte, error) {
	g := in.cfg.Guard
	if g == nil {
		return in.eng.Process(cmd)
	}
	if resp := g.Check(cmd); resp != nil {
		return resp, nil
	}
	resp, err := in.eng.Process(cmd)
	if err != nil || !in.IsTPM2() {
		return resp, err
	}
	if rc, rerr := tpmwire.ResponseCode(resp); rerr != nil || rc != tpmwire.RCSuccess {
		return resp, nil
	}
	if isStartupClear(cmd) {
		if err := g.Started(in.eng.Process); err != nil {
			return nil, fmt.Errorf("guard after TPM2_Startup(CLEAR): %w", err)
		}
	}
	g.Done(cmd, resp, in.eng.Process)
	return resp, nil
}

// isStartupClear reports a TPM2_Startup(SU_CLEAR) command.
func isStartupClear(cmd []byte) bool {
	h, err := tpmwire.ParseHeader(cmd)
	return err == nil && h.Code == tpmwire.CCStartup && len(cmd) >= tpmwire.HeaderSize+2 &&
		cmd[tpmwire.HeaderSize] == 0 && cmd[tpmwire.HeaderSize+1] == byte(tpmwire.SUClear)
}

// Sentinel errors callers branch on.
var (
	// ErrLock is wrapped when the state lock cannot be taken.
	ErrLock = errors.New("backend: cannot lock the tpm state")
	// ErrLockLost means the state lock could not be re-taken for a data-channel command;
	// swtpm terminates in this case.
	ErrLockLost = errors.New("backend: cannot re-acquire the state lock")
	// ErrBlobType is wrapped when SET_STATEBLOB names a blob type that does not exist.
	ErrBlobType = errors.New("backend: unknown state blob type")
	// ErrCancelTPM12 is CMD_CANCEL_TPM_CMD on a TPM 1.2, which swtpm does not cancel (TPM_FAIL).
	ErrCancelTPM12 = errors.New("backend: a TPM 1.2 command cannot be canceled")

	// errNVResultPassedOn marks a failed TPM 1.2 start: libtpms 1.2 answers with the result
	// its state callback returned.
	errNVResultPassedOn = errors.New("backend: libtpms 1.2 passed on the state callback's result")
)

// Established implements CMD_GET_TPMESTABLISHED.
func (in *Instance) Established() (bool, error) {
	return in.eng.Established()
}

// SetLocality implements CMD_SET_LOCALITY.
func (in *Instance) SetLocality(loc uint8) error {
	libtpms.SetLocality(loc)
	return nil
}

// ResetEstablished implements CMD_RESET_TPMESTABLISHED.
func (in *Instance) ResetEstablished(loc uint8) error { return in.eng.ResetEstablished(loc) }

// HashStart implements CMD_HASH_START.
func (in *Instance) HashStart() error { return in.eng.HashStart() }

// HashData implements CMD_HASH_DATA.
func (in *Instance) HashData(b []byte) error { return in.eng.HashData(b) }

// HashEnd implements CMD_HASH_END.
func (in *Instance) HashEnd() error { return in.eng.HashEnd() }

// Cancel implements CMD_CANCEL_TPM_CMD; it does not wait for the engine lock. swtpm cancels
// only TPM 2 commands.
func (in *Instance) Cancel() error {
	if in.cfg.Version != emulator.TPM2 {
		return ErrCancelTPM12
	}
	in.eng.Cancel()
	return nil
}

// StoreVolatile implements CMD_STORE_VOLATILE.
func (in *Instance) StoreVolatile() error {
	vol, err := in.eng.VolatileState()
	if err != nil {
		return err
	}
	if err := in.cfg.Store.Store(emulator.StateVolatile, vol); err != nil {
		in.log.Error("store volatile state", "err", err)
		return fmt.Errorf("store volatile state: %w", err)
	}
	return nil
}

// Config implements CMD_GET_CONFIG.
func (in *Instance) Config() uint32 {
	var f uint32
	if in.cfg.StateKey != nil {
		f |= socket.ConfigFlagFileKey
	}
	if in.cfg.MigrationKey != nil {
		f |= socket.ConfigFlagMigrationKey
	}
	return f
}

// SetBufferSize implements CMD_SET_BUFFERSIZE.
func (in *Instance) SetBufferSize(wanted uint32) (uint32, uint32, uint32, error) {
	return in.eng.SetBufferSize(wanted)
}

// Info implements CMD_GET_INFO.
func (in *Instance) Info(flags uint64) (string, error) {
	return in.eng.Info(uint32(flags)), nil
}

// LockStorage implements CMD_LOCK_STORAGE (QEMU sends it when a failed migration resumes the
// VM on the source).
func (in *Instance) LockStorage(retries uint32) error {
	in.mu.Lock()
	defer in.mu.Unlock()
	in.lockRetries = int(retries)
	if in.deferLock {
		return nil // nothing to protect yet
	}
	return in.lockLocked()
}

func stateType(typ uint32) (emulator.StateType, error) {
	switch typ {
	case socket.BlobPermanent:
		return emulator.StatePermanent, nil
	case socket.BlobVolatile:
		return emulator.StateVolatile, nil
	case socket.BlobSavestate:
		return emulator.StateSave, nil
	}
	return 0, fmt.Errorf("%w %d", ErrBlobType, typ)
}

// GetStateBlob implements CMD_GET_STATEBLOB: the stored blob re-wrapped as a migration blob.
// Fetching the volatile state stores it first and deletes the file afterwards; fetching the
// savestate blob (the last one QEMU asks for) releases the state lock for the destination.
//
// swtpm has no blob of an unknown type: it answers as for a missing one (nil, TPM_RETRY).
func (in *Instance) GetStateBlob(typ uint32, decrypt bool) ([]byte, bool, error) {
	t, err := stateType(typ)
	if err != nil {
		return nil, false, nil
	}
	in.mu.Lock()
	defer in.mu.Unlock()
	var plain []byte
	switch t {
	case emulator.StateVolatile:
		plain, err = in.eng.VolatileState()
		if err != nil {
			return nil, false, err
		}
		// swtpm stores, reads back and deletes it, so a later INIT never resumes a stale state.
		if err := in.cfg.Store.Delete(emulator.StateVolatile, false); err != nil {
			in.log.Warn("delete volatile state", "err", err)
		}
	default:
		plain, err = in.cfg.Store.Load(t)
		if errors.Is(err, emulator.ErrNotExist) {
			plain, err = nil, nil
		}
		if err != nil {
			return nil, false, fmt.Errorf("load %s: %w", t.Name(), err)
		}
	}
	if t == emulator.StateSave && in.cfg.Store.Locked() {
		in.cfg.Store.Unlock()
		in.lockRetries = relockRetries
	}
	if len(plain) == 0 {
		return nil, false, nil
	}
	b, enc, err := blob.WrapMigration(plain, in.cfg.StateKey, in.cfg.MigrationKey, decrypt)
	if err != nil {
		return nil, false, fmt.Errorf("wrap %s: %w", t.Name(), err)
	}
	if in.cfg.Blobs != nil {
		if in.released != nil {
			clear(b)
			return nil, false, in.released
		}
		ctx, cancel := context.WithTimeout(context.Background(), hookTimeout)
		defer cancel()
		sealed, err := in.cfg.Blobs.Export(ctx, typ, b)
		clear(b)
		if errors.Is(err, seam.ErrReleased) {
			in.released = err
		}
		if err != nil {
			in.log.Error("sealing the state blob for migration", "type", t.Name(), "err", err)
			return nil, false, fmt.Errorf("seal %s blob for migration: %w", t.Name(), err)
		}
		// whatever happens to the sealed state, the instance asks before it goes on
		in.needAdmit = true
		return sealed, enc, nil
	}
	return b, enc, nil
}

// SetStateBlob implements CMD_SET_STATEBLOB: the blob is unwrapped and handed to libtpms for
// the next INIT; nothing on disk changes until that INIT succeeds.
func (in *Instance) SetStateBlob(typ uint32, encrypted bool, b []byte) error {
	t, err := stateType(typ)
	if err != nil {
		return err
	}
	in.mu.Lock()
	defer in.mu.Unlock()
	if err := in.lockLocked(); err != nil {
		return err
	}
	if in.cfg.Blobs != nil {
		// kept for the hook, which opens every blob of the migration at INIT at once
		if in.incoming == nil {
			in.incoming = map[uint32]incomingBlob{}
		}
		if len(b) == 0 {
			delete(in.incoming, typ)
			return in.eng.SetState(t, nil)
		}
		in.incoming[typ] = incomingBlob{encrypted: encrypted, b: b}
		return nil
	}
	if seam.IsSealed(b) {
		in.log.Error("refusing state blob", "type", t.Name(), "err", errSealedNoHook)
		return fmt.Errorf("%s blob: %w", t.Name(), errSealedNoHook)
	}
	var plain []byte
	if len(b) > 0 {
		plain, err = blob.UnwrapMigration(b, encrypted, in.cfg.StateKey, in.cfg.MigrationKey)
		if err != nil {
			in.log.Error("refusing state blob", "type", t.Name(), "err", err)
			return fmt.Errorf("unwrap %s blob: %w", t.Name(), err)
		}
	}
	if err := in.eng.SetState(t, plain); err != nil {
		in.log.Error("refusing state blob", "type", t.Name(), "err", err)
		return err
	}
	return nil
}

// errSealedNoHook refuses a sealed migration blob on a vTPM without a manager.
var errSealedNoHook = fmt.Errorf("%w: the state blob is sealed by a vtpmd manager for secure migration, "+
	"and this vTPM runs without a manager to open it", blob.ErrMalformed)

// admitLocked asks the hook whether the instance may run its next command (after it started,
// and after an export); a refusal that says the state was released stands for good (mu held).
func (in *Instance) admitLocked() error {
	if in.released != nil {
		return in.released
	}
	if !in.needAdmit {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), hookTimeout)
	defer cancel()
	if err := in.cfg.Blobs.Admit(ctx); err != nil {
		if errors.Is(err, seam.ErrReleased) {
			in.released = err
			in.log.Error("the vTPM's state went to another instance: refusing every command", "err", err)
		} else {
			in.log.Error("the manager did not admit the vTPM's next command", "err", err)
		}
		return err
	}
	in.needAdmit = false
	return nil
}

// admitOrImportLocked is INIT's question to the hook: with blobs received, the hook opens
// them (an import, which also admits the instance); otherwise the instance is admitted as
// for any command (mu held). The blobs received are gone either way.
func (in *Instance) admitOrImportLocked() (map[uint32]incomingBlob, error) {
	if in.cfg.Blobs == nil || len(in.incoming) == 0 {
		return nil, in.admitLocked()
	}
	got := in.incoming
	in.incoming = nil
	if in.released != nil {
		// a new state may arrive for an instance whose old one went away (a migration back)
		in.released = nil
	}
	sealed := make(map[uint32][]byte, len(got))
	for typ, ib := range got {
		sealed[typ] = ib.b
	}
	ctx, cancel := context.WithTimeout(context.Background(), hookTimeout)
	defer cancel()
	opened, err := in.cfg.Blobs.Import(ctx, sealed)
	if err != nil {
		in.clearCachedLocked()
		in.log.Error("refusing the migrated state", "err", err)
		return nil, fmt.Errorf("import migrated state: %w", err)
	}
	out := make(map[uint32]incomingBlob, len(opened))
	for typ, b := range opened {
		if _, ok := got[typ]; !ok {
			in.clearCachedLocked()
			return nil, fmt.Errorf("import migrated state: the hook returned a blob of type %d that did not arrive", typ)
		}
		out[typ] = incomingBlob{encrypted: got[typ].encrypted, b: b}
	}
	in.needAdmit = false
	return out, nil
}

// setImportedLocked hands opened blobs to libtpms, permanent before volatile (mu held); on
// failure none stays cached.
func (in *Instance) setImportedLocked(blobs map[uint32]incomingBlob) error {
	for _, typ := range []uint32{socket.BlobPermanent, socket.BlobVolatile, socket.BlobSavestate} {
		ib, ok := blobs[typ]
		if !ok {
			continue
		}
		t, _ := stateType(typ)
		plain, err := blob.UnwrapMigration(ib.b, ib.encrypted, in.cfg.StateKey, in.cfg.MigrationKey)
		clear(ib.b)
		if err == nil {
			err = in.eng.SetState(t, plain)
			clear(plain)
		}
		if err != nil {
			in.clearCachedLocked()
			in.log.Error("refusing migrated state blob", "type", t.Name(), "err", err)
			return fmt.Errorf("migrated %s blob: %w", t.Name(), err)
		}
	}
	return nil
}

// clearCachedLocked drops state blobs cached in libtpms for the next INIT.
func (in *Instance) clearCachedLocked() {
	for _, t := range []emulator.StateType{emulator.StatePermanent, emulator.StateVolatile, emulator.StateSave} {
		if err := in.eng.SetState(t, nil); err != nil {
			in.log.Debug("clear cached state", "type", t.Name(), "err", err)
		}
	}
}
