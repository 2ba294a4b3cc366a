package libvirt

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/manager"

	"github.com/vtpmd/vtpmd/manager/registry"
)

func TestConfigApply(t *testing.T) {
	tests := []struct {
		name     string
		env      string
		o        Overrides
		root     string
		registry string
	}{
		{"nothing", "", Overrides{}, "/st", "/st/registry"},
		{"environment", "/env/reg", Overrides{}, "/st", "/env/reg"},
		{"flag wins over environment", "/env/reg", Overrides{RegistryDir: "/flag/reg"}, "/st", "/flag/reg"},
		{"state root takes the registry along", "", Overrides{StateRoot: "/other"}, "/other", "/other/registry"},
		{"state root, registry placed by environment", "/env/reg", Overrides{StateRoot: "/other"}, "/other", "/env/reg"},
		{"state root and registry flag", "", Overrides{StateRoot: "/other", RegistryDir: "/flag/reg"}, "/other", "/flag/reg"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Setenv(registry.DirEnv, tt.env)
			c := &Config{StateRoot: "/st"}
			if err := c.Validate(); err != nil {
				t.Fatal(err)
			}
			c.Apply(tt.o)
			if err := c.Validate(); err != nil {
				t.Fatal(err)
			}
			if c.StateRoot != tt.root || c.RegistryDir != tt.registry {
				t.Fatalf("state root %s, registry %s; want %s, %s", c.StateRoot, c.RegistryDir, tt.root, tt.registry)
			}
		})
	}
}

func TestRunHook(t *testing.T) {
	t.Setenv(registry.DirEnv, "")
	dir := t.TempDir()
	req := HookRequest{
		Overrides: Overrides{StateRoot: dir},
		Args:      []string{"vm1", OpStopped, "end", "-"},
	}
	var out, errb bytes.Buffer
	if err := RunHook(context.Background(), req, strings.NewReader(domXML(emuTPM, "")), &out, &errb); err != nil {
		t.Fatal(err)
	}
	rec, err := registry.New(filepath.Join(dir, "registry")).Get(testUUID)
	if err != nil || len(rec.Events) != 1 || rec.Events[0].Op != OpStopped {
		t.Fatalf("record %+v, %v", rec, err)
	}
	req.ConfigPath = filepath.Join(dir, "absent.json")
	if err := RunHook(context.Background(), req, strings.NewReader(domXML(emuTPM, "")), &out, &errb); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("explicit missing configuration: %v", err)
	}
	req.ConfigPath, req.Overrides = "", Overrides{StateRoot: "relative"}
	if err := RunHook(context.Background(), req, strings.NewReader(domXML(emuTPM, "")), &out, &errb); !errors.Is(err, ErrBadPath) {
		t.Fatalf("relative state root: %v", err)
	}
}

func TestShowStatusRegistryOnly(t *testing.T) {
	t.Setenv(registry.DirEnv, "")
	reg := registry.New(t.TempDir())
	ctx := context.Background()
	for _, op := range []string{OpPrepare, OpStopped} {
		if _, err := reg.Append(ctx, testUUID, registry.Event{Op: op, SubOp: "begin", Detail: "d-" + op}, func(r *registry.Record) {
			r.Name, r.Backend, r.StateDir = "vm1", string(BackendEmulator), "/nonexistent/tpm2"
		}); err != nil {
			t.Fatal(err)
		}
	}
	q := StatusQuery{Overrides: Overrides{RegistryDir: reg.Dir}, NoLibvirt: true, History: 1, JSON: true}
	var out, warn bytes.Buffer
	if err := ShowStatus(ctx, q, &out, &warn); err != nil {
		t.Fatal(err)
	}
	var sts []VMStatus
	if err := json.Unmarshal(out.Bytes(), &sts); err != nil {
		t.Fatalf("%v: %s", err, out.String())
	}
	if len(sts) != 1 || sts[0].UUID != testUUID || sts[0].Defined || sts[0].Running || len(sts[0].History) != 1 || sts[0].History[0].Op != OpStopped {
		t.Fatalf("status %+v", sts)
	}
	if warn.Len() != 0 {
		t.Fatalf("warnings %q", warn.String())
	}
	out.Reset()
	q.JSON = false
	if err := ShowStatus(ctx, q, &out, &warn); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"NAME", "vm1", "unknown", "stopped", "/nonexistent/tpm2 (absent)", "stopped begin d-stopped"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("table lacks %q:\n%s", want, out.String())
		}
	}
}

func TestWriteStatusTable(t *testing.T) {
	when := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	tests := []struct {
		name string
		sts  []VMStatus
		want []string
	}{
		{"empty", nil, []string{"no domains with a vTPM\n"}},
		{"running external", []VMStatus{{
			Name: "vm1", UUID: testUUID, Defined: true, Active: true, Backend: BackendExternal,
			StateDir: "/st/tpm2", StateFound: true, Socket: "/run/vm1.sock", Running: true, PID: 42, Exe: "/usr/bin/vtpmd",
			Policy:  &Policy{XML: "<a>\n  <b/>\n</a>"},
			History: []registry.Event{{Time: when, Op: OpStart, SubOp: "begin", PID: 42, Detail: "started", Error: "boom"}},
		}}, []string{
			"vm1   " + testUUID + "  running  external  running  42   -    /st/tpm2\n",
			"  socket: /run/vm1.sock\n", "  exe:    /usr/bin/vtpmd\n", "  policy: <a> <b/> </a>\n",
			"  2026-01-02T03:04:05Z start begin pid=42 started ERROR: boom\n",
		}},
		{"inactive, no state", []VMStatus{{Name: "vm2", UUID: testUUID, Defined: true, Backend: BackendEmulator}}, []string{
			"inactive  emulator  stopped  -    -    -\n",
		}},
		{"sealed by the manager", []VMStatus{{Name: "vm3", UUID: testUUID, Defined: true, Backend: BackendEmulator,
			StateDir: "/st/tpm2", StateFound: true,
			Manager: &manager.VMStatus{Sealed: true, Phase: "enrolled", Policy: "none", Version: 12}}}, []string{
			"inactive  emulator  stopped  -    sealed  /st/tpm2\n",
			"  manager: enrolled, policy none, state version 12, last seen never (since the manager started)\n",
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var b bytes.Buffer
			WriteStatusTable(&b, tt.sts)
			for _, w := range tt.want {
				if !strings.Contains(b.String(), w) {
					t.Errorf("output lacks %q:\n%s", w, b.String())
				}
			}
		})
	}
}

func TestReportPrint(t *testing.T) {
	rep := &Report{}
	rep.did("%s: linked", "/bin/swtpm")
	rep.note("restart %s", "libvirtd")
	tests := []struct {
		rep    *Report
		asJSON bool
		want   string
	}{
		{rep, false, "vtpmd install:\n  /bin/swtpm: linked\nnote: restart libvirtd\n"},
		{rep, true, "{\n  \"actions\": [\n    \"/bin/swtpm: linked\"\n  ],\n  \"notes\": [\n    \"restart libvirtd\"\n  ]\n}\n"},
		{nil, false, ""},
		{nil, true, ""},
	}
	for _, tt := range tests {
		var b bytes.Buffer
		if err := tt.rep.Print(&b, "vtpmd install:", tt.asJSON); err != nil || b.String() != tt.want {
			t.Errorf("Print(json=%v) = %q, %v; want %q", tt.asJSON, b.String(), err, tt.want)
		}
	}
}

func TestRunInstallChecksHookConfig(t *testing.T) {
	e := newInstallEnv(t, SetupVtpmd)
	e.o.HookConfig = filepath.Join(e.dir, "absent.json")
	var b bytes.Buffer
	if err := RunInstall(context.Background(), e.o, &b, false); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("err = %v", err)
	}
	if b.Len() != 0 {
		t.Fatalf("report printed: %q", b.String())
	}
	if _, err := os.Stat(e.o.BinDir); !errors.Is(err, fs.ErrNotExist) {
		t.Fatal("installed despite a bad configuration")
	}
	cfg := filepath.Join(e.dir, "hook.json")
	os.WriteFile(cfg, []byte(`{"state_root": "/srv/vtpm"}`), 0o644)
	e.o.HookConfig = cfg
	if err := RunInstall(context.Background(), e.o, &b, false); err != nil {
		t.Fatal(err)
	}
	script, _ := os.ReadFile(filepath.Join(e.o.HookDir, DefaultHookName))
	if !strings.Contains(string(script), "hook '--config' '"+cfg+"' '--registry'") {
		t.Fatalf("hook script:\n%s", script)
	}
	if !strings.HasPrefix(b.String(), "vtpmd install:\n") {
		t.Fatalf("report %q", b.String())
	}
}
