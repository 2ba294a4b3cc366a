package libvirt

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// ErrUsage is wrapped when the hook's arguments are not what libvirt passes.
var ErrUsage = errors.New("usage")

// Hook operations libvirt's qemu driver runs (virHookQemuOp).
const (
	OpPrepare   = "prepare"
	OpStart     = "start"
	OpStarted   = "started"
	OpStopped   = "stopped"
	OpRelease   = "release"
	OpMigrate   = "migrate"
	OpRestore   = "restore"
	OpReconnect = "reconnect"
	OpAttach    = "attach"
)

var knownOps = map[string]bool{
	OpPrepare: true, OpStart: true, OpStarted: true, OpStopped: true, OpRelease: true,
	OpMigrate: true, OpRestore: true, OpReconnect: true, OpAttach: true,
}

// Invocation is one hook call: libvirt runs `HOOK <object> <op> <subop> <extra>`, where the
// object is the domain name for the qemu driver and missing values are "-".
type Invocation struct {
	Object, Op, SubOp, Extra string
}

// ParseArgs checks the hook's positional arguments.
func ParseArgs(args []string) (Invocation, error) {
	if len(args) < 2 || len(args) > 4 {
		return Invocation{}, fmt.Errorf("%w: want <domain> <operation> [<sub-operation> [<extra>]], got %d arguments", ErrUsage, len(args))
	}
	for _, a := range args {
		if a == "" || len(a) > 1024 || strings.IndexByte(a, 0) >= 0 {
			return Invocation{}, fmt.Errorf("%w: empty, oversized or binary argument", ErrUsage)
		}
	}
	inv := Invocation{Object: args[0], Op: args[1], SubOp: "-", Extra: "-"}
	if len(args) > 2 {
		inv.SubOp = args[2]
	}
	if len(args) > 3 {
		inv.Extra = args[3]
	}
	return inv, nil
}

// Hook runs libvirt qemu hook calls.
type Hook struct {
	Config   *Config
	Registry *Registry
	// Exe is the vtpmd binary started as `vtpmd socket` for external backends.
	Exe    string
	Stdout io.Writer // filter output (migrate, restore)
	Stderr io.Writer // warnings; errors are returned
}

// NewHook returns a hook for cfg; exe "" means cfg.Vtpmd, else the running executable.
func NewHook(cfg *Config, exe string) (*Hook, error) {
	if exe == "" {
		exe = cfg.Vtpmd
	}
	if exe == "" {
		self, err := os.Executable()
		if err != nil {
			return nil, fmt.Errorf("hook: find own executable: %w", err)
		}
		exe = self
	}
	return &Hook{Config: cfg, Registry: NewRegistry(cfg.RegistryDir), Exe: exe, Stdout: os.Stdout, Stderr: os.Stderr}, nil
}

func (h *Hook) warn(format string, a ...any) {
	if h.Stderr != nil {
		fmt.Fprintf(h.Stderr, "vtpmd hook: warning: "+format+"\n", a...)
	}
}

// Run handles one hook call with the domain XML on stdin.
func (h *Hook) Run(ctx context.Context, args []string, stdin io.Reader) error {
	inv, err := ParseArgs(args)
	if err != nil {
		return err
	}
	data, err := ReadXML(stdin)
	if err != nil {
		return fmt.Errorf("%s %s: %w", inv.Object, inv.Op, err)
	}
	if !knownOps[inv.Op] {
		// Newer libvirt may add operations; they are no reason to fail a domain.
		return nil
	}
	if len(data) == 0 {
		if inv.Op == OpStopped || inv.Op == OpRelease {
			return nil
		}
		return fmt.Errorf("%s %s: no domain XML on stdin", inv.Object, inv.Op)
	}
	dom, err := ParseDomain(data)
	if err != nil {
		return fmt.Errorf("%s %s: %w", inv.Object, inv.Op, err)
	}
	if dom.Name != inv.Object && inv.Op != OpMigrate && inv.Op != OpRestore {
		h.warn("hook object %q differs from the domain name %q in the XML", inv.Object, dom.Name)
	}
	if dom.TPM == nil {
		return nil // nothing of ours; filters print nothing (= unchanged)
	}
	if err := h.dispatch(ctx, inv, dom, data); err != nil {
		h.record(dom, inv, Event{Error: err.Error()}, nil)
		return fmt.Errorf("%s %s: %w", dom.Name, inv.Op, err)
	}
	return nil
}

func (h *Hook) dispatch(ctx context.Context, inv Invocation, dom *Domain, data []byte) error {
	ext := dom.TPM.Backend == BackendExternal
	switch inv.Op {
	case OpMigrate, OpRestore:
		return h.filter(inv, dom, data)
	case OpPrepare:
		if ext {
			return h.ensureExternal(ctx, inv, dom, false)
		}
		h.record(dom, inv, Event{Detail: "libvirt starts the emulator"}, nil)
	case OpReconnect:
		if ext {
			return h.ensureExternal(ctx, inv, dom, true)
		}
		h.recordEmulator(dom, inv)
	case OpStart, OpStarted:
		if ext {
			h.recordExternal(dom, inv)
		} else {
			h.recordEmulator(dom, inv)
		}
	case OpRelease:
		if ext {
			return h.stopExternal(inv, dom)
		}
		h.record(dom, inv, Event{}, func(r *Record) { r.PID, r.Exe = 0, "" })
	default: // stopped, attach
		h.record(dom, inv, Event{}, nil)
	}
	return nil
}

// record appends an event and refreshes the record's description of the domain. Registry
// failures only warn: the VM must not fail because bookkeeping did.
func (h *Hook) record(dom *Domain, inv Invocation, ev Event, fn func(*Record)) {
	ev.Op, ev.SubOp = inv.Op, inv.SubOp
	_, err := h.Registry.Append(dom.UUID, ev, func(r *Record) {
		r.Name = dom.Name
		r.Backend = dom.TPM.Backend
		r.Model = dom.TPM.Model
		r.Version = dom.TPM.Version
		r.StateDir = h.Config.StateDir(dom)
		r.Persistent = dom.TPM.PersistentState
		r.Policy = dom.Policy
		if dom.TPM.Backend == BackendExternal {
			r.Socket = dom.TPM.SocketPath
		} else if s := h.Config.EmulatorSocket(dom); s != "" {
			r.Socket = s
		}
		if fn != nil {
			fn(r)
		}
	})
	if err != nil {
		h.warn("%v", err)
	}
}

// shortName is libvirt's <id>-<name up to 20 bytes>, used in swtpm socket and pid file names.
func shortName(dom *Domain) string {
	n := dom.Name
	if len(n) > 20 {
		n = n[:20]
	}
	return strconv.Itoa(dom.ID) + "-" + n
}

// EmulatorSocket is the control socket libvirt gives the swtpm of a running domain.
func (c *Config) EmulatorSocket(dom *Domain) string {
	if dom.ID < 0 {
		return ""
	}
	return filepath.Join(c.LibvirtSwtpmRunDir, shortName(dom)+"-swtpm.sock")
}

// EmulatorPID finds the swtpm (vtpmd) process libvirt started for a running domain: its pid
// file first, then any process serving the domain's state directory.
func (c *Config) EmulatorPID(dom *Domain) int {
	if dom.ID >= 0 {
		pf := filepath.Join(c.LibvirtSwtpmRunDir, shortName(dom)+"-swtpm.pid")
		if pid, err := readPidFile(pf); err == nil && Alive(pid) {
			return pid
		}
	}
	if pids := FindInstances("dir", c.StateDir(dom)); len(pids) > 0 {
		return pids[0]
	}
	return 0
}

func (h *Hook) recordEmulator(dom *Domain, inv Invocation) {
	pid := h.Config.EmulatorPID(dom)
	ev := Event{PID: pid}
	exe := ""
	if pid > 0 {
		if info, err := Inspect(pid); err == nil {
			exe = info.Exe
		}
		ev.Detail = "emulator exe " + exe
	} else if inv.Op != OpPrepare {
		ev.Detail = "emulator process not found"
	}
	h.record(dom, inv, ev, func(r *Record) {
		if pid > 0 {
			r.PID, r.Exe = pid, exe
		}
	})
}

func (h *Hook) recordExternal(dom *Domain, inv Invocation) {
	rec, _ := h.Registry.Get(dom.UUID)
	pid := 0
	if rec != nil && rec.PID > 0 && isInstance(rec.PID, "path", dom.TPM.SocketPath) {
		pid = rec.PID
	} else if pids := FindInstances("path", dom.TPM.SocketPath); len(pids) > 0 {
		pid = pids[0]
	}
	ev := Event{PID: pid}
	if pid == 0 {
		ev.Detail = "vTPM process not running"
	}
	h.record(dom, inv, ev, func(r *Record) { r.PID = pid })
}

// filter implements the migrate and restore XML filters.
func (h *Hook) filter(inv Invocation, dom *Domain, data []byte) error {
	out, changed, err := RewritePaths(data, h.Config.Rewrites)
	if err != nil {
		return err
	}
	ev := Event{Detail: "XML unchanged"}
	if changed {
		nd, err := ParseDomain(out)
		if err != nil {
			return fmt.Errorf("rewritten XML: %w", err)
		}
		if nd.TPM != nil && nd.TPM.Backend == BackendExternal {
			if _, err := CheckAllowed(nd.TPM.SocketPath, h.Config.SocketRoots); err != nil {
				return fmt.Errorf("rewritten external TPM socket: %w", err)
			}
		}
		if _, err := h.Stdout.Write(out); err != nil {
			return fmt.Errorf("write filtered XML: %w", err)
		}
		ev.Detail = "rewrote host paths"
		dom = nd
	}
	h.record(dom, inv, ev, nil)
	return nil
}

// qemuIDs resolves the configured qemu user and group.
func (h *Hook) qemuIDs() (int, int, error) {
	u, err := user.Lookup(h.Config.QEMUUser)
	if err != nil {
		return 0, 0, fmt.Errorf("qemu user %q: %w", h.Config.QEMUUser, err)
	}
	g, err := user.LookupGroup(h.Config.QEMUGroup)
	if err != nil {
		return 0, 0, fmt.Errorf("qemu group %q: %w", h.Config.QEMUGroup, err)
	}
	uid, err := strconv.Atoi(u.Uid)
	if err != nil {
		return 0, 0, fmt.Errorf("qemu user %q: uid %q", h.Config.QEMUUser, u.Uid)
	}
	gid, err := strconv.Atoi(g.Gid)
	if err != nil {
		return 0, 0, fmt.Errorf("qemu group %q: gid %q", h.Config.QEMUGroup, g.Gid)
	}
	return uid, gid, nil
}

// externalSocket validates an external backend's socket path against the configuration.
func (h *Hook) externalSocket(dom *Domain) (string, string, error) {
	sock := dom.TPM.SocketPath
	root, err := CheckAllowed(sock, h.Config.SocketRoots)
	if err != nil {
		return "", "", err
	}
	if strings.ContainsRune(sock, ',') {
		return "", "", fmt.Errorf("%w: socket path %q contains a comma", ErrBadPath, sock)
	}
	return sock, root, nil
}

// ensureExternal re-attaches to the VM's running `vtpmd socket` or starts one.
func (h *Hook) ensureExternal(ctx context.Context, inv Invocation, dom *Domain, reconnect bool) error {
	sock, root, err := h.externalSocket(dom)
	if err != nil {
		return err
	}
	rec, _ := h.Registry.Get(dom.UUID)
	pid := 0
	if rec != nil && rec.PID > 0 && isInstance(rec.PID, "path", sock) {
		pid = rec.PID
	} else if pids := FindInstances("path", sock); len(pids) > 0 {
		pid = pids[0]
	}
	if pid > 0 {
		if fi, err := os.Lstat(sock); err == nil && fi.Mode()&os.ModeSocket != 0 {
			h.record(dom, inv, Event{PID: pid, Detail: "re-attached to running vTPM"}, func(r *Record) { r.PID = pid })
			return nil
		}
		// A process without its socket is of no use to QEMU: replace it.
		if _, err := terminate(pid, 2*time.Second); err != nil {
			return err
		}
	}
	pid, exe, err := h.startExternal(ctx, dom, sock, root)
	if err != nil {
		return err
	}
	detail := "started vTPM"
	if reconnect {
		detail = "vTPM was not running; started a new one"
	}
	h.record(dom, inv, Event{PID: pid, Detail: detail}, func(r *Record) { r.PID, r.Exe = pid, exe })
	return nil
}

// startExternal launches `vtpmd socket` for dom, detached, and waits for its socket.
func (h *Hook) startExternal(ctx context.Context, dom *Domain, sock, root string) (int, string, error) {
	uid, gid, err := h.qemuIDs()
	if err != nil {
		return 0, "", err
	}
	vmDir := h.Config.ExternalDir(dom.UUID)
	stateDir := h.Config.StateDir(dom)
	if err := MkdirNoFollow(h.Config.StateRoot, stateDir, 0o700); err != nil {
		return 0, "", err
	}
	if err := MkdirNoFollow(root, filepath.Dir(sock), 0o711); err != nil {
		return 0, "", err
	}
	if err := removeSocket(sock); err != nil {
		return 0, "", fmt.Errorf("stale socket: %w", err)
	}
	logPath := filepath.Join(vmDir, "vtpmd.log")
	logf, err := os.OpenFile(logPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND|syscall.O_NOFOLLOW, 0o600)
	if err != nil {
		return 0, "", fmt.Errorf("open log: %w", err)
	}
	defer logf.Close()
	devnull, err := os.OpenFile(os.DevNull, os.O_RDWR, 0)
	if err != nil {
		return 0, "", err
	}
	defer devnull.Close()
	fmt.Fprintf(logf, "%s vtpmd hook: starting vTPM for %s (%s)\n", time.Now().UTC().Format(time.RFC3339Nano), dom.Name, dom.UUID)
	args := []string{"socket"}
	if dom.TPM.Version != "1.2" {
		args = append(args, "--tpm2")
	}
	args = append(args,
		"--tpmstate", "dir="+stateDir+",mode=0600",
		"--ctrl", fmt.Sprintf("type=unixio,path=%s,mode=0600,uid=%d,gid=%d", sock, uid, gid),
		"--log", "file="+logPath)
	args = append(args, h.Config.SocketArgs...)
	cmd := exec.Command(h.Exe, args...)
	cmd.Dir = "/"
	cmd.Stdin, cmd.Stdout, cmd.Stderr = devnull, devnull, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return 0, "", fmt.Errorf("start %s: %w", h.Exe, err)
	}
	pid := cmd.Process.Pid
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	deadline := time.NewTimer(h.Config.StartWait())
	defer deadline.Stop()
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for {
		if fi, err := os.Lstat(sock); err == nil && fi.Mode()&os.ModeSocket != 0 {
			if st, ok := fi.Sys().(*syscall.Stat_t); !ok || int(st.Uid) == uid {
				exe, _ := os.Readlink(filepath.Join(procRoot, strconv.Itoa(pid), "exe"))
				return pid, exe, nil
			}
		}
		select {
		case err := <-exited:
			return 0, "", fmt.Errorf("vTPM process exited before its socket appeared (%v): %s", err, logTail(logPath))
		case <-deadline.C:
			_ = cmd.Process.Kill()
			return 0, "", fmt.Errorf("vTPM socket %s did not show up within %v: %s", sock, h.Config.StartWait(), logTail(logPath))
		case <-ctx.Done():
			_ = cmd.Process.Kill()
			return 0, "", ctx.Err()
		case <-tick.C:
		}
	}
}

// logTail returns the last lines of a log for an error message.
func logTail(p string) string {
	f, err := os.Open(p)
	if err != nil {
		return "(no log)"
	}
	defer f.Close()
	const n = 1024
	if fi, err := f.Stat(); err == nil && fi.Size() > n {
		_, _ = f.Seek(fi.Size()-n, io.SeekStart)
	}
	data, _ := io.ReadAll(io.LimitReader(f, n))
	s := strings.TrimSpace(string(data))
	if lines := strings.Split(s, "\n"); len(lines) > 4 {
		s = strings.Join(lines[len(lines)-4:], "\n")
	}
	return "log " + p + ": " + s
}

// stopExternal stops the VM's vTPM if it still runs (QEMU's shutdown normally ended it) and
// removes its socket, and its state when the policy says so.
func (h *Hook) stopExternal(inv Invocation, dom *Domain) error {
	sock, _, err := h.externalSocket(dom)
	if err != nil {
		return err
	}
	pids := FindInstances("path", sock)
	if rec, _ := h.Registry.Get(dom.UUID); rec != nil && rec.PID > 0 && isInstance(rec.PID, "path", sock) {
		pids = append(pids, rec.PID)
	}
	stopped := 0
	var errs []error
	seen := map[int]bool{}
	for _, pid := range pids {
		if seen[pid] {
			continue
		}
		seen[pid] = true
		sig, err := terminate(pid, 3*time.Second)
		if err != nil {
			errs = append(errs, err)
		}
		if sig {
			stopped++
		}
	}
	if err := removeSocket(sock); err != nil {
		errs = append(errs, err)
	}
	detail := "vTPM had already exited"
	if stopped > 0 {
		detail = fmt.Sprintf("stopped %d vTPM process(es)", stopped)
	}
	if !dom.Policy.Keep() {
		dir := h.Config.ExternalDir(dom.UUID)
		if err := os.RemoveAll(dir); err != nil {
			errs = append(errs, fmt.Errorf("remove state: %w", err))
		} else {
			detail += "; removed state (policy keep=no)"
		}
	}
	h.record(dom, inv, Event{Detail: detail}, func(r *Record) { r.PID, r.Exe = 0, "" })
	return errors.Join(errs...)
}
