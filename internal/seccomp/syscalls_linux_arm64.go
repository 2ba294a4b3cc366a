package seccomp

import "golang.org/x/sys/unix"

const (
	auditArch = unix.AUDIT_ARCH_AARCH64
	checkX32  = false
)

// denied is the arm64 counterpart of the x86_64 list (syscalls_linux_amd64.go): the same calls
// where arm64 has them (it lacks fork, vfork, mknod, inotify_init, signalfd, eventfd, iopl,
// sysctl and the removed ones).
var denied = []uintptr{
	// high concern
	unix.SYS_CAPSET, unix.SYS_PIVOT_ROOT, unix.SYS_CHROOT, unix.SYS_SETTIMEOFDAY, unix.SYS_CLOCK_ADJTIME,
	unix.SYS_CLOCK_SETTIME, unix.SYS_ADJTIMEX, unix.SYS_MOUNT, unix.SYS_UMOUNT2, unix.SYS_FSMOUNT,
	unix.SYS_MOVE_MOUNT, unix.SYS_FSOPEN, unix.SYS_FSCONFIG, unix.SYS_FSPICK, unix.SYS_OPEN_TREE,
	unix.SYS_MOUNT_SETATTR, unix.SYS_SWAPON, unix.SYS_SWAPOFF, unix.SYS_REBOOT, unix.SYS_KEXEC_LOAD,
	unix.SYS_UNSHARE, unix.SYS_SETNS, unix.SYS_KCMP, unix.SYS_INIT_MODULE, unix.SYS_FINIT_MODULE,
	unix.SYS_DELETE_MODULE, unix.SYS_SECCOMP, unix.SYS_KEXEC_FILE_LOAD,
	// semaphores and message queues
	unix.SYS_SEMGET, unix.SYS_SEMOP, unix.SYS_SEMTIMEDOP, unix.SYS_SHMGET, unix.SYS_SHMAT, unix.SYS_SHMCTL,
	unix.SYS_SHMDT, unix.SYS_MSGGET, unix.SYS_MSGSND, unix.SYS_MSGRCV, unix.SYS_MSGCTL, unix.SYS_MQ_OPEN,
	unix.SYS_MQ_UNLINK, unix.SYS_MQ_TIMEDSEND, unix.SYS_MQ_TIMEDRECEIVE, unix.SYS_MQ_NOTIFY,
	unix.SYS_MQ_GETSETATTR,
	// misc
	unix.SYS_PTRACE, unix.SYS_PROCESS_VM_READV, unix.SYS_PROCESS_VM_WRITEV, unix.SYS_SYSLOG, unix.SYS_CAPGET,
	unix.SYS_PERSONALITY, unix.SYS_GETPRIORITY, unix.SYS_SETPRIORITY, unix.SYS_SCHED_SETPARAM,
	unix.SYS_SCHED_SETSCHEDULER, unix.SYS_SCHED_SETAFFINITY, unix.SYS_SCHED_SETATTR, unix.SYS_VHANGUP,
	unix.SYS_SETHOSTNAME, unix.SYS_SETDOMAINNAME, unix.SYS_QUOTACTL, unix.SYS_READAHEAD,
	unix.SYS_LOOKUP_DCOOKIE, unix.SYS_ADD_KEY, unix.SYS_REQUEST_KEY, unix.SYS_KEYCTL,
	unix.SYS_INOTIFY_INIT1, unix.SYS_INOTIFY_ADD_WATCH, unix.SYS_INOTIFY_RM_WATCH, unix.SYS_SPLICE,
	unix.SYS_TEE, unix.SYS_VMSPLICE, unix.SYS_TIMERFD_SETTIME, unix.SYS_TIMERFD_GETTIME, unix.SYS_SIGNALFD4,
	unix.SYS_FANOTIFY_INIT, unix.SYS_FANOTIFY_MARK, unix.SYS_MKNODAT, unix.SYS_ACCT, unix.SYS_PRLIMIT64,
	unix.SYS_SETRLIMIT, unix.SYS_BPF, unix.SYS_USERFAULTFD, unix.SYS_PERF_EVENT_OPEN,
	// extended attributes, by path (swtpm denies the descriptor calls too; vtpmd needs
	// flistxattr, fgetxattr and fsetxattr: replacing a file:// state keeps its security
	// labels and ACLs, internal/atomicfile's KeepAll)
	unix.SYS_SETXATTR, unix.SYS_LSETXATTR, unix.SYS_GETXATTR, unix.SYS_LGETXATTR,
	unix.SYS_LISTXATTR, unix.SYS_LLISTXATTR, unix.SYS_REMOVEXATTR,
	unix.SYS_LREMOVEXATTR, unix.SYS_FREMOVEXATTR,
	// processes
	unix.SYS_EXECVE, unix.SYS_EXECVEAT,
	// I/O
	unix.SYS_IO_SETUP, unix.SYS_IO_DESTROY, unix.SYS_IO_GETEVENTS, unix.SYS_IO_SUBMIT, unix.SYS_IO_CANCEL,
	unix.SYS_IOPRIO_SET, unix.SYS_IOPRIO_GET, unix.SYS_IO_URING_SETUP, unix.SYS_IO_URING_ENTER,
	unix.SYS_IO_URING_REGISTER,
	// not implemented
	unix.SYS_NFSSERVCTL,
	// privileged
	unix.SYS_SETUID, unix.SYS_SETGID, unix.SYS_SETPGID, unix.SYS_SETSID, unix.SYS_SETREUID,
	unix.SYS_SETREGID, unix.SYS_SETGROUPS, unix.SYS_SETRESUID, unix.SYS_SETRESGID, unix.SYS_SETFSUID,
	unix.SYS_SETFSGID,
}
