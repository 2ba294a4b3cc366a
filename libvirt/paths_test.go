package libvirt

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
)

func TestCheckAllowed(t *testing.T) {
	root := t.TempDir()
	other := t.TempDir()
	if err := os.MkdirAll(filepath.Join(root, "real"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(other, filepath.Join(root, "link")); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "file"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	roots := []string{root}
	ok := []string{root + "/x.sock", root + "/real/x.sock", root + "/new/deeper/x.sock"}
	for _, p := range ok {
		if _, err := CheckAllowed(p, roots); err != nil {
			t.Errorf("%s: %v", p, err)
		}
	}
	bad := []string{
		"/etc/passwd", other + "/x.sock", root, root + "/../x.sock", root + "/link/x.sock",
		root + "/file/x.sock", "relative/x.sock", root + "x/y.sock",
	}
	for _, p := range bad {
		if _, err := CheckAllowed(p, roots); !errors.Is(err, ErrBadPath) {
			t.Errorf("%s: err = %v", p, err)
		}
	}
}

func TestMkdirNoFollow(t *testing.T) {
	root := t.TempDir()
	target := t.TempDir()
	if err := MkdirNoFollow(root, root+"/a/b/c", 0o711); err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(root + "/a/b/c"); err != nil || !fi.IsDir() {
		t.Fatal(err)
	}
	if err := os.Symlink(target, root+"/a/evil"); err != nil {
		t.Fatal(err)
	}
	if err := MkdirNoFollow(root, root+"/a/evil/x", 0o711); !errors.Is(err, ErrBadPath) {
		t.Fatalf("err = %v", err)
	}
	if _, err := os.Stat(target + "/x"); !os.IsNotExist(err) {
		t.Fatalf("created through a symlink")
	}
	if err := MkdirNoFollow(root, "/elsewhere", 0o711); !errors.Is(err, ErrBadPath) {
		t.Fatalf("err = %v", err)
	}
}

func TestRemoveSocket(t *testing.T) {
	dir := t.TempDir()
	if err := removeSocket(dir + "/absent"); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dir+"/f", []byte("keep"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := removeSocket(dir + "/f"); !errors.Is(err, ErrBadPath) {
		t.Fatalf("err = %v", err)
	}
	if _, err := os.Stat(dir + "/f"); err != nil {
		t.Fatal("regular file removed")
	}
}

func TestCleanRoots(t *testing.T) {
	dir := t.TempDir()
	if err := os.Symlink(dir, dir+"-link"); err != nil {
		t.Fatal(err)
	}
	defer os.Remove(dir + "-link")
	roots, err := cleanRoots([]string{dir + "-link/", dir})
	if err != nil {
		t.Fatal(err)
	}
	if len(roots) != 2 || roots[0] != dir+"-link" || roots[1] != dir {
		t.Fatalf("roots %v", roots)
	}
	if _, err := cleanRoots([]string{"rel"}); err == nil {
		t.Fatal("relative root accepted")
	}
}
