package store

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"

	"github.com/vtpmd/vtpmd/internal/atomicfile"
)

// maxBlob bounds what is read as one stored blob; libtpms blobs are below 128 KiB.
const maxBlob = 16 << 20

// dirBackend is swtpm's directory layout: one file per blob.
type dirBackend struct {
	dir  string
	opts Options
}

func openDir(dir string, o Options) (*dirBackend, error) {
	if dir == "" {
		return nil, errors.New("store: empty state directory")
	}
	st, err := os.Stat(dir)
	if err != nil {
		return nil, fmt.Errorf("store: state directory: %w", err)
	}
	if !st.IsDir() {
		return nil, fmt.Errorf("store: %s is not a directory", dir)
	}
	return &dirBackend{dir: dir, opts: o}, nil
}

func (d *dirBackend) String() string { return "dir://" + d.dir }

// prepare has nothing to do for a directory: its files are created when they are written.
func (d *dirBackend) prepare() (bool, error) { return false, nil }

// file is swtpm's name: tpm2-00.<name> (TPM 2) or tpm-00.<name> (TPM 1.2).
func (d *dirBackend) file(name string) string {
	if d.opts.TPM2 {
		return filepath.Join(d.dir, "tpm2-00."+name)
	}
	return filepath.Join(d.dir, "tpm-00."+name)
}

// tmpName is swtpm's temporary file name, in the state directory: TMP2-00.<name> or
// TMP-00.<name>.
func (d *dirBackend) tmpName(name string) string {
	if d.opts.TPM2 {
		return "TMP2-00." + name
	}
	return "TMP-00." + name
}

func (d *dirBackend) lockFile() (string, int, uint32) {
	return filepath.Join(d.dir, ".lock"), unix.O_WRONLY, 0o660
}

// openBlob opens a blob file for reading, refusing symlinks and anything but regular files.
func (d *dirBackend) openBlob(name string) (*os.File, fs.FileInfo, error) {
	p := d.file(name)
	// unix.Open + os.NewFile: a blocking descriptor that os does not try to register with the
	// network poller (os.OpenFile costs four more system calls per blob on a regular file)
	fd, err := unix.Open(p, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		if errors.Is(err, unix.ELOOP) {
			return nil, nil, fmt.Errorf("%s is a symbolic link: %w", p, err)
		}
		return nil, nil, &fs.PathError{Op: "open", Path: p, Err: err}
	}
	f := os.NewFile(uintptr(fd), p)
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, nil, err
	}
	if !st.Mode().IsRegular() {
		f.Close()
		return nil, nil, fmt.Errorf("%s is not a regular file", p)
	}
	return f, st, nil
}

func (d *dirBackend) read(name string) ([]byte, error) {
	f, st, err := d.openBlob(name)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	if st.Size() > maxBlob {
		return nil, fmt.Errorf("%s: %d bytes is larger than any TPM state (%d)", f.Name(), st.Size(), maxBlob)
	}
	// one read of the stat'ed size (plus one byte, to see growth), then the EOF
	buf := bytes.NewBuffer(make([]byte, 0, st.Size()+1))
	if _, err := buf.ReadFrom(io.LimitReader(f, maxBlob+1)); err != nil {
		return nil, fmt.Errorf("read %s: %w", f.Name(), err)
	}
	if buf.Len() > maxBlob {
		return nil, fmt.Errorf("%s grew beyond %d bytes while being read", f.Name(), maxBlob)
	}
	return buf.Bytes(), nil
}

func (d *dirBackend) size(name string) (int64, error) {
	st, err := os.Lstat(d.file(name))
	if err != nil {
		return 0, err
	}
	if !st.Mode().IsRegular() {
		return 0, fmt.Errorf("%s is not a regular file", d.file(name))
	}
	return st.Size(), nil
}

// loaded applies swtpm's mode handling to a file that was just loaded: an explicit mode is
// set exactly; otherwise the owner keeps write permission.
func (d *dirBackend) loaded(name string) error {
	f, st, err := d.openBlob(name)
	if err != nil {
		return err
	}
	defer f.Close()
	perm := uint32(st.Mode().Perm())
	want := perm | 0o200
	if d.opts.ModeSet {
		want = d.opts.Mode
	}
	if want == perm {
		return nil
	}
	if err := f.Chmod(os.FileMode(want)); err != nil {
		return fmt.Errorf("chmod %s: %w", f.Name(), err)
	}
	return nil
}

// apply replaces blobs atomically and durably, as swtpm writes them: each blob goes to
// TMP2-00.<name> (O_NOFOLLOW), is fsynced and renamed over tpm2-00.<name>; deletions remove
// the file; then the directory is fsynced once.
func (d *dirBackend) apply(changes []change) error {
	for _, c := range changes {
		if c.del {
			if err := os.Remove(d.file(c.name)); err != nil && !errors.Is(err, fs.ErrNotExist) {
				return err
			}
			continue
		}
		if err := d.writeFile(c.name, c.data); err != nil {
			return err
		}
	}
	return fsyncDir(d.dir, d.opts.NoFsync)
}

// writeFile replaces one blob file; apply fsyncs the directory once for all of them.
func (d *dirBackend) writeFile(name string, data []byte) error {
	return atomicfile.Write(d.file(name), data, atomicfile.Options{
		Perm:      os.FileMode(d.opts.Mode),
		ExactPerm: d.opts.ModeSet, // exact mode, whatever the umask
		TempName:  d.tmpName(name),
		NoFsync:   d.opts.NoFsync,
		NoDirSync: true,
		Trace:     hook,
	})
}
