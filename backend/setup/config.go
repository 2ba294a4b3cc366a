package setup

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/vtpmd/vtpmd/backend/localca"
)

// systemConfigFile is swtpm_setup.conf for every user.
const systemConfigFile = "/etc/swtpm_setup.conf"

// config is what Run uses from swtpm_setup.conf.
type config struct {
	caConfig, caOptions string
	activeBanks         string
	ek1, ek2            string // ek1keyalgo, ek2keyalgo (swtpm 0.11)
	certTool, path      string // create_certs_tool, and the file that named it
}

// userConfigDir is ${XDG_CONFIG_HOME:-$HOME/.config}, where swtpm keeps per-user files.
func userConfigDir() string {
	if d := os.Getenv("XDG_CONFIG_HOME"); d != "" {
		return d
	}
	home := os.Getenv("HOME")
	if home == "" {
		if h, err := os.UserHomeDir(); err == nil {
			home = h
		}
	}
	return filepath.Join(home, ".config")
}

// loadConfig finds swtpm_setup.conf as swtpm_setup does (--config, the user's file,
// /etc/swtpm_setup.conf) and reads the keys Run uses. Without any file it uses Debian's
// defaults.
func loadConfig(explicit string) (config, error) {
	c := config{caConfig: localca.DefaultConfigFile, caOptions: localca.DefaultOptionsFile, activeBanks: "sha256"}
	path := explicit
	if path == "" {
		for _, p := range []string{filepath.Join(userConfigDir(), "swtpm_setup.conf"), systemConfigFile} {
			if _, err := os.Stat(p); err == nil {
				path = p
				break
			}
		}
	}
	if path == "" {
		return c, nil
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return c, messagef("Could not read config file %s: %w", path, err)
	}
	kv, err := localca.ParseKeyValues(data)
	if err != nil {
		return c, fmt.Errorf("config file %s: %w", path, err)
	}
	// a foreign certificate tool only matters when certificates are asked for (certTool)
	c.certTool, c.path = kv["create_certs_tool"], path
	if v := kv["create_certs_tool_config"]; v != "" {
		c.caConfig = v
	}
	if v := kv["create_certs_tool_options"]; v != "" {
		c.caOptions = v
	}
	if v := kv["active_pcr_banks"]; v != "" {
		c.activeBanks = v
	}
	c.ek1, c.ek2 = kv["ek1keyalgo"], kv["ek2keyalgo"]
	return c, nil
}

// checkCertTool refuses a create_certs_tool other than swtpm_localca (whose job Run does
// in-process) rather than ignoring it; it is called only when certificates are asked for.
func (c config) checkCertTool() error {
	if c.certTool != "" && filepath.Base(c.certTool) != "swtpm_localca" {
		return fmt.Errorf("create_certs_tool %s in %s is not supported: vtpmd setup issues certificates with its own swtpm_localca-compatible CA", c.certTool, c.path)
	}
	return nil
}
