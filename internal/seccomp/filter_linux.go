//go:build linux && (amd64 || arm64)

package seccomp

import (
	"fmt"
	"runtime"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Offsets in struct seccomp_data: nr (int), arch (u32), instruction_pointer (u64), args[6]
// (u64, little-endian on the supported architectures: the low word comes first).
const (
	offNr    = 0
	offArch  = 4
	offArg0  = 16
	x32Bit   = 0x40000000 // __X32_SYSCALL_BIT
	prSetVMA = 0x53564d41 // PR_SET_VMA (Go names its heap mappings with it)
)

// Supported reports whether Install can install a filter on this platform.
func Supported() bool { return true }

// Install confines the process with the deny-list and action a (None: nothing). Call it once,
// after every file and socket is open; it cannot be undone. Every thread gets the filter.
func Install(a Action) error {
	if a == None {
		return nil
	}
	prog, err := Program(a)
	if err != nil {
		return err
	}
	// no_new_privs is per thread; TSYNC copies it, with the filter, from this thread to all.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("seccomp: prctl(PR_SET_NO_NEW_PRIVS): %w", err)
	}
	fprog := unix.SockFprog{Len: uint16(len(prog)), Filter: &prog[0]}
	r, _, errno := unix.Syscall(unix.SYS_SECCOMP, unix.SECCOMP_SET_MODE_FILTER, unix.SECCOMP_FILTER_FLAG_TSYNC,
		uintptr(unsafe.Pointer(&fprog)))
	runtime.KeepAlive(prog)
	if errno != 0 {
		return fmt.Errorf("seccomp: install the %s filter: %w", a, errno)
	}
	if r != 0 {
		return fmt.Errorf("seccomp: thread %d could not be synchronized with the %s filter", r, a)
	}
	return nil
}

// Program is the classic BPF filter for action a: calls of a foreign architecture (and x32's)
// kill the process, denied calls get a's return value, everything else is allowed.
func Program(a Action) ([]unix.SockFilter, error) {
	var ret uint32
	switch a {
	case Kill:
		ret = unix.SECCOMP_RET_KILL_PROCESS
	case Log:
		ret = unix.SECCOMP_RET_LOG
	default:
		return nil, fmt.Errorf("%w: no filter for action %s", ErrAction, a)
	}
	var p prog
	p.load(offArch)
	p.add(unix.BPF_JMP|unix.BPF_JEQ|unix.BPF_K, auditArch, 1, 0)
	p.ret(unix.SECCOMP_RET_KILL_PROCESS)
	p.load(offNr)
	if checkX32 {
		p.add(unix.BPF_JMP|unix.BPF_JGE|unix.BPF_K, x32Bit, 0, 1)
		p.ret(unix.SECCOMP_RET_KILL_PROCESS)
	}
	// clone3 cannot be inspected (its flags are behind a pointer): ENOSYS sends glibc's
	// pthread_create back to clone, whose flags can.
	p.jumpUnless(unix.SYS_CLONE3, 1)
	p.ret(unix.SECCOMP_RET_ERRNO | uint32(unix.ENOSYS))
	// clone: a new thread (CLONE_THREAD) is allowed, a new process is not.
	p.jumpUnless(unix.SYS_CLONE, 4)
	p.load(offArg0)
	p.add(unix.BPF_JMP|unix.BPF_JSET|unix.BPF_K, unix.CLONE_THREAD, 0, 1)
	p.ret(unix.SECCOMP_RET_ALLOW)
	p.ret(ret)
	// prctl: only PR_SET_VMA (the Go runtime's); PR_SET_NO_NEW_PRIVS is set before the filter.
	p.jumpUnless(unix.SYS_PRCTL, 4)
	p.load(offArg0)
	p.add(unix.BPF_JMP|unix.BPF_JEQ|unix.BPF_K, prSetVMA, 0, 1)
	p.ret(unix.SECCOMP_RET_ALLOW)
	p.ret(ret)
	for _, nr := range denied {
		p.jumpUnless(uint32(nr), 1)
		p.ret(ret)
	}
	p.ret(unix.SECCOMP_RET_ALLOW)
	if len(p) > unix.BPF_MAXINSNS {
		return nil, fmt.Errorf("seccomp: filter of %d instructions exceeds %d", len(p), unix.BPF_MAXINSNS)
	}
	return p, nil
}

// Denied lists the system calls the filter denies outright (clone and prctl are denied
// depending on their first argument, clone3 fails with ENOSYS).
func Denied() []uintptr { return append([]uintptr(nil), denied...) }

// prog builds a BPF program whose jumps only ever skip forward over a few instructions.
type prog []unix.SockFilter

func (p *prog) add(code uint16, k uint32, jt, jf uint8) {
	*p = append(*p, unix.SockFilter{Code: code, Jt: jt, Jf: jf, K: k})
}

// load loads the 32-bit word at off of struct seccomp_data.
func (p *prog) load(off uint32) { p.add(unix.BPF_LD|unix.BPF_W|unix.BPF_ABS, off, 0, 0) }

// jumpUnless falls through when the accumulator equals k and skips n instructions otherwise.
func (p *prog) jumpUnless(k uint32, n uint8) { p.add(unix.BPF_JMP|unix.BPF_JEQ|unix.BPF_K, k, 0, n) }

func (p *prog) ret(k uint32) { p.add(unix.BPF_RET|unix.BPF_K, k, 0, 0) }
