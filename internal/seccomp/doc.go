// Package seccomp confines a vTPM process the way swtpm's --seccomp does: once every file and
// socket the process needs is open, a seccomp filter denies the system calls a TPM never needs
// (exec, mount, ptrace, module loading, reboot, namespaces, privilege changes, System V IPC,
// ...), with swtpm's actions: kill the process (the default), only log the call, or install
// nothing.
//
// The filter is a classic BPF program checked against the architecture it was built for. It is
// installed with PR_SET_NO_NEW_PRIVS and SECCOMP_FILTER_FLAG_TSYNC, so every thread of the Go
// runtime gets it at once. swtpm's deny-list is kept except for the calls the Go runtime itself
// makes after start-up: tgkill (preemption signals), sigaltstack (every new thread), eventfd2
// (the netpoller), clone for new threads (a clone without CLONE_THREAD, i.e. a fork, is still
// denied), prctl(PR_SET_VMA) (naming heap mappings); clone3 fails with ENOSYS so that glibc's
// pthread_create (cgo threads) falls back to clone.
package seccomp
