package libvirt

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/signal"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/internal/proc"
	"github.com/vtpmd/vtpmd/manager/registry"
)

// fakeEnv makes the test binary act as `vtpmd socket`: ok (listen until SIGTERM), fail (exit
// at once with a message) or hang (never create the socket).
const fakeEnv = "VTPMD_LIBVIRT_TEST_FAKE_SOCKET"

func TestMain(m *testing.M) {
	if mode := os.Getenv(fakeEnv); mode != "" {
		os.Exit(fakeSocket(mode, os.Args[1:]))
	}
	os.Exit(m.Run())
}

func fakeSocket(mode string, args []string) int {
	var path, stateDir string
	uid, gid, ctrlFD, pidFD := -1, -1, -1, -1
	for i, a := range args {
		if i+1 >= len(args) {
			break
		}
		for _, kv := range strings.Split(args[i+1], ",") {
			k, v, _ := strings.Cut(kv, "=")
			switch a + " " + k {
			case "--ctrl path":
				path = v
			case "--ctrl uid":
				uid, _ = strconv.Atoi(v)
			case "--ctrl gid":
				gid, _ = strconv.Atoi(v)
			case "--ctrl fd":
				ctrlFD, _ = strconv.Atoi(v)
			case "--pid fd":
				pidFD, _ = strconv.Atoi(v)
			case "--tpmstate dir":
				stateDir = v
			}
		}
	}
	switch mode {
	case "fail":
		fmt.Fprintln(os.Stderr, "fake vtpmd: cannot open the TPM state")
		return 1
	case "hang":
		time.Sleep(time.Hour)
		return 0
	}
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM)
	var l net.Listener
	var err error
	if ctrlFD >= 0 {
		l, err = net.FileListener(os.NewFile(uintptr(ctrlFD), "ctrl"))
	} else {
		l, err = net.Listen("unix", path)
		os.Chmod(path, 0o600)
		if os.Getuid() == 0 {
			os.Chown(path, uid, gid)
		}
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	if mode == "probe" {
		// what the real vTPM needs of its state directory: to create files in it
		if err := os.WriteFile(filepath.Join(stateDir, "probe"), []byte("ok"), 0o600); err != nil {
			fmt.Fprintln(os.Stderr, "fake vtpmd:", err)
			return 1
		}
	}
	if pidFD >= 0 {
		f := os.NewFile(uintptr(pidFD), "pid")
		fmt.Fprint(f, os.Getpid())
		f.Close()
	}
	<-sigs
	l.Close()
	return 0
}

type hookEnv struct {
	t    *testing.T
	dir  string
	cfg  *Config
	hook *Hook
	out  *bytes.Buffer
	errb *bytes.Buffer
}

func newHookEnv(t *testing.T, mode string) *hookEnv {
	t.Helper()
	t.Setenv(fakeEnv, mode)
	dir := t.TempDir()
	u, err := user.Current()
	if err != nil {
		t.Skip(err)
	}
	g, err := user.LookupGroupId(u.Gid)
	if err != nil {
		t.Skip(err)
	}
	cfg := &Config{
		StateRoot:    dir + "/st",
		SocketRoots:  []string{dir + "/run"},
		QEMUUser:     u.Username,
		QEMUGroup:    g.Name,
		RunAs:        u.Username, // TestHookRunsAsUser starts the vTPM as another user
		StartTimeout: "2s",
		Rewrites:     []Rewrite{{From: dir + "/run/A", To: dir + "/run/B"}},
	}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	e := &hookEnv{t: t, dir: dir, cfg: cfg, out: &bytes.Buffer{}, errb: &bytes.Buffer{}}
	e.hook = &Hook{Config: cfg, Registry: registry.New(cfg.RegistryDir), Exe: exe, Stdout: e.out, Stderr: e.errb}
	return e
}

func (e *hookEnv) run(xml string, args ...string) error {
	e.out.Reset()
	return e.hook.Run(context.Background(), args, strings.NewReader(xml))
}

func (e *hookEnv) extXML(sock string) string {
	return domXML(fmt.Sprintf(`<serial type='file'><source path='%s/run/A/serial.log'/></serial>
<tpm model='tpm-crb'><backend type='external'><source type='unix' mode='connect' path='%s'/></backend></tpm>`, e.dir, sock), "")
}

func TestParseArgs(t *testing.T) {
	tests := []struct {
		args []string
		want Invocation
		err  bool
	}{
		{[]string{"vm1", "prepare", "begin", "-"}, Invocation{"vm1", "prepare", "begin", "-"}, false},
		{[]string{"vm1", "release"}, Invocation{"vm1", "release", "-", "-"}, false},
		{[]string{"vm1"}, Invocation{}, true},
		{nil, Invocation{}, true},
		{[]string{"vm1", "prepare", "begin", "-", "extra"}, Invocation{}, true},
		{[]string{"", "prepare"}, Invocation{}, true},
		{[]string{"vm1", strings.Repeat("x", 2000)}, Invocation{}, true},
		{[]string{"vm\x00", "prepare"}, Invocation{}, true},
	}
	for _, tt := range tests {
		got, err := ParseArgs(tt.args)
		if (err != nil) != tt.err || (!tt.err && got != tt.want) {
			t.Errorf("%q: got %+v, %v", tt.args, got, err)
		}
		if err != nil && !errors.Is(err, ErrUsage) {
			t.Errorf("%q: err %v not ErrUsage", tt.args, err)
		}
	}
}

func TestHookExternalLifecycle(t *testing.T) {
	e := newHookEnv(t, "ok")
	sock := e.dir + "/run/A/vm1/ctrl.sock"
	x := e.extXML(sock)
	if err := e.run(x, "vm1", OpPrepare, "begin", "-"); err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Lstat(sock); err != nil || fi.Mode()&os.ModeSocket == 0 {
		t.Fatalf("socket: %v", err)
	}
	rec, err := e.hook.Registry.Get(testUUID)
	if err != nil || rec.PID == 0 || !proc.Alive(rec.PID) || rec.Backend != string(BackendExternal) || rec.Socket != sock {
		t.Fatalf("record %+v %v", rec, err)
	}
	if rec.StateDir != filepath.Join(e.dir, "st", testUUID, "tpm2") {
		t.Fatalf("state dir %s", rec.StateDir)
	}
	if fi, err := os.Stat(rec.StateDir); err != nil || fi.Mode().Perm() != 0o700 {
		t.Fatalf("state dir: %v %v", fi.Mode(), err)
	}
	pid := rec.PID
	for _, op := range []string{OpStart, OpStarted} {
		if err := e.run(x, "vm1", op, "begin", "-"); err != nil {
			t.Fatal(err)
		}
	}
	// reconnect with the instance alive re-attaches
	if err := e.run(x, "vm1", OpReconnect, "begin", "-"); err != nil {
		t.Fatal(err)
	}
	rec, _ = e.hook.Registry.Get(testUUID)
	if rec.PID != pid || !strings.Contains(rec.Events[len(rec.Events)-1].Detail, "re-attached") {
		t.Fatalf("reconnect: %+v", rec.Events[len(rec.Events)-1])
	}
	if err := e.run(x, "vm1", OpStopped, "end", "-"); err != nil {
		t.Fatal(err)
	}
	if err := e.run(x, "vm1", OpRelease, "end", "-"); err != nil {
		t.Fatal(err)
	}
	if proc.Alive(pid) {
		t.Fatalf("vTPM %d still running after release", pid)
	}
	if _, err := os.Lstat(sock); !os.IsNotExist(err) {
		t.Fatalf("socket left behind: %v", err)
	}
	// reconnect when the vTPM is gone starts a new one
	if err := e.run(x, "vm1", OpReconnect, "begin", "-"); err != nil {
		t.Fatal(err)
	}
	rec, _ = e.hook.Registry.Get(testUUID)
	if rec.PID == 0 || rec.PID == pid || !proc.Alive(rec.PID) {
		t.Fatalf("reconnect did not start: %+v", rec)
	}
	if err := e.run(x, "vm1", OpRelease, "end", "-"); err != nil {
		t.Fatal(err)
	}
	rec, _ = e.hook.Registry.Get(testUUID)
	var ops []string
	for _, ev := range rec.Events {
		ops = append(ops, ev.Op)
	}
	if got := strings.Join(ops, ","); got != "prepare,start,started,reconnect,stopped,release,reconnect,release" {
		t.Fatalf("events %s", got)
	}
	if _, err := os.Stat(rec.StateDir); err != nil {
		t.Fatalf("state removed by default: %v", err)
	}
}

func TestHookKeepStateNo(t *testing.T) {
	e := newHookEnv(t, "ok")
	sock := e.dir + "/run/vm1.sock"
	x := strings.Replace(e.extXML(sock), "<metadata></metadata>", "<metadata>"+policy+"</metadata>", 1)
	if err := e.run(x, "vm1", OpPrepare, "begin", "-"); err != nil {
		t.Fatal(err)
	}
	if err := e.run(x, "vm1", OpRelease, "end", "-"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(e.dir, "st", testUUID)); !os.IsNotExist(err) {
		t.Fatalf("state kept despite keep=no: %v", err)
	}
	rec, _ := e.hook.Registry.Get(testUUID)
	if rec.Policy == nil || rec.Policy.Projection == nil || rec.Policy.Projection.Mode != "summary" {
		t.Fatalf("policy not recorded: %+v", rec.Policy)
	}
}

func TestHookStartFailures(t *testing.T) {
	for _, mode := range []string{"fail", "hang"} {
		t.Run(mode, func(t *testing.T) {
			e := newHookEnv(t, mode)
			e.cfg.startTimeout = 300 * time.Millisecond
			sock := e.dir + "/run/vm1.sock"
			start := time.Now()
			err := e.run(e.extXML(sock), "vm1", OpPrepare, "begin", "-")
			if err == nil {
				t.Fatal("no error")
			}
			if mode == "fail" && !strings.Contains(err.Error(), "cannot open the TPM state") {
				t.Fatalf("error without the vTPM's message: %v", err)
			}
			if time.Since(start) > 3*time.Second {
				t.Fatalf("took %v", time.Since(start))
			}
			if pids := proc.FindInstances("path", sock); len(pids) > 0 {
				t.Fatalf("left processes %v", pids)
			}
			rec, _ := e.hook.Registry.Get(testUUID)
			if rec == nil || rec.Events[len(rec.Events)-1].Error == "" {
				t.Fatalf("error not recorded: %+v", rec)
			}
		})
	}
}

func TestHookRefusesBadSockets(t *testing.T) {
	e := newHookEnv(t, "ok")
	outside := t.TempDir()
	os.MkdirAll(e.dir+"/run", 0o755)
	os.Symlink(outside, e.dir+"/run/link")
	os.WriteFile(e.dir+"/run/file.sock", []byte("precious"), 0o644)
	cases := map[string]string{
		"outside roots":  outside + "/x.sock",
		"etc":            "/etc/vtpmd-test.sock",
		"through link":   e.dir + "/run/link/x.sock",
		"comma":          e.dir + "/run/a,b.sock",
		"regular file":   e.dir + "/run/file.sock",
		"is a root":      e.dir + "/run",
		"dotdot escapes": e.dir + "/run/../escape.sock",
	}
	for name, sock := range cases {
		t.Run(name, func(t *testing.T) {
			err := e.run(e.extXML(sock), "vm1", OpPrepare, "begin", "-")
			if err == nil {
				t.Fatal("accepted")
			}
			if !errors.Is(err, ErrBadPath) {
				t.Fatalf("err = %v", err)
			}
		})
	}
	if entries, _ := os.ReadDir(outside); len(entries) != 0 {
		t.Fatalf("wrote outside the roots: %v", entries)
	}
	if data, _ := os.ReadFile(e.dir + "/run/file.sock"); string(data) != "precious" {
		t.Fatal("regular file touched")
	}
	if _, err := os.Stat(e.dir + "/escape.sock"); !os.IsNotExist(err) {
		t.Fatal("escaped")
	}
}

func TestHookHostileInput(t *testing.T) {
	e := newHookEnv(t, "ok")
	inputs := map[string]string{
		"doctype":   `<!DOCTYPE domain [<!ENTITY x SYSTEM "file:///etc/shadow">]><domain><name>&x;</name></domain>`,
		"garbage":   "\xff\xfe<<<",
		"huge":      "<domain>" + strings.Repeat("<a>", 1000) + strings.Repeat(" ", MaxXMLSize),
		"bad uuid":  `<domain><name>vm1</name><uuid>../../x</uuid><devices>` + extTPM + `</devices></domain>`,
		"two tpms":  domXML(emuTPM+extTPM, ""),
		"deep":      `<domain>` + strings.Repeat("<a>", 5000) + strings.Repeat("</a>", 5000) + `</domain>`,
		"no domain": `<?xml version="1.0"?>`,
	}
	for name, x := range inputs {
		t.Run(name, func(t *testing.T) {
			if err := e.run(x, "vm1", OpPrepare, "begin", "-"); err == nil {
				t.Fatal("accepted")
			}
			if err := e.run(x, "vm1", OpMigrate, "begin", "-"); err == nil {
				t.Fatal("filter accepted")
			}
			if e.out.Len() != 0 {
				t.Fatal("filter printed something for bad input")
			}
		})
	}
	if _, err := os.Stat(e.cfg.RegistryDir); !os.IsNotExist(err) {
		t.Fatalf("registry written for hostile input: %v", err)
	}
	if _, err := os.Stat(e.cfg.StateRoot); !os.IsNotExist(err) {
		t.Fatalf("state root written for hostile input: %v", err)
	}
}

func TestHookIgnores(t *testing.T) {
	e := newHookEnv(t, "ok")
	for name, tc := range map[string]struct {
		xml  string
		args []string
	}{
		"no tpm":         {domXML("", ""), []string{"vm1", OpPrepare, "begin", "-"}},
		"passthrough":    {domXML(`<tpm><backend type='passthrough'><device path='/dev/tpm0'/></backend></tpm>`, ""), []string{"vm1", OpPrepare, "begin", "-"}},
		"unknown op":     {"whatever", []string{"vm1", "teleport", "begin", "-"}},
		"empty release":  {"", []string{"vm1", OpRelease, "end", "-"}},
		"no tpm migrate": {domXML("", ""), []string{"vm1", OpMigrate, "begin", "-"}},
	} {
		t.Run(name, func(t *testing.T) {
			if err := e.run(tc.xml, tc.args...); err != nil {
				t.Fatal(err)
			}
			if e.out.Len() != 0 {
				t.Fatalf("output %q", e.out)
			}
		})
	}
	if _, err := os.Stat(e.cfg.RegistryDir); !os.IsNotExist(err) {
		t.Fatalf("registry written: %v", err)
	}
	if err := e.run("", "vm1", OpPrepare, "begin", "-"); err == nil {
		t.Fatal("empty stdin accepted at prepare")
	}
	if err := e.run(domXML("", ""), "vm1"); !errors.Is(err, ErrUsage) {
		t.Fatalf("err = %v", err)
	}
}

func TestHookFilter(t *testing.T) {
	e := newHookEnv(t, "ok")
	x := e.extXML(e.dir + "/run/A/ctrl.sock")
	for _, op := range []string{OpMigrate, OpRestore} {
		if err := e.run(x, "vm1", op, "begin", "-"); err != nil {
			t.Fatal(err)
		}
		want := strings.ReplaceAll(x, e.dir+"/run/A/", e.dir+"/run/B/")
		if e.out.String() != want {
			t.Fatalf("%s output\n%s\nwant\n%s", op, e.out, want)
		}
	}
	// nothing to rewrite: empty output means unchanged
	y := e.extXML(e.dir + "/run/C/ctrl.sock")
	y = strings.ReplaceAll(y, "/run/A/serial.log", "/run/C/serial.log")
	if err := e.run(y, "vm1", OpMigrate, "begin", "-"); err != nil || e.out.Len() != 0 {
		t.Fatalf("%v %q", err, e.out)
	}
	// a rule that would move the socket outside the roots is refused
	e.cfg.Rewrites = []Rewrite{{From: e.dir + "/run/A", To: "/etc"}}
	if err := e.run(x, "vm1", OpMigrate, "begin", "-"); !errors.Is(err, ErrBadPath) || e.out.Len() != 0 {
		t.Fatalf("err = %v, out %q", err, e.out)
	}
}

func TestHookEmulatorRecords(t *testing.T) {
	e := newHookEnv(t, "ok")
	x := domXML(`<tpm model='tpm-crb'><backend type='emulator' version='2.0' persistent_state='yes'/></tpm>`, "")
	for _, op := range []string{OpPrepare, OpStart, OpStarted, OpStopped, OpRelease} {
		if err := e.run(x, "vm1", op, "begin", "-"); err != nil {
			t.Fatal(err)
		}
	}
	rec, err := e.hook.Registry.Get(testUUID)
	if err != nil {
		t.Fatal(err)
	}
	if rec.Backend != string(BackendEmulator) || !rec.Persistent || len(rec.Events) != 5 ||
		rec.StateDir != filepath.Join(DefaultLibvirtSwtpmStateDir, testUUID, "tpm2") ||
		rec.Socket != filepath.Join(DefaultLibvirtSwtpmRunDir, "7-vm1-swtpm.sock") {
		t.Fatalf("record %+v", rec)
	}
	if _, err := os.Stat(filepath.Join(e.cfg.StateRoot, testUUID)); !os.IsNotExist(err) {
		t.Fatal("emulator backend created state under the hook's root")
	}
}

func TestShortName(t *testing.T) {
	d := &Domain{Name: "a-very-long-domain-name-indeed", ID: 12}
	if got := shortName(d); got != "12-a-very-long-domain-n" {
		t.Fatalf("got %s", got)
	}
}

func TestConfig(t *testing.T) {
	dir := t.TempDir()
	c, err := LoadConfig(dir + "/absent.json")
	if err == nil {
		t.Fatalf("explicit missing config accepted: %+v", c)
	}
	for name, body := range map[string]string{
		"unknown key":  `{"state_rot": "/x"}`,
		"relative":     `{"state_root": "x"}`,
		"comma":        `{"state_root": "/x,y"}`,
		"timeout":      `{"start_timeout": "forever"}`,
		"socket args":  `{"socket_args": ["--ctrl=type=tcp"]}`,
		"rewrite":      `{"rewrite": [{"from": "/a/../b", "to": "/c"}]}`,
		"relative exe": `{"vtpmd": "vtpmd"}`,
		"not json":     `state_root = /x`,
		"run_as group": `{"run_as": "tss:tss"}`,
		"run_as blank": `{"run_as": " tss"}`,
	} {
		p := filepath.Join(dir, strings.ReplaceAll(name, " ", "_")+".json")
		os.WriteFile(p, []byte(body), 0o644)
		if _, err := LoadConfig(p); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	p := dir + "/ok.json"
	os.WriteFile(p, []byte(`{"state_root": "/srv/vtpm", "start_timeout": "2s"}`), 0o644)
	c, err = LoadConfig(p)
	if err != nil {
		t.Fatal(err)
	}
	if c.RegistryDir != "/srv/vtpm/registry" || c.StartWait() != 2*time.Second || len(c.SocketRoots) != 2 || c.QEMUUser != DefaultQEMUUser || c.RunAs != "tss" {
		t.Fatalf("config %+v", c)
	}
}

// TestHookRunsAsUser (root only): the external backend's vTPM runs as run_as from its first
// instruction, owns its state directory (one left by a root-run vTPM is handed over, not
// following links), reaches it through a per-VM directory only that user's group may
// traverse, and serves a socket root created for the qemu user; a state directory of a third
// user is refused.
func TestHookRunsAsUser(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	acct, err := lookupAccount("nobody")
	if err != nil {
		t.Skip(err)
	}
	e := newHookEnv(t, "probe")
	// the vTPM must be able to execute its binary and traverse to its state
	pub, err := os.MkdirTemp("", "vtpmd-runas-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(pub) })
	os.Chmod(pub, 0o755)
	data, err := os.ReadFile(e.hook.Exe)
	if err != nil {
		t.Fatal(err)
	}
	e.hook.Exe = filepath.Join(pub, "vtpmd")
	if err := os.WriteFile(e.hook.Exe, data, 0o755); err != nil {
		t.Fatal(err)
	}
	e.cfg.StateRoot, e.cfg.RunAs = filepath.Join(pub, "st"), "nobody"
	// a state directory as a root-run vTPM left it, with a link that must not be followed
	stateDir := filepath.Join(e.cfg.StateRoot, testUUID, "tpm2")
	os.Mkdir(e.cfg.StateRoot, 0o755)
	os.MkdirAll(stateDir, 0o700)
	os.WriteFile(filepath.Join(stateDir, "tpm2-00.permall"), []byte("state"), 0o600)
	victim := filepath.Join(pub, "victim")
	os.WriteFile(victim, nil, 0o600)
	os.Symlink(victim, filepath.Join(stateDir, "link"))

	sock := e.dir + "/run/A/vm1/ctrl.sock"
	x := e.extXML(sock)
	if err := e.run(x, "vm1", OpPrepare, "begin", "-"); err != nil {
		t.Fatalf("%v\n%s", err, proc.LogTail(filepath.Join(e.cfg.StateRoot, testUUID, "vtpmd.log")))
	}
	rec, _ := e.hook.Registry.Get(testUUID)
	status, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", rec.PID))
	want := fmt.Sprintf("Uid:\t%d\t%d\t%d\t%d\n", acct.uid, acct.uid, acct.uid, acct.uid)
	if !strings.Contains(string(status), want) {
		t.Fatalf("vTPM %d does not run as nobody:\n%s", rec.PID, status)
	}
	owner := func(p string) (uint32, uint32, os.FileMode) {
		t.Helper()
		fi, err := os.Lstat(p)
		if err != nil {
			t.Fatal(err)
		}
		st := fi.Sys().(*syscall.Stat_t)
		return st.Uid, st.Gid, fi.Mode()
	}
	check := func(p string, uid, gid int, mode os.FileMode) {
		t.Helper()
		if u, g, m := owner(p); int(u) != uid || int(g) != gid || m != mode {
			t.Errorf("%s: %d:%d %v, want %d:%d %v", p, u, g, m, uid, gid, mode)
		}
	}
	check(filepath.Join(e.cfg.StateRoot, testUUID), 0, acct.gid, os.ModeDir|0o710)
	check(stateDir, acct.uid, acct.gid, os.ModeDir|0o700)
	check(filepath.Join(stateDir, "tpm2-00.permall"), acct.uid, acct.gid, 0o600)
	check(filepath.Join(stateDir, "probe"), acct.uid, acct.gid, 0o600)
	check(victim, 0, 0, 0o600)
	check(filepath.Join(e.cfg.StateRoot, testUUID, "vtpmd.log"), 0, 0, 0o600)
	check(sock, os.Getuid(), os.Getgid(), os.ModeSocket|0o600) // newHookEnv's qemu user: ours
	if err := e.run(x, "vm1", OpRelease, "end", "-"); err != nil {
		t.Fatal(err)
	}
	if proc.Alive(rec.PID) {
		t.Fatal("vTPM still running after release")
	}

	// a state directory of a third user is not taken over
	if err := os.Chown(stateDir, 4242, 4242); err != nil {
		t.Fatal(err)
	}
	err = e.run(x, "vm1", OpPrepare, "begin", "-")
	if !errors.Is(err, ErrStateOwner) {
		t.Fatalf("err = %v, want ErrStateOwner", err)
	}
	if _, err := os.Lstat(sock); !os.IsNotExist(err) {
		t.Fatalf("socket left after a refused start: %v", err)
	}
	check(stateDir, 4242, 4242, os.ModeDir|0o700)
}
