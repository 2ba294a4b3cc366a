//go:build linux && (amd64 || arm64)

package seccomp

import (
	"encoding/binary"
	"errors"
	"slices"
	"testing"

	"golang.org/x/sys/unix"
)

// run interprets the classic BPF program as the kernel would for one system call.
func run(t *testing.T, p []unix.SockFilter, arch uint32, nr int32, arg0 uint64) uint32 {
	t.Helper()
	var data [64]byte
	le := binary.LittleEndian
	le.PutUint32(data[offNr:], uint32(nr))
	le.PutUint32(data[offArch:], arch)
	le.PutUint64(data[offArg0:], arg0)
	var acc uint32
	for pc := 0; pc < len(p); pc++ {
		in := p[pc]
		switch in.Code {
		case unix.BPF_LD | unix.BPF_W | unix.BPF_ABS:
			if int(in.K)+4 > len(data) {
				t.Fatalf("pc %d: load at %d out of seccomp_data", pc, in.K)
			}
			acc = le.Uint32(data[in.K:])
		case unix.BPF_JMP | unix.BPF_JEQ | unix.BPF_K:
			pc += jump(acc == in.K, in)
		case unix.BPF_JMP | unix.BPF_JGE | unix.BPF_K:
			pc += jump(acc >= in.K, in)
		case unix.BPF_JMP | unix.BPF_JSET | unix.BPF_K:
			pc += jump(acc&in.K != 0, in)
		case unix.BPF_RET | unix.BPF_K:
			return in.K
		default:
			t.Fatalf("pc %d: unexpected instruction %#x", pc, in.Code)
		}
	}
	t.Fatal("program ran off its end")
	return 0
}

func jump(cond bool, in unix.SockFilter) int {
	if cond {
		return int(in.Jt)
	}
	return int(in.Jf)
}

func TestProgram(t *testing.T) {
	const enosys = unix.SECCOMP_RET_ERRNO | uint32(unix.ENOSYS)
	for _, a := range []Action{Kill, Log} {
		p, err := Program(a)
		if err != nil {
			t.Fatal(err)
		}
		deny := map[Action]uint32{Kill: unix.SECCOMP_RET_KILL_PROCESS, Log: unix.SECCOMP_RET_LOG}[a]
		for _, nr := range Denied() {
			if got := run(t, p, auditArch, int32(nr), 0); got != deny {
				t.Errorf("%s: syscall %d: %#x, want %#x", a, nr, got, deny)
			}
		}
		cases := []struct {
			name string
			arch uint32
			nr   int32
			arg0 uint64
			want uint32
		}{
			{"foreign architecture", auditArch ^ 1, unix.SYS_READ, 0, unix.SECCOMP_RET_KILL_PROCESS},
			{"read", auditArch, unix.SYS_READ, 0, unix.SECCOMP_RET_ALLOW},
			{"write", auditArch, unix.SYS_WRITE, 0, unix.SECCOMP_RET_ALLOW},
			{"futex", auditArch, unix.SYS_FUTEX, 0, unix.SECCOMP_RET_ALLOW},
			{"mmap", auditArch, unix.SYS_MMAP, 0, unix.SECCOMP_RET_ALLOW},
			{"tgkill", auditArch, unix.SYS_TGKILL, 0, unix.SECCOMP_RET_ALLOW},
			{"sigaltstack", auditArch, unix.SYS_SIGALTSTACK, 0, unix.SECCOMP_RET_ALLOW},
			{"eventfd2", auditArch, unix.SYS_EVENTFD2, 0, unix.SECCOMP_RET_ALLOW},
			{"openat", auditArch, unix.SYS_OPENAT, 0, unix.SECCOMP_RET_ALLOW},
			{"renameat2", auditArch, unix.SYS_RENAMEAT2, 0, unix.SECCOMP_RET_ALLOW},
			{"accept4", auditArch, unix.SYS_ACCEPT4, 0, unix.SECCOMP_RET_ALLOW},
			{"thread", auditArch, unix.SYS_CLONE, unix.CLONE_VM | unix.CLONE_THREAD | unix.CLONE_SIGHAND, unix.SECCOMP_RET_ALLOW},
			{"fork", auditArch, unix.SYS_CLONE, uint64(unix.SIGCHLD), deny},
			{"vfork-like clone", auditArch, unix.SYS_CLONE, unix.CLONE_VM | unix.CLONE_VFORK, deny},
			{"clone3", auditArch, unix.SYS_CLONE3, 0, enosys},
			{"prctl PR_SET_VMA", auditArch, unix.SYS_PRCTL, prSetVMA, unix.SECCOMP_RET_ALLOW},
			{"prctl PR_SET_NAME", auditArch, unix.SYS_PRCTL, unix.PR_SET_NAME, deny},
			{"prctl PR_SET_NO_NEW_PRIVS", auditArch, unix.SYS_PRCTL, unix.PR_SET_NO_NEW_PRIVS, deny},
		}
		if checkX32 {
			cases = append(cases, struct {
				name string
				arch uint32
				nr   int32
				arg0 uint64
				want uint32
			}{"x32 read", auditArch, x32Bit | unix.SYS_READ, 0, unix.SECCOMP_RET_KILL_PROCESS})
		}
		for _, c := range cases {
			if got := run(t, p, c.arch, c.nr, c.arg0); got != c.want {
				t.Errorf("%s: %s: %#x, want %#x", a, c.name, got, c.want)
			}
		}
	}
	if _, err := Program(None); !errors.Is(err, ErrAction) {
		t.Fatalf("Program(None): %v", err)
	}
}

// TestDeniedList: swtpm's list is there, and nothing the Go runtime needs is.
func TestDeniedList(t *testing.T) {
	d := Denied()
	for _, nr := range []uintptr{unix.SYS_EXECVE, unix.SYS_EXECVEAT, unix.SYS_MOUNT, unix.SYS_PTRACE, unix.SYS_REBOOT,
		unix.SYS_INIT_MODULE, unix.SYS_FINIT_MODULE, unix.SYS_DELETE_MODULE, unix.SYS_KEXEC_LOAD, unix.SYS_UNSHARE,
		unix.SYS_SETNS, unix.SYS_SETUID, unix.SYS_SETGROUPS, unix.SYS_CHROOT, unix.SYS_PIVOT_ROOT, unix.SYS_BPF} {
		if !slices.Contains(d, nr) {
			t.Errorf("syscall %d is not denied", nr)
		}
	}
	for _, nr := range []uintptr{unix.SYS_CLONE, unix.SYS_CLONE3, unix.SYS_PRCTL, unix.SYS_TGKILL, unix.SYS_SIGALTSTACK,
		unix.SYS_EVENTFD2, unix.SYS_FUTEX, unix.SYS_MMAP, unix.SYS_MUNMAP, unix.SYS_MADVISE, unix.SYS_RT_SIGACTION,
		unix.SYS_RT_SIGPROCMASK, unix.SYS_EPOLL_PWAIT, unix.SYS_EXIT_GROUP, unix.SYS_GETRANDOM, unix.SYS_FSYNC} {
		if slices.Contains(d, nr) {
			t.Errorf("syscall %d, which the Go runtime or vtpmd needs, is denied outright", nr)
		}
	}
	seen := map[uintptr]bool{}
	for _, nr := range d {
		if seen[nr] {
			t.Errorf("syscall %d listed twice", nr)
		}
		seen[nr] = true
	}
}

func TestParseAction(t *testing.T) {
	for s, want := range map[string]Action{"": Kill, "kill": Kill, "log": Log, "none": None} {
		if a, err := ParseAction(s); err != nil || a != want {
			t.Errorf("ParseAction(%q) = %v, %v", s, a, err)
		}
	}
	for _, s := range []string{"foo", "KILL", "trap", "errno"} {
		if _, err := ParseAction(s); !errors.Is(err, ErrAction) {
			t.Errorf("ParseAction(%q): %v", s, err)
		}
	}
}
