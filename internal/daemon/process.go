package daemon

import (
	"fmt"
	"os"
	"os/user"
	"strconv"
	"syscall"

	"golang.org/x/sys/unix"
)

// Chroot changes the root directory to dir and the working directory to the new root
// (--chroot).
func Chroot(dir string) error {
	if err := syscall.Chroot(dir); err != nil {
		return fmt.Errorf("chroot %s: %w", dir, err)
	}
	if err := os.Chdir("/"); err != nil {
		return fmt.Errorf("chdir / in chroot: %w", err)
	}
	return nil
}

// RunAs drops to the user (a name, or a numeric uid) with its primary and supplementary
// groups (--runas).
func RunAs(name string) error {
	u, err := user.Lookup(name)
	if err != nil {
		if _, nerr := strconv.Atoi(name); nerr == nil {
			u, err = user.LookupId(name)
		}
		if err != nil {
			return fmt.Errorf("user '%s' does not exist", name)
		}
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	groups, _ := u.GroupIds()
	var gids []int
	for _, g := range groups {
		if n, err := strconv.Atoi(g); err == nil {
			gids = append(gids, n)
		}
	}
	if err := syscall.Setgroups(gids); err != nil {
		return fmt.Errorf("runas %s: setgroups: %w", name, err)
	}
	if err := syscall.Setgid(gid); err != nil {
		return fmt.Errorf("runas %s: setgid: %w", name, err)
	}
	if err := syscall.Setuid(uid); err != nil {
		return fmt.Errorf("runas %s: setuid: %w", name, err)
	}
	return nil
}

// PidFile is where --pid writes the process id: a path, or an inherited fd of a regular file
// (FD -1: none). The zero value with FD -1 writes nothing.
type PidFile struct {
	Path string
	FD   int
}

// Write writes the pid as swtpm does (decimal, no newline). The returned function removes a
// pid file created by path; call it at exit.
func (p PidFile) Write() (remove func(), err error) {
	nop := func() {}
	pid := []byte(strconv.Itoa(os.Getpid()))
	if p.Path != "" {
		f, err := os.OpenFile(p.Path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC|syscall.O_NOFOLLOW, 0o644)
		if err != nil {
			return nop, fmt.Errorf("could not open pidfile %s: %w", p.Path, err)
		}
		defer f.Close()
		if _, err := f.Write(pid); err != nil {
			return nop, fmt.Errorf("write pidfile %s: %w", p.Path, err)
		}
		return func() { os.Remove(p.Path) }, nil
	}
	if p.FD < 0 {
		return nop, nil
	}
	var st unix.Stat_t
	if err := unix.Fstat(p.FD, &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFREG {
		return nop, fmt.Errorf("--pid fd=%d: not a regular file", p.FD)
	}
	f := os.NewFile(uintptr(p.FD), "pidfile")
	defer f.Close()
	if err := f.Truncate(0); err == nil {
		if _, err := f.WriteAt(pid, 0); err != nil {
			return nop, fmt.Errorf("write pid fd: %w", err)
		}
	}
	return nop, nil
}
