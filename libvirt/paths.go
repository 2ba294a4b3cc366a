package libvirt

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
)

// underRoot reports which of roots contains p (strictly below it); roots are clean absolute paths.
func underRoot(p string, roots []string) (string, bool) {
	for _, r := range roots {
		if r == "/" {
			return r, true
		}
		if strings.HasPrefix(p, r+"/") {
			return r, true
		}
	}
	return "", false
}

// CheckAllowed verifies that p is syntactically clean, lies below one of roots, and that no
// existing component between that root and p's parent is a symlink or a non-directory. It
// returns the root that contains p.
func CheckAllowed(p string, roots []string) (string, error) {
	if err := CheckSyntax(p); err != nil {
		return "", err
	}
	root, ok := underRoot(p, roots)
	if !ok {
		return "", fmt.Errorf("%w: %q is outside the allowed roots %v", ErrBadPath, p, roots)
	}
	rel := strings.TrimPrefix(p, root)
	rel = strings.TrimPrefix(rel, "/")
	comps := strings.Split(rel, "/")
	cur := root
	for _, c := range comps[:len(comps)-1] {
		cur = filepath.Join(cur, c)
		fi, err := os.Lstat(cur)
		if errors.Is(err, fs.ErrNotExist) {
			return root, nil // the rest will be created by MkdirNoFollow
		}
		if err != nil {
			return "", fmt.Errorf("%w: %v", ErrBadPath, err)
		}
		if fi.Mode()&fs.ModeSymlink != 0 {
			return "", fmt.Errorf("%w: %q is a symlink", ErrBadPath, cur)
		}
		if !fi.IsDir() {
			return "", fmt.Errorf("%w: %q is not a directory", ErrBadPath, cur)
		}
	}
	return root, nil
}

// MkdirNoFollow creates dir and its missing parents below root with mode perm, refusing to
// traverse symlinks. root itself must exist or be creatable (it is trusted configuration).
func MkdirNoFollow(root, dir string, perm fs.FileMode) error {
	if err := os.MkdirAll(root, 0o755); err != nil {
		return fmt.Errorf("create %s: %w", root, err)
	}
	if dir == root {
		return nil
	}
	if !strings.HasPrefix(dir, root+"/") && root != "/" {
		return fmt.Errorf("%w: %q is not below %q", ErrBadPath, dir, root)
	}
	rel := strings.TrimPrefix(strings.TrimPrefix(dir, root), "/")
	cur := root
	for _, c := range strings.Split(rel, "/") {
		cur = filepath.Join(cur, c)
		err := syscall.Mkdir(cur, uint32(perm.Perm()))
		if err != nil && !errors.Is(err, syscall.EEXIST) {
			return fmt.Errorf("create %s: %w", cur, err)
		}
		fi, err := os.Lstat(cur)
		if err != nil {
			return fmt.Errorf("create %s: %w", cur, err)
		}
		if fi.Mode()&fs.ModeSymlink != 0 || !fi.IsDir() {
			return fmt.Errorf("%w: %q is a symlink or not a directory", ErrBadPath, cur)
		}
	}
	return nil
}

// cleanRoots cleans configured roots and adds their symlink-resolved forms (roots are trusted;
// /var/run is a symlink to /run on most systems), dropping duplicates.
func cleanRoots(roots []string) ([]string, error) {
	var out []string
	seen := map[string]bool{}
	for _, r := range roots {
		if !filepath.IsAbs(r) {
			return nil, fmt.Errorf("%w: root %q is relative", ErrBadPath, r)
		}
		r = filepath.Clean(r)
		forms := []string{r}
		if res, err := filepath.EvalSymlinks(r); err == nil && res != r {
			forms = append(forms, res)
		}
		for _, f := range forms {
			if !seen[f] {
				seen[f] = true
				out = append(out, f)
			}
		}
	}
	return out, nil
}

// removeSocket deletes p if it is a unix socket; anything else is left alone.
func removeSocket(p string) error {
	fi, err := os.Lstat(p)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if fi.Mode()&fs.ModeSocket == 0 {
		return fmt.Errorf("%w: %q exists and is not a socket", ErrBadPath, p)
	}
	return os.Remove(p)
}
