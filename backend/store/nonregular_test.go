package store

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vtpmd/vtpmd/emulator"
)

// fast runs f and fails the test if it takes more than two seconds (a blocked open would
// hang it: the goroutine is then left behind, the test reports it).
func fast(t *testing.T, what string, f func() error) error {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- f() }()
	select {
	case err := <-done:
		return err
	case <-time.After(2 * time.Second):
		t.Fatalf("%s blocked", what)
		return nil
	}
}

// wantNotRegular checks err says what the file is and wraps ErrNotRegular.
func wantNotRegular(t *testing.T, what string, err error, kind string) {
	t.Helper()
	if !errors.Is(err, ErrNotRegular) || !strings.Contains(err.Error(), kind) {
		t.Fatalf("%s: %v, want ErrNotRegular naming %q", what, err, kind)
	}
}

// TestNonRegularStateFilesRefusedAtOnce: a FIFO, a device, a directory or a socket where a
// state file, the lock file or a linear store belongs is refused at once with an error that
// says what it is; nothing waits for a FIFO's other end. Symbolic links are followed where
// swtpm follows them (dir:// blobs), to the same check, and refused where it does not (the
// lock file, a file:// store).
func TestNonRegularStateFilesRefusedAtOnce(t *testing.T) {
	for _, name := range []string{"permall", "volatilestate"} {
		t.Run("dir FIFO "+name, func(t *testing.T) {
			dir := t.TempDir()
			if err := unix.Mkfifo(filepath.Join(dir, "tpm2-00."+name), 0o600); err != nil {
				t.Fatal(err)
			}
			s := mustOpen(t, dir, Options{TPM2: true})
			typ := map[string]emulator.StateType{"permall": emulator.StatePermanent, "volatilestate": emulator.StateVolatile}[name]
			err := fast(t, "Load", func() error { _, err := s.Load(typ); return err })
			wantNotRegular(t, "Load", err, "FIFO")
			err = fast(t, "States", func() error { _, err := s.States(); return err })
			wantNotRegular(t, "States", err, "FIFO")
		})
	}
	t.Run("dir symlink to a FIFO, a device, a directory", func(t *testing.T) {
		dir := t.TempDir()
		fifo := filepath.Join(t.TempDir(), "fifo")
		if err := unix.Mkfifo(fifo, 0o600); err != nil {
			t.Fatal(err)
		}
		for target, kind := range map[string]string{fifo: "FIFO", "/dev/null": "character device", t.TempDir(): "directory"} {
			p := filepath.Join(dir, "tpm2-00.permall")
			os.Remove(p)
			if err := os.Symlink(target, p); err != nil {
				t.Fatal(err)
			}
			s := mustOpen(t, dir, Options{TPM2: true})
			err := fast(t, "Load", func() error { _, err := s.Load(emulator.StatePermanent); return err })
			wantNotRegular(t, target, err, kind)
		}
	})
	t.Run("dir directory and socket", func(t *testing.T) {
		dir := t.TempDir()
		if err := os.Mkdir(filepath.Join(dir, "tpm2-00.permall"), 0o700); err != nil {
			t.Fatal(err)
		}
		s := mustOpen(t, dir, Options{TPM2: true})
		_, err := s.Load(emulator.StatePermanent)
		wantNotRegular(t, "directory", err, "directory")
		sock := filepath.Join(dir, "tpm2-00.volatilestate")
		fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer unix.Close(fd)
		if err := unix.Bind(fd, &unix.SockaddrUnix{Name: sock}); err != nil {
			t.Fatal(err)
		}
		_, err = s.Load(emulator.StateVolatile)
		wantNotRegular(t, "socket", err, "socket")
	})
	t.Run("lock file", func(t *testing.T) {
		dir := t.TempDir()
		if err := unix.Mkfifo(filepath.Join(dir, ".lock"), 0o600); err != nil {
			t.Fatal(err)
		}
		s := mustOpen(t, dir, Options{TPM2: true, Lock: true})
		wantNotRegular(t, "FIFO lock file", fast(t, "Lock", func() error { return s.Lock(0) }), "FIFO")
		os.Remove(filepath.Join(dir, ".lock"))
		os.Symlink(filepath.Join(t.TempDir(), "elsewhere"), filepath.Join(dir, ".lock"))
		wantNotRegular(t, "symlinked lock file", fast(t, "Lock", func() error { return s.Lock(0) }), "symbolic link")
	})
	t.Run("linear", func(t *testing.T) {
		dir := t.TempDir()
		fifo := filepath.Join(dir, "fifo.img")
		if err := unix.Mkfifo(fifo, 0o600); err != nil {
			t.Fatal(err)
		}
		err := fast(t, "Open", func() error { _, err := Open("file://"+fifo, Options{TPM2: true}); return err })
		wantNotRegular(t, "FIFO store", err, "FIFO")
		err = fast(t, "Open", func() error { _, err := Open("file:///dev/null", Options{TPM2: true}); return err })
		wantNotRegular(t, "character device store", err, "character device")
		link := filepath.Join(dir, "link.img")
		os.Symlink(filepath.Join(dir, "real.img"), link)
		_, err = Open("file://"+link, Options{TPM2: true})
		wantNotRegular(t, "symlinked store", err, "symbolic link")
		// a regular store swapped for a FIFO after Open: loads and writes refuse it at once
		img := filepath.Join(dir, "tpm.img")
		for _, lock := range []bool{false, true} {
			os.Remove(img)
			s := mustOpen(t, "file://"+img, Options{TPM2: true, Lock: lock})
			os.Remove(img)
			if err := unix.Mkfifo(img, 0o600); err != nil {
				t.Fatal(err)
			}
			err = fast(t, "Load", func() error { _, err := s.Load(emulator.StatePermanent); return err })
			wantNotRegular(t, "swapped store, load", err, "FIFO")
			err = fast(t, "Store", func() error { return s.Store(emulator.StatePermanent, testBlob) })
			wantNotRegular(t, "swapped store, store", err, "FIFO")
		}
	})
}
