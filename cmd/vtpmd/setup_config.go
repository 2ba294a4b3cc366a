package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/vtpmd/vtpmd/backend/localca"
	"github.com/vtpmd/vtpmd/internal/atomicfile"
)

const defaultSetupConfig = "/etc/swtpm_setup.conf"

// setupConfig is what vtpmd setup uses from swtpm_setup.conf.
type setupConfig struct {
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

// loadSetupConfig finds swtpm_setup.conf as swtpm_setup does (--config, the user's file,
// /etc/swtpm_setup.conf) and reads the keys vtpmd setup uses. Without any file it uses
// Debian's defaults.
func loadSetupConfig(explicit string) (setupConfig, error) {
	c := setupConfig{caConfig: localca.DefaultConfigFile, caOptions: localca.DefaultOptionsFile, activeBanks: "sha256"}
	path := explicit
	if path == "" {
		for _, p := range []string{filepath.Join(userConfigDir(), "swtpm_setup.conf"), defaultSetupConfig} {
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
		return c, cliMessage(fmt.Sprintf("Could not read config file %s: %v", path, err))
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

// checkCertTool refuses a create_certs_tool other than swtpm_localca (whose job vtpmd does
// in-process) rather than ignoring it; it is called only when certificates are asked for.
func (c setupConfig) checkCertTool() error {
	if c.certTool != "" && filepath.Base(c.certTool) != "swtpm_localca" {
		return fmt.Errorf("create_certs_tool %s in %s is not supported: vtpmd setup issues certificates with its own swtpm_localca-compatible CA", c.certTool, c.path)
	}
	return nil
}

// createConfigFiles is --create-config-files [overwrite][,root][,skip-if-exist]: per-user
// swtpm_setup.conf, swtpm-localca.conf and swtpm-localca.options whose CA lives under the
// user's config directory.
func createConfigFiles(flags string) error {
	var overwrite, root, skip bool
	for _, f := range strings.Split(flags, ",") {
		switch strings.TrimSpace(f) {
		case "":
		case "overwrite":
			overwrite = true
		case "root":
			root = true
		case "skip-if-exist":
			skip = true
		default:
			return cliMessage(fmt.Sprintf("Unsupported flag '%s' for --create-config-files", f))
		}
	}
	if overwrite && skip {
		return cliMessage("Error: overwrite and skip-if-exist cannot both be used")
	}
	if os.Getuid() == 0 && !root {
		return cliMessage("Requiring the 'root' flag since the configuration files will shadow those in /etc.")
	}
	dir := userConfigDir()
	caDir := filepath.Join(dir, "var", "lib", "swtpm-localca")
	files := []struct{ name, content string }{
		{"swtpm_setup.conf", "create_certs_tool = /usr/bin/swtpm_localca\n" +
			"create_certs_tool_config = " + filepath.Join(dir, "swtpm-localca.conf") + "\n" +
			"create_certs_tool_options = " + filepath.Join(dir, "swtpm-localca.options") + "\n" +
			"# Comma-separated list (no spaces) of PCR banks to activate by default\nactive_pcr_banks = sha256\n"},
		{"swtpm-localca.conf", "statedir = " + caDir + "\nsigningkey = " + filepath.Join(caDir, "signkey.pem") + "\n" +
			"issuercert = " + filepath.Join(caDir, "issuercert.pem") + "\ncertserial = " + filepath.Join(caDir, "certserial") + "\n"},
		{"swtpm-localca.options", platformOptions()},
	}
	for _, f := range files {
		p := filepath.Join(dir, f.name)
		if _, err := os.Stat(p); err == nil && !overwrite {
			if skip {
				return nil
			}
			return cliMessage(fmt.Sprintf("File %s already exists. Refusing to overwrite.", p))
		}
	}
	if err := os.MkdirAll(caDir, 0o775); err != nil {
		return cliMessage(fmt.Sprintf("Could not create %s: %v", caDir, err))
	}
	for _, f := range files {
		p := filepath.Join(dir, f.name)
		if err := atomicfile.WriteFile(p, []byte(f.content), 0o644); err != nil {
			return err
		}
		fmt.Printf("Writing %s.\n", p)
	}
	return nil
}

// unixAccess is access(2) with the real uid, as the C tools check permissions.
func unixAccess(path string, mode uint32) error {
	return unix.Access(path, mode)
}

// platformOptions is swtpm-localca.options for a user: the platform is the running kernel
// (uname sysname, version, sysname; blanks become '_'), as swtpm_setup writes it.
func platformOptions() string {
	var u unix.Utsname
	sys, ver := "Linux", "unknown"
	if unix.Uname(&u) == nil {
		sys, ver = unix.ByteSliceToString(u.Sysname[:]), unix.ByteSliceToString(u.Version[:])
	}
	us := func(s string) string { return strings.ReplaceAll(s, " ", "_") }
	return "--platform-manufacturer " + us(sys) + "\n--platform-version " + us(ver) + "\n--platform-model " + us(sys) + "\n"
}
