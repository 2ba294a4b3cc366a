package libtpms

/*
#cgo pkg-config: libtpms
#include <stdlib.h>
#include <string.h>
#include <libtpms/tpm_library.h>
#include <libtpms/tpm_error.h>
#include <libtpms/tpm_tis.h>
#include "glue.h"
*/
import "C"

import (
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"unsafe"

	"github.com/vtpmd/vtpmd/emulator"
	"github.com/vtpmd/vtpmd/internal/tpmwire"
)

// cmdBufSize is the reusable C command buffer; larger commands get a one-off allocation.
const cmdBufSize = 8192

// Engine is the process's libtpms instance. Its methods are safe for concurrent use; they are
// serialized internally, except Cancel.
type Engine struct {
	version emulator.Version
	store   emulator.Store
	log     *slog.Logger

	mu      sync.Mutex
	running bool           // guarded by mu
	closed  bool           // guarded by mu
	respBuf *C.uchar       // guarded by mu; libtpms realloc()s it, we keep it for the process lifetime
	respCap C.uint32_t     // guarded by mu
	respLen C.uint32_t     // guarded by mu; the last response's length (a field: a local passed to C escapes to the heap)
	cmdBuf  unsafe.Pointer // guarded by mu
	nvErr   error          // guarded by mu; first store error since the last command
	epoch   uint64         // guarded by mu; calls other than Process so far (see Epoch)
}

// engineMu guards the process-wide libtpms slot.
var (
	engineMu sync.Mutex
	current  *Engine
)

func init() { C.vtpmd_engine_init() }

// lock takes the Engine's mutex and then the engine lock it shares with native data threads
// (ServeData); taking it disarms them, so the next command on a data thread goes through Go.
// It counts a control call (Epoch).
func (e *Engine) lock() {
	e.lockData()
	e.epoch++
}

// lockData is lock for running a command: not a control call.
func (e *Engine) lockData() {
	e.mu.Lock()
	C.vtpmd_engine_lock()
}

// unlock releases both; arm lets a native data thread run the next commands itself.
func (e *Engine) unlock() { e.unlockArm(false) }

func (e *Engine) unlockArm(arm bool) {
	a := C.int(0)
	if arm {
		a = 1
	}
	C.vtpmd_engine_unlock(a)
	e.mu.Unlock()
}

// Open claims libtpms for this process and prepares a TPM of the given version whose state
// lives in s. The TPM starts stopped; call Start to power it on.
func Open(v emulator.Version, s emulator.Store, log *slog.Logger) (*Engine, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	engineMu.Lock()
	defer engineMu.Unlock()
	if current != nil {
		return nil, emulator.ErrInUse
	}
	e := &Engine{version: v, store: s, log: log, cmdBuf: C.malloc(cmdBufSize)}
	if err := e.chooseLocked(); err != nil {
		C.free(e.cmdBuf)
		return nil, err
	}
	current = e
	return e, nil
}

func (e *Engine) chooseLocked() error {
	ver := C.TPMLIB_TPMVersion(C.TPMLIB_TPM_VERSION_1_2)
	if e.version == emulator.TPM2 {
		ver = C.TPMLIB_TPM_VERSION_2
	}
	if rc := C.TPMLIB_ChooseTPMVersion(ver); rc != C.TPM_SUCCESS {
		return fmt.Errorf("choose tpm version %s: %w", e.version, tpmwire.Result(rc))
	}
	if rc := C.vtpmd_register_callbacks(); rc != C.TPM_SUCCESS {
		return fmt.Errorf("register libtpms callbacks: %w", tpmwire.Result(rc))
	}
	return nil
}

// emulator.Version reports the TPM family of this engine.
func (e *Engine) Version() emulator.Version { return e.version }

// Close stops the TPM if it runs and releases libtpms for another Open.
func (e *Engine) Close() {
	e.lock()
	defer e.unlock()
	if e.closed {
		return
	}
	if e.running {
		C.TPMLIB_Terminate()
		e.running = false
	}
	e.closed = true
	if e.respBuf != nil {
		C.free(unsafe.Pointer(e.respBuf))
		e.respBuf = nil
	}
	C.free(e.cmdBuf)
	engineMu.Lock()
	current = nil
	engineMu.Unlock()
}

// Running reports whether the TPM is powered on.
func (e *Engine) Running() bool {
	e.mu.Lock() // running is Go's own: no need to disarm a data thread
	defer e.mu.Unlock()
	return e.running
}

// Start powers the TPM on (TPMLIB_MainInit): it loads state from the emulator.Store, or from blobs set
// with SetState, or manufactures a new TPM when there is none.
func (e *Engine) Start() error {
	e.lock()
	defer e.unlock()
	if e.closed {
		return emulator.ErrClosed
	}
	if e.running {
		return emulator.ErrRunning
	}
	e.nvErr = nil
	rc := C.TPMLIB_MainInit()
	if rc != C.TPM_SUCCESS {
		// MainInit locks the version choice even when it fails; Terminate unlocks it.
		C.TPMLIB_Terminate()
		_ = e.chooseLocked()
		err := error(tpmwire.Result(rc))
		if e.nvErr != nil {
			err = fmt.Errorf("%w (%w)", tpmwire.Result(rc), e.nvErr)
		}
		return fmt.Errorf("start tpm: %w", err)
	}
	e.running = true
	C.vtpmd_set_last_cc(0)
	return nil
}

// Stop powers the TPM off (TPMLIB_Terminate). Stopping a stopped TPM is a no-op.
func (e *Engine) Stop() {
	e.lock()
	defer e.unlock()
	if !e.running {
		return
	}
	C.TPMLIB_Terminate()
	e.running = false
	_ = e.chooseLocked()
}

// LastOrdinal is the command code of the last command processed since Start (0 if none).
func (e *Engine) LastOrdinal() uint32 {
	e.lock()
	defer e.unlock()
	return uint32(C.vtpmd_last_cc())
}

// ErrStore is wrapped by Process when libtpms could not store its state: the response must not
// reach the guest as if the write had happened.
var ErrStore = errors.New("emulator: state store failed")

// Process runs one TPM command and returns the response. TPM-level failures are in the
// response; an error means the command could not be run at all.
func (e *Engine) Process(cmd []byte) ([]byte, error) {
	e.lockData()
	defer e.unlock()
	if err := e.processLocked(cmd); err != nil {
		return nil, err
	}
	return C.GoBytes(unsafe.Pointer(e.respBuf), C.int(e.respLen)), nil
}

// ProcessAppend is Process with the response appended to dst: a caller that reuses its buffer
// across commands (the data channel) allocates nothing per command, so a busy vTPM makes no
// garbage and its heap does not grow.
func (e *Engine) ProcessAppend(dst, cmd []byte) ([]byte, error) {
	return e.processAppend(dst, cmd, false, 0)
}

// Epoch counts the Engine's control calls (every call but Process and ProcessAppend*). A
// caller that checked, at epoch, everything a data command needs before it reaches libtpms
// arms the engine with it (ProcessAppendArmed, ArmIf): a control call since then (a state
// export, a stop) leaves it disarmed.
func (e *Engine) Epoch() uint64 {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.epoch
}

// ProcessAppendArmed is ProcessAppend for a caller that checked, at epoch, everything a data
// command needs before it reaches libtpms: when it succeeds and no control call came since
// epoch, a native data thread (ServeData) may run the following commands itself, until the
// next control call.
func (e *Engine) ProcessAppendArmed(dst, cmd []byte, epoch uint64) ([]byte, error) {
	return e.processAppend(dst, cmd, true, epoch)
}

// ArmIf arms the engine (as ProcessAppendArmed does) when no control call came since epoch.
func (e *Engine) ArmIf(epoch uint64) {
	e.lockData()
	e.unlockArm(e.epoch == epoch)
}

func (e *Engine) processAppend(dst, cmd []byte, arm bool, epoch uint64) (out []byte, err error) {
	e.lockData()
	defer func() { e.unlockArm(arm && err == nil && e.epoch == epoch) }()
	if err := e.processLocked(cmd); err != nil {
		return dst, err
	}
	return append(dst, unsafe.Slice((*byte)(unsafe.Pointer(e.respBuf)), int(e.respLen))...), nil
}

// processLocked runs cmd; the response is e.respBuf[:e.respLen].
func (e *Engine) processLocked(cmd []byte) error {
	if !e.running {
		return emulator.ErrNotRunning
	}
	// libtpms decrypts parameters in place, so it always gets a C copy.
	in := e.cmdBuf
	if len(cmd) > cmdBufSize {
		in = C.malloc(C.size_t(len(cmd)))
		defer C.free(in)
	}
	if len(cmd) > 0 {
		C.memcpy(in, unsafe.Pointer(&cmd[0]), C.size_t(len(cmd)))
	}
	if len(cmd) >= 10 {
		C.vtpmd_set_last_cc(C.uint32_t(uint32(cmd[6])<<24 | uint32(cmd[7])<<16 | uint32(cmd[8])<<8 | uint32(cmd[9])))
	}
	e.nvErr = nil
	e.respLen = 0
	rc := C.TPMLIB_Process(&e.respBuf, &e.respLen, &e.respCap, (*C.uchar)(in), C.uint32_t(len(cmd)))
	if rc != C.TPM_SUCCESS {
		return fmt.Errorf("process command: %w", tpmwire.Result(rc))
	}
	if e.nvErr != nil {
		return fmt.Errorf("%w: %w", ErrStore, e.nvErr)
	}
	return nil
}

// Cancel asks libtpms to abort the command that Process is running. It does not wait.
func (e *Engine) Cancel() { C.TPMLIB_CancelCommand() }

// SetLocality sets the locality subsequent commands run at. It is process-global and survives
// Stop/Start, as QEMU expects.
func SetLocality(loc uint8) { C.vtpmd_set_locality(C.uint32_t(loc)) }

// Locality returns the current locality.
func Locality() uint8 { return uint8(C.vtpmd_locality()) }

// Established reads the TPM-established flag.
func (e *Engine) Established() (bool, error) {
	e.lock()
	defer e.unlock()
	if !e.running {
		return false, emulator.ErrNotRunning
	}
	var b C.TPM_BOOL
	if rc := C.TPM_IO_TpmEstablished_Get(&b); rc != C.TPM_SUCCESS {
		return false, tpmwire.Result(rc)
	}
	return b != 0, nil
}

// ResetEstablished resets the TPM-established flag as if requested from locality loc
// (libtpms allows it only from locality 3 or 4).
func (e *Engine) ResetEstablished(loc uint8) error {
	e.lock()
	defer e.unlock()
	if !e.running {
		return emulator.ErrNotRunning
	}
	prev := C.vtpmd_locality()
	C.vtpmd_set_locality(C.uint32_t(loc))
	defer C.vtpmd_set_locality(prev)
	if rc := C.TPM_IO_TpmEstablished_Reset(); rc != C.TPM_SUCCESS {
		return tpmwire.Result(rc)
	}
	return nil
}

// HashStart begins a _TPM_Hash_Start/Data/End (DRTM) sequence.
func (e *Engine) HashStart() error {
	return e.call(func() C.TPM_RESULT { return C.TPM_IO_Hash_Start() })
}

// HashData feeds data into the DRTM hash sequence.
func (e *Engine) HashData(data []byte) error {
	if len(data) == 0 {
		return e.call(func() C.TPM_RESULT { return C.TPM_IO_Hash_Data(nil, 0) })
	}
	p := C.CBytes(data)
	defer C.free(p)
	return e.call(func() C.TPM_RESULT { return C.TPM_IO_Hash_Data((*C.uchar)(p), C.uint32_t(len(data))) })
}

// HashEnd completes the DRTM hash sequence.
func (e *Engine) HashEnd() error {
	return e.call(func() C.TPM_RESULT { return C.TPM_IO_Hash_End() })
}

func (e *Engine) call(f func() C.TPM_RESULT) error {
	e.lock()
	defer e.unlock()
	if !e.running {
		return emulator.ErrNotRunning
	}
	if rc := f(); rc != C.TPM_SUCCESS {
		return tpmwire.Result(rc)
	}
	return nil
}

// VolatileState serializes the running TPM's volatile state (TPMLIB_VolatileAll_Store).
func (e *Engine) VolatileState() ([]byte, error) {
	e.lock()
	defer e.unlock()
	if !e.running {
		return nil, emulator.ErrNotRunning
	}
	var buf *C.uchar
	var n C.uint32_t
	if rc := C.TPMLIB_VolatileAll_Store(&buf, &n); rc != C.TPM_SUCCESS {
		return nil, fmt.Errorf("store volatile state: %w", tpmwire.Result(rc))
	}
	defer C.free(unsafe.Pointer(buf))
	return C.GoBytes(unsafe.Pointer(buf), C.int(n)), nil
}

func cState(t emulator.StateType) (C.enum_TPMLIB_StateType, error) {
	switch t {
	case emulator.StatePermanent:
		return C.TPMLIB_STATE_PERMANENT, nil
	case emulator.StateVolatile:
		return C.TPMLIB_STATE_VOLATILE, nil
	case emulator.StateSave:
		return C.TPMLIB_STATE_SAVE_STATE, nil
	}
	return 0, fmt.Errorf("state type %d: %w", int(t), tpmwire.ResBadType)
}

// GetState returns a state blob: live when running, else the blob set with SetState or the
// one in the emulator.Store. An empty blob with no error means "none" (e.g. TPM 2 savestate).
func (e *Engine) GetState(t emulator.StateType) ([]byte, error) {
	st, err := cState(t)
	if err != nil {
		return nil, err
	}
	e.lock()
	defer e.unlock()
	var buf *C.uchar
	var n C.uint32_t
	if rc := C.TPMLIB_GetState(st, &buf, &n); rc != C.TPM_SUCCESS {
		return nil, fmt.Errorf("get %s state: %w", t.Name(), tpmwire.Result(rc))
	}
	if buf == nil {
		return nil, nil
	}
	defer C.free(unsafe.Pointer(buf))
	return C.GoBytes(unsafe.Pointer(buf), C.int(n)), nil
}

// SetState hands libtpms a state blob for the next Start (the TPM must be stopped). A nil
// blob clears a previously set one. libtpms validates the blob first.
func (e *Engine) SetState(t emulator.StateType, blob []byte) error {
	st, err := cState(t)
	if err != nil {
		return err
	}
	e.lock()
	defer e.unlock()
	if e.running {
		return emulator.ErrRunning
	}
	var p unsafe.Pointer
	if len(blob) > 0 {
		p = C.CBytes(blob)
		defer C.free(p)
	}
	if rc := C.TPMLIB_SetState(st, (*C.uchar)(p), C.uint32_t(len(blob))); rc != C.TPM_SUCCESS {
		return fmt.Errorf("set %s state: %w", t.Name(), tpmwire.Result(rc))
	}
	return nil
}

// SetBufferSize sets the TPM's I/O buffer size (0 queries) and returns the size in use and
// the bounds it was clamped to. Setting requires a stopped TPM.
func (e *Engine) SetBufferSize(wanted uint32) (size, min, max uint32, err error) {
	e.lock()
	defer e.unlock()
	if wanted != 0 && e.running {
		return 0, 0, 0, emulator.ErrRunning
	}
	var mn, mx C.uint32_t
	sz := C.TPMLIB_SetBufferSize(C.uint32_t(wanted), &mn, &mx)
	return uint32(sz), uint32(mn), uint32(mx), nil
}

// Info returns libtpms' JSON description for the TPMLIB_INFO_* flags.
func (e *Engine) Info(flags uint32) string {
	e.lock()
	defer e.unlock()
	s := C.TPMLIB_GetInfo(C.enum_TPMLIB_InfoFlags(flags))
	if s == nil {
		return ""
	}
	defer C.free(unsafe.Pointer(s))
	return C.GoString(s)
}

// SetDebug sends libtpms' own debug output to fd at level (libtpms writes only above 1), as
// swtpm hands its --log level and file to libtpms. It applies to the whole process.
func SetDebug(fd int, level uint) {
	C.TPMLIB_SetDebugFD(C.int(fd))
	C.TPMLIB_SetDebugLevel(C.uint(level))
}

// LibraryVersion is libtpms' version as 0xMMmmuu.
func LibraryVersion() uint32 { return uint32(C.TPMLIB_GetVersion()) }

// callbacks run inside a libtpms call, under the engine lock (held by the goroutine that holds
// e.mu, or by a native data thread): they use current without locking and must not panic
// across the C frames.

//export goNvInit
func goNvInit() C.TPM_RESULT { return C.TPM_SUCCESS }

//export goNvLoad
func goNvLoad(data **C.uchar, length *C.uint32_t, _ C.uint32_t, name *C.char) (rc C.TPM_RESULT) {
	defer recoverCallback(&rc)
	e := current
	t, ok := emulator.StateTypeByName(C.GoString(name))
	if e == nil || !ok {
		return C.TPM_FAIL
	}
	b, err := e.store.Load(t)
	if errors.Is(err, emulator.ErrNotExist) || (err == nil && len(b) == 0) {
		return C.TPM_RETRY
	}
	if err != nil {
		e.log.Error("load tpm state", "blob", t.Name(), "err", err)
		if e.nvErr == nil {
			e.nvErr = err
		}
		return C.TPM_FAIL
	}
	*data = (*C.uchar)(C.CBytes(b))
	*length = C.uint32_t(len(b))
	return C.TPM_SUCCESS
}

//export goNvStore
func goNvStore(data *C.uchar, length C.uint32_t, _ C.uint32_t, name *C.char) (rc C.TPM_RESULT) {
	defer recoverCallback(&rc)
	e := current
	t, ok := emulator.StateTypeByName(C.GoString(name))
	if e == nil || !ok {
		return C.TPM_FAIL
	}
	if err := e.store.Store(t, C.GoBytes(unsafe.Pointer(data), C.int(length))); err != nil {
		e.log.Error("store tpm state", "blob", t.Name(), "err", err)
		if e.nvErr == nil {
			e.nvErr = err
		}
		return C.TPM_FAIL
	}
	return C.TPM_SUCCESS
}

//export goNvDelete
func goNvDelete(_ C.uint32_t, name *C.char, mustExist C.TPM_BOOL) (rc C.TPM_RESULT) {
	defer recoverCallback(&rc)
	e := current
	t, ok := emulator.StateTypeByName(C.GoString(name))
	if e == nil || !ok {
		return C.TPM_FAIL
	}
	if err := e.store.Delete(t, mustExist != 0); err != nil {
		e.log.Error("delete tpm state", "blob", t.Name(), "err", err)
		return C.TPM_FAIL
	}
	return C.TPM_SUCCESS
}

func recoverCallback(rc *C.TPM_RESULT) {
	if r := recover(); r != nil {
		if e := current; e != nil {
			e.log.Error("panic in libtpms callback", "panic", r)
		}
		*rc = C.TPM_FAIL
	}
}
