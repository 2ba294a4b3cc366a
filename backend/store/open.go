package store

import (
	"errors"
	"fmt"
	"io/fs"
	"os"

	"golang.org/x/sys/unix"

	"github.com/vtpmd/vtpmd/internal/atomicfile"
)

// ErrNotRegular is wrapped when a state file, the lock file or a file:// store is something
// other than a regular file (a block device for file://): a FIFO, a device, a socket, a
// directory, or, where swtpm does not follow them, a symbolic link. It is refused at once:
// nothing blocks on it.
var ErrNotRegular = errors.New("not a regular file")

// fileKind names the type of a file mode for error messages.
func fileKind(mode uint32) string {
	switch mode & unix.S_IFMT {
	case unix.S_IFIFO:
		return "a FIFO (named pipe)"
	case unix.S_IFCHR:
		return "a character device"
	case unix.S_IFBLK:
		return "a block device"
	case unix.S_IFSOCK:
		return "a socket"
	case unix.S_IFDIR:
		return "a directory"
	case unix.S_IFLNK:
		return "a symbolic link"
	}
	return fmt.Sprintf("of type %#o", mode&unix.S_IFMT)
}

// openFile opens a state file the way nothing can make it block or be redirected: O_NONBLOCK
// (opening a FIFO does not wait for its other end; reads and writes of regular files and
// block devices ignore the flag), O_NOFOLLOW when follow is false (swtpm follows symbolic
// links only where it reads a dir:// blob), O_CLOEXEC, and a type check on the descriptor
// opened: a regular file, or a block device when block is true. Anything else is refused with
// an error that wraps ErrNotRegular and says what the file is. A missing file gives an error
// wrapping fs.ErrNotExist. The caller closes fd.
func openFile(path string, flags int, perm uint32, follow, block bool) (fd int, st unix.Stat_t, err error) {
	flags |= unix.O_NONBLOCK | unix.O_CLOEXEC
	if !follow {
		flags |= unix.O_NOFOLLOW
	}
	for {
		fd, err = unix.Open(path, flags, perm)
		if !errors.Is(err, unix.EINTR) {
			break
		}
	}
	if err != nil {
		// ELOOP (a symbolic link with O_NOFOLLOW), ENXIO (a FIFO without a reader opened for
		// writing), EISDIR, ...: say what is there when it is not a regular file
		var lst unix.Stat_t
		if lerr := statPath(path, follow, &lst); lerr == nil && !typeOK(lst.Mode, block) {
			return -1, st, notRegular(path, lst.Mode, follow)
		}
		return -1, st, &fs.PathError{Op: "open", Path: path, Err: err}
	}
	if err := unix.Fstat(fd, &st); err != nil {
		unix.Close(fd)
		return -1, st, &fs.PathError{Op: "fstat", Path: path, Err: err}
	}
	if !typeOK(st.Mode, block) {
		unix.Close(fd)
		return -1, st, notRegular(path, st.Mode, follow)
	}
	return fd, st, nil
}

func statPath(path string, follow bool, st *unix.Stat_t) error {
	if follow {
		return unix.Stat(path, st)
	}
	return unix.Lstat(path, st)
}

func typeOK(mode uint32, block bool) bool {
	t := mode & unix.S_IFMT
	return t == unix.S_IFREG || block && t == unix.S_IFBLK
}

func notRegular(path string, mode uint32, follow bool) error {
	what := fileKind(mode)
	if mode&unix.S_IFMT == unix.S_IFLNK && !follow {
		what += " (not followed, as swtpm does not)"
	}
	return fmt.Errorf("store: %s is %s, refused: %w", path, what, ErrNotRegular)
}

// readFD reads an open regular file of the stat'ed size: one read of that size plus one byte
// (to see growth), then the end of file; at most limit bytes.
func readFD(fd int, name string, size, limit int64) ([]byte, error) {
	if size > limit {
		return nil, fmt.Errorf("%s: %d bytes is larger than any TPM state (%d)", name, size, limit)
	}
	buf := make([]byte, 0, size+1)
	for {
		if len(buf) == cap(buf) {
			if int64(len(buf)) > limit {
				return nil, fmt.Errorf("%s grew beyond %d bytes while being read", name, limit)
			}
			buf = append(buf, make([]byte, 4096)...)[:len(buf)]
		}
		n, err := unix.Read(fd, buf[len(buf):cap(buf)])
		switch {
		case errors.Is(err, unix.EINTR):
			continue
		case err != nil:
			return nil, fmt.Errorf("read %s: %w", name, err)
		case n == 0:
			return buf, nil
		}
		buf = buf[:len(buf)+n]
	}
}

// preadFull fills b from offset off of an open file.
func preadFull(fd int, name string, b []byte, off int64) error {
	for len(b) > 0 {
		n, err := unix.Pread(fd, b, off)
		switch {
		case errors.Is(err, unix.EINTR):
			continue
		case err != nil:
			return fmt.Errorf("read %s: %w", name, err)
		case n == 0:
			return fmt.Errorf("read %s: unexpected end of file at %d", name, off)
		}
		b, off = b[n:], off+int64(n)
	}
	return nil
}

// pwriteFull writes b at offset off of an open file.
func pwriteFull(fd int, name string, b []byte, off int64) error {
	for len(b) > 0 {
		n, err := unix.Pwrite(fd, b, off)
		switch {
		case errors.Is(err, unix.EINTR):
			continue
		case err != nil:
			return fmt.Errorf("write %s: %w", name, err)
		}
		b, off = b[n:], off+int64(n)
	}
	return nil
}

// fsyncFD fsyncs an open file unless fsync is off.
func fsyncFD(fd int, name string, noFsync bool) error {
	if noFsync {
		return nil
	}
	hook(atomicfile.StepFsync, name)
	for {
		err := unix.Fsync(fd)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return fmt.Errorf("fsync %s: %w", name, err)
		}
		return nil
	}
}

// fchmod sets an open file's permission bits.
func fchmod(fd int, name string, mode uint32) error {
	if err := unix.Fchmod(fd, mode); err != nil {
		return fmt.Errorf("chmod %s: %w", name, err)
	}
	return nil
}

// permBits is the permission bits of a stat'ed mode.
func permBits(mode uint32) uint32 { return mode & uint32(os.ModePerm) }
