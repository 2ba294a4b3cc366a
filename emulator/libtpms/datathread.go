package libtpms

/*
#include <stdint.h>
#include <stdlib.h>
#include <libtpms/tpm_library.h>
#include <libtpms/tpm_error.h>
#include "glue.h"
*/
import "C"

import (
	"errors"
	"fmt"
	"runtime/cgo"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/vtpmd/vtpmd/internal/tpmwire"
)

// DataHandler answers a data-channel message the native thread does not run itself: it
// returns the bytes to send back (nil: nothing) and whether the connection goes on. It runs on
// the data thread, one message at a time.
type DataHandler func(msg []byte) (resp []byte, more bool)

// DataConn is a data connection served by a native thread (ServeData).
type DataConn struct {
	e      *Engine
	handle cgo.Handle
	slow   DataHandler
	done   chan struct{}

	fd     int        // the thread's descriptor; closed by goDataDone, its last callback
	mu     sync.Mutex // orders Shutdown against that close
	closed bool       // guarded by mu
}

// ErrNotSocket is returned by ServeData for a descriptor that is not a stream socket.
var ErrNotSocket = errors.New("libtpms: data descriptor is not a stream socket")

// ServeData serves a connected stream socket on a thread of its own, outside the Go scheduler,
// as swtpm's main loop does: per command one read, libtpms, one send, and no other thread
// woken. The thread runs a TPM 2 command in libtpms itself only while the engine is armed
// (ProcessAppendArmed succeeded and no other Engine call came since); every other message
// goes to slow, which answers it as the Go data path would and re-arms the engine through
// ProcessAppendArmed. A failed libtpms call or state store disarms it and is answered with
// TPM_RC_FAILURE. bufSize is the largest message read at once. ServeData takes fd (it is
// closed when the thread ends, see Done); fd is made blocking. Commands whose code is in toGo
// always go to slow (a guard's commands).
func (e *Engine) ServeData(fd int, bufSize int, toGo []uint32, slow DataHandler) (*DataConn, error) {
	typ, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE)
	if err != nil || typ != unix.SOCK_STREAM {
		return nil, ErrNotSocket
	}
	flags, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
	if err != nil {
		return nil, fmt.Errorf("data descriptor: %w", err)
	}
	if err := unix.SetNonblock(fd, false); err != nil {
		return nil, fmt.Errorf("data descriptor: %w", err)
	}
	d := &DataConn{e: e, slow: slow, fd: fd, done: make(chan struct{})}
	d.handle = cgo.NewHandle(d)
	var codes *C.uint32_t
	if len(toGo) > 0 {
		codes = (*C.uint32_t)(unsafe.Pointer(&toGo[0]))
	}
	if rc := C.vtpmd_start_data_thread(C.int(fd), C.uintptr_t(d.handle), C.size_t(bufSize), codes, C.size_t(len(toGo))); rc != 0 {
		d.handle.Delete()
		_, _ = unix.FcntlInt(uintptr(fd), unix.F_SETFL, flags) // shared with the caller's descriptor
		return nil, fmt.Errorf("start data thread: %w", unix.Errno(rc))
	}
	return d, nil
}

// Done is closed when the thread has ended: the peer closed the connection, it broke, a
// handler said so, or Shutdown was called.
func (d *DataConn) Done() <-chan struct{} { return d.done }

// Shutdown ends the connection; the thread ends at its next read. Wait on Done.
func (d *DataConn) Shutdown() {
	d.mu.Lock()
	defer d.mu.Unlock()
	if !d.closed {
		_ = unix.Shutdown(d.fd, unix.SHUT_RDWR)
	}
}

func dataConnOf(h C.uintptr_t) *DataConn { return cgo.Handle(h).Value().(*DataConn) }

//export goDataMessage
func goDataMessage(h C.uintptr_t, msg *C.uchar, n C.uint32_t) (stop C.int) {
	d := dataConnOf(h)
	defer func() {
		if r := recover(); r != nil {
			d.e.log.Error("panic on the data channel", "panic", r)
			stop = 1
		}
	}()
	resp, more := d.slow(unsafe.Slice((*byte)(unsafe.Pointer(msg)), int(n)))
	// d.fd is closed only after this thread's last callback (goDataDone)
	if len(resp) > 0 {
		if rc := C.vtpmd_send_all(C.int(d.fd), (*C.uchar)(unsafe.Pointer(&resp[0])), C.size_t(len(resp))); rc != 0 {
			d.e.log.Warn("data reply", "err", unix.Errno(rc))
			return 1
		}
	}
	if !more {
		return 1
	}
	return 0
}

//export goDataError
func goDataError(h C.uintptr_t, rc C.TPM_RESULT) {
	d := dataConnOf(h)
	err := error(tpmwire.Result(rc))
	if rc == C.TPM_SUCCESS {
		err = ErrStore
		if nv := d.e.nvErr; nv != nil {
			err = fmt.Errorf("%w: %w", ErrStore, nv)
		}
	}
	d.e.log.Error("tpm command failed", "err", err)
}

//export goDataDone
func goDataDone(h C.uintptr_t) {
	d := dataConnOf(h)
	d.mu.Lock()
	_ = unix.Close(d.fd)
	d.closed = true
	d.mu.Unlock()
	d.handle.Delete()
	close(d.done)
}
