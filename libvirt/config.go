package libvirt

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/vtpmd/vtpmd/manager/registry"
)

// Defaults of the hook configuration.
const (
	DefaultConfigPath = "/etc/vtpmd/hook.json"
	DefaultStateRoot  = "/var/lib/vtpmd"
	DefaultRunRoot    = "/run/vtpmd"
	DefaultQEMUUser   = "libvirt-qemu"
	DefaultQEMUGroup  = "kvm"
	// DefaultRunAs is the user external backends' `vtpmd socket` runs as: libvirt's swtpm user.
	DefaultRunAs        = "tss"
	DefaultStartTimeout = 5 * time.Second
	// DefaultLibvirtSwtpmRunDir and DefaultLibvirtSwtpmStateDir are where the system libvirtd
	// keeps the sockets and pid files, and the state, of the swtpm processes it starts.
	DefaultLibvirtSwtpmRunDir   = "/run/libvirt/qemu/swtpm"
	DefaultLibvirtSwtpmStateDir = "/var/lib/libvirt/swtpm"
)

// Config is the hook's configuration, read from a JSON file (DefaultConfigPath unless told
// otherwise). A missing file means all defaults. Unknown keys are refused.
type Config struct {
	// StateRoot holds <uuid>/tpm2 state directories and <uuid>/vtpmd.log of external backends.
	StateRoot string `json:"state_root,omitempty"`
	// RegistryDir holds the registry; default <StateRoot>/registry.
	RegistryDir string `json:"registry_dir,omitempty"`
	// SocketRoots are the directories an external backend's socket may be in (default
	// /run/vtpmd and StateRoot). The hook creates missing directories below them.
	SocketRoots []string `json:"socket_roots,omitempty"`
	// QEMUUser and QEMUGroup own the external control socket (qemu.conf's user and group).
	QEMUUser  string `json:"qemu_user,omitempty"`
	QEMUGroup string `json:"qemu_group,omitempty"`
	// RunAs is the user (a name or a uid) an external backend's `vtpmd socket` runs as, with
	// its primary and supplementary groups; default DefaultRunAs. It owns the state directory.
	// "root" (or 0) runs it as root: only when set here explicitly.
	RunAs string `json:"run_as,omitempty"`
	// Rewrites are applied to <source path> attributes by the migrate and restore filters.
	Rewrites []Rewrite `json:"rewrite,omitempty"`
	// StartTimeout bounds the wait for an external backend's socket, e.g. "5s".
	StartTimeout string `json:"start_timeout,omitempty"`
	// Vtpmd is the binary started as `vtpmd socket`; default the running executable.
	Vtpmd string `json:"vtpmd,omitempty"`
	// SocketArgs are extra arguments for `vtpmd socket` (e.g. "--flags=startup-clear"); the
	// options the hook sets itself (--ctrl, --tpmstate, --log, ...) are refused.
	SocketArgs []string `json:"socket_args,omitempty"`
	// LibvirtSwtpmRunDir and LibvirtSwtpmStateDir locate libvirt's own swtpm processes.
	LibvirtSwtpmRunDir   string `json:"libvirt_swtpm_run_dir,omitempty"`
	LibvirtSwtpmStateDir string `json:"libvirt_swtpm_state_dir,omitempty"`

	startTimeout time.Duration
}

// LoadConfig reads the configuration at path ("" means DefaultConfigPath); a missing file
// gives the defaults. The result has passed Validate.
func LoadConfig(path string) (*Config, error) {
	explicit := path != ""
	if path == "" {
		path = DefaultConfigPath
	}
	c := &Config{}
	f, err := os.Open(path)
	switch {
	case errors.Is(err, fs.ErrNotExist) && !explicit:
	case err != nil:
		return nil, fmt.Errorf("hook config: %w", err)
	default:
		defer f.Close()
		data, err := io.ReadAll(io.LimitReader(f, 1<<20))
		if err != nil {
			return nil, fmt.Errorf("hook config %s: %w", path, err)
		}
		dec := json.NewDecoder(bytes.NewReader(data))
		dec.DisallowUnknownFields()
		if err := dec.Decode(c); err != nil {
			return nil, fmt.Errorf("hook config %s: %w", path, err)
		}
	}
	if err := c.Validate(); err != nil {
		return nil, fmt.Errorf("hook config %s: %w", path, err)
	}
	return c, nil
}

// Overrides are settings from the command line that win over the configuration file.
type Overrides struct {
	// StateRoot replaces the configured state root; the registry moves along with it
	// (<StateRoot>/registry) unless RegistryDir or $VTPMD_REGISTRY places it.
	StateRoot string
	// RegistryDir wins over $VTPMD_REGISTRY, which wins over the configuration file.
	RegistryDir string
}

// Apply sets what o and $VTPMD_REGISTRY say in c. Run Validate afterwards when o moves the
// state root (it derives the registry directory again).
func (c *Config) Apply(o Overrides) {
	if o.StateRoot != "" {
		c.StateRoot, c.RegistryDir = o.StateRoot, ""
	}
	if d := os.Getenv(registry.DirEnv); d != "" {
		c.RegistryDir = d
	}
	if o.RegistryDir != "" {
		c.RegistryDir = o.RegistryDir
	}
}

// Validate fills in defaults and checks the values.
func (c *Config) Validate() error {
	if c.StateRoot == "" {
		c.StateRoot = DefaultStateRoot
	}
	if c.RegistryDir == "" {
		c.RegistryDir = filepath.Join(c.StateRoot, "registry")
	}
	if len(c.SocketRoots) == 0 {
		c.SocketRoots = []string{DefaultRunRoot, c.StateRoot}
	}
	if c.QEMUUser == "" {
		c.QEMUUser = DefaultQEMUUser
	}
	if c.QEMUGroup == "" {
		c.QEMUGroup = DefaultQEMUGroup
	}
	if c.RunAs == "" {
		c.RunAs = DefaultRunAs
	}
	if strings.ContainsAny(c.RunAs, ":/\x00\n") || strings.TrimSpace(c.RunAs) != c.RunAs {
		return fmt.Errorf("run_as %q: want a user name or a uid", c.RunAs)
	}
	if c.LibvirtSwtpmRunDir == "" {
		c.LibvirtSwtpmRunDir = DefaultLibvirtSwtpmRunDir
	}
	if c.LibvirtSwtpmStateDir == "" {
		c.LibvirtSwtpmStateDir = DefaultLibvirtSwtpmStateDir
	}
	c.startTimeout = DefaultStartTimeout
	if c.StartTimeout != "" {
		d, err := time.ParseDuration(c.StartTimeout)
		if err != nil || d <= 0 || d > 5*time.Minute {
			return fmt.Errorf("start_timeout %q: want a duration between 0 and 5m", c.StartTimeout)
		}
		c.startTimeout = d
	}
	for _, p := range []string{c.StateRoot, c.RegistryDir, c.LibvirtSwtpmRunDir, c.LibvirtSwtpmStateDir} {
		if err := CheckSyntax(p); err != nil {
			return err
		}
		if strings.ContainsRune(p, ',') {
			return fmt.Errorf("%w: %q contains a comma", ErrBadPath, p)
		}
	}
	roots, err := cleanRoots(c.SocketRoots)
	if err != nil {
		return err
	}
	c.SocketRoots = roots
	for _, r := range c.Rewrites {
		if err := r.Check(); err != nil {
			return err
		}
	}
	for _, a := range c.SocketArgs {
		switch strings.TrimLeft(strings.SplitN(a, "=", 2)[0], "-") {
		case "ctrl", "tpmstate", "log", "daemon", "server", "pid", "chroot", "runas", "terminate", "t", "d":
			return fmt.Errorf("socket_args: %q is set by the hook", a)
		}
	}
	if c.Vtpmd != "" && !filepath.IsAbs(c.Vtpmd) {
		return fmt.Errorf("vtpmd %q: want an absolute path", c.Vtpmd)
	}
	return nil
}

// StartWait is the validated start timeout.
func (c *Config) StartWait() time.Duration {
	if c.startTimeout == 0 {
		return DefaultStartTimeout
	}
	return c.startTimeout
}

// ExternalDir is the per-VM directory of an external backend: <StateRoot>/<uuid>.
func (c *Config) ExternalDir(uuid string) string { return filepath.Join(c.StateRoot, uuid) }

// StateDir is where a domain's vTPM state lives: libvirt's directory for the emulator
// backend, <StateRoot>/<uuid>/tpm2 for the external one.
func (c *Config) StateDir(dom *Domain) string {
	if dom.TPM == nil {
		return ""
	}
	if dom.TPM.Backend == BackendEmulator {
		return filepath.Join(c.LibvirtSwtpmStateDir, dom.UUID, dom.TPM.StateSubdir())
	}
	return filepath.Join(c.ExternalDir(dom.UUID), dom.TPM.StateSubdir())
}
