package setup

import (
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestLoadConfig(t *testing.T) {
	dir := t.TempDir()
	t.Setenv("XDG_CONFIG_HOME", filepath.Join(dir, "none"))
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		os.WriteFile(p, []byte(content), 0o600)
		return p
	}
	c, err := loadConfig(write("a.conf", "# x\ncreate_certs_tool= /usr/bin/swtpm_localca\ncreate_certs_tool_config = /c/l.conf\ncreate_certs_tool_options = /c/l.options\nactive_pcr_banks = sha1,sha256\n"))
	if err != nil || c.caConfig != "/c/l.conf" || c.caOptions != "/c/l.options" || c.activeBanks != "sha1,sha256" {
		t.Fatalf("config %+v, %v", c, err)
	}
	// a foreign certificate tool is refused only when certificates are asked for
	c, err = loadConfig(write("b.conf", "create_certs_tool = /opt/my-ca-tool\n"))
	if err != nil {
		t.Fatalf("config naming another certificate tool: %v", err)
	}
	if err := c.checkCertTool(); err == nil || !strings.Contains(err.Error(), "not supported") {
		t.Fatalf("foreign certificate tool accepted: %v", err)
	}
	if _, err := loadConfig(filepath.Join(dir, "missing.conf")); err == nil {
		t.Fatal("a missing --config file accepted")
	}
	// as swtpm: a line without '=' is skipped, an inline comment ends a value
	if c, err := loadConfig(write("c.conf", "no equals sign\nactive_pcr_banks = sha1 # old guests\n")); err != nil || c.activeBanks != "sha1" {
		t.Fatalf("lenient parsing: %+v, %v", c, err)
	}
	// the user's file wins over /etc
	t.Setenv("XDG_CONFIG_HOME", dir)
	write("swtpm_setup.conf", "active_pcr_banks = sha384\n")
	if c, err := loadConfig(""); err != nil || c.activeBanks != "sha384" {
		t.Fatalf("user config: %+v, %v", c, err)
	}
}

func TestCreateConfigFiles(t *testing.T) {
	if os.Getuid() == 0 {
		if err := createConfigFiles("", io.Discard); err == nil || !strings.Contains(err.Error(), "'root' flag") {
			t.Fatalf("root without the root flag: %v", err)
		}
	}
	dir := t.TempDir()
	t.Setenv("XDG_CONFIG_HOME", dir)
	if err := createConfigFiles("root", io.Discard); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"swtpm_setup.conf", "swtpm-localca.conf", "swtpm-localca.options"} {
		if _, err := os.Stat(filepath.Join(dir, f)); err != nil {
			t.Fatal(err)
		}
	}
	c, err := loadConfig(filepath.Join(dir, "swtpm_setup.conf"))
	if err != nil || c.caConfig != filepath.Join(dir, "swtpm-localca.conf") {
		t.Fatalf("written config: %+v, %v", c, err)
	}
	if err := createConfigFiles("root", io.Discard); err == nil || !strings.Contains(err.Error(), "Refusing to overwrite") {
		t.Fatalf("second run: %v", err)
	}
	if err := createConfigFiles("root,skip-if-exist", io.Discard); err != nil {
		t.Fatalf("skip-if-exist: %v", err)
	}
	if err := createConfigFiles("root,overwrite", io.Discard); err != nil {
		t.Fatalf("overwrite: %v", err)
	}
	for _, bad := range []string{"root,bogus", "root,overwrite,skip-if-exist"} {
		if err := createConfigFiles(bad, io.Discard); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}
