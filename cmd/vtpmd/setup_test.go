package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

func TestSetupArgs(t *testing.T) {
	cases := []struct{ in, want []string }{
		{[]string{"x", "--create-config-files", "skip-if-exist"}, []string{"x", "--create-config-files=skip-if-exist"}},
		{[]string{"x", "--create-config-files", "--tpm2"}, []string{"x", "--create-config-files=", "--tpm2"}},
		{[]string{"x", "--create-config-files"}, []string{"x", "--create-config-files="}},
		{[]string{"x", "--tpm2", "--tpm-state", "/d"}, []string{"x", "--tpm2", "--tpm-state", "/d"}},
		{[]string{"x", "--pcr-banks", "sha1", "--tpm2", "--pcr-banks= sha384 "}, []string{"x", "--pcr-banks", "sha1,sha384", "--tpm2"}},
	}
	for _, tc := range cases {
		if got := setupArgs(tc.in); !slices.Equal(got, tc.want) {
			t.Errorf("setupArgs(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}

// TestSetupCapabilities: the features libvirt probes are there, in swtpm_setup's JSON shape.
func TestSetupCapabilities(t *testing.T) {
	var caps struct {
		Type     string   `json:"type"`
		Features []string `json:"features"`
		Version  string   `json:"version"`
	}
	if err := json.Unmarshal([]byte(setupCapabilities()), &caps); err != nil {
		t.Fatal(err)
	}
	if caps.Type != "swtpm_setup" || caps.Version == "" {
		t.Fatalf("capabilities %+v", caps)
	}
	for _, f := range []string{"tpm-2.0", "cmdarg-pwdfile-fd", "cmdarg-reconfigure-pcr-banks", "cmdarg-create-config-files", "tpm12-not-need-root", "tpm2-rsa-keysize-2048", "tpm2-rsa-keysize-3072"} {
		if !slices.Contains(caps.Features, f) {
			t.Errorf("missing feature %s", f)
		}
	}
}

func TestLoadSetupConfig(t *testing.T) {
	dir := t.TempDir()
	t.Setenv("XDG_CONFIG_HOME", filepath.Join(dir, "none"))
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		os.WriteFile(p, []byte(content), 0o600)
		return p
	}
	c, err := loadSetupConfig(write("a.conf", "# x\ncreate_certs_tool= /usr/bin/swtpm_localca\ncreate_certs_tool_config = /c/l.conf\ncreate_certs_tool_options = /c/l.options\nactive_pcr_banks = sha1,sha256\n"))
	if err != nil || c.caConfig != "/c/l.conf" || c.caOptions != "/c/l.options" || c.activeBanks != "sha1,sha256" {
		t.Fatalf("config %+v, %v", c, err)
	}
	// a foreign certificate tool is refused only when certificates are asked for
	c, err = loadSetupConfig(write("b.conf", "create_certs_tool = /opt/my-ca-tool\n"))
	if err != nil {
		t.Fatalf("config naming another certificate tool: %v", err)
	}
	if err := c.checkCertTool(); err == nil || !strings.Contains(err.Error(), "not supported") {
		t.Fatalf("foreign certificate tool accepted: %v", err)
	}
	if _, err := loadSetupConfig(filepath.Join(dir, "missing.conf")); err == nil {
		t.Fatal("a missing --config file accepted")
	}
	// as swtpm: a line without '=' is skipped, an inline comment ends a value
	if c, err := loadSetupConfig(write("c.conf", "no equals sign\nactive_pcr_banks = sha1 # old guests\n")); err != nil || c.activeBanks != "sha1" {
		t.Fatalf("lenient parsing: %+v, %v", c, err)
	}
	// the user's file wins over /etc
	t.Setenv("XDG_CONFIG_HOME", dir)
	write("swtpm_setup.conf", "active_pcr_banks = sha384\n")
	if c, err := loadSetupConfig(""); err != nil || c.activeBanks != "sha384" {
		t.Fatalf("user config: %+v, %v", c, err)
	}
}

func TestCreateConfigFiles(t *testing.T) {
	if os.Getuid() == 0 {
		if err := createConfigFiles(""); err == nil || !strings.Contains(err.Error(), "'root' flag") {
			t.Fatalf("root without the root flag: %v", err)
		}
	}
	dir := t.TempDir()
	t.Setenv("XDG_CONFIG_HOME", dir)
	if err := createConfigFiles("root"); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"swtpm_setup.conf", "swtpm-localca.conf", "swtpm-localca.options"} {
		if _, err := os.Stat(filepath.Join(dir, f)); err != nil {
			t.Fatal(err)
		}
	}
	c, err := loadSetupConfig(filepath.Join(dir, "swtpm_setup.conf"))
	if err != nil || c.caConfig != filepath.Join(dir, "swtpm-localca.conf") {
		t.Fatalf("written config: %+v, %v", c, err)
	}
	if err := createConfigFiles("root"); err == nil || !strings.Contains(err.Error(), "Refusing to overwrite") {
		t.Fatalf("second run: %v", err)
	}
	if err := createConfigFiles("root,skip-if-exist"); err != nil {
		t.Fatalf("skip-if-exist: %v", err)
	}
	if err := createConfigFiles("root,overwrite"); err != nil {
		t.Fatalf("overwrite: %v", err)
	}
	for _, bad := range []string{"root,bogus", "root,overwrite,skip-if-exist"} {
		if err := createConfigFiles(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}
