package atomicfile

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

func TestWriteFileReplacesAndKeepsNoTemp(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "f")
	for _, content := range []string{"one", "two, longer"} {
		if err := WriteFile(p, []byte(content), 0o640); err != nil {
			t.Fatal(err)
		}
		got, err := os.ReadFile(p)
		if err != nil || string(got) != content {
			t.Fatalf("read %q, %v; want %q", got, err, content)
		}
	}
	ents, _ := os.ReadDir(dir)
	if len(ents) != 1 {
		t.Fatalf("directory holds %d entries, want only the file", len(ents))
	}
	st, _ := os.Stat(p)
	if st.Mode().Perm()&0o007 != 0 {
		t.Fatalf("mode %v grants others access", st.Mode())
	}
}

func TestWriteFileMissingDirectory(t *testing.T) {
	err := WriteFile(filepath.Join(t.TempDir(), "no", "f"), []byte("x"), 0o600)
	if !errors.Is(err, ErrCreateTemp) || !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("write into a missing directory: %v", err)
	}
}

// withUmask runs the test under umask m.
func withUmask(t *testing.T, m int) {
	old := syscall.Umask(m)
	t.Cleanup(func() { syscall.Umask(old) })
}

func perm(t *testing.T, p string) os.FileMode {
	t.Helper()
	st, err := os.Lstat(p)
	if err != nil {
		t.Fatal(err)
	}
	return st.Mode().Perm()
}

// TestWriteModes: the new file's mode under umask 027, from Perm, ExactPerm and Keep.
func TestWriteModes(t *testing.T) {
	withUmask(t, 0o027)
	tests := []struct {
		name string
		old  os.FileMode // mode of the file replaced, 0 for none
		o    Options
		want os.FileMode
	}{
		{"new file, umask applies", 0, Options{Perm: 0o666}, 0o640},
		{"replaced file, umask applies", 0o604, Options{Perm: 0o666}, 0o640},
		{"exact", 0, Options{Perm: 0o664, ExactPerm: true}, 0o664},
		{"keep owner takes the old mode", 0o604, Options{Perm: 0o600, Keep: KeepOwner}, 0o604},
		{"keep owner, no old file", 0, Options{Perm: 0o666, Keep: KeepOwner}, 0o640},
		{"keep all takes the old mode", 0o606, Options{Perm: 0o600, Keep: KeepAll}, 0o606},
		{"keep all, no old file", 0, Options{Perm: 0o660, Keep: KeepAll}, 0o640},
		{"exact wins over keep", 0o604, Options{Perm: 0o660, ExactPerm: true, Keep: KeepAll}, 0o660},
		{"fixed temporary name", 0, Options{Perm: 0o644, TempName: "TMP-f"}, 0o640},
		{"fixed temporary name, exact", 0o600, Options{Perm: 0o644, ExactPerm: true, TempName: "TMP-f"}, 0o644},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			p := filepath.Join(dir, "f")
			if tt.old != 0 {
				if err := os.WriteFile(p, []byte("old"), 0o600); err != nil {
					t.Fatal(err)
				}
				if err := os.Chmod(p, tt.old); err != nil {
					t.Fatal(err)
				}
			}
			if err := Write(p, []byte("new"), tt.o); err != nil {
				t.Fatal(err)
			}
			if got := perm(t, p); got != tt.want {
				t.Fatalf("mode %o, want %o", got, tt.want)
			}
			if b, _ := os.ReadFile(p); string(b) != "new" {
				t.Fatalf("content %q", b)
			}
			if ents, _ := os.ReadDir(dir); len(ents) != 1 {
				t.Fatalf("temporary file left: %v", ents)
			}
		})
	}
}

// TestWriteSteps: the durability steps in order, and what NoFsync and NoDirSync leave out.
func TestWriteSteps(t *testing.T) {
	tests := []struct {
		name string
		o    Options
		want string
	}{
		{"fresh temporary name", Options{}, "fsync .f.tmp-N, rename f, fsync-dir D"},
		{"fixed temporary name", Options{TempName: "TMP-f"}, "fsync TMP-f, rename f, fsync-dir D"},
		{"no directory fsync", Options{TempName: "TMP-f", NoDirSync: true}, "fsync TMP-f, rename f"},
		{"no fsync", Options{TempName: "TMP-f", NoFsync: true}, "rename f"},
		{"keep all", Options{Keep: KeepAll}, "fsync .f.tmp-N, rename f, fsync-dir D"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			p := filepath.Join(dir, "f")
			var steps []string
			tt.o.Perm = 0o600
			tt.o.Trace = func(step, path string) {
				name := filepath.Base(path)
				if path == dir {
					name = "D"
				} else if i := strings.Index(name, ".tmp-"); i >= 0 {
					name = name[:i] + ".tmp-N"
				}
				steps = append(steps, step+" "+name)
			}
			for range 2 { // new file, then a replacement
				steps = nil
				if err := Write(p, []byte("x"), tt.o); err != nil {
					t.Fatal(err)
				}
				if got := strings.Join(steps, ", "); got != tt.want {
					t.Fatalf("steps %s, want %s", got, tt.want)
				}
			}
		})
	}
}

// TestWriteFailuresChangeNothing: refused writes leave the target and no temporary file.
func TestWriteFailuresChangeNothing(t *testing.T) {
	tests := []struct {
		name    string
		prepare func(t *testing.T, dir, p string) Options
		want    error
	}{
		{"directory at the temporary name", func(t *testing.T, dir, _ string) Options {
			if err := os.Mkdir(filepath.Join(dir, "TMP-f"), 0o700); err != nil {
				t.Fatal(err)
			}
			return Options{TempName: "TMP-f"}
		}, ErrCreateTemp},
		{"symbolic link at the temporary name", func(t *testing.T, dir, _ string) Options {
			victim := filepath.Join(t.TempDir(), "victim")
			if err := os.WriteFile(victim, []byte("keep"), 0o600); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() {
				if b, _ := os.ReadFile(victim); string(b) != "keep" {
					t.Error("symbolic link followed")
				}
			})
			if err := os.Symlink(victim, filepath.Join(dir, "TMP-f")); err != nil {
				t.Fatal(err)
			}
			return Options{TempName: "TMP-f"}
		}, unix.ELOOP},
		{"temporary name is the target", func(*testing.T, string, string) Options {
			return Options{TempName: "f"}
		}, ErrCreateTemp},
		{"temporary name in another directory", func(*testing.T, string, string) Options {
			return Options{TempName: "../TMP-f"}
		}, ErrCreateTemp},
		{"keep all of a symbolic link", func(t *testing.T, dir, p string) Options {
			if err := os.Rename(p, p+".real"); err != nil {
				t.Fatal(err)
			}
			if err := os.Symlink("f.real", p); err != nil {
				t.Fatal(err)
			}
			return Options{Keep: KeepAll}
		}, unix.ELOOP},
		{"keep all of a directory", func(t *testing.T, dir, p string) Options {
			if err := os.Remove(p); err != nil {
				t.Fatal(err)
			}
			if err := os.Mkdir(p, 0o700); err != nil {
				t.Fatal(err)
			}
			return Options{Keep: KeepAll}
		}, ErrNotRegular},
		{"rename over a non-empty directory", func(t *testing.T, dir, p string) Options {
			if err := os.Remove(p); err != nil {
				t.Fatal(err)
			}
			if err := os.MkdirAll(filepath.Join(p, "x"), 0o700); err != nil {
				t.Fatal(err)
			}
			return Options{}
		}, unix.EISDIR},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			p := filepath.Join(dir, "f")
			if err := os.WriteFile(p, []byte("old"), 0o600); err != nil {
				t.Fatal(err)
			}
			o := tt.prepare(t, dir, p)
			o.Perm = 0o600
			before := listing(t, dir)
			err := Write(p, []byte("new"), o)
			if !errors.Is(err, tt.want) {
				t.Fatalf("err = %v, want %v", err, tt.want)
			}
			if after := listing(t, dir); after != before {
				t.Fatalf("directory changed:\n%s\nwas\n%s", after, before)
			}
		})
	}
}

// listing describes a directory's entries and regular files' contents.
func listing(t *testing.T, dir string) string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	for _, e := range ents {
		data, _ := os.ReadFile(filepath.Join(dir, e.Name()))
		fmt.Fprintf(&b, "%s %v %q\n", e.Name(), e.Type(), data)
	}
	return b.String()
}

// TestWriteKeepAll: owner and security attributes are carried over, others are not (root
// only: only root may give files away and set security.* attributes).
func TestWriteKeepAll(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	dir := t.TempDir()
	for _, tt := range []struct {
		keep      Keep
		owner     bool
		attribute bool
	}{
		{KeepNone, false, false},
		{KeepOwner, true, false},
		{KeepAll, true, true},
	} {
		t.Run(fmt.Sprint(tt.keep), func(t *testing.T) {
			p := filepath.Join(dir, fmt.Sprint("f", tt.keep))
			if err := os.WriteFile(p, []byte("old"), 0o600); err != nil {
				t.Fatal(err)
			}
			if err := os.Chown(p, 4321, 4322); err != nil {
				t.Fatal(err)
			}
			if err := unix.Setxattr(p, "security.vtpmd-test", []byte("label"), 0); err != nil {
				t.Skipf("security attributes not supported here: %v", err)
			}
			if err := unix.Setxattr(p, "user.vtpmd-test", []byte("x"), 0); err != nil {
				t.Skipf("user attributes not supported here: %v", err)
			}
			if err := Write(p, []byte("new"), Options{Perm: 0o600, Keep: tt.keep}); err != nil {
				t.Fatal(err)
			}
			var st unix.Stat_t
			if err := unix.Stat(p, &st); err != nil {
				t.Fatal(err)
			}
			if owned := st.Uid == 4321 && st.Gid == 4322; owned != tt.owner {
				t.Errorf("owner %d:%d, kept %v, want %v", st.Uid, st.Gid, owned, tt.owner)
			}
			buf := make([]byte, 64)
			n, err := unix.Getxattr(p, "security.vtpmd-test", buf)
			if kept := err == nil && string(buf[:n]) == "label"; kept != tt.attribute {
				t.Errorf("security attribute kept %v (%v), want %v", kept, err, tt.attribute)
			}
			if _, err := unix.Getxattr(p, "user.vtpmd-test", buf); err == nil {
				t.Error("user attribute carried over")
			}
		})
	}
}

func TestSyncDir(t *testing.T) {
	if err := SyncDir(t.TempDir()); err != nil {
		t.Fatal(err)
	}
	if err := SyncDir(filepath.Join(t.TempDir(), "absent")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("err = %v", err)
	}
	f := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(f, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := SyncDir(f); !errors.Is(err, unix.ENOTDIR) {
		t.Fatalf("err = %v", err)
	}
}
