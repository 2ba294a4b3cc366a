package libvirt

import (
	"errors"
	"fmt"
	"os"
	"os/user"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// ErrStateOwner is wrapped when an external backend's state directory belongs to neither the
// hook's user nor the configured run_as user: the hook does not take files from one user to
// give them to another.
var ErrStateOwner = errors.New("state directory belongs to another user")

// account is the user an external backend's `vtpmd socket` runs as.
type account struct {
	name     string
	uid, gid int
	groups   []uint32 // supplementary groups, as libvirt gives its swtpm user
}

// lookupAccount resolves a user name (or a numeric uid) with its primary and supplementary
// groups.
func lookupAccount(name string) (*account, error) {
	u, err := user.Lookup(name)
	if err != nil {
		if _, nerr := strconv.Atoi(name); nerr == nil {
			u, err = user.LookupId(name)
		}
	}
	if err != nil {
		return nil, fmt.Errorf("run_as user %q: %w (create it, or name another user in the hook's run_as)", name, err)
	}
	uid, err := strconv.Atoi(u.Uid)
	if err != nil {
		return nil, fmt.Errorf("run_as user %q: uid %q", name, u.Uid)
	}
	gid, err := strconv.Atoi(u.Gid)
	if err != nil {
		return nil, fmt.Errorf("run_as user %q: gid %q", name, u.Gid)
	}
	a := &account{name: name, uid: uid, gid: gid}
	ids, err := u.GroupIds()
	if err != nil {
		return nil, fmt.Errorf("run_as user %q: groups: %w", name, err)
	}
	for _, g := range ids {
		if n, err := strconv.ParseUint(g, 10, 32); err == nil {
			a.groups = append(a.groups, uint32(n))
		}
	}
	return a, nil
}

// credential is what the vTPM process is started with; nil when it is the hook's own user
// and group (nothing to change, which needs no privilege).
func (a *account) credential() *syscall.Credential {
	if a.uid == os.Geteuid() && a.gid == os.Getegid() {
		return nil
	}
	return &syscall.Credential{Uid: uint32(a.uid), Gid: uint32(a.gid), Groups: a.groups}
}

// openDir opens dir itself, refusing a symlink or a non-directory in its place.
func openDir(dir string) (*os.File, *unix.Stat_t, error) {
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("open %s: %w", dir, err)
	}
	f := os.NewFile(uintptr(fd), dir)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		f.Close()
		return nil, nil, fmt.Errorf("stat %s: %w", dir, err)
	}
	return f, &st, nil
}

// shareVMDir makes the per-VM directory (<state_root>/<uuid>, the hook's: it holds the log)
// traversable by the run_as user and nobody else: mode 0710 with the user's primary group,
// 0700 when the vTPM runs as the hook's own user.
func shareVMDir(dir string, a *account) error {
	f, st, err := openDir(dir)
	if err != nil {
		return err
	}
	defer f.Close()
	fd := int(f.Fd())
	gid, mode := -1, uint32(0o700)
	if a.uid != int(st.Uid) {
		gid, mode = a.gid, 0o710
	}
	if gid >= 0 && int(st.Gid) != gid {
		if err := unix.Fchown(fd, -1, gid); err != nil {
			return fmt.Errorf("chgrp %s: %w", dir, err)
		}
	}
	if st.Mode&0o7777 != mode {
		if err := unix.Fchmod(fd, mode); err != nil {
			return fmt.Errorf("chmod %s: %w", dir, err)
		}
	}
	return nil
}

// adoptStateDir gives the state directory to the run_as user (mode 0700). A directory the
// hook's user owns (just created, or made by a hook that ran vTPMs as root) is handed over
// with the entries that user owns, not following symbolic links and not descending; one the
// run_as user owns is left as it is; a directory of a third user is refused (ErrStateOwner)
// unless the vTPM runs as root, which may use it as it is.
func adoptStateDir(dir string, a *account) error {
	f, st, err := openDir(dir)
	if err != nil {
		return err
	}
	defer f.Close()
	owner := int(st.Uid)
	switch {
	case owner == a.uid || a.uid == 0:
		return nil
	case owner != os.Geteuid():
		return fmt.Errorf("%w: %s belongs to uid %d, the vTPM runs as %s (uid %d): chown -R %d:%d %s if it is this VM's state",
			ErrStateOwner, dir, owner, a.name, a.uid, a.uid, a.gid, dir)
	}
	fd := int(f.Fd())
	names, err := f.Readdirnames(-1)
	if err != nil {
		return fmt.Errorf("read %s: %w", dir, err)
	}
	for _, n := range names {
		var est unix.Stat_t
		if err := unix.Fstatat(fd, n, &est, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			return fmt.Errorf("stat %s/%s: %w", dir, n, err)
		}
		if int(est.Uid) != owner {
			continue
		}
		if err := unix.Fchownat(fd, n, a.uid, a.gid, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			return fmt.Errorf("chown %s/%s: %w", dir, n, err)
		}
	}
	if err := unix.Fchown(fd, a.uid, a.gid); err != nil {
		return fmt.Errorf("chown %s: %w", dir, err)
	}
	if err := unix.Fchmod(fd, 0o700); err != nil {
		return fmt.Errorf("chmod %s: %w", dir, err)
	}
	return nil
}

// listenSocket creates the control socket at path, owned by uid:gid with mode 0600, and
// returns its listening descriptor for the vTPM to inherit. The socket's mode is set before
// bind, so the file never exists with a wider mode than 0600, and it is chowned before it
// listens.
func listenSocket(path string, uid, gid int) (*os.File, error) {
	if len(path) >= len(unix.RawSockaddrUnix{}.Path) {
		return nil, fmt.Errorf("%w: socket path %q is longer than a unix socket address allows", ErrBadPath, path)
	}
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("socket: %w", err)
	}
	f := os.NewFile(uintptr(fd), path)
	fail := func(what string, err error) (*os.File, error) {
		f.Close()
		return nil, fmt.Errorf("%s %s: %w", what, path, err)
	}
	// a unix socket file takes the socket's mode (less the umask) at bind
	if err := unix.Fchmod(fd, 0o600); err != nil {
		return fail("chmod", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrUnix{Name: path}); err != nil {
		return fail("bind", err)
	}
	if err := unix.Fchownat(unix.AT_FDCWD, path, uid, gid, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		_ = os.Remove(path)
		return fail("chown", err)
	}
	if err := unix.Listen(fd, unix.SOMAXCONN); err != nil {
		_ = os.Remove(path)
		return fail("listen", err)
	}
	return f, nil
}

// newPidFile is an anonymous file for `vtpmd socket --pid fd=N`: vtpmd writes its pid there
// once the TPM is ready to be served, which is when the hook may let QEMU start.
func newPidFile() (*os.File, error) {
	fd, err := unix.MemfdCreate("vtpmd-pid", unix.MFD_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("pid file: %w", err)
	}
	return os.NewFile(uintptr(fd), "vtpmd-pid"), nil
}

// pidWritten reports whether f holds pid (as swtpm and vtpmd write pid files).
func pidWritten(f *os.File) func(pid int) bool {
	return func(pid int) bool {
		buf := make([]byte, 32)
		n, _ := f.ReadAt(buf, 0)
		return strings.TrimSpace(string(buf[:n])) == strconv.Itoa(pid)
	}
}
