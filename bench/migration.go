package main

import (
	"bytes"
	"context"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/vtpmd/vtpmd/internal/tpmclient"
	"github.com/vtpmd/vtpmd/internal/tpmwire"
	"github.com/vtpmd/vtpmd/manager"
	"github.com/vtpmd/vtpmd/socket"
)

// The migration part of the bench: the downtime a live migration owes to the vTPM, measured
// the way QEMU moves it (backends/tpm/tpm_emulator.c): on the source, GET_STATEBLOB of the
// permanent, volatile and savestate blobs while the VM is paused; on the destination (started
// beforehand, as QEMU's -incoming is), STOP, SET_STATEBLOB of each non-empty blob and INIT
// with DELETE_VOLATILE; then the destination's first answer to a TPM command. One window is
// the time from the source's first GET_STATEBLOB to that answer. Three pairs: Debian's swtpm
// to swtpm, vtpmd to vtpmd without managers, and vtpmd to vtpmd with a manager on each side
// (each on its own stand-in hardware TPM). Each window starts from a fresh copy of the same
// golden state (enrolled with the source's manager in the managed pair).

// The pairs of this section, as named in its table.
const (
	migSwtpm    = "swtpm → swtpm"
	migPlain    = "vtpmd → vtpmd"
	migManagers = "vtpmd + managers → vtpmd + managers"
)

// migrationManagerArgs are the flags the secure-migration protocol needs on the manager of
// side ("A" source, "B" destination): its TLS listener for the other manager.
func migrationManagerArgs(side string, ports map[string]int) []string {
	return []string{"--migration-listen", fmt.Sprintf("127.0.0.1:%d", ports[side])}
}

// trustEachOther puts each manager's host CA root (identity.json's ca_root, made at its first
// start) into the other's trusted-cas.pem, which the managers read at each use.
func trustEachOther(dirs map[string]string) error {
	roots := map[string][]byte{}
	for side, dir := range dirs {
		raw, err := os.ReadFile(filepath.Join(dir, "records", "identity.json"))
		if err != nil {
			return fmt.Errorf("manager %s's identity: %w", side, err)
		}
		var id struct {
			CARoot []byte `json:"ca_root"`
		}
		if err := json.Unmarshal(raw, &id); err != nil || len(id.CARoot) == 0 {
			return fmt.Errorf("manager %s's identity.json: no ca_root (%v)", side, err)
		}
		roots[side] = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: id.CARoot})
	}
	for side, dir := range dirs {
		var other []byte
		for o, root := range roots {
			if o != side {
				other = append(other, root...)
			}
		}
		if err := os.WriteFile(filepath.Join(dir, "records", manager.TrustedCAsName), other, 0o600); err != nil {
			return err
		}
	}
	return nil
}

// startMigManager starts side's manager ("A" source, "B" destination) in dirs[side].
func (r *run) startMigManager(vtpmd, side string, dirs map[string]string, ports map[string]int) (*hostManager, error) {
	return r.startHostManager(vtpmd, dirs[side], side, migrationManagerArgs(side, ports)...)
}

// freePort is a TCP port on 127.0.0.1 that was free a moment ago.
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// migPair is one source/destination pair.
type migPair struct {
	src, dst impl
	// prepare readies a fresh source state directory (the managed pair enrols it).
	prepare func(stateDir string) error
	// sealed: the source's blobs must leave sealed (checked in every window)
	sealed bool
}

// migParts are one window's parts: the source's GET_STATEBLOBs, the destination's STOP,
// SET_STATEBLOBs and INIT, and its first answer.
type migParts struct{ get, set, first time.Duration }

// migrationWindow runs one migration of a fresh copy of golden through the pair and returns
// the window and its parts.
func (r *run) migrationWindow(p migPair, golden string) (time.Duration, migParts, error) {
	var parts migParts
	r.seq++
	srcDir := filepath.Join(r.work, fmt.Sprintf("mig-src-%d", r.seq))
	dstDir := filepath.Join(r.work, fmt.Sprintf("mig-dst-%d", r.seq))
	defer os.RemoveAll(srcDir)
	defer os.RemoveAll(dstDir)
	if err := copyState(golden, srcDir); err != nil {
		return 0, parts, err
	}
	if err := os.MkdirAll(filepath.Join(dstDir, "state"), 0o700); err != nil {
		return 0, parts, err
	}
	if p.prepare != nil {
		if err := p.prepare(filepath.Join(srcDir, "state")); err != nil {
			return 0, parts, err
		}
	}
	// the source runs (INIT and Startup by its flags) and has answered a command
	src, err := startAt(p.src, srcDir)
	if err != nil {
		return 0, parts, err
	}
	defer src.stop()
	sd, err := src.dial(10 * time.Second)
	if err != nil {
		return 0, parts, err
	}
	defer sd.Close()
	if _, err := tpmclient.GetRandom(tpmclient.Stream(sd), 8); err != nil {
		return 0, parts, fmt.Errorf("source: %w", err)
	}
	sc, err := dialCtrl(src.ctrl)
	if err != nil {
		return 0, parts, err
	}
	defer sc.Close()
	// the destination waits, not initialized, with its control and data channels connected
	dst, err := startIncoming(p.dst, dstDir)
	if err != nil {
		return 0, parts, err
	}
	defer dst.stop()
	dc, err := dialCtrl(dst.ctrl)
	if err != nil {
		return 0, parts, err
	}
	defer dc.Close()
	dd, err := dst.dial(10 * time.Second)
	if err != nil {
		return 0, parts, err
	}
	defer dd.Close()

	t0 := time.Now()
	var blobs [3][]byte
	var flags [3]uint32
	for k, typ := range []uint32{socket.BlobPermanent, socket.BlobVolatile, socket.BlobSavestate} {
		blobs[k], flags[k], err = sc.GetStateBlob(typ, socket.StateFlagDecrypted)
		if errors.Is(err, tpmwire.ResRetry) { // no such blob (TPM 2's savestate): QEMU carries 0 bytes
			blobs[k], err = nil, nil
		}
		if err != nil {
			return 0, parts, fmt.Errorf("source GET_STATEBLOB %d: %w", typ, err)
		}
	}
	t1 := time.Now()
	if p.sealed && !bytes.HasPrefix(blobs[0], []byte("VTPMDMIG")) {
		return 0, parts, errors.New("the managed source's permanent blob left unsealed")
	}
	if err := dc.Stop(); err != nil {
		return 0, parts, fmt.Errorf("destination STOP: %w", err)
	}
	for k, b := range blobs {
		if len(b) == 0 {
			continue
		}
		if err := dc.SetStateBlob(uint32(k+1), flags[k], b); err != nil {
			return 0, parts, fmt.Errorf("destination SET_STATEBLOB %d: %w", k+1, err)
		}
	}
	if err := dc.Init(socket.InitFlagDeleteVolatile); err != nil {
		return 0, parts, fmt.Errorf("destination INIT: %w", err)
	}
	t2 := time.Now()
	if _, err := tpmclient.GetRandom(tpmclient.Stream(dd), 8); err != nil {
		return 0, parts, fmt.Errorf("destination's first answer: %w", err)
	}
	t3 := time.Now()
	parts = migParts{get: t1.Sub(t0), set: t2.Sub(t1), first: t3.Sub(t2)}
	return t3.Sub(t0), parts, nil
}

// startIncoming launches an emulator in dir the way a migration destination waits: no INIT,
// no Startup (startAt's flags would run both).
func startIncoming(im impl, dir string) (*instance, error) {
	in := &instance{dir: dir, data: filepath.Join(dir, "d.sock"), ctrl: filepath.Join(dir, "c.sock")}
	args := append(append([]string{}, im.args...), "--tpm2", "--tpmstate", "dir="+filepath.Join(dir, "state"),
		"--server", "type=unixio,path="+in.data, "--ctrl", "type=unixio,path="+in.ctrl)
	in.cmd = exec.Command(im.bin, args...)
	in.cmd.Stderr = os.Stderr
	if err := in.cmd.Start(); err != nil {
		return nil, err
	}
	return in, nil
}

// migrationSection is the report's section on migration downtime.
func (r *run) migrationSection() (string, error) {
	vtpmd := r.impls[0].bin
	var b strings.Builder
	b.WriteString("\n## Migration: downtime owed to the vTPM\n\n")
	golden, err := r.goldenState()
	if err != nil {
		return "", err
	}
	pairs := map[string]migPair{
		migSwtpm: {src: r.impls[1], dst: r.impls[1]},
		migPlain: {src: r.impls[0], dst: r.impls[0]}, // vtpmd socket --manager none
	}
	managed := os.Geteuid() == 0 // enrolling is an operator request, answered to root only
	if managed {
		dirs := map[string]string{"A": filepath.Join(r.work, "mig-manager-A"), "B": filepath.Join(r.work, "mig-manager-B")}
		for _, d := range dirs {
			if err := os.MkdirAll(d, 0o700); err != nil {
				return "", err
			}
		}
		ports := map[string]int{}
		for _, side := range []string{"A", "B"} {
			if ports[side], err = freePort(); err != nil {
				return "", err
			}
		}
		ma, err := r.startMigManager(vtpmd, "A", dirs, ports)
		if err != nil {
			return "", err
		}
		defer ma.stop()
		mb, err := r.startMigManager(vtpmd, "B", dirs, ports)
		if err != nil {
			return "", err
		}
		defer mb.stop()
		if err := trustEachOther(dirs); err != nil {
			return "", err
		}
		pairs[migManagers] = migPair{
			src:    impl{name: "vtpmd-mig-A", bin: vtpmd, args: []string{"socket", "--manager", ma.sock}},
			dst:    impl{name: "vtpmd-mig-B", bin: vtpmd, args: []string{"socket", "--manager", mb.sock}},
			sealed: true,
			prepare: func(state string) error {
				path, err := filepath.EvalSymlinks(state) // as the manager names it
				if err != nil {
					return err
				}
				ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
				defer cancel()
				if _, err := manager.NewClient(ma.sock).Enroll(ctx, manager.VMRequest{VM: path}); err != nil {
					return fmt.Errorf("enrol the source's state with manager A: %w", err)
				}
				return nil
			},
		}
	}
	n := max(15, r.iters/10)
	parts := map[string][]migParts{}
	fs := map[string]timed{}
	for name, p := range pairs {
		fs[name] = func() (time.Duration, error) {
			d, pt, err := r.migrationWindow(p, golden)
			parts[name] = append(parts[name], pt)
			return d, err
		}
	}
	ds, err := timeBlocks(n, 1, fs)
	if err != nil {
		return "", fmt.Errorf("migration: %w", err)
	}
	vals := summarizeAll(ds)

	fmt.Fprintf(&b, "One window: the source's GET_STATEBLOB (permanent, volatile, savestate) to the destination's first answer (a GetRandom) after STOP, "+
		"SET_STATEBLOB of each non-empty blob and INIT with DELETE_VOLATILE: the part of a live migration's downtime the vTPM adds, "+
		"with QEMU's own sequence of control commands, without QEMU. Each window starts from a fresh copy of one golden state "+
		"(manufactured by swtpm, NV indices defined); the destination is started beforehand, as QEMU's `-incoming` is. "+
		"The pairs take turns window by window; medians of %d windows each.", n)
	if managed {
		b.WriteString(" `vtpmd + managers`: the source's copy enrolled with manager A (`vtpmd socket --manager A`), the destination under manager B, " +
			"each manager `vtpmd manager --tpm swtpm:path=SOCK --migration-listen 127.0.0.1:PORT` on its own stand-in hardware TPM (Debian's swtpm), " +
			"each trusting the other's host CA: the source's blobs leave sealed under a one-time key, which the destination's manager fetches " +
			"from the source's over mutually authenticated TLS at INIT (issue 14's protocol, docs/migration.md).")
	} else {
		b.WriteString(" The managed pair was not measured: enrolling a vTPM is an operator request, which the manager answers only to root. Run the bench as root.")
	}
	b.WriteString("\n\n| pair | window (median) | p10 | p99 | GET (source) | SET + INIT (destination) | first answer | / swtpm | / vtpmd without managers |\n|---|---|---|---|---|---|---|---|---|\n")
	for _, name := range []string{migPlain, migManagers, migSwtpm} {
		v, ok := vals[name]
		if !ok {
			continue
		}
		med := func(f func(migParts) time.Duration) time.Duration {
			var xs []time.Duration
			for _, p := range parts[name] {
				xs = append(xs, f(p))
			}
			return summarize(xs).median
		}
		fmt.Fprintf(&b, "| %s | %s | %s | %s | %s | %s | %s | %.2f | %.2f |\n", name, fmtDur(v.median), fmtDur(v.p10), fmtDur(v.p99),
			fmtDur(med(func(p migParts) time.Duration { return p.get })), fmtDur(med(func(p migParts) time.Duration { return p.set })),
			fmtDur(med(func(p migParts) time.Duration { return p.first })),
			float64(v.median)/float64(vals[migSwtpm].median), float64(v.median)/float64(vals[migPlain].median))
	}
	r.summarize("migration downtime owed to the vTPM (vtpmd without managers)", fmtDur(vals[migPlain].median), fmtDur(vals[migSwtpm].median),
		float64(vals[migPlain].median)/float64(vals[migSwtpm].median))
	if managed {
		r.summarize("migration downtime owed to the vTPM (vtpmd + managers)", fmtDur(vals[migManagers].median), fmtDur(vals[migSwtpm].median),
			float64(vals[migManagers].median)/float64(vals[migSwtpm].median))
	}
	return b.String(), nil
}
