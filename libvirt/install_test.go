package libvirt

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

type installEnv struct {
	dir string
	o   InstallOptions
}

func newInstallEnv(t *testing.T, setup string) *installEnv {
	t.Helper()
	dir := t.TempDir()
	exe := filepath.Join(dir, "build", "vtpmd")
	os.MkdirAll(filepath.Dir(exe), 0o755)
	if err := os.WriteFile(exe, []byte("#!/bin/sh\nexit 3\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	os.MkdirAll(filepath.Join(dir, "proc"), 0o755)
	return &installEnv{dir: dir, o: InstallOptions{
		Exe:          exe,
		BinDir:       filepath.Join(dir, "bin"),
		HookDir:      filepath.Join(dir, "hooks", "qemu.d"),
		ManifestPath: filepath.Join(dir, "var", "install.json"),
		Setup:        setup,
		HookRegistry: "/tmp/it's here",
		ProcRoot:     filepath.Join(dir, "proc"),
	}}
}

func TestInstallUninstall(t *testing.T) {
	e := newInstallEnv(t, SetupVtpmd)
	rep, err := Install(context.Background(), e.o)
	if err != nil {
		t.Fatal(err)
	}
	bin := e.o.BinDir
	for _, n := range []string{"swtpm", "swtpm_setup", "swtpm_ioctl"} {
		if tgt, err := os.Readlink(filepath.Join(bin, n)); err != nil || tgt != "vtpmd" {
			t.Errorf("%s -> %q %v", n, tgt, err)
		}
		if res, err := filepath.EvalSymlinks(filepath.Join(bin, n)); err != nil || res != filepath.Join(bin, "vtpmd") {
			t.Errorf("%s resolves to %q %v", n, res, err)
		}
	}
	hook := filepath.Join(e.o.HookDir, DefaultHookName)
	script, err := os.ReadFile(hook)
	if err != nil {
		t.Fatal(err)
	}
	want := "exec '" + bin + "/vtpmd' hook '--registry' '/tmp/it'\\''s here' -- \"$@\"\n"
	if !strings.HasSuffix(string(script), want) {
		t.Fatalf("hook script:\n%s", script)
	}
	if fi, _ := os.Stat(hook); fi.Mode().Perm() != 0o755 {
		t.Fatalf("hook mode %v", fi.Mode())
	}
	joined := strings.Join(rep.Notes, "\n")
	for _, w := range []string{"restart libvirtd", "SIGHUP", "vtpmd uninstall", "not running"} {
		if !strings.Contains(joined, w) {
			t.Errorf("notes lack %q:\n%s", w, joined)
		}
	}

	// idempotent
	rep, err = Install(context.Background(), e.o)
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range rep.Actions {
		if !strings.Contains(a, "unchanged") {
			t.Errorf("second install changed something: %s", a)
		}
	}

	// a new build replaces the copy
	os.WriteFile(e.o.Exe, []byte("#!/bin/sh\nexit 4\n"), 0o755)
	if _, err := Install(context.Background(), e.o); err != nil {
		t.Fatal(err)
	}
	if data, _ := os.ReadFile(filepath.Join(bin, "vtpmd")); !strings.Contains(string(data), "exit 4") {
		t.Fatal("binary not updated")
	}

	rep, err = Uninstall(e.o)
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Actions) == 0 {
		t.Error("uninstall reported no actions")
	}
	left, _ := os.ReadDir(bin)
	if len(left) != 0 {
		t.Fatalf("left in bin dir: %v", left)
	}
	if _, err := os.Stat(hook); !os.IsNotExist(err) {
		t.Fatal("hook left")
	}
	if _, err := os.Stat(e.o.ManifestPath); !os.IsNotExist(err) {
		t.Fatal("manifest left")
	}
	if _, err := os.Stat(filepath.Join(e.dir, "hooks")); !os.IsNotExist(err) {
		t.Fatal("hook directories created by install left")
	}
	// uninstall twice is harmless
	if _, err := Uninstall(e.o); err != nil {
		t.Fatal(err)
	}
}

func TestInstallForeignFiles(t *testing.T) {
	e := newInstallEnv(t, SetupSystem)
	os.MkdirAll(e.o.BinDir, 0o755)
	foreign := filepath.Join(e.o.BinDir, "swtpm")
	os.WriteFile(foreign, []byte("someone else's"), 0o755)
	_, err := Install(context.Background(), e.o)
	if !errors.Is(err, ErrForeignFile) {
		t.Fatalf("err = %v", err)
	}
	if data, _ := os.ReadFile(foreign); string(data) != "someone else's" {
		t.Fatal("foreign file replaced without --force")
	}
	e.o.Force = true
	if _, err := Install(context.Background(), e.o); err != nil {
		t.Fatal(err)
	}
	if tgt, _ := os.Readlink(foreign); tgt != "vtpmd" {
		t.Fatal("not linked")
	}
	if _, err := os.Lstat(filepath.Join(e.o.BinDir, "swtpm_setup")); !os.IsNotExist(err) {
		t.Fatal("swtpm_setup linked in system mode")
	}
	if _, err := Uninstall(e.o); err != nil {
		t.Fatal(err)
	}
	if data, _ := os.ReadFile(foreign); string(data) != "someone else's" {
		t.Fatal("foreign file not restored")
	}
}

func TestInstallSetupModes(t *testing.T) {
	e := newInstallEnv(t, SetupVtpmd)
	if _, err := Install(context.Background(), e.o); err != nil {
		t.Fatal(err)
	}
	// auto: the fake binary fails --print-capabilities, so swtpm_setup falls back to the system one
	e.o.Setup = SetupAuto
	rep, err := Install(context.Background(), e.o)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(filepath.Join(e.o.BinDir, "swtpm_setup")); !os.IsNotExist(err) {
		t.Fatal("swtpm_setup link kept in fallback")
	}
	if !strings.Contains(strings.Join(rep.Notes, "\n"), SystemSwtpmSetup) {
		t.Fatalf("fallback not explained: %v", rep.Notes)
	}
	e.o.Setup = "magic"
	if _, err := Install(context.Background(), e.o); err == nil {
		t.Fatal("bad setup mode accepted")
	}
}

func TestCheckLibvirtdPath(t *testing.T) {
	dir := t.TempDir()
	bin := filepath.Join(dir, "bin")
	os.MkdirAll(bin, 0o755)
	os.WriteFile(filepath.Join(bin, "swtpm"), []byte("x"), 0o755)
	proc := filepath.Join(dir, "proc")
	for pid, path := range map[string]string{"100": bin + ":/usr/bin", "200": "/usr/bin:" + bin} {
		os.MkdirAll(filepath.Join(proc, pid), 0o755)
		os.WriteFile(filepath.Join(proc, pid, "comm"), []byte("libvirtd\n"), 0o644)
		os.WriteFile(filepath.Join(proc, pid, "environ"), []byte("HOME=/\x00PATH="+path+"\x00"), 0o644)
	}
	rep := &Report{}
	checkLibvirtdPath(proc, bin, rep)
	joined := strings.Join(rep.Notes, "\n")
	if !strings.Contains(joined, "pid 100 finds") || !strings.Contains(joined, "WARNING: libvirtd pid 200") {
		t.Fatalf("notes:\n%s", joined)
	}
}

func TestHookScriptQuoting(t *testing.T) {
	s := HookScript("/opt/v tpm/vtpmd", []string{"--config", "/etc/$(reboot)"})
	if !strings.Contains(s, `exec '/opt/v tpm/vtpmd' hook '--config' '/etc/$(reboot)' -- "$@"`) {
		t.Fatalf("script:\n%s", s)
	}
}
