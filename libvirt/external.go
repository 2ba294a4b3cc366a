package libvirt

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/vtpmd/vtpmd/internal/proc"
	"github.com/vtpmd/vtpmd/manager/registry"
)

// Grace periods between SIGTERM and SIGKILL for an external backend's `vtpmd socket`.
const (
	replaceGrace = 2 * time.Second // a process that lost its socket, replaced at prepare
	releaseGrace = 3 * time.Second // at release, after QEMU's shutdown normally ended it
)

// runningExternal finds the live `vtpmd socket` serving sock: the recorded process first,
// then any other; 0 when there is none.
func (h *Hook) runningExternal(uuid, sock string) int {
	if rec, _ := h.Registry.Get(uuid); rec != nil && rec.PID > 0 && proc.IsInstance(rec.PID, "path", sock) {
		return rec.PID
	}
	if pids := proc.FindInstances("path", sock); len(pids) > 0 {
		return pids[0]
	}
	return 0
}

// recordExternal records whether the domain's `vtpmd socket` runs.
func (h *Hook) recordExternal(ctx context.Context, dom *Domain, inv Invocation) {
	pid := h.runningExternal(dom.UUID, dom.TPM.SocketPath)
	ev := registry.Event{PID: pid}
	if pid == 0 {
		ev.Detail = "vTPM process not running"
	}
	h.record(ctx, dom, inv, ev, func(r *registry.Record) { r.PID = pid })
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
	if pid := h.runningExternal(dom.UUID, sock); pid > 0 {
		if fi, err := os.Lstat(sock); err == nil && fi.Mode()&os.ModeSocket != 0 {
			h.record(ctx, dom, inv, registry.Event{PID: pid, Detail: "re-attached to running vTPM"}, func(r *registry.Record) { r.PID = pid })
			return nil
		}
		// A process without its socket is of no use to QEMU: replace it.
		if _, err := proc.Terminate(ctx, pid, replaceGrace); err != nil {
			return err
		}
	}
	started, err := h.startExternal(ctx, dom, sock, root)
	if err != nil {
		return err
	}
	detail := "started vTPM"
	if reconnect {
		detail = "vTPM was not running; started a new one"
	}
	h.record(ctx, dom, inv, registry.Event{PID: started.PID, Detail: detail}, func(r *registry.Record) { r.PID, r.Exe = started.PID, started.Exe })
	return nil
}

// startExternal prepares the directories of dom's external backend and launches its `vtpmd
// socket`, detached, as the run_as user, serving sock for the qemu user.
//
// The hook creates what needs privilege and hands it on: the control socket (owned by the
// qemu user, mode 0600) as an inherited listening descriptor, the log as standard error, and
// an anonymous pid file in which vtpmd says it is ready. The vTPM itself starts unprivileged
// (exec with the user's credentials, not --runas: nothing of it runs as root) and writes only
// its state directory, which belongs to it.
func (h *Hook) startExternal(ctx context.Context, dom *Domain, sock, root string) (*proc.Started, error) {
	uid, gid, err := h.qemuIDs()
	if err != nil {
		return nil, err
	}
	acct, err := lookupAccount(h.Config.RunAs)
	if err != nil {
		return nil, err
	}
	vmDir, stateDir := h.Config.ExternalDir(dom.UUID), h.Config.StateDir(dom)
	if err := MkdirNoFollow(h.Config.StateRoot, vmDir, 0o700); err != nil {
		return nil, err
	}
	if err := shareVMDir(vmDir, acct); err != nil {
		return nil, err
	}
	if err := MkdirNoFollow(h.Config.StateRoot, stateDir, 0o700); err != nil {
		return nil, err
	}
	if err := adoptStateDir(stateDir, acct); err != nil {
		return nil, err
	}
	if err := MkdirNoFollow(root, filepath.Dir(sock), 0o711); err != nil {
		return nil, err
	}
	if err := removeSocket(sock); err != nil {
		return nil, fmt.Errorf("stale socket: %w", err)
	}
	ln, err := listenSocket(sock, uid, gid)
	if err != nil {
		return nil, err
	}
	defer ln.Close()
	pidf, err := newPidFile()
	if err != nil {
		_ = removeSocket(sock)
		return nil, err
	}
	defer pidf.Close()
	args := []string{"socket"}
	if dom.TPM.Version != "1.2" {
		args = append(args, "--tpm2")
	}
	// fd 3 is the socket, fd 4 the pid file, fd 2 the log; path= names the socket for
	// `vtpmd status` and the hook's own lookups (with fd=, vtpmd and swtpm ignore it)
	args = append(args,
		"--tpmstate", "dir="+stateDir+",mode=0600",
		"--ctrl", "type=unixio,fd=3,path="+sock,
		"--pid", "fd=4",
		"--log", "fd=2")
	args = append(args, h.Config.SocketArgs...)
	started, err := proc.Start(ctx, proc.Daemon{
		Path:        h.Exe,
		Args:        args,
		Log:         filepath.Join(vmDir, "vtpmd.log"),
		Banner:      fmt.Sprintf("vtpmd hook: starting vTPM for %s (%s) as %s", dom.Name, dom.UUID, acct.name),
		Socket:      sock,
		SocketOwner: -1,
		Ready:       pidWritten(pidf),
		Files:       []*os.File{ln, pidf},
		Credential:  acct.credential(),
		Wait:        h.Config.StartWait(),
	})
	if err != nil {
		_ = removeSocket(sock)
		return nil, fmt.Errorf("vTPM: %w", err)
	}
	return started, nil
}

// stopExternal stops the VM's vTPM if it still runs (QEMU's shutdown normally ended it) and
// removes its socket, and its state when the policy says so.
func (h *Hook) stopExternal(ctx context.Context, inv Invocation, dom *Domain) error {
	sock, _, err := h.externalSocket(dom)
	if err != nil {
		return err
	}
	pids := proc.FindInstances("path", sock)
	if rec, _ := h.Registry.Get(dom.UUID); rec != nil && rec.PID > 0 && proc.IsInstance(rec.PID, "path", sock) {
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
		signalled, err := proc.Terminate(ctx, pid, releaseGrace)
		if err != nil {
			errs = append(errs, err)
		}
		if signalled {
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
		if err := os.RemoveAll(h.Config.ExternalDir(dom.UUID)); err != nil {
			errs = append(errs, fmt.Errorf("remove state: %w", err))
		} else {
			detail += "; removed state (policy keep=no)"
		}
	}
	h.record(ctx, dom, inv, registry.Event{Detail: detail}, func(r *registry.Record) { r.PID, r.Exe = 0, "" })
	return errors.Join(errs...)
}
