package libvirt

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/vtpmd/vtpmd/internal/proc"
	"github.com/vtpmd/vtpmd/manager/registry"
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

// HookRequest is one `vtpmd hook` call as the command line gives it.
type HookRequest struct {
	// ConfigPath is the hook configuration; "" means DefaultConfigPath, which may be absent.
	ConfigPath string
	Overrides
	// Args are libvirt's positional arguments: <domain> <operation> <sub-operation> <extra>.
	Args []string
}

// RunHook loads the configuration, applies the request's overrides and handles the call with
// the domain XML on stdin: filter output goes to stdout, warnings to stderr.
func RunHook(ctx context.Context, req HookRequest, stdin io.Reader, stdout, stderr io.Writer) error {
	cfg, err := LoadConfig(req.ConfigPath)
	if err != nil {
		return err
	}
	cfg.Apply(req.Overrides)
	if err := cfg.Validate(); err != nil {
		return err
	}
	h, err := NewHook(cfg, "")
	if err != nil {
		return err
	}
	h.Stdout, h.Stderr = stdout, stderr
	return h.Run(ctx, req.Args, stdin)
}

// Hook runs libvirt qemu hook calls.
type Hook struct {
	Config   *Config
	Registry *registry.Registry
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
	return &Hook{Config: cfg, Registry: registry.New(cfg.RegistryDir), Exe: exe, Stdout: os.Stdout, Stderr: os.Stderr}, nil
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
		// recorded even when ctx has ended: the record says why the domain failed
		h.record(context.WithoutCancel(ctx), dom, inv, registry.Event{Error: err.Error()}, nil)
		return fmt.Errorf("%s %s: %w", dom.Name, inv.Op, err)
	}
	return nil
}

func (h *Hook) dispatch(ctx context.Context, inv Invocation, dom *Domain, data []byte) error {
	ext := dom.TPM.Backend == BackendExternal
	switch inv.Op {
	case OpMigrate, OpRestore:
		return h.filter(ctx, inv, dom, data)
	case OpPrepare:
		if ext {
			return h.ensureExternal(ctx, inv, dom, false)
		}
		h.record(ctx, dom, inv, registry.Event{Detail: "libvirt starts the emulator"}, nil)
	case OpReconnect:
		if ext {
			return h.ensureExternal(ctx, inv, dom, true)
		}
		h.recordEmulator(ctx, dom, inv)
	case OpStart, OpStarted:
		if ext {
			h.recordExternal(ctx, dom, inv)
		} else {
			h.recordEmulator(ctx, dom, inv)
		}
	case OpRelease:
		if ext {
			return h.stopExternal(ctx, inv, dom)
		}
		h.record(ctx, dom, inv, registry.Event{}, func(r *registry.Record) { r.PID, r.Exe = 0, "" })
	default: // stopped, attach
		h.record(ctx, dom, inv, registry.Event{}, nil)
	}
	return nil
}

// record appends an event and refreshes the record's description of the domain. Registry
// failures only warn: the VM must not fail because bookkeeping did.
func (h *Hook) record(ctx context.Context, dom *Domain, inv Invocation, ev registry.Event, fn func(*registry.Record)) {
	ev.Op, ev.SubOp = inv.Op, inv.SubOp
	_, err := h.Registry.Append(ctx, dom.UUID, ev, func(r *registry.Record) {
		r.Name = dom.Name
		r.Backend = string(dom.TPM.Backend)
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

// recordEmulator records the swtpm (vtpmd) process libvirt runs for the domain.
func (h *Hook) recordEmulator(ctx context.Context, dom *Domain, inv Invocation) {
	pid := h.Config.EmulatorPID(dom)
	ev := registry.Event{PID: pid}
	exe := ""
	if pid > 0 {
		if info, err := proc.Inspect(pid); err == nil {
			exe = info.Exe
		}
		ev.Detail = "emulator exe " + exe
	} else if inv.Op != OpPrepare {
		ev.Detail = "emulator process not found"
	}
	h.record(ctx, dom, inv, ev, func(r *registry.Record) {
		if pid > 0 {
			r.PID, r.Exe = pid, exe
		}
	})
}

// filter implements the migrate and restore XML filters.
func (h *Hook) filter(ctx context.Context, inv Invocation, dom *Domain, data []byte) error {
	out, changed, err := RewritePaths(data, h.Config.Rewrites)
	if err != nil {
		return err
	}
	ev := registry.Event{Detail: "XML unchanged"}
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
	h.record(ctx, dom, inv, ev, nil)
	return nil
}
