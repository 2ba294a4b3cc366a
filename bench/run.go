package main

import (
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/vtpmd/vtpmd/emulator/libtpms"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/vtpmd/vtpmd/emulator"
	"github.com/vtpmd/vtpmd/internal/tpmclient"
	"github.com/vtpmd/vtpmd/socket"
)

type impl struct {
	name string
	bin  string
	args []string
	env  []string // added to the bench's environment
	// stateOpts follow dir=... in --tpmstate (",fsync=false")
	stateOpts string
}

type run struct {
	work  string
	iters int
	impls []impl
	seq   int
	// idleMem and startOne are the density section's idle memory per instance and start of one
	// instance, by server, for its floor rows.
	idleMem  map[string]procMemory
	startOne map[string]time.Duration
	// summary collects the README's table rows: operation, vtpmd, swtpm, ratio.
	summary [][4]string
}

func (r *run) summarize(name, v, s string, ratio float64) {
	r.summary = append(r.summary, [4]string{name, v, s, fmt.Sprintf("%.2f", ratio)})
}

// instance is one running emulator process with a unix data and control socket.
type instance struct {
	cmd  *exec.Cmd
	dir  string
	data string
	ctrl string
}

// start launches an emulator in a new directory; stateSuffix is appended to --tpmstate (e.g.
// ",fsync=false").
func (r *run) start(im impl, stateSuffix ...string) (*instance, error) {
	r.seq++
	dir := filepath.Join(r.work, fmt.Sprintf("%s-%d", im.name, r.seq))
	if err := os.MkdirAll(filepath.Join(dir, "state"), 0o755); err != nil {
		return nil, err
	}
	return startAt(im, dir, stateSuffix...)
}

// startAt launches an emulator on the state in dir/state (kept from earlier runs), with its
// sockets in dir.
func startAt(im impl, dir string, stateSuffix ...string) (*instance, error) {
	in := &instance{dir: dir, data: filepath.Join(dir, "d.sock"), ctrl: filepath.Join(dir, "c.sock")}
	os.Remove(in.data) // a socket left by an earlier run would answer dial with ECONNREFUSED
	os.Remove(in.ctrl)
	args := append([]string{}, im.args...)
	args = append(args, "--tpm2", "--tpmstate", "dir="+filepath.Join(dir, "state")+im.stateOpts+strings.Join(stateSuffix, ""),
		"--server", "type=unixio,path="+in.data, "--ctrl", "type=unixio,path="+in.ctrl,
		"--flags", "not-need-init,startup-clear")
	in.cmd = exec.Command(im.bin, args...)
	in.cmd.Stderr = os.Stderr
	if im.env != nil {
		in.cmd.Env = append(os.Environ(), im.env...)
	}
	if err := in.cmd.Start(); err != nil {
		return nil, err
	}
	return in, nil
}

func (in *instance) stop() {
	if c, err := socket.Dial("unix", in.ctrl); err == nil {
		c.Shutdown()
		c.Close()
	}
	done := make(chan struct{})
	go func() { in.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(3 * time.Second):
		in.cmd.Process.Kill()
		<-done
	}
}

// firstAnswer times start until the emulator it launches has answered a GetRandom; the
// shutdown afterwards is not timed.
func firstAnswer(start func() (*instance, error)) timed {
	return func() (time.Duration, error) {
		t0 := time.Now()
		in, err := start()
		if err != nil {
			return 0, err
		}
		defer in.stop()
		c, err := in.dial(10 * time.Second)
		if err != nil {
			return 0, err
		}
		defer c.Close()
		if _, err := tpmclient.GetRandom(tpmclient.Stream(c), 8); err != nil {
			return 0, err
		}
		return time.Since(t0), nil
	}
}

// dial waits for the data socket and answers; it returns the connection.
func (in *instance) dial(timeout time.Duration) (net.Conn, error) {
	deadline := time.Now().Add(timeout)
	for {
		c, err := net.Dial("unix", in.data)
		if err == nil {
			return c, nil
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("data socket %s: %w", in.data, err)
		}
		time.Sleep(200 * time.Microsecond)
	}
}

type stats struct{ median, p10, p99, mean time.Duration }

// timed is one measured call: it runs once and says how long its measured part took (a call
// with untimed set-up or tear-down times itself; clock times a whole call).
type timed func() (time.Duration, error)

func clock(f func() error) timed {
	return func() (time.Duration, error) {
		t0 := time.Now()
		err := f()
		return time.Since(t0), err
	}
}

// measureInterleaved runs the functions round-robin, one call each per round, so that load
// from the rest of the machine falls on all of them alike.
func measureInterleaved(n int, fs map[string]func() error) (map[string]stats, error) {
	return measureBlocks(n, 1, fs)
}

// measureBlocks times each function in blocks of back-to-back calls, the functions taking
// turns block by block (a block of 1 interleaves them call by call).
func measureBlocks(rounds, block int, fs map[string]func() error) (map[string]stats, error) {
	ts := map[string]timed{}
	for name, f := range fs {
		ts[name] = clock(f)
	}
	ds, err := timeBlocks(rounds, block, ts)
	if err != nil {
		return nil, err
	}
	return summarizeAll(ds), nil
}

// timeBlocks is the timing loop: rounds of blocks of back-to-back calls of each function in
// turn, in name order. It returns every call's duration.
func timeBlocks(rounds, block int, fs map[string]timed) (map[string][]time.Duration, error) {
	ds := map[string][]time.Duration{}
	names := sortedKeys(fs)
	for i := 0; i < rounds; i++ {
		for _, name := range names {
			for j := 0; j < block; j++ {
				d, err := fs[name]()
				if err != nil {
					return nil, fmt.Errorf("%s: %w", name, err)
				}
				ds[name] = append(ds[name], d)
			}
		}
	}
	return ds, nil
}

func sortedKeys[V any](m map[string]V) []string {
	names := make([]string, 0, len(m))
	for name := range m {
		names = append(names, name)
	}
	sort.Strings(names)
	return names
}

func summarizeAll(ds map[string][]time.Duration) map[string]stats {
	out := map[string]stats{}
	for name, d := range ds {
		out[name] = summarize(d)
	}
	return out
}

func summarize(ds []time.Duration) stats {
	sort.Slice(ds, func(i, j int) bool { return ds[i] < ds[j] })
	var sum time.Duration
	for _, d := range ds {
		sum += d
	}
	return stats{median: ds[len(ds)/2], p10: ds[len(ds)/10], p99: ds[len(ds)*99/100], mean: sum / time.Duration(len(ds))}
}

func measure(n int, f func() error) (stats, error) {
	vals, err := measureBlocks(1, n, map[string]func() error{"call": f})
	return vals["call"], err
}

// workload is the set of commands timed over every transport.
type workload struct {
	name  string
	iters func(n int) int
	fn    func(t transport.TPM) (func() error, error)
}

func workloads() []workload {
	digest := sha256.Sum256([]byte("bench"))
	full := func(n int) int { return n }
	few := func(n int) int { return max(5, n/20) }
	return []workload{
		{"GetRandom(32)", full, func(t transport.TPM) (func() error, error) {
			return func() error { _, err := tpmclient.GetRandom(t, 32); return err }, nil
		}},
		{"PCR_Extend", full, func(t transport.TPM) (func() error, error) {
			return func() error { return tpmclient.PCRExtend(t, 16, digest[:]) }, nil
		}},
		{"PCR_Read", full, func(t transport.TPM) (func() error, error) {
			return func() error { _, err := tpmclient.PCRRead(t, 16); return err }, nil
		}},
		{"ECC Quote", few, func(t transport.TPM) (func() error, error) {
			ak, err := tpmclient.CreatePrimary(t, tpm2.TPMRHOwner, tpmclient.ECCSigningTemplate)
			if err != nil {
				return nil, err
			}
			return func() error {
				_, err := tpm2.Quote{
					SignHandle:     tpm2.AuthHandle{Handle: ak.Handle, Name: ak.Name, Auth: tpm2.PasswordAuth(nil)},
					QualifyingData: tpm2.TPM2BData{Buffer: []byte("nonce")},
					InScheme:       tpm2.TPMTSigScheme{Scheme: tpm2.TPMAlgNull},
					PCRSelect:      tpmclient.Selection(0, 16),
				}.Execute(t)
				return err
			}, nil
		}},
		{"ECC CreatePrimary", few, func(t transport.TPM) (func() error, error) {
			return func() error {
				k, err := tpmclient.CreatePrimary(t, tpm2.TPMRHOwner, tpm2.ECCSRKTemplate)
				if err != nil {
					return err
				}
				return tpmclient.Flush(t, k.Handle)
			}, nil
		}},
		{"RSA-2048 CreatePrimary", func(n int) int { return max(3, n/50) }, func(t transport.TPM) (func() error, error) {
			return func() error {
				k, err := tpmclient.CreatePrimary(t, tpm2.TPMRHOwner, tpm2.RSASRKTemplate)
				if err != nil {
					return err
				}
				return tpmclient.Flush(t, k.Handle)
			}, nil
		}},
		{"NV_Write(64) durable", few, func(t transport.TPM) (func() error, error) {
			if err := tpmclient.NVDefine(t, 0x01500020, 64); err != nil {
				return nil, err
			}
			// new bytes every time: libtpms stores nothing when a write leaves NV unchanged
			data := make([]byte, 64)
			var n uint64
			return func() error {
				n++
				binary.BigEndian.PutUint64(data, n)
				return tpmclient.NVWrite(t, 0x01500020, data, 0)
			}, nil
		}},
	}
}

type row struct {
	name string
	vals map[string]stats
}

func (r *run) all(counts []int) (string, error) {
	var b strings.Builder
	host, _ := os.Hostname()
	swver, _ := exec.Command(r.impls[1].bin, "--version").CombinedOutput()
	fmt.Fprintf(&b, "# Benchmarks: vtpmd vs Debian swtpm\n\nWritten by `just bench` (`go run ./bench`) on %s, %s. Reference: %s. libtpms 0x%06x in both (same shared library).\n"+
		"Ratios are vtpmd / swtpm: below 1 means vtpmd is faster or smaller. Times are medians over the iteration count shown; the in-process column calls libtpms directly (the floor a socket server can approach).\n\n",
		host, time.Now().UTC().Format("2006-01-02 15:04 UTC"), strings.TrimSpace(string(swver)), libtpms.LibraryVersion())

	// start-up to first answer on a fresh state; the shutdown afterwards is not timed
	starts := map[string]timed{}
	for _, im := range r.impls {
		starts[im.name] = firstAnswer(func() (*instance, error) { return r.start(im) })
	}
	startDs, err := timeBlocks(max(10, r.iters/10), 1, starts)
	if err != nil {
		return "", fmt.Errorf("start: %w", err)
	}
	startRow := row{name: "start to first answer", vals: summarizeAll(startDs)}

	// command latency over the socket and in-process
	rows := []row{}
	conns := map[string]net.Conn{}
	var insts []*instance
	defer func() {
		for _, in := range insts {
			in.stop()
		}
	}()
	for _, im := range r.impls {
		in, err := r.start(im)
		if err != nil {
			return "", err
		}
		insts = append(insts, in)
		c, err := in.dial(10 * time.Second)
		if err != nil {
			return "", err
		}
		conns[im.name] = c
	}
	inproc, closeInproc, err := inProcess()
	if err != nil {
		return "", err
	}
	defer closeInproc()
	for _, w := range workloads() {
		rw := row{name: w.name, vals: map[string]stats{}}
		transports := map[string]transport.TPM{"in-process": inproc}
		for name, c := range conns {
			transports[name] = tpmclient.Stream(c)
		}
		fns := map[string]func() error{}
		for name, t := range transports {
			f, err := w.fn(t)
			if err != nil {
				return "", fmt.Errorf("%s setup on %s: %w", w.name, name, err)
			}
			fns[name] = f
		}
		vals, err := measureInterleaved(w.iters(r.iters), fns)
		if err != nil {
			return "", fmt.Errorf("%s: %w", w.name, err)
		}
		rw.vals = vals
		rows = append(rows, rw)
	}

	fmt.Fprintf(&b, "## Latency (median, one connection, %d iterations for cheap commands)\n\n", r.iters)
	fmt.Fprintf(&b, "| operation | vtpmd | swtpm | ratio | vtpmd − in-process | in-process libtpms | vtpmd ops/s | swtpm ops/s |\n|---|---|---|---|---|---|---|---|\n")
	for _, rw := range append([]row{startRow}, rows...) {
		v, s := rw.vals["vtpmd"], rw.vals["swtpm"]
		ip, hasIP := rw.vals["in-process"]
		ipCol, diffCol := "—", "—"
		if hasIP {
			ipCol, diffCol = fmtDur(ip.median), fmtDur(v.median-ip.median)
		}
		fmt.Fprintf(&b, "| %s | %s | %s | %.2f | %s | %s | %.0f | %.0f |\n", rw.name, fmtDur(v.median), fmtDur(s.median),
			float64(v.median)/float64(s.median), diffCol, ipCol, opsPerSec(v.mean), opsPerSec(s.mean))
		switch rw.name {
		case "start to first answer", "GetRandom(32)", "PCR_Extend", "ECC Quote", "NV_Write(64) durable":
			r.summarize(rw.name, fmtDur(v.median), fmtDur(s.median), float64(v.median)/float64(s.median))
		}
	}

	// state blobs
	fmt.Fprintf(&b, "\n## State blobs over the control channel (after the workloads above)\n\n| blob | vtpmd time | swtpm time | ratio | vtpmd size | swtpm size |\n|---|---|---|---|---|---|\n")
	for _, typ := range []struct {
		name string
		t    uint32
	}{{"GET permanent", socket.BlobPermanent}, {"GET volatile", socket.BlobVolatile}} {
		vals := map[string]stats{}
		sizes := map[string]int{}
		for i, im := range r.impls {
			c, err := socket.Dial("unix", insts[i].ctrl)
			if err != nil {
				return "", err
			}
			st, err := measure(20, func() error {
				blob, _, err := c.GetStateBlob(typ.t, socket.StateFlagDecrypted)
				sizes[im.name] = len(blob)
				return err
			})
			c.Close()
			if err != nil {
				return "", fmt.Errorf("%s %s: %w", im.name, typ.name, err)
			}
			vals[im.name] = st
		}
		fmt.Fprintf(&b, "| %s | %s | %s | %.2f | %d B | %d B |\n", typ.name, fmtDur(vals["vtpmd"].median), fmtDur(vals["swtpm"].median),
			float64(vals["vtpmd"].median)/float64(vals["swtpm"].median), sizes["vtpmd"], sizes["swtpm"])
	}
	setRow, err := r.setStateBlob()
	if err != nil {
		return "", err
	}
	b.WriteString(setRow)

	// memory
	fmt.Fprintf(&b, "\n## Memory per instance (after Startup and a GetRandom; mean over instances)\n\n| instances | vtpmd RSS | swtpm RSS | RSS ratio | vtpmd PSS | swtpm PSS | PSS ratio |\n|---|---|---|---|---|---|---|\n")
	for _, n := range counts {
		mem := map[string][2]float64{}
		for _, im := range r.impls {
			rss, pss, err := r.memory(im, n)
			if err != nil {
				return "", fmt.Errorf("%s memory x%d: %w", im.name, n, err)
			}
			mem[im.name] = [2]float64{rss, pss}
		}
		v, s := mem["vtpmd"], mem["swtpm"]
		fmt.Fprintf(&b, "| %d | %.1f MiB | %.1f MiB | %.2f | %.1f MiB | %.1f MiB | %.2f |\n", n, v[0], s[0], v[0]/s[0], v[1], s[1], v[1]/s[1])
		if n == counts[len(counts)-1] {
			r.summarize(fmt.Sprintf("RSS per instance (%d instances)", n), fmt.Sprintf("%.1f MiB", v[0]), fmt.Sprintf("%.1f MiB", s[0]), v[0]/s[0])
			r.summarize(fmt.Sprintf("PSS per instance (%d instances)", n), fmt.Sprintf("%.1f MiB", v[1]), fmt.Sprintf("%.1f MiB", s[1]), v[1]/s[1])
		}
	}
	dur, err := r.durability()
	if err != nil {
		return "", err
	}
	b.WriteString(dur)
	mgr, err := r.managerSection()
	if err != nil {
		return "", err
	}
	b.WriteString(mgr)
	mig, err := r.migrationSection()
	if err != nil {
		return "", err
	}
	b.WriteString(mig)
	dens, err := r.densitySection(counts)
	if err != nil {
		return "", err
	}
	b.WriteString(dens)
	setup, err := r.setup()
	if err != nil {
		return "", err
	}
	b.WriteString(setup)
	floors, err := r.floors()
	if err != nil {
		return "", err
	}
	b.WriteString(floors)
	fmt.Fprintf(&b, "\nReproduce: `just bench` (or `go run ./bench -n %d`).\n", r.iters)
	return b.String(), nil
}

func fmtDur(d time.Duration) string {
	switch {
	case d < 0:
		return "-" + fmtDur(-d)
	case d < time.Millisecond:
		return fmt.Sprintf("%.1f µs", float64(d)/1e3)
	case d < time.Second:
		return fmt.Sprintf("%.2f ms", float64(d)/1e6)
	}
	return fmt.Sprintf("%.2f s", d.Seconds())
}

func opsPerSec(mean time.Duration) float64 {
	if mean <= 0 {
		return 0
	}
	return float64(time.Second) / float64(mean)
}

// setStateBlob times SET_STATEBLOB(permanent) + INIT on a stopped TPM.
func (r *run) setStateBlob() (string, error) {
	vals := map[string]stats{}
	for _, im := range r.impls {
		in, err := r.start(im)
		if err != nil {
			return "", err
		}
		c, err := dialCtrl(in.ctrl)
		if err != nil {
			in.stop()
			return "", err
		}
		blob, flags, err := c.GetStateBlob(socket.BlobPermanent, socket.StateFlagDecrypted)
		if err == nil {
			vals[im.name], err = measure(20, func() error {
				if err := c.Stop(); err != nil {
					return err
				}
				if err := c.SetStateBlob(socket.BlobPermanent, flags, blob); err != nil {
					return err
				}
				return c.Init(0)
			})
		}
		c.Close()
		in.stop()
		if err != nil {
			return "", fmt.Errorf("%s SET_STATEBLOB: %w", im.name, err)
		}
	}
	return fmt.Sprintf("| SET permanent + INIT | %s | %s | %.2f | | |\n", fmtDur(vals["vtpmd"].median), fmtDur(vals["swtpm"].median),
		float64(vals["vtpmd"].median)/float64(vals["swtpm"].median)), nil
}

func dialCtrl(path string) (*socket.Client, error) {
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := socket.Dial("unix", path)
		if err == nil {
			return c, nil
		}
		if time.Now().After(deadline) {
			return nil, err
		}
		time.Sleep(time.Millisecond)
	}
}

// memory starts n instances, exercises each once and averages RSS and PSS (MiB).
func (r *run) memory(im impl, n int) (float64, float64, error) {
	var insts []*instance
	defer func() {
		for _, in := range insts {
			in.stop()
		}
	}()
	for i := 0; i < n; i++ {
		in, err := r.start(im)
		if err != nil {
			return 0, 0, err
		}
		insts = append(insts, in)
	}
	var rss, pss float64
	for _, in := range insts {
		c, err := in.dial(20 * time.Second)
		if err != nil {
			return 0, 0, err
		}
		_, err = tpmclient.GetRandom(tpmclient.Stream(c), 8)
		c.Close()
		if err != nil {
			return 0, 0, err
		}
	}
	for _, in := range insts {
		r1, p1, err := smaps(in.cmd.Process.Pid)
		if err != nil {
			return 0, 0, err
		}
		rss += r1
		pss += p1
	}
	return rss / float64(n), pss / float64(n), nil
}

func smaps(pid int) (rss, pss float64, err error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
	if err != nil {
		return 0, 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		kb, _ := strconv.ParseFloat(f[1], 64)
		switch f[0] {
		case "Rss:":
			rss = kb / 1024
		case "Pss:":
			pss = kb / 1024
		}
	}
	return rss, pss, nil
}

// durability compares NV_Write with vtpmd's default fsync against vtpmd with fsync=false and
// swtpm 0.7.1 (which does not fsync).
func (r *run) durability() (string, error) {
	cases := []struct {
		label  string
		im     impl
		suffix string
	}{
		{"vtpmd (fsync, default)", r.impls[0], ""},
		{"vtpmd --tpmstate ...,fsync=false", r.impls[0], ",fsync=false"},
		{"swtpm 0.7.1 (no fsync)", r.impls[1], ""},
	}
	var b strings.Builder
	fmt.Fprintf(&b, "\n## Cost of durability: NV_Write(64 bytes), each acknowledged only once on disk\n\n| server | median | p99 |\n|---|---|---|\n")
	for _, cs := range cases {
		in, err := r.start(cs.im, cs.suffix)
		if err != nil {
			return "", err
		}
		c, err := in.dial(10 * time.Second)
		if err != nil {
			in.stop()
			return "", err
		}
		t := tpmclient.Stream(c)
		f, err := workloads()[6].fn(t)
		var st stats
		if err == nil {
			st, err = measure(max(20, r.iters/4), f)
		}
		c.Close()
		in.stop()
		if err != nil {
			return "", fmt.Errorf("%s: %w", cs.label, err)
		}
		fmt.Fprintf(&b, "| %s | %s | %s |\n", cs.label, fmtDur(st.median), fmtDur(st.p99))
	}
	return b.String(), nil
}

// inProcess opens libtpms in this process with a memory store.
func inProcess() (transport.TPM, func(), error) {
	e, err := libtpms.Open(emulator.TPM2, emulator.NewMemStore(), nil)
	if err != nil {
		return nil, nil, err
	}
	if err := e.Start(); err != nil {
		return nil, nil, err
	}
	t := tpmclient.SendFunc(e.Process)
	if err := tpmclient.Startup(t); err != nil {
		return nil, nil, err
	}
	return t, e.Close, nil
}
