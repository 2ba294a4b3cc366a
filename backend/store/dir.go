package store

import (
	"errors"
	"fmt"
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

func (d *dirBackend) lockFile() (string, int, uint32, bool) {
	return filepath.Join(d.dir, ".lock"), unix.O_WRONLY, 0o660, false
}

// openBlob opens a blob file for reading as swtpm does, following a symbolic link (swtpm's
// SWTPM_NVRAM_LoadData_Dir opens it without O_NOFOLLOW; writes replace the link), and refusing
// at once anything but a regular file (openFile).
func (d *dirBackend) openBlob(name string) (int, unix.Stat_t, error) {
	return openFile(d.file(name), unix.O_RDONLY, 0, true, false)
}

func (d *dirBackend) read(name string) ([]byte, error) {
	fd, st, err := d.openBlob(name)
	if err != nil {
		return nil, err
	}
	defer unix.Close(fd)
	return readFD(fd, d.file(name), st.Size, maxBlob)
}

// size is the blob's size, through a symbolic link as swtpm's stat; a blob that is not a
// regular file is an error.
func (d *dirBackend) size(name string) (int64, error) {
	p := d.file(name)
	var st unix.Stat_t
	if err := unix.Stat(p, &st); err != nil {
		return 0, &fs.PathError{Op: "stat", Path: p, Err: err}
	}
	if !typeOK(st.Mode, false) {
		return 0, notRegular(p, st.Mode, true)
	}
	return st.Size, nil
}

// loaded applies swtpm's mode handling to a file that was just loaded: an explicit mode is
// set exactly; otherwise the owner keeps write permission.
func (d *dirBackend) loaded(name string) error {
	fd, st, err := d.openBlob(name)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	p := permBits(st.Mode)
	want := p | 0o200
	if d.opts.ModeSet {
		want = d.opts.Mode
	}
	if want == p {
		return nil
	}
	return fchmod(fd, d.file(name), want)
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
