package setup

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/vtpmd/vtpmd/internal/atomicfile"
)

// configFilesFlags is --create-config-files' argument.
type configFilesFlags struct {
	overwrite, root, skipIfExist bool
}

func parseConfigFilesFlags(flags string) (configFilesFlags, error) {
	var f configFilesFlags
	for _, v := range strings.Split(flags, ",") {
		switch strings.TrimSpace(v) {
		case "":
		case "overwrite":
			f.overwrite = true
		case "root":
			f.root = true
		case "skip-if-exist":
			f.skipIfExist = true
		default:
			return f, messagef("Unsupported flag '%s' for --create-config-files", v)
		}
	}
	if f.overwrite && f.skipIfExist {
		return f, messagef("Error: overwrite and skip-if-exist cannot both be used")
	}
	return f, nil
}

// createConfigFiles is --create-config-files [overwrite][,root][,skip-if-exist]: per-user
// swtpm_setup.conf, swtpm-localca.conf and swtpm-localca.options whose CA lives under the
// user's config directory. It says on stdout what it writes.
func createConfigFiles(flags string, stdout io.Writer) error {
	f, err := parseConfigFilesFlags(flags)
	if err != nil {
		return err
	}
	// root's files would shadow those in /etc, for every tool run as root
	if os.Getuid() == 0 && !f.root {
		return messagef("Requiring the 'root' flag since the configuration files will shadow those in /etc.")
	}
	dir := userConfigDir()
	caDir := filepath.Join(dir, "var", "lib", "swtpm-localca")
	files := userConfigFiles(dir, caDir)
	for _, cf := range files {
		p := filepath.Join(dir, cf.name)
		if _, err := os.Stat(p); err == nil && !f.overwrite {
			if f.skipIfExist {
				return nil
			}
			return messagef("File %s already exists. Refusing to overwrite.", p)
		}
	}
	if err := os.MkdirAll(caDir, 0o775); err != nil {
		return messagef("Could not create %s: %w", caDir, err)
	}
	for _, cf := range files {
		p := filepath.Join(dir, cf.name)
		if err := atomicfile.WriteFile(p, []byte(cf.content), 0o644); err != nil {
			return err
		}
		fmt.Fprintf(stdout, "Writing %s.\n", p)
	}
	return nil
}

// configFile is one config file that --create-config-files writes.
type configFile struct{ name, content string }

// userConfigFiles are the per-user config files, in dir, with the CA in caDir.
func userConfigFiles(dir, caDir string) []configFile {
	return []configFile{
		{"swtpm_setup.conf", "create_certs_tool = /usr/bin/swtpm_localca\n" +
			"create_certs_tool_config = " + filepath.Join(dir, "swtpm-localca.conf") + "\n" +
			"create_certs_tool_options = " + filepath.Join(dir, "swtpm-localca.options") + "\n" +
			"# Comma-separated list (no spaces) of PCR banks to activate by default\nactive_pcr_banks = sha256\n"},
		{"swtpm-localca.conf", "statedir = " + caDir + "\nsigningkey = " + filepath.Join(caDir, "signkey.pem") + "\n" +
			"issuercert = " + filepath.Join(caDir, "issuercert.pem") + "\ncertserial = " + filepath.Join(caDir, "certserial") + "\n"},
		{"swtpm-localca.options", platformOptions()},
	}
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
