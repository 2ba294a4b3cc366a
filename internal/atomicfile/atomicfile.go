package atomicfile

import (
	"errors"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Sentinel errors. When Write returns one of them it has changed nothing.
var (
	// ErrCreateTemp is wrapped, together with the system error, when the temporary file cannot
	// be created (a read-only or confined directory, a directory or symbolic link planted at
	// a fixed temporary name).
	ErrCreateTemp = errors.New("create temporary file")
	// ErrCannotKeep is wrapped when KeepAll cannot read or reproduce the replaced file's owner,
	// security labels or ACLs.
	ErrCannotKeep = errors.New("cannot keep the replaced file's owner or attributes")
	// ErrNotRegular is wrapped when KeepAll finds something other than a regular file at the
	// path to replace.
	ErrNotRegular = errors.New("not a regular file")
)

// Keep says what the new file takes over from the file it replaces (when there is one).
type Keep int

const (
	// KeepNone gives the new file Options.Perm.
	KeepNone Keep = iota
	// KeepOwner gives the new file the mode, owner and group of the regular file it replaces;
	// the owner and group only when the process may set them (only root may give files
	// away), so that replacing a file as root does not take it from the service user.
	KeepOwner
	// KeepAll makes the new file indistinguishable from the one it replaces apart from its
	// content: mode, owner, group, security labels and ACLs (the security.* and
	// system.posix_acl_* extended attributes, which libvirt sets on a VM's files). When any
	// of them cannot be read or reproduced Write fails with ErrCannotKeep.
	KeepAll
)

func (k Keep) String() string {
	switch k {
	case KeepNone:
		return "none"
	case KeepOwner:
		return "owner"
	case KeepAll:
		return "all"
	}
	return "Keep(" + strconv.Itoa(int(k)) + ")"
}

// Steps reported to Options.Trace, each just before it happens.
const (
	StepFsync    = "fsync"     // the temporary file, path is the temporary file
	StepRename   = "rename"    // the temporary file over the target, path is the target
	StepFsyncDir = "fsync-dir" // the directory, path is the directory
)

// Options say how Write replaces a file. The zero value (mode 0) is rarely what you want: set
// Perm.
type Options struct {
	// Perm is the mode of the new file, subject to the umask (applied by the kernel when the
	// temporary file is created) unless ExactPerm.
	Perm os.FileMode
	// ExactPerm applies Perm as is (one fchmod), whatever the umask and whatever Keep found.
	ExactPerm bool
	// Keep says what the new file takes over from the one it replaces.
	Keep Keep
	// TempName is the temporary file's name in the target's directory. "" means a fresh
	// unique name (".<name>.tmp-<random>", created exclusively). A fixed name (swtpm's
	// TMP2-00.<blob>) is truncated when it exists, as a crash may leave it behind; either
	// way a symbolic link there is refused, never followed.
	TempName string
	// NoFsync skips every fsync (benchmarks and tests only: a crash may then lose the write).
	NoFsync bool
	// NoDirSync leaves the directory fsync that makes the rename durable to the caller, who
	// calls SyncDir once after a batch of replacements in the same directory.
	NoDirSync bool
	// Trace, when set, is told about each durability step (Step*) before it happens.
	Trace func(step, path string)
}

func (o *Options) trace(step, path string) {
	if o.Trace != nil {
		o.Trace(step, path)
	}
}

// WriteFile atomically and durably replaces path with data. A new file gets mode perm
// (subject to the umask); the temporary file is removed on failure.
func WriteFile(path string, data []byte, perm os.FileMode) error {
	return Write(path, data, Options{Perm: perm})
}

// WriteFileKeepOwner is WriteFile that gives the new content the owner, group and mode of the
// file it replaces (see KeepOwner).
func WriteFileKeepOwner(path string, data []byte, perm os.FileMode) error {
	return Write(path, data, Options{Perm: perm, Keep: KeepOwner})
}

// Write replaces path with data so that a crash at any moment leaves either the old or the
// new content: it writes a temporary file in the same directory, fsyncs it, renames it over
// path and fsyncs the directory (see Options for what can be left out). On failure the
// temporary file is removed and path is untouched. Errors name the file and the step.
func Write(path string, data []byte, o Options) error {
	attrs, err := o.keptAttrs(path)
	if err != nil {
		return err
	}
	dir := filepath.Dir(path)
	f, err := o.createTemp(dir, path, attrs.perm)
	if err != nil {
		return err
	}
	tmp := f.Name()
	err = o.fill(f, data, attrs)
	if cerr := f.Close(); err == nil && cerr != nil {
		err = fmt.Errorf("close %s: %w", tmp, cerr)
	}
	if err == nil {
		o.trace(StepRename, path)
		if rerr := ignoringEINTR(func() error { return unix.Rename(tmp, path) }); rerr != nil {
			err = fmt.Errorf("rename %s to %s: %w", tmp, path, rerr)
		}
	}
	if err != nil {
		_ = unix.Unlink(tmp)
		return err
	}
	if o.NoFsync || o.NoDirSync {
		return nil
	}
	o.trace(StepFsyncDir, dir)
	return SyncDir(dir)
}

// attrs is what the new file gets besides its content.
type attrs struct {
	perm     os.FileMode // creation mode (the kernel applies the umask)
	chmod    bool        // set perm exactly with fchmod after creation
	uid, gid int         // owner to give the file, -1 to leave it
	strict   bool        // failing to reproduce the owner or xattrs is ErrCannotKeep
	xattrs   map[string][]byte
}

// keptAttrs works out the new file's mode, owner and extended attributes.
func (o *Options) keptAttrs(path string) (attrs, error) {
	a := attrs{perm: o.Perm, uid: -1, gid: -1}
	var st unix.Stat_t
	switch o.Keep {
	case KeepOwner:
		if unix.Lstat(path, &st) == nil && st.Mode&unix.S_IFMT == unix.S_IFREG {
			a.keepOwner(&st)
		}
	case KeepAll:
		found, err := keepAll(path, &st, &a)
		if err != nil {
			return a, err
		}
		if found {
			a.keepOwner(&st)
			a.strict = true
		}
	}
	if o.ExactPerm {
		a.perm, a.chmod = o.Perm, true
	}
	return a, nil
}

// keepOwner takes the mode, owner and group of st.
func (a *attrs) keepOwner(st *unix.Stat_t) {
	a.perm, a.chmod = os.FileMode(st.Mode&0o777), true
	if int(st.Uid) != os.Geteuid() || int(st.Gid) != os.Getegid() {
		a.uid, a.gid = int(st.Uid), int(st.Gid)
	}
}

// keepAll reads the status and the kept extended attributes of the regular file at path; it
// reports false when there is no file.
func keepAll(path string, st *unix.Stat_t, a *attrs) (bool, error) {
	var fd int
	err := ignoringEINTR(func() (err error) {
		fd, err = unix.Open(path, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		return err
	})
	if errors.Is(err, unix.ENOENT) {
		return false, nil
	}
	if err != nil {
		return false, &fs.PathError{Op: "open", Path: path, Err: err}
	}
	defer unix.Close(fd)
	if err := unix.Fstat(fd, st); err != nil {
		return false, fmt.Errorf("%w: stat %s: %w", ErrCannotKeep, path, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		return false, fmt.Errorf("replace %s: %w", path, ErrNotRegular)
	}
	x, err := keptXattrs(fd)
	if err != nil {
		return false, fmt.Errorf("%w: extended attributes of %s: %w", ErrCannotKeep, path, err)
	}
	a.xattrs = x
	return true, nil
}

// keptXattrs returns the extended attributes KeepAll carries over: security labels
// (security.*) and ACLs (system.posix_acl_*).
func keptXattrs(fd int) (map[string][]byte, error) {
	n, err := unix.Flistxattr(fd, nil)
	if errors.Is(err, unix.ENOTSUP) || n == 0 && err == nil {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	list := make([]byte, n)
	if n, err = unix.Flistxattr(fd, list); err != nil {
		return nil, err
	}
	var out map[string][]byte
	for _, name := range strings.Split(string(list[:n]), "\x00") {
		if !strings.HasPrefix(name, "security.") && !strings.HasPrefix(name, "system.posix_acl_") {
			continue
		}
		sz, err := unix.Fgetxattr(fd, name, nil)
		if err != nil {
			return nil, err
		}
		v := make([]byte, sz)
		if sz, err = unix.Fgetxattr(fd, name, v); err != nil {
			return nil, err
		}
		if out == nil {
			out = map[string][]byte{}
		}
		out[name] = v[:sz]
	}
	return out, nil
}

// maxTempTries bounds the attempts at a fresh temporary name.
const maxTempTries = 10000

// createTemp creates the temporary file beside target with mode perm (minus the umask).
// unix.Open and os.NewFile: a blocking descriptor that os does not try to register with the
// network poller (os.OpenFile costs four more system calls on a regular file).
func (o *Options) createTemp(dir, target string, perm os.FileMode) (*os.File, error) {
	const flags = unix.O_WRONLY | unix.O_CREAT | unix.O_NOFOLLOW | unix.O_CLOEXEC
	open := func(name string, flags int) (*os.File, error) {
		var fd int
		err := ignoringEINTR(func() (err error) {
			fd, err = unix.Open(name, flags, uint32(perm.Perm()))
			return err
		})
		if err != nil {
			return nil, err
		}
		return os.NewFile(uintptr(fd), name), nil
	}
	if o.TempName != "" {
		tmp := filepath.Join(dir, o.TempName)
		if tmp == target || filepath.Dir(tmp) != dir {
			return nil, fmt.Errorf("%w %q for %s: not a separate name in the same directory", ErrCreateTemp, o.TempName, target)
		}
		f, err := open(tmp, flags|unix.O_TRUNC)
		if err != nil {
			return nil, fmt.Errorf("%w %s: %w", ErrCreateTemp, tmp, err)
		}
		return f, nil
	}
	prefix := filepath.Join(dir, "."+filepath.Base(target)+".tmp-")
	for range maxTempTries {
		tmp := prefix + strconv.FormatUint(uint64(rand.Uint32()), 10)
		f, err := open(tmp, flags|unix.O_EXCL)
		if errors.Is(err, unix.EEXIST) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("%w for %s: %w", ErrCreateTemp, target, err)
		}
		return f, nil
	}
	return nil, fmt.Errorf("%w for %s: %w", ErrCreateTemp, target, fs.ErrExist)
}

// fill gives the temporary file its owner, mode, extended attributes and content, and fsyncs
// it.
func (o *Options) fill(f *os.File, data []byte, a attrs) error {
	tmp := f.Name()
	if a.uid >= 0 {
		if err := f.Chown(a.uid, a.gid); err != nil && a.strict {
			return fmt.Errorf("%w: chown %s: %w", ErrCannotKeep, tmp, err)
		}
	}
	if a.chmod {
		if err := f.Chmod(a.perm); err != nil {
			return fmt.Errorf("chmod %s: %w", tmp, err)
		}
	}
	for name, v := range a.xattrs {
		if err := unix.Fsetxattr(int(f.Fd()), name, v, 0); err != nil {
			return fmt.Errorf("%w: set %s on %s: %w", ErrCannotKeep, name, tmp, err)
		}
	}
	if _, err := f.Write(data); err != nil {
		return fmt.Errorf("write %s: %w", tmp, err)
	}
	if o.NoFsync {
		return nil
	}
	o.trace(StepFsync, tmp)
	if err := f.Sync(); err != nil {
		return fmt.Errorf("fsync %s: %w", tmp, err)
	}
	return nil
}

// SyncDir fsyncs a directory so that renames and creations in it are durable.
func SyncDir(dir string) error {
	var fd int
	err := ignoringEINTR(func() (err error) {
		fd, err = unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		return err
	})
	if err != nil {
		return fmt.Errorf("open directory %s: %w", dir, err)
	}
	defer unix.Close(fd)
	if err := ignoringEINTR(func() error { return unix.Fsync(fd) }); err != nil {
		return fmt.Errorf("fsync directory %s: %w", dir, err)
	}
	return nil
}

// ignoringEINTR repeats fn while it is interrupted by a signal.
func ignoringEINTR(fn func() error) error {
	for {
		if err := fn(); !errors.Is(err, unix.EINTR) {
			return err
		}
	}
}
