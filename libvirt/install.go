package libvirt

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/vtpmd/vtpmd/internal/atomicfile"
)

// Install defaults.
const (
	DefaultBinDir       = "/usr/local/bin"
	DefaultHookDir      = "/etc/libvirt/hooks/qemu.d"
	DefaultHookName     = "50-vtpmd"
	DefaultManifestPath = "/var/lib/vtpmd/install.json"
	// SystemSwtpmSetup is Debian's swtpm_setup, the fallback when vtpmd's own setup is not
	// available: it drives whatever `swtpm` comes first in PATH, i.e. the vtpmd link.
	SystemSwtpmSetup = "/usr/bin/swtpm_setup"
	hookMarker       = "installed by `vtpmd install`"
	savedSuffix      = ".vtpmd-saved"
)

// ErrForeignFile is returned when install would replace a file it did not create.
var ErrForeignFile = errors.New("file not installed by vtpmd")

// Setup modes for swtpm_setup.
const (
	SetupAuto   = "auto"   // vtpmd's setup if it answers --print-capabilities, else the system one
	SetupVtpmd  = "vtpmd"  // link swtpm_setup to vtpmd
	SetupSystem = "system" // leave swtpm_setup to the distribution's binary
)

// InstallOptions say where vtpmd goes. Zero values mean the defaults above.
type InstallOptions struct {
	Exe          string // the vtpmd binary to install; default the running executable
	BinDir       string // a directory before /usr/bin in libvirtd's PATH
	HookDir      string // libvirt's qemu hook directory
	HookName     string // file name of the hook in HookDir
	ManifestPath string // what install did, for uninstall
	Setup        string // SetupAuto, SetupVtpmd or SetupSystem
	// HookConfig and HookRegistry are baked into the hook as `vtpmd hook --config` and
	// `--registry` when set; Install checks the configuration first.
	HookConfig   string
	HookRegistry string
	Force        bool // move foreign files aside (NAME.vtpmd-saved) instead of failing
	// ProcRoot is /proc, for finding libvirtd's PATH (tests change it).
	ProcRoot string
}

func (o *InstallOptions) defaults() error {
	if o.BinDir == "" {
		o.BinDir = DefaultBinDir
	}
	if o.HookDir == "" {
		o.HookDir = DefaultHookDir
	}
	if o.HookName == "" {
		o.HookName = DefaultHookName
	}
	if o.ManifestPath == "" {
		o.ManifestPath = DefaultManifestPath
	}
	if o.Setup == "" {
		o.Setup = SetupAuto
	}
	if o.ProcRoot == "" {
		o.ProcRoot = "/proc"
	}
	switch o.Setup {
	case SetupAuto, SetupVtpmd, SetupSystem:
	default:
		return fmt.Errorf("setup mode %q: want auto, vtpmd or system", o.Setup)
	}
	for _, p := range []string{o.BinDir, o.HookDir, o.ManifestPath} {
		if !filepath.IsAbs(p) {
			return fmt.Errorf("%w: %q is relative", ErrBadPath, p)
		}
	}
	if strings.ContainsRune(o.HookName, '/') || o.HookName == "." || o.HookName == ".." {
		return fmt.Errorf("%w: hook name %q", ErrBadPath, o.HookName)
	}
	return nil
}

// Manifest records what install created, so uninstall removes exactly that.
type Manifest struct {
	Installed time.Time      `json:"installed"`
	BinDir    string         `json:"bin_dir"`
	Files     []ManifestFile `json:"files"`
}

// ManifestFile is one created file.
type ManifestFile struct {
	Path   string `json:"path"`
	Kind   string `json:"kind"`             // binary, link, hook
	Target string `json:"target,omitempty"` // link target
	SHA256 string `json:"sha256,omitempty"` // binary and hook content
	Saved  string `json:"saved,omitempty"`  // where a replaced foreign file was moved
}

// hookArgs are the `vtpmd hook` options baked into the hook.
func (o *InstallOptions) hookArgs() ([]string, error) {
	var args []string
	if o.HookConfig != "" {
		if _, err := LoadConfig(o.HookConfig); err != nil {
			return nil, err
		}
		args = append(args, "--config", o.HookConfig)
	}
	if o.HookRegistry != "" {
		args = append(args, "--registry", o.HookRegistry)
	}
	return args, nil
}

func readManifest(p string) (*Manifest, error) {
	data, err := os.ReadFile(p)
	if errors.Is(err, fs.ErrNotExist) {
		return &Manifest{}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("manifest: %w", err)
	}
	var m Manifest
	if err := json.Unmarshal(data, &m); err != nil {
		return nil, fmt.Errorf("manifest %s: %w", p, err)
	}
	return &m, nil
}

func (m *Manifest) find(p string) *ManifestFile {
	for i := range m.Files {
		if m.Files[i].Path == p {
			return &m.Files[i]
		}
	}
	return nil
}

func (m *Manifest) put(f ManifestFile) {
	if old := m.find(f.Path); old != nil {
		if f.Saved == "" {
			f.Saved = old.Saved
		}
		*old = f
		return
	}
	m.Files = append(m.Files, f)
}

func (m *Manifest) drop(p string) {
	out := m.Files[:0]
	for _, f := range m.Files {
		if f.Path != p {
			out = append(out, f)
		}
	}
	m.Files = out
}

func fileSHA256(p string) (string, error) {
	f, err := os.Open(p)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// shellQuote quotes s for a POSIX shell.
func shellQuote(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }

// HookScript is the content of the installed hook.
func HookScript(vtpmd string, args []string) string {
	var b strings.Builder
	b.WriteString("#!/bin/sh\n")
	b.WriteString("# libvirt qemu hook for vtpmd, " + hookMarker + ".\n")
	b.WriteString("# Remove it with `vtpmd uninstall`; libvirtd re-reads hooks on SIGHUP.\n")
	b.WriteString("exec " + shellQuote(vtpmd) + " hook")
	for _, a := range args {
		b.WriteString(" " + shellQuote(a))
	}
	b.WriteString(" -- \"$@\"\n")
	return b.String()
}

// Install makes vtpmd the host's swtpm for libvirt and installs the hook. It is idempotent.
func Install(ctx context.Context, o InstallOptions) (*Report, error) {
	if err := o.defaults(); err != nil {
		return nil, err
	}
	hookArgs, err := o.hookArgs()
	if err != nil {
		return nil, err
	}
	rep := &Report{}
	m, err := readManifest(o.ManifestPath)
	if err != nil {
		return nil, err
	}
	m.BinDir = o.BinDir
	// Whatever happens below, remember what was done so far.
	defer func() { _ = m.save(o.ManifestPath) }()

	exe, err := resolveExe(o.Exe)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(o.BinDir, 0o755); err != nil {
		return nil, err
	}
	target := filepath.Join(o.BinDir, "vtpmd")
	if err := installBinary(exe, target, m, rep); err != nil {
		return rep, err
	}
	if err := installLinks(ctx, o, target, m, rep); err != nil {
		return rep, err
	}
	if err := mkdirRecorded(o.HookDir, m, rep); err != nil {
		return rep, err
	}
	hookPath := filepath.Join(o.HookDir, o.HookName)
	if err := installHook(hookPath, HookScript(target, hookArgs), o.Force, m, rep); err != nil {
		return rep, err
	}

	checkLibvirtdPath(o.ProcRoot, o.BinDir, rep)
	rep.note("restart libvirtd (or virtqemud) so it looks up swtpm, swtpm_setup and swtpm_ioctl again: it caches their paths; VMs already running keep their current swtpm")
	rep.note("libvirtd reads hooks at start and on SIGHUP: `kill -HUP $(pidof libvirtd)` if you do not restart it")
	rep.note("undo all of this with `vtpmd uninstall` (manifest: %s)", o.ManifestPath)
	if err := m.save(o.ManifestPath); err != nil {
		return rep, fmt.Errorf("write manifest: %w", err)
	}
	return rep, nil
}

// save writes the manifest to p, stamped now.
func (m *Manifest) save(p string) error {
	m.Installed = time.Now().UTC()
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		return err
	}
	data, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return fmt.Errorf("encode manifest: %w", err)
	}
	return atomicfile.Write(p, append(data, '\n'), atomicfile.Options{Perm: 0o644, ExactPerm: true})
}

// resolveExe is the real path of the vtpmd binary to install ("" means the running one).
func resolveExe(exe string) (string, error) {
	if exe == "" {
		self, err := os.Executable()
		if err != nil {
			return "", fmt.Errorf("find own executable: %w", err)
		}
		exe = self
	}
	resolved, err := filepath.EvalSymlinks(exe)
	if err != nil {
		return "", fmt.Errorf("resolve %s: %w", exe, err)
	}
	return resolved, nil
}

// installLinks links swtpm and swtpm_ioctl, and swtpm_setup when vtpmd's setup is used, to
// the installed vtpmd (target).
func installLinks(ctx context.Context, o InstallOptions, target string, m *Manifest, rep *Report) error {
	names := []string{"swtpm", "swtpm_ioctl"}
	setup := o.Setup
	if setup == SetupAuto {
		if probeSetup(ctx, target) {
			setup = SetupVtpmd
		} else {
			setup = SetupSystem
		}
	}
	if setup == SetupVtpmd {
		names = append(names, "swtpm_setup")
	} else {
		if err := removeOurLink(filepath.Join(o.BinDir, "swtpm_setup"), m, rep); err != nil {
			return err
		}
		rep.note("swtpm_setup: vtpmd's setup is not used (mode %s); libvirt runs %s, which starts the swtpm link (vtpmd) to manufacture TPM state", o.Setup, SystemSwtpmSetup)
		if fi, err := os.Stat("/var/lib/swtpm-localca"); err == nil {
			if st, ok := fi.Sys().(*syscall.Stat_t); ok && st.Uid == 0 {
				rep.note("/var/lib/swtpm-localca is owned by root but libvirt runs swtpm_setup as tss: run `chown -R tss:root /var/lib/swtpm-localca`")
			}
		}
	}
	for _, n := range names {
		if err := installLink(filepath.Join(o.BinDir, n), "vtpmd", o.Force, m, rep); err != nil {
			return err
		}
	}
	return nil
}

// mkdirRecorded creates dir (and parents) and records the directories it created, so that
// uninstall can remove them again when they are empty.
func mkdirRecorded(dir string, m *Manifest, rep *Report) error {
	var missing []string
	for d := dir; d != "/" && d != "."; d = filepath.Dir(d) {
		if _, err := os.Lstat(d); err == nil {
			break
		}
		missing = append(missing, d)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	for i := len(missing) - 1; i >= 0; i-- {
		m.put(ManifestFile{Path: missing[i], Kind: "dir"})
		rep.did("%s: created", missing[i])
	}
	return nil
}

func installBinary(exe, target string, m *Manifest, rep *Report) error {
	sum, err := fileSHA256(exe)
	if err != nil {
		return fmt.Errorf("read %s: %w", exe, err)
	}
	if exe == target {
		rep.did("%s: vtpmd already here, used in place", target)
		return nil
	}
	if cur, err := fileSHA256(target); err == nil && cur == sum {
		rep.did("%s: unchanged", target)
		if m.find(target) == nil {
			m.put(ManifestFile{Path: target, Kind: "binary", SHA256: sum})
		}
		return nil
	}
	src, err := os.Open(exe)
	if err != nil {
		return err
	}
	defer src.Close()
	var buf bytes.Buffer
	if _, err := io.Copy(&buf, src); err != nil {
		return err
	}
	// A copy, not a link to the build tree: libvirt runs swtpm as tss, which must be able to
	// reach and execute it, and rebuilding the tree must not change the host's swtpm.
	if err := atomicfile.Write(target, buf.Bytes(), atomicfile.Options{Perm: 0o755, ExactPerm: true}); err != nil {
		return fmt.Errorf("install %s: %w", target, err)
	}
	m.put(ManifestFile{Path: target, Kind: "binary", SHA256: sum})
	rep.did("%s: installed a copy of %s", target, exe)
	return nil
}

func installLink(p, target string, force bool, m *Manifest, rep *Report) error {
	fi, err := os.Lstat(p)
	switch {
	case errors.Is(err, fs.ErrNotExist):
	case err != nil:
		return err
	case fi.Mode()&fs.ModeSymlink != 0:
		if cur, _ := os.Readlink(p); cur == target || cur == filepath.Join(filepath.Dir(p), target) {
			m.put(ManifestFile{Path: p, Kind: "link", Target: target})
			rep.did("%s -> %s: unchanged", p, target)
			return nil
		}
		fallthrough
	default:
		if err := moveAside(p, force, m, rep); err != nil {
			return err
		}
	}
	if err := os.Symlink(target, p); err != nil {
		return fmt.Errorf("link %s: %w", p, err)
	}
	m.put(ManifestFile{Path: p, Kind: "link", Target: target})
	rep.did("%s -> %s: linked", p, target)
	return nil
}

// moveAside moves a foreign file out of the way when forced; files of ours are replaced.
func moveAside(p string, force bool, m *Manifest, rep *Report) error {
	if m.find(p) != nil {
		return os.Remove(p)
	}
	if !force {
		return fmt.Errorf("%w: refusing to replace %s (use --force to move it to %s%s)", ErrForeignFile, p, p, savedSuffix)
	}
	saved := p + savedSuffix
	if err := os.Rename(p, saved); err != nil {
		return err
	}
	m.put(ManifestFile{Path: p, Saved: saved})
	rep.did("%s: moved the existing file to %s", p, saved)
	return nil
}

func removeOurLink(p string, m *Manifest, rep *Report) error {
	f := m.find(p)
	if f == nil || f.Kind != "link" {
		return nil
	}
	if cur, err := os.Readlink(p); err == nil && cur == f.Target {
		if err := os.Remove(p); err != nil {
			return err
		}
		rep.did("%s: removed the link to vtpmd", p)
	}
	if f.Saved != "" {
		if err := os.Rename(f.Saved, p); err == nil {
			rep.did("%s: restored from %s", p, f.Saved)
		}
	}
	m.drop(p)
	return nil
}

func installHook(p, script string, force bool, m *Manifest, rep *Report) error {
	sum := sha256.Sum256([]byte(script))
	want := hex.EncodeToString(sum[:])
	fi, err := os.Lstat(p)
	switch {
	case errors.Is(err, fs.ErrNotExist):
	case err != nil:
		return err
	default:
		cur, rerr := os.ReadFile(p)
		ours := rerr == nil && fi.Mode().IsRegular() && bytes.Contains(cur, []byte(hookMarker))
		if ours && string(cur) == script {
			m.put(ManifestFile{Path: p, Kind: "hook", SHA256: want})
			rep.did("%s: unchanged", p)
			return nil
		}
		if !ours {
			if err := moveAside(p, force, m, rep); err != nil {
				return err
			}
		}
	}
	if err := atomicfile.Write(p, []byte(script), atomicfile.Options{Perm: 0o755, ExactPerm: true}); err != nil {
		return fmt.Errorf("install hook: %w", err)
	}
	m.put(ManifestFile{Path: p, Kind: "hook", SHA256: want})
	rep.did("%s: installed the libvirt qemu hook", p)
	return nil
}

// libvirtdPIDs finds running libvirt daemons that start QEMU.
func libvirtdPIDs(procRoot string) []int {
	entries, _ := os.ReadDir(procRoot)
	var pids []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		comm, err := os.ReadFile(filepath.Join(procRoot, e.Name(), "comm"))
		if err != nil {
			continue
		}
		switch strings.TrimSpace(string(comm)) {
		case "libvirtd", "virtqemud":
			pids = append(pids, pid)
		}
	}
	return pids
}

// checkLibvirtdPath notes whether each running daemon would find binDir's swtpm first.
func checkLibvirtdPath(procRoot, binDir string, rep *Report) {
	pids := libvirtdPIDs(procRoot)
	if len(pids) == 0 {
		rep.note("libvirtd is not running: start it with a PATH that lists %s before /usr/bin (systemd's default does)", binDir)
		return
	}
	for _, pid := range pids {
		env, err := os.ReadFile(filepath.Join(procRoot, strconv.Itoa(pid), "environ"))
		if err != nil {
			rep.note("libvirtd pid %d: cannot read its environment (%v)", pid, err)
			continue
		}
		path := ""
		for _, kv := range strings.Split(string(env), "\x00") {
			if v, ok := strings.CutPrefix(kv, "PATH="); ok {
				path = v
			}
		}
		if first := firstInPath(path, "swtpm"); first == filepath.Join(binDir, "swtpm") {
			rep.note("libvirtd pid %d finds %s first in its PATH: good", pid, first)
		} else {
			rep.note("WARNING: libvirtd pid %d has PATH=%q and finds swtpm at %q, not in %s; restart it with %s earlier in PATH", pid, path, first, binDir, binDir)
		}
	}
}

// firstInPath is the first executable called name in a PATH value.
func firstInPath(path, name string) string {
	for _, d := range filepath.SplitList(path) {
		if d == "" {
			continue
		}
		p := filepath.Join(d, name)
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0 {
			return p
		}
	}
	return ""
}

// probeSetup reports whether the installed vtpmd answers `swtpm_setup --print-capabilities`
// like swtpm_setup does.
func probeSetup(ctx context.Context, vtpmd string) bool {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, vtpmd, "--print-capabilities")
	cmd.Args[0] = "swtpm_setup"
	out, err := cmd.Output()
	if err != nil {
		return false
	}
	var caps struct {
		Type     string   `json:"type"`
		Features []string `json:"features"`
	}
	if json.Unmarshal(out, &caps) != nil || caps.Type != "swtpm_setup" {
		return false
	}
	for _, f := range caps.Features {
		if f == "tpm-2.0" {
			return true
		}
	}
	return false
}

// Uninstall removes what the manifest lists, as long as each file is still what install put
// there, and puts moved-aside files back.
func Uninstall(o InstallOptions) (*Report, error) {
	if err := o.defaults(); err != nil {
		return nil, err
	}
	rep := &Report{}
	m, err := readManifest(o.ManifestPath)
	if err != nil {
		return nil, err
	}
	if len(m.Files) == 0 {
		// No manifest: remove only what is unmistakably ours in the given directories.
		for _, n := range []string{"swtpm", "swtpm_setup", "swtpm_ioctl"} {
			m.Files = append(m.Files, ManifestFile{Path: filepath.Join(o.BinDir, n), Kind: "link", Target: "vtpmd"})
		}
		m.Files = append(m.Files, ManifestFile{Path: filepath.Join(o.HookDir, o.HookName), Kind: "hook"})
	}
	var errs []error
	// Links first, the binary they point to later, directories (deepest first) last.
	for _, kind := range []string{"link", "hook", "binary", "", "dir"} {
		files := m.Files
		if kind == "dir" {
			files = append([]ManifestFile(nil), files...)
			sort.Slice(files, func(i, j int) bool { return len(files[i].Path) > len(files[j].Path) })
		}
		for _, f := range files {
			if f.Kind != kind {
				continue
			}
			if err := uninstallFile(f, rep); err != nil {
				errs = append(errs, err)
			}
		}
	}
	if len(errs) == 0 {
		if err := os.Remove(o.ManifestPath); err != nil && !errors.Is(err, fs.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	rep.note("restart libvirtd (or virtqemud) so it uses the distribution's swtpm again; SIGHUP is enough for the hook")
	return rep, errors.Join(errs...)
}

func uninstallFile(f ManifestFile, rep *Report) error {
	fi, err := os.Lstat(f.Path)
	exists := err == nil
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	if f.Kind == "dir" {
		if exists {
			if err := os.Remove(f.Path); err == nil {
				rep.did("%s: removed (empty directory created by install)", f.Path)
			} else {
				rep.note("%s: left in place (%v)", f.Path, err)
			}
		}
		return nil
	}
	ours := false
	if exists {
		switch f.Kind {
		case "link":
			cur, _ := os.Readlink(f.Path)
			ours = fi.Mode()&fs.ModeSymlink != 0 && cur == f.Target
		case "hook":
			cur, _ := os.ReadFile(f.Path)
			ours = fi.Mode().IsRegular() && bytes.Contains(cur, []byte(hookMarker))
		case "binary":
			sum, _ := fileSHA256(f.Path)
			ours = fi.Mode().IsRegular() && sum == f.SHA256
			if !ours && fi.Mode().IsRegular() {
				rep.note("%s: changed since install, left in place", f.Path)
			}
		}
	}
	if ours {
		if err := os.Remove(f.Path); err != nil {
			return err
		}
		rep.did("%s: removed", f.Path)
		exists = false
	}
	if f.Saved != "" {
		if exists {
			rep.note("%s: not restoring %s over a file that is not ours", f.Path, f.Saved)
		} else if err := os.Rename(f.Saved, f.Path); err != nil {
			return fmt.Errorf("restore %s: %w", f.Path, err)
		} else {
			rep.did("%s: restored the original from %s", f.Path, f.Saved)
		}
	}
	return nil
}
