package setup

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// TestCapabilities: the features libvirt probes are there, in swtpm_setup's JSON shape.
func TestCapabilities(t *testing.T) {
	var caps struct {
		Type     string   `json:"type"`
		Features []string `json:"features"`
		Version  string   `json:"version"`
	}
	if err := json.Unmarshal([]byte(capabilities()), &caps); err != nil {
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

// runSetup runs Run with opts and a config file of its own, and returns stdout and stderr.
func runSetup(t *testing.T, opts Options) (stdout, stderr string, err error) {
	t.Helper()
	var out, errOut bytes.Buffer
	opts.Stdout, opts.Stderr = &out, &errOut
	if opts.ConfigFile == "" {
		opts.ConfigFile = filepath.Join(t.TempDir(), "swtpm_setup.conf")
		os.WriteFile(opts.ConfigFile, []byte("active_pcr_banks = sha256\n"), 0o600)
	}
	err = Run(context.Background(), opts)
	return out.String(), errOut.String(), err
}

// exitCode is the status a command exits with for Run's error.
func exitCode(t *testing.T, err error) int {
	t.Helper()
	if err == nil {
		return 0
	}
	var ee *ExitError
	if !errors.As(err, &ee) {
		t.Fatalf("Run failed without an ExitError: %v", err)
	}
	return ee.Code
}

func TestRunPrintsInfo(t *testing.T) {
	out, _, err := runSetup(t, Options{Program: "swtpm_setup", Release: "9.9", Help: true, Version: true})
	if err != nil || !strings.HasPrefix(out, "TPM emulator setup tool version "+CompatVersion+" (vtpmd 9.9)\nUsage: swtpm_setup [options]") {
		t.Fatalf("help: %q, %v", out, err)
	}
	if out, _, err := runSetup(t, Options{Version: true, Release: "9.9"}); err != nil || out != "TPM emulator setup tool version "+CompatVersion+" (vtpmd 9.9)\n" {
		t.Fatalf("version: %q, %v", out, err)
	}
	if out, _, err := runSetup(t, Options{PrintCapabilities: true, StatePath: "/nonexistent"}); err != nil || !strings.Contains(out, `"type": "swtpm_setup"`) {
		t.Fatalf("capabilities: %q, %v", out, err)
	}
}

// TestRunRefusesOptions: swtpm_setup's checks, each an error on stderr and exit status 1.
func TestRunRefusesOptions(t *testing.T) {
	dir := t.TempDir()
	cases := []struct {
		opts Options
		msg  string
	}{
		{Options{TPM2: true, TakeOwnership: true, StatePath: dir}, "Taking ownership is not supported for TPM 2.\n"},
		{Options{ECC: true, StatePath: dir}, "--ecc requires --tpm2.\n"},
		{Options{Reconfigure: true, StatePath: dir}, "--reconfigure requires --tpm2.\n"},
		{Options{PCRBanksGiven: true, StatePath: dir}, "--pcr-banks requires --tpm2.\n"},
		{Options{RSAKeySize: "3072", StatePath: dir}, "3072 bit RSA keys are not supported by libtpms.\n"},
		{Options{TPM2: true}, "--tpm-state must be provided\n"},
		{Options{TPM2: true, StatePath: "nvram://x"}, "Unsupported TPM state backend in nvram://x: use a directory, dir:// or file://\n"},
		{Options{TPM2: true, StatePath: filepath.Join(dir, "missing")}, "cannot access directory " + filepath.Join(dir, "missing") + ". Make sure"},
		{Options{TPM2: true, StatePath: dir, Reconfigure: true, CreateEK: true}, "Reconfiguration is not supported with creation of EK or certificates\n"},
		{Options{TPM2: true, StatePath: dir, Cipher: "des"}, "Unsupported cipher des.\n"},
		{Options{TPM2: true, StatePath: dir, KeyFileFD: "x"}, "Invalid file descriptor 'x'\n"},
		{Options{TPM2: true, StatePath: dir, PCRBanks: "md5"}, "No PCR banks could be allocated. None of the selected algorithms are supported.\n"},
	}
	for _, tc := range cases {
		_, stderr, err := runSetup(t, tc.opts)
		if exitCode(t, err) != 1 || !strings.Contains(stderr, tc.msg) {
			t.Errorf("%+v: stderr %q, %v; want %q", tc.opts, stderr, err, tc.msg)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "tpm2-00.permall")); err == nil {
		t.Error("a refused run wrote state")
	}
	// an unsupported key size is logged as information, on stdout
	stdout, _, err := runSetup(t, Options{TPM2: true, StatePath: dir, RSAKeySize: "1024"})
	if exitCode(t, err) != 1 || stdout != "Unsupported RSA key size 1024.\n" {
		t.Errorf("rsa key size: stdout %q, %v", stdout, err)
	}
}

func TestRunEarlyFailures(t *testing.T) {
	dir := t.TempDir()
	link := filepath.Join(dir, "log")
	os.Symlink(filepath.Join(dir, "target"), link)
	if _, stderr, err := runSetup(t, Options{TPM2: true, StatePath: dir, LogFile: link}); exitCode(t, err) != 1 || stderr != "Logfile must not be a symlink.\n" {
		t.Errorf("symlinked log: %q, %v", stderr, err)
	}
	if _, stderr, err := runSetup(t, Options{TPM2: true, StatePath: dir, RunAs: "no-such-user-vtpmd"}); exitCode(t, err) != 1 || stderr != "user 'no-such-user-vtpmd' does not exist\n" {
		t.Errorf("--runas an unknown user: %q, %v", stderr, err)
	}
	switched := ""
	switchUser := func(u string) error { switched = u; return errors.New("user 'x' does not exist") }
	if _, stderr, err := runSetup(t, Options{StatePath: dir, RunAs: "x", SwitchUser: switchUser}); exitCode(t, err) != 1 || switched != "x" || stderr != "user 'x' does not exist\n" {
		t.Errorf("--runas: %q, %v", stderr, err)
	}
}

// TestRunManufactures: a TPM 2 is made once; then existing state is refused, kept, or
// replaced, as swtpm_setup decides.
func TestRunManufactures(t *testing.T) {
	dir := t.TempDir()
	log := filepath.Join(t.TempDir(), "setup.log")
	opts := Options{TPM2: true, StatePath: dir, CreateEK: true, Display: true, LogFile: log, IgnoredOptions: []string{"swtpm_ioctl"}}
	stdout, _, err := runSetup(t, opts)
	if err != nil || !strings.Contains(stdout, "EK rsa2048 at handle 0x81010001") {
		t.Fatalf("fresh: %q, %v", stdout, err)
	}
	b, _ := os.ReadFile(log)
	for _, want := range []string{"Warning: --swtpm_ioctl is deprecated and has no effect.\n", "Starting vTPM manufacturing as ", "Successfully authored TPM state.\nEnding vTPM manufacturing @ "} {
		if !strings.Contains(string(b), want) {
			t.Errorf("log %q lacks %q", b, want)
		}
	}
	opts = Options{TPM2: true, StatePath: "dir://" + dir}
	if _, stderr, err := runSetup(t, opts); !errors.Is(err, ErrStateExists) || exitCode(t, err) != 1 || stderr != "Found existing TPM state 'permall'.\n" {
		t.Fatalf("existing state: %q, %v", stderr, err)
	}
	opts.NotOverwrite, opts.Overwrite = true, true
	if stdout, _, err := runSetup(t, opts); err != nil || stdout != "Not overwriting existing state file.\n" {
		t.Fatalf("not-overwrite: %q, %v", stdout, err)
	}
	opts.NotOverwrite = false
	if stdout, _, err := runSetup(t, opts); err != nil || !strings.Contains(stdout, "Successfully authored TPM state.") {
		t.Fatalf("overwrite: %q, %v", stdout, err)
	}
}
