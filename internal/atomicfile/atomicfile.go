package atomicfile

import (
	"fmt"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// WriteFile atomically and durably replaces path with data. A new file gets mode perm
// (subject to the umask); the temporary file is removed on failure.
func WriteFile(path string, data []byte, perm os.FileMode) error {
	return write(path, data, perm, false)
}

// WriteFileKeepOwner is WriteFile that gives the new content the owner, group and mode of the
// file it replaces (when there is one and the process may set them), so that replacing a file
// as root does not take it away from the service user that also writes it.
func WriteFileKeepOwner(path string, data []byte, perm os.FileMode) error {
	return write(path, data, perm, true)
}

func write(path string, data []byte, perm os.FileMode, keepOwner bool) error {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return fmt.Errorf("create temporary file for %s: %w", path, err)
	}
	tmp := f.Name()
	err = func() error {
		mode := perm &^ os.FileMode(umask())
		if keepOwner {
			var st unix.Stat_t
			if unix.Lstat(path, &st) == nil && st.Mode&unix.S_IFMT == unix.S_IFREG {
				mode = os.FileMode(st.Mode & 0o777)
				if int(st.Uid) != os.Geteuid() || int(st.Gid) != os.Getegid() {
					_ = f.Chown(int(st.Uid), int(st.Gid)) // best effort: only root may give files away
				}
			}
		}
		if err := f.Chmod(mode); err != nil {
			return err
		}
		if _, err := f.Write(data); err != nil {
			return err
		}
		return f.Sync()
	}()
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("write %s: %w", path, err)
	}
	return SyncDir(dir)
}

// SyncDir fsyncs a directory so that renames and creations in it are durable.
func SyncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("open directory %s: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("fsync directory %s: %w", dir, err)
	}
	return nil
}

// umask reads the process umask (set and restore: the only way to read it).
func umask() int {
	m := unix.Umask(0)
	unix.Umask(m)
	return m
}
