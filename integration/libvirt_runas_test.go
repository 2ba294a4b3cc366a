//go:build integration

package integration

import (
	"fmt"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// externalRunsAsTss: the hook runs an external backend's vTPM as tss (not root), which owns
// the state; the socket belongs to the qemu user (0600) and the log stays root's; the guest's
// TPM works through it; destroy leaves no process and no socket.
func (e *lvEnv) externalRunsAsTss() {
	t := e.t
	tss, err := user.Lookup("tss")
	if err != nil {
		t.Fatalf("user tss: %v", err)
	}
	qemu, err := user.Lookup("libvirt-qemu")
	if err != nil {
		t.Fatalf("user libvirt-qemu: %v", err)
	}
	kvm, err := user.LookupGroup("kvm")
	if err != nil {
		t.Fatalf("group kvm: %v", err)
	}
	sock := filepath.Join(e.w, "A", "run", "lv-runas-ext", "ctrl.sock")
	d := e.domain("lv-runas-ext", "12", "tpmloop",
		fmt.Sprintf("<backend type='external'><source type='unix' mode='connect' path='%s'/></backend>", sock))
	e.virsh("A", "create", d.writeXML())
	defer e.virshErr("A", "destroy", d.Name)
	rows := e.waitRows(d.serial("A"), 0, 2, 2*time.Minute)
	lvCheckChain(t, rows[:1], rows[1:])

	procs := e.vtpmProcs("path=" + sock)
	if len(procs) != 1 {
		t.Fatalf("vtpmd processes for %s: %v", sock, procs)
	}
	status, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", procs[0]))
	var uids, gids []string
	for _, line := range strings.Split(string(status), "\n") {
		if v, ok := strings.CutPrefix(line, "Uid:"); ok {
			uids = strings.Fields(v)
		}
		if v, ok := strings.CutPrefix(line, "Gid:"); ok {
			gids = strings.Fields(v)
		}
	}
	if len(uids) != 4 || len(gids) != 4 || strings.Join(uids, " ") != strings.Repeat(tss.Uid+" ", 3)+tss.Uid ||
		strings.Join(gids, " ") != strings.Repeat(tss.Gid+" ", 3)+tss.Gid {
		t.Fatalf("the hook's vTPM (pid %d) runs as uids %v gids %v, want tss (%s:%s)", procs[0], uids, gids, tss.Uid, tss.Gid)
	}
	t.Logf("external vTPM pid %d runs as tss (%s:%s)", procs[0], tss.Uid, tss.Gid)

	owner := func(p string) (string, string, os.FileMode) {
		fi, err := os.Lstat(p)
		if err != nil {
			t.Fatal(err)
		}
		st := fi.Sys().(*syscall.Stat_t)
		return strconv.Itoa(int(st.Uid)), strconv.Itoa(int(st.Gid)), fi.Mode()
	}
	vmDir := filepath.Join(e.w, "A", "state", d.UUID)
	for _, c := range []struct {
		path     string
		uid, gid string
		mode     os.FileMode
	}{
		{vmDir, "0", tss.Gid, os.ModeDir | 0o710},
		{filepath.Join(vmDir, "tpm2"), tss.Uid, tss.Gid, os.ModeDir | 0o700},
		{filepath.Join(vmDir, "tpm2", "tpm2-00.permall"), tss.Uid, tss.Gid, 0o600},
		{filepath.Join(vmDir, "vtpmd.log"), "0", "0", 0o600},
		{sock, qemu.Uid, kvm.Gid, os.ModeSocket | 0o600},
	} {
		u, g, m := owner(c.path)
		if u != c.uid || g != c.gid || m != c.mode {
			t.Errorf("%s: %s:%s %v, want %s:%s %v", c.path, u, g, m, c.uid, c.gid, c.mode)
		}
	}

	e.virsh("A", "destroy", d.Name)
	if !lvWait(10*time.Second, func() bool { return len(e.vtpmProcs("path="+sock)) == 0 && !lvExists(sock) }) {
		t.Fatalf("after destroy: vtpmd processes %v, socket exists %v", e.vtpmProcs("path="+sock), lvExists(sock))
	}
}
