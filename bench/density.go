package main

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/google/go-tpm/tpm2/transport"

	"github.com/vtpmd/vtpmd/internal/atomicfile"
	"github.com/vtpmd/vtpmd/internal/tpmclient"
	"github.com/vtpmd/vtpmd/internal/tpmwire"
	"github.com/vtpmd/vtpmd/socket"
)

// The density part of the bench (issue 11): many vTPMs on one host, vtpmd against Debian's swtpm
// in the same run, every instance on its own copy of one golden state (manufactured by swtpm,
// NV indices defined). Every measure is taken in windows, the two servers taking turns window
// by window (the first server alternating), and the report gives the median over the windows:
//
//   - memory: n instances started, each answering one GetRandom, then left idle; per process
//     RssAnon and VmRSS (/proc/PID/status) and PSS (/proc/PID/smaps_rollup), the mean over the
//     instances. Each server's instances run alone, so PSS shares only among them;
//   - start at once: the time from starting n instances together until every one has answered;
//   - contention: n instances of each server running; back-to-back, one client per instance
//     sends raw GetRandom(8) round trips as fast as it gets answers, for a fixed time (aggregate
//     throughput, median and p99 latency over every call, server CPU time per command from
//     /proc/PID/task/*/schedstat); interleaved, one client calls the instances in turn, one
//     call each, so each TPM is idle and woken per command;
//   - RssAnon after sustained load: after the back-to-back windows of the largest count, at
//     once and after a quiet period; and one instance after a mixed load (GetRandom,
//     PCR_Extend, durable NV_Write 1 KiB, GET_STATEBLOB volatile);
//   - save + restore over the control channel, as QEMU moves the TPM in a migration: GET_STATEBLOB
//     permanent and volatile on the source, then on a destination waiting un-initialized STOP,
//     SET_STATEBLOB of both, INIT (delete volatile) and its first answer;
//   - durable NV_Write 1 KiB: vtpmd acknowledges once on disk (fsync), swtpm does not fsync.

// densityWindows is the number of windows per measure (the report gives their median).
const densityWindows = 3

// Window lengths of the contention measures.
const (
	b2bWindow   = 2 * time.Second
	interWindow = time.Second
	// quietAfterLoad is how long the instances idle before the second RssAnon reading: longer
	// than vtpmd's first quiet check (internal/daemon) and a second one.
	quietAfterLoad = 5 * time.Second
)

// fleet is n running instances of one server, each on its own copy of the golden state.
type fleet struct {
	im    impl
	insts []*instance
	conns []net.Conn
}

// fleetDirs makes (once per server and count) n directories holding a copy of the golden
// state; the instances started in them keep the state between windows.
func (r *run) fleetDirs(golden string, im impl, n int) ([]string, error) {
	dirs := make([]string, n)
	for i := range dirs {
		dirs[i] = filepath.Join(r.work, fmt.Sprintf("dens-%s-%d-%d", im.name, n, i))
		if _, err := os.Stat(filepath.Join(dirs[i], "state")); err == nil {
			continue
		}
		if err := copyState(golden, dirs[i]); err != nil {
			return nil, err
		}
	}
	return dirs, nil
}

// startFleet starts an instance in each directory at once and returns when every one has
// answered a GetRandom, with how long that took. The data connections stay open.
func startFleet(im impl, dirs []string) (*fleet, time.Duration, error) {
	f := &fleet{im: im, insts: make([]*instance, len(dirs)), conns: make([]net.Conn, len(dirs))}
	t0 := time.Now()
	errs := make([]error, len(dirs))
	var wg sync.WaitGroup
	for i, dir := range dirs {
		in, err := startAt(im, dir)
		if err != nil {
			f.stop()
			return nil, 0, err
		}
		f.insts[i] = in
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := in.dial(60 * time.Second)
			if err != nil {
				errs[i] = err
				return
			}
			f.conns[i] = c
			errs[i] = roundTrip(c, getRandom8, 20)()
		}()
	}
	wg.Wait()
	took := time.Since(t0)
	if err := errors.Join(errs...); err != nil {
		f.stop()
		return nil, 0, fmt.Errorf("%s x%d: %w", im.name, len(dirs), err)
	}
	return f, took, nil
}

// stop shuts every instance down, all at once.
func (f *fleet) stop() {
	var wg sync.WaitGroup
	for i, in := range f.insts {
		if in == nil {
			continue
		}
		if f.conns[i] != nil {
			f.conns[i].Close()
		}
		wg.Add(1)
		go func() { defer wg.Done(); in.stop() }()
	}
	wg.Wait()
}

func (f *fleet) pids() map[string]int {
	out := map[string]int{}
	for i, in := range f.insts {
		out[fmt.Sprint(i)] = in.cmd.Process.Pid
	}
	return out
}

// procMemory is one process's memory in KiB.
type procMemory struct{ rssAnon, vmRSS, pss float64 }

// readMemory reads RssAnon and VmRSS from /proc/PID/status and Pss from smaps_rollup.
func readMemory(pid int) (procMemory, error) {
	var m procMemory
	st, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return m, err
	}
	roll, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
	if err != nil {
		return m, err
	}
	for _, line := range strings.Split(string(st)+string(roll), "\n") {
		var kb float64
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		fmt.Sscan(f[1], &kb)
		switch f[0] {
		case "RssAnon:":
			m.rssAnon = kb
		case "VmRSS:":
			m.vmRSS = kb
		case "Pss:":
			m.pss = kb
		}
	}
	return m, nil
}

// memory is the mean per instance, in MiB.
func (f *fleet) memory() (procMemory, error) {
	var sum procMemory
	for _, in := range f.insts {
		m, err := readMemory(in.cmd.Process.Pid)
		if err != nil {
			return sum, err
		}
		sum.rssAnon += m.rssAnon
		sum.vmRSS += m.vmRSS
		sum.pss += m.pss
	}
	n := float64(len(f.insts)) * 1024
	return procMemory{sum.rssAnon / n, sum.vmRSS / n, sum.pss / n}, nil
}

// backToBack drives every instance from its own client for d; it returns the aggregate
// throughput, the latency of every call, and the servers' CPU time per command.
func (f *fleet) backToBack(d time.Duration) (float64, stats, time.Duration, error) {
	cpu0 := cpuTimes(f.pids())
	lats := make([][]time.Duration, len(f.conns))
	errs := make([]error, len(f.conns))
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i, c := range f.conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			call := roundTrip(c, getRandom8, 20)
			ds := make([]time.Duration, 0, 1<<14)
			<-start
			end := time.Now().Add(d)
			for {
				t0 := time.Now()
				if t0.After(end) {
					break
				}
				if err := call(); err != nil {
					errs[i] = err
					break
				}
				ds = append(ds, time.Since(t0))
			}
			lats[i] = ds
		}()
	}
	t0 := time.Now()
	close(start)
	wg.Wait()
	el := time.Since(t0)
	if err := errors.Join(errs...); err != nil {
		return 0, stats{}, 0, err
	}
	cpu1 := cpuTimes(f.pids())
	var all []time.Duration
	for _, ds := range lats {
		all = append(all, ds...)
	}
	if len(all) == 0 {
		return 0, stats{}, 0, errors.New("no call completed")
	}
	var cpu time.Duration
	for k, v := range cpu1 {
		cpu += v - cpu0[k]
	}
	return float64(len(all)) / el.Seconds(), summarize(all), cpu / time.Duration(len(all)), nil
}

// interleaved calls the instances in turn, one call each, for d.
func (f *fleet) interleaved(d time.Duration) (float64, stats, error) {
	calls := make([]func() error, len(f.conns))
	for i, c := range f.conns {
		calls[i] = roundTrip(c, getRandom8, 20)
	}
	var ds []time.Duration
	t0 := time.Now()
	end := t0.Add(d)
	for time.Now().Before(end) {
		for _, call := range calls {
			c0 := time.Now()
			if err := call(); err != nil {
				return 0, stats{}, err
			}
			ds = append(ds, time.Since(c0))
		}
	}
	return float64(len(ds)) / time.Since(t0).Seconds(), summarize(ds), nil
}

// medianOf is the median of the windows' values.
func medianOf(vs []float64) float64 {
	s := append([]float64(nil), vs...)
	sort.Float64s(s)
	return s[len(s)/2]
}

// goPathName is vtpmd with the Go data path (socket.GoDataPathEnv), measured beside the native one.
const goPathName = "vtpmd-go"

// rotate is the servers in window w's order (each goes first in turn).
func rotate(impls []impl, w int) []impl {
	k := w % len(impls)
	return append(append([]impl{}, impls[k:]...), impls[:k]...)
}

// order is the servers in window w's order (the first alternates).
func (r *run) order(w int) []impl {
	if w%2 == 0 {
		return []impl{r.impls[0], r.impls[1]}
	}
	return []impl{r.impls[1], r.impls[0]}
}

// perServer collects per-window values by server name.
type perServer map[string][]float64

func (p perServer) add(name string, v float64) { p[name] = append(p[name], v) }
func (p perServer) med(name string) float64    { return medianOf(p[name]) }
func (p perServer) ratio() float64             { return p.med("vtpmd") / p.med("swtpm") }

// densitySection is the report's section on many instances per host.
func (r *run) densitySection(counts []int) (string, error) {
	if len(counts) == 0 {
		counts = []int{1, 10, 100}
	}
	golden, err := r.goldenState()
	if err != nil {
		return "", err
	}
	var b strings.Builder
	fmt.Fprintf(&b, "\n## Many instances per host (density, contention)\n\n"+
		"Every instance on its own copy of one golden state (manufactured by swtpm, NV indices defined). Each measure is taken in %d windows, "+
		"the servers taking turns window by window, the first alternating; the tables give the median over the windows (ratios are of those medians). "+
		"vtpmd is `vtpmd socket --manager none`, swtpm is `%s socket`, both with `--flags not-need-init,startup-clear`.\n",
		densityWindows, r.impls[1].bin)

	// memory and start at once, each server's instances alone
	type memKey struct {
		n    int
		name string
	}
	rssAnon, vmRSS, pss, startAll := map[memKey][]float64{}, map[memKey][]float64{}, map[memKey][]float64{}, map[memKey][]float64{}
	for w := 0; w < densityWindows; w++ {
		for _, im := range r.order(w) {
			for _, n := range counts {
				dirs, err := r.fleetDirs(golden, im, n)
				if err != nil {
					return "", err
				}
				f, took, err := startFleet(im, dirs)
				if err != nil {
					return "", err
				}
				time.Sleep(idleSettle)
				m, err := f.memory()
				f.stop()
				if err != nil {
					return "", err
				}
				k := memKey{n, im.name}
				rssAnon[k] = append(rssAnon[k], m.rssAnon)
				vmRSS[k] = append(vmRSS[k], m.vmRSS)
				pss[k] = append(pss[k], m.pss)
				startAll[k] = append(startAll[k], float64(took))
			}
		}
	}
	fmt.Fprintf(&b, "\n### Memory per idle instance (started, one GetRandom each, 0.5 s idle; mean over the instances, MiB)\n\n"+
		"| instances | vtpmd RssAnon | swtpm RssAnon | ratio | vtpmd PSS | swtpm PSS | ratio | vtpmd VmRSS | swtpm VmRSS | ratio |\n|---|---|---|---|---|---|---|---|---|---|\n")
	for _, n := range counts {
		v, s := memKey{n, "vtpmd"}, memKey{n, "swtpm"}
		ra, pa, va := medianOf(rssAnon[v]), medianOf(pss[v]), medianOf(vmRSS[v])
		rs, ps, vs := medianOf(rssAnon[s]), medianOf(pss[s]), medianOf(vmRSS[s])
		fmt.Fprintf(&b, "| %d | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f |\n", n, ra, rs, ra/rs, pa, ps, pa/ps, va, vs, va/vs)
		if r.idleMem == nil || n == floorInstances {
			// the floor rows compare with the count the floor runs at
			r.idleMem = map[string]procMemory{"vtpmd": {rssAnon: ra, pss: pa}, "swtpm": {rssAnon: rs, pss: ps}}
		}
		if n == counts[len(counts)-1] {
			r.summarize(fmt.Sprintf("private memory (RssAnon) per idle instance, %d instances", n), fmt.Sprintf("%.2f MiB", ra), fmt.Sprintf("%.2f MiB", rs), ra/rs)
			r.summarize(fmt.Sprintf("PSS per idle instance, %d instances", n), fmt.Sprintf("%.2f MiB", pa), fmt.Sprintf("%.2f MiB", ps), pa/ps)
		}
	}
	b.WriteString("\nVmRSS counts every resident page the process maps, shared ones whole: the binary's text and read-only data (vtpmd's is a ~19 MB Go binary, " +
		"resident in large page-cache folios), libcrypto, libtpms, libc. PSS divides each shared page by the processes mapping it, so it falls with the count; RssAnon is what each instance costs on its own.\n")
	fmt.Fprintf(&b, "\n### Instances started at once, until every one has answered a GetRandom (existing state)\n\n| instances | vtpmd | swtpm | ratio |\n|---|---|---|---|\n")
	for _, n := range counts {
		v, s := medianOf(startAll[memKey{n, "vtpmd"}]), medianOf(startAll[memKey{n, "swtpm"}])
		fmt.Fprintf(&b, "| %d | %s | %s | %.2f |\n", n, fmtDur(time.Duration(v)), fmtDur(time.Duration(s)), v/s)
		if n == 1 || r.startOne == nil {
			r.startOne = map[string]time.Duration{"vtpmd": time.Duration(v), "swtpm": time.Duration(s)}
		}
		if n == counts[len(counts)-1] && n > 1 {
			r.summarize(fmt.Sprintf("%d instances started at once, all answered", n), fmtDur(time.Duration(v)), fmtDur(time.Duration(s)), v/s)
		}
	}

	single, err := r.singleLatency(golden)
	if err != nil {
		return "", err
	}
	b.WriteString(single)
	cont, err := r.contention(golden, counts)
	if err != nil {
		return "", err
	}
	b.WriteString(cont)
	mixed, err := r.mixedLoadMemory(golden)
	if err != nil {
		return "", err
	}
	b.WriteString(mixed)
	sr, err := r.saveRestore(golden)
	if err != nil {
		return "", err
	}
	b.WriteString(sr)
	nv, nvFloor, err := r.densityNVWrite(golden)
	if err != nil {
		return "", err
	}
	b.WriteString(nv)
	floors, err := r.densityFloors(golden, nvFloor)
	if err != nil {
		return "", err
	}
	b.WriteString(floors)
	return b.String(), nil
}

// contention runs both servers' fleets side by side for each count above 1.
func (r *run) contention(golden string, counts []int) (string, error) {
	var b strings.Builder
	fmt.Fprintf(&b, "\n### Contention: n instances on %d CPUs, raw GetRandom(8) (back-to-back: one client per instance for %s; interleaved: one client calling the instances in turn for %s)\n\n"+
		"`vtpmd` serves each data connection on a native thread (per command one read, libtpms, one send; no goroutine woken). `vtpmd, Go data path` is the same binary with `%s=1`: the connection served by goroutines through Go's netpoller, as before; it is measured in the same windows to show the floor that design had.\n\n"+
		"| instances | measure | vtpmd | swtpm | vtpmd / swtpm | vtpmd, Go data path | Go data path / swtpm |\n|---|---|---|---|---|---|---|\n", runtime.NumCPU(), b2bWindow, interWindow, socket.GoDataPathEnv)
	impls := append(append([]impl{}, r.impls...), impl{name: goPathName, bin: r.impls[0].bin, args: r.impls[0].args, env: []string{socket.GoDataPathEnv + "=1"}})
	var after strings.Builder
	for _, n := range counts {
		if n < 2 {
			continue
		}
		fleets := map[string]*fleet{}
		for _, im := range impls {
			dirs, err := r.fleetDirs(golden, im, n)
			if err != nil {
				return "", err
			}
			f, _, err := startFleet(im, dirs)
			if err != nil {
				for _, f := range fleets {
					f.stop()
				}
				return "", err
			}
			fleets[im.name] = f
		}
		ops, med, p99, cpu, imed, ip99 := perServer{}, perServer{}, perServer{}, perServer{}, perServer{}, perServer{}
		var err error
		for w := 0; w < densityWindows && err == nil; w++ {
			for _, im := range rotate(impls, w) {
				f := fleets[im.name]
				o, st, c, e := f.backToBack(b2bWindow)
				if e != nil {
					err = fmt.Errorf("%s x%d back-to-back: %w", im.name, n, e)
					break
				}
				_, ist, e := f.interleaved(interWindow)
				if e != nil {
					err = fmt.Errorf("%s x%d interleaved: %w", im.name, n, e)
					break
				}
				ops.add(im.name, o)
				med.add(im.name, float64(st.median))
				p99.add(im.name, float64(st.p99))
				cpu.add(im.name, float64(c))
				imed.add(im.name, float64(ist.median))
				ip99.add(im.name, float64(ist.p99))
			}
		}
		if err == nil {
			// RssAnon after the sustained load, at once and after a quiet period
			var now, later map[string]procMemory
			if now, err = fleetMemories(fleets); err == nil {
				time.Sleep(quietAfterLoad)
				later, err = fleetMemories(fleets)
			}
			if err == nil {
				fmt.Fprintf(&after, "| %d instances after %d back-to-back windows | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f |\n", n, densityWindows,
					now["vtpmd"].rssAnon, now["swtpm"].rssAnon, now["vtpmd"].rssAnon/now["swtpm"].rssAnon,
					later["vtpmd"].rssAnon, later["swtpm"].rssAnon, later["vtpmd"].rssAnon/later["swtpm"].rssAnon)
			}
		}
		for _, f := range fleets {
			f.stop()
		}
		if err != nil {
			return "", err
		}
		d := func(p perServer) (string, string, float64) {
			return fmtDur(time.Duration(p.med("vtpmd"))), fmtDur(time.Duration(p.med("swtpm"))), p.ratio()
		}
		goPath := func(p perServer, dur bool) string {
			v := fmt.Sprintf("%.0f /s", p.med(goPathName))
			if dur {
				v = fmtDur(time.Duration(p.med(goPathName)))
			}
			return fmt.Sprintf("%s | %.2f", v, p.med(goPathName)/p.med("swtpm"))
		}
		fmt.Fprintf(&b, "| %d | aggregate throughput, back-to-back | %.0f /s | %.0f /s | %.2f | %s |\n", n, ops.med("vtpmd"), ops.med("swtpm"), ops.ratio(), goPath(ops, false))
		for _, row := range []struct {
			name string
			p    perServer
		}{{"median latency, back-to-back", med}, {"p99 latency, back-to-back", p99}, {"median latency, interleaved", imed},
			{"p99 latency, interleaved", ip99}, {"server CPU time per command, back-to-back", cpu}} {
			v, s, q := d(row.p)
			fmt.Fprintf(&b, "| %d | %s | %s | %s | %.2f | %s |\n", n, row.name, v, s, q, goPath(row.p, true))
		}
		r.summarize(fmt.Sprintf("%d instances, aggregate GetRandom throughput (higher is better)", n),
			fmt.Sprintf("%.0f /s", ops.med("vtpmd")), fmt.Sprintf("%.0f /s", ops.med("swtpm")), ops.ratio())
		v, s, q := d(med)
		r.summarize(fmt.Sprintf("%d instances, median latency under load (back-to-back)", n), v, s, q)
		v, s, q = d(p99)
		r.summarize(fmt.Sprintf("%d instances, p99 latency under load (back-to-back)", n), v, s, q)
	}
	fmt.Fprintf(&b, "\nThroughput is bounded by CPU time per command when the instances outnumber the CPUs: the CPU row is the servers' own (user and system, every thread).\n")
	fmt.Fprintf(&b, "\n### RssAnon after sustained load (MiB per instance, mean)\n\n| load | vtpmd at once | swtpm at once | ratio | vtpmd after %s quiet | swtpm after %s quiet | ratio |\n|---|---|---|---|---|---|---|\n%s",
		quietAfterLoad, quietAfterLoad, after.String())
	return b.String(), nil
}

func fleetMemories(fleets map[string]*fleet) (map[string]procMemory, error) {
	out := map[string]procMemory{}
	for name, f := range fleets {
		m, err := f.memory()
		if err != nil {
			return nil, err
		}
		out[name] = m
	}
	return out, nil
}

// mixedLoad is one instance's sustained mixed load: GetRandom, PCR_Extend, durable NV_Write
// 1 KiB and GET_STATEBLOB volatile, for d.
func mixedLoad(in *instance, c net.Conn, d time.Duration) error {
	t := tpmclient.Stream(c)
	write, err := nvWriter(t, nvKiB, 1024)
	if err != nil {
		return err
	}
	ctrl, err := dialCtrl(in.ctrl)
	if err != nil {
		return err
	}
	defer ctrl.Close()
	digest := make([]byte, 32)
	for end := time.Now().Add(d); time.Now().Before(end); {
		for i := 0; i < 20; i++ {
			if _, err := tpmclient.GetRandom(t, 32); err != nil {
				return err
			}
			if err := tpmclient.PCRExtend(t, 16, digest); err != nil {
				return err
			}
		}
		if err := write(); err != nil {
			return err
		}
		if _, _, err := ctrl.GetStateBlob(socket.BlobVolatile, socket.StateFlagDecrypted); err != nil {
			return err
		}
	}
	return nil
}

// mixedLoadMemory is RssAnon of one instance of each server before, right after and a while
// after a sustained mixed load.
func (r *run) mixedLoadMemory(golden string) (string, error) {
	const loadFor = 5 * time.Second
	var b strings.Builder
	fmt.Fprintf(&b, "\n### One instance under a sustained mixed load (%s of GetRandom, PCR_Extend, durable NV_Write 1 KiB, GET_STATEBLOB volatile): RssAnon, MiB\n\n"+
		"| server | idle before | right after | after %s quiet |\n|---|---|---|---|\n", loadFor, quietAfterLoad)
	vals := map[string][3]float64{}
	for _, im := range r.impls {
		dirs, err := r.fleetDirs(golden, im, 1)
		if err != nil {
			return "", err
		}
		f, _, err := startFleet(im, []string{dirs[0]})
		if err != nil {
			return "", err
		}
		var v [3]float64
		pid := f.insts[0].cmd.Process.Pid
		m, err := readMemory(pid)
		v[0] = m.rssAnon / 1024
		if err == nil {
			err = mixedLoad(f.insts[0], f.conns[0], loadFor)
		}
		if err == nil {
			m, err = readMemory(pid)
			v[1] = m.rssAnon / 1024
		}
		if err == nil {
			time.Sleep(quietAfterLoad)
			m, err = readMemory(pid)
			v[2] = m.rssAnon / 1024
		}
		f.stop()
		if err != nil {
			return "", fmt.Errorf("%s mixed load: %w", im.name, err)
		}
		vals[im.name] = v
		fmt.Fprintf(&b, "| %s | %.2f | %.2f | %.2f |\n", im.name, v[0], v[1], v[2])
	}
	v, s := vals["vtpmd"], vals["swtpm"]
	r.summarize("RssAnon of one instance after sustained load, then quiet", fmt.Sprintf("%.2f MiB", v[2]), fmt.Sprintf("%.2f MiB", s[2]), v[2]/s[2])
	return b.String(), nil
}

// startWaiting launches an emulator the way a migration destination waits: no INIT, no
// Startup.
func startWaiting(im impl, dir string) (*instance, error) {
	in := &instance{dir: dir, data: filepath.Join(dir, "d.sock"), ctrl: filepath.Join(dir, "c.sock")}
	os.Remove(in.data)
	os.Remove(in.ctrl)
	args := append(append([]string{}, im.args...), "--tpm2", "--tpmstate", "dir="+filepath.Join(dir, "state"),
		"--server", "type=unixio,path="+in.data, "--ctrl", "type=unixio,path="+in.ctrl)
	in.cmd = exec.Command(im.bin, args...)
	in.cmd.Stderr = os.Stderr
	if err := in.cmd.Start(); err != nil {
		return nil, err
	}
	return in, nil
}

// saveRestoreOnce is one window: a source on a copy of the golden state that has answered a
// command, a destination waiting; timed from the source's first GET_STATEBLOB to the
// destination's first answer.
func (r *run) saveRestoreOnce(im impl, golden string) (time.Duration, error) {
	r.seq++
	src := filepath.Join(r.work, fmt.Sprintf("sr-src-%d", r.seq))
	dst := filepath.Join(r.work, fmt.Sprintf("sr-dst-%d", r.seq))
	defer os.RemoveAll(src)
	defer os.RemoveAll(dst)
	if err := copyState(golden, src); err != nil {
		return 0, err
	}
	if err := os.MkdirAll(filepath.Join(dst, "state"), 0o700); err != nil {
		return 0, err
	}
	sf, _, err := startFleet(im, []string{src})
	if err != nil {
		return 0, err
	}
	defer sf.stop()
	sc, err := dialCtrl(sf.insts[0].ctrl)
	if err != nil {
		return 0, err
	}
	defer sc.Close()
	d, err := startWaiting(im, dst)
	if err != nil {
		return 0, err
	}
	defer d.stop()
	dc, err := dialCtrl(d.ctrl)
	if err != nil {
		return 0, err
	}
	defer dc.Close()
	dd, err := d.dial(10 * time.Second)
	if err != nil {
		return 0, err
	}
	defer dd.Close()

	t0 := time.Now()
	var blobs [2][]byte
	var flags [2]uint32
	for k, typ := range []uint32{socket.BlobPermanent, socket.BlobVolatile} {
		if blobs[k], flags[k], err = sc.GetStateBlob(typ, socket.StateFlagDecrypted); err != nil {
			return 0, fmt.Errorf("source GET_STATEBLOB %d: %w", typ, err)
		}
	}
	if err := dc.Stop(); err != nil {
		return 0, fmt.Errorf("destination STOP: %w", err)
	}
	for k, typ := range []uint32{socket.BlobPermanent, socket.BlobVolatile} {
		if err := dc.SetStateBlob(typ, flags[k], blobs[k]); err != nil {
			return 0, fmt.Errorf("destination SET_STATEBLOB %d: %w", typ, err)
		}
	}
	if err := dc.Init(socket.InitFlagDeleteVolatile); err != nil {
		return 0, fmt.Errorf("destination INIT: %w", err)
	}
	resp, err := tpmclient.RoundTrip(dd, getRandom8)
	if err != nil {
		return 0, fmt.Errorf("destination's first answer: %w", err)
	}
	took := time.Since(t0)
	if rc, err := tpmwire.ResponseCode(resp); err != nil || rc != 0 {
		return 0, fmt.Errorf("destination's first answer: rc %#x %v", rc, err)
	}
	return took, nil
}

// saveRestore is the save + restore row: windows of 5 migrations each, the window's median.
func (r *run) saveRestore(golden string) (string, error) {
	const per = 5
	vals := perServer{}
	for w := 0; w < densityWindows; w++ {
		for _, im := range r.order(w) {
			var ds []time.Duration
			for i := 0; i < per; i++ {
				d, err := r.saveRestoreOnce(im, golden)
				if err != nil {
					return "", fmt.Errorf("%s save + restore: %w", im.name, err)
				}
				ds = append(ds, d)
			}
			vals.add(im.name, float64(summarize(ds).median))
		}
	}
	v, s := time.Duration(vals.med("vtpmd")), time.Duration(vals.med("swtpm"))
	r.summarize("save + restore over the control channel", fmtDur(v), fmtDur(s), vals.ratio())
	return fmt.Sprintf("\n### Save + restore over the control channel (source GET_STATEBLOB permanent + volatile; destination STOP, SET_STATEBLOB both, INIT, first answer; %d per window)\n\n"+
		"| vtpmd | swtpm | ratio |\n|---|---|---|\n| %s | %s | %.2f |\n", per, fmtDur(v), fmtDur(s), vals.ratio()), nil
}

// densityNVWrite is durable NV_Write 1 KiB: windows of 50 back-to-back writes on one instance.
// nvFloor is what the durable NV_Write row is bounded by, measured in the same windows.
type nvFloor struct {
	noFsync, primitive time.Duration // vtpmd with fsync=false; the durable write alone
	size               int           // bytes of the state file the primitive writes
	vtpmd, swtpm       time.Duration
}

func (r *run) densityNVWrite(golden string) (string, nvFloor, error) {
	const per = 50
	vals, p99s := perServer{}, perServer{}
	fleets := map[string]*fleet{}
	defer func() {
		for _, f := range fleets {
			f.stop()
		}
	}()
	// the same vTPM without fsync, and the durable write primitive alone on a file of the
	// vTPM's state size in the same filesystem: the floor of a durable write here
	impls := append(append([]impl{}, r.impls...), impl{name: noFsyncName, bin: r.impls[0].bin, args: r.impls[0].args, stateOpts: ",fsync=false"})
	writers := map[string]func() error{}
	for _, im := range impls {
		dirs, err := r.fleetDirs(golden, im, 1)
		if err != nil {
			return "", nvFloor{}, err
		}
		f, _, err := startFleet(im, dirs)
		if err != nil {
			return "", nvFloor{}, err
		}
		fleets[im.name] = f
		if writers[im.name], err = nvWriter(tpmclient.Stream(f.conns[0]), nvKiB, 1024); err != nil {
			return "", nvFloor{}, err
		}
	}
	permall, err := os.ReadFile(filepath.Join(golden, "tpm2-00.permall"))
	if err != nil {
		return "", nvFloor{}, err
	}
	primDir := filepath.Join(r.work, "durable-primitive")
	if err := os.MkdirAll(primDir, 0o700); err != nil {
		return "", nvFloor{}, err
	}
	writers[primitiveName] = func() error {
		return atomicfile.Write(filepath.Join(primDir, "tpm2-00.permall"), permall, atomicfile.Options{Perm: 0o600})
	}
	impls = append(impls, impl{name: primitiveName})
	for w := 0; w < densityWindows; w++ {
		for _, im := range rotate(impls, w) {
			st, err := measure(per, writers[im.name])
			if err != nil {
				return "", nvFloor{}, fmt.Errorf("%s NV_Write: %w", im.name, err)
			}
			vals.add(im.name, float64(st.median))
			p99s.add(im.name, float64(st.p99))
		}
	}
	v, s := time.Duration(vals.med("vtpmd")), time.Duration(vals.med("swtpm"))
	r.summarize("durable NV_Write 1 KiB (vtpmd fsyncs, swtpm does not)", fmtDur(v), fmtDur(s), vals.ratio())
	floor := nvFloor{noFsync: time.Duration(vals.med(noFsyncName)), primitive: time.Duration(vals.med(primitiveName)), size: len(permall), vtpmd: v, swtpm: s}
	return fmt.Sprintf("\n### Durable NV_Write 1 KiB (%d back-to-back per window; vtpmd acknowledges once on disk, swtpm does not fsync)\n\n"+
		"| measure | vtpmd | swtpm | ratio | vtpmd, fsync=false | fsync=false / swtpm |\n|---|---|---|---|---|---|\n| median | %s | %s | %.2f | %s | %.2f |\n| p99 | %s | %s | %.2f | %s | %.2f |\n",
		per, fmtDur(v), fmtDur(s), vals.ratio(), fmtDur(floor.noFsync), float64(floor.noFsync)/float64(s),
		fmtDur(time.Duration(p99s.med("vtpmd"))), fmtDur(time.Duration(p99s.med("swtpm"))), p99s.ratio(),
		fmtDur(time.Duration(p99s.med(noFsyncName))), p99s.med(noFsyncName)/p99s.med("swtpm")), floor, nil
}

const (
	// idleSettle is how long instances idle before their memory is read.
	idleSettle    = 500 * time.Millisecond
	noFsyncName   = "vtpmd-nofsync"
	primitiveName = "durable-write"
	// floorInstances is how many instances of bench/floor the memory floor is the mean of.
	floorInstances = 10
)

// densityFloors measures, in the same run, what bounds the targets still open: a Go process
// with cgo and libtpms and nothing of vtpmd (bench/floor, its connection on the native data
// thread), idle and at start; and the durable NV write's parts.
func (r *run) densityFloors(golden string, nv nvFloor) (string, error) {
	bin := filepath.Join(r.work, "floor")
	if out, err := exec.Command("go", "build", "-o", bin, "./bench/floor").CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build ./bench/floor: %v: %s", err, out)
	}
	start := func(sock string) (*exec.Cmd, net.Conn, error) {
		os.Remove(sock)
		cmd := exec.Command(bin, "-sock", sock)
		cmd.Stderr = os.Stderr
		if err := cmd.Start(); err != nil {
			return nil, nil, err
		}
		c, err := (&instance{data: sock}).dial(30 * time.Second)
		if err == nil {
			err = roundTrip(c, getRandom8, 20)()
		}
		if err != nil {
			cmd.Process.Kill()
			cmd.Wait()
			return nil, nil, err
		}
		return cmd, c, nil
	}
	stop := func(cmd *exec.Cmd, c net.Conn) {
		c.Close()
		cmd.Process.Kill()
		cmd.Wait()
	}
	var starts []float64
	for i := 0; i < 10; i++ {
		t0 := time.Now()
		cmd, c, err := start(filepath.Join(r.work, "floor-start.sock"))
		if err != nil {
			return "", fmt.Errorf("floor start: %w", err)
		}
		starts = append(starts, float64(time.Since(t0)))
		stop(cmd, c)
	}
	var mem procMemory
	var pids []int
	for i := 0; i < floorInstances; i++ {
		cmd, c, err := start(filepath.Join(r.work, fmt.Sprintf("floor-%d.sock", i)))
		if err != nil {
			return "", fmt.Errorf("floor instance: %w", err)
		}
		defer stop(cmd, c)
		pids = append(pids, cmd.Process.Pid)
	}
	time.Sleep(idleSettle)
	for _, pid := range pids {
		m, err := readMemory(pid)
		if err != nil {
			return "", err
		}
		mem.rssAnon += m.rssAnon / 1024 / floorInstances // readMemory is in KiB
		mem.pss += m.pss / 1024 / floorInstances
	}
	floorStart := time.Duration(medianOf(starts))
	var b strings.Builder
	fmt.Fprintf(&b, "\n### Floors under the targets still open (same run)\n\n"+
		"`floor` is bench/floor: the Go runtime, cgo and libtpms, one TPM manufactured in memory, one unix socket served on the native data thread, and nothing else of vtpmd (no CLI, state files, control channel or manager code).\n\n"+
		"| target still open | floor | floor | swtpm | floor / swtpm | vtpmd | vtpmd / swtpm |\n|---|---|---|---|---|---|---|\n")
	swMem, vMem := r.idleMem["swtpm"], r.idleMem["vtpmd"]
	fmt.Fprintf(&b, "| private memory per idle instance (RssAnon) ≤ 1.5× | %d instances of `floor` | %.2f MiB | %.2f MiB | %.2f | %.2f MiB | %.2f |\n",
		floorInstances, mem.rssAnon, swMem.rssAnon, mem.rssAnon/swMem.rssAnon, vMem.rssAnon, vMem.rssAnon/swMem.rssAnon)
	fmt.Fprintf(&b, "| PSS per idle instance ≤ 1.5× | the same | %.2f MiB | %.2f MiB | %.2f | %.2f MiB | %.2f |\n",
		mem.pss, swMem.pss, mem.pss/swMem.pss, vMem.pss, vMem.pss/swMem.pss)
	swStart, vStart := r.startOne["swtpm"], r.startOne["vtpmd"]
	fmt.Fprintf(&b, "| start to first answer (1 and 100 at once) ≤ 1.0× | `floor` started alone, median of %d | %s | %s | %.2f | %s | %.2f |\n",
		len(starts), fmtDur(floorStart), fmtDur(swStart), float64(floorStart)/float64(swStart), fmtDur(vStart), float64(vStart)/float64(swStart))
	fmt.Fprintf(&b, "| durable NV_Write 1 KiB ≤ 1.5× | vtpmd with `fsync=false` (the same write, not durable) | %s | %s | %.2f | %s | %.2f |\n",
		fmtDur(nv.noFsync), fmtDur(nv.swtpm), float64(nv.noFsync)/float64(nv.swtpm), fmtDur(nv.vtpmd), float64(nv.vtpmd)/float64(nv.swtpm))
	fmt.Fprintf(&b, "| the same | the durable write alone: a %d-byte file (the state's size) written to a temporary file, fsync, rename, directory fsync | %s | %s | %.2f | | |\n",
		nv.size, fmtDur(nv.primitive), fmtDur(nv.swtpm), float64(nv.primitive)/float64(nv.swtpm))
	return b.String(), nil
}

// idle1000 is the instance count of `just bench-1000`.
const idle1000 = 1000

// meminfo reads a /proc/meminfo field in KiB.
func meminfo(field string) (float64, error) {
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == field+":" {
			var kb float64
			_, err := fmt.Sscan(f[1], &kb)
			return kb, err
		}
	}
	return 0, fmt.Errorf("/proc/meminfo: no %s", field)
}

// startIdle starts n instances in batches (each instance answers one GetRandom; its data
// connection is then closed, as an idle VM's TPM has nothing to say) and returns them.
func (r *run) startIdle(golden string, im impl, n int) (*fleet, error) {
	const batch = 50
	dirs, err := r.fleetDirs(golden, im, n)
	if err != nil {
		return nil, err
	}
	all := &fleet{im: im}
	for i := 0; i < n; i += batch {
		f, _, err := startFleet(im, dirs[i:min(n, i+batch)])
		if err != nil {
			all.stop()
			return nil, err
		}
		for _, c := range f.conns {
			c.Close()
		}
		all.insts = append(all.insts, f.insts...)
		all.conns = append(all.conns, make([]net.Conn, len(f.insts))...)
	}
	return all, nil
}

// idle1000Section is `just bench-1000`: 1,000 idle vtpmd instances, then (if the memory vtpmd's
// took is still available twice over) 1,000 swtpm, each server alone; their total memory.
func (r *run) idle1000Section() (string, error) {
	golden, err := r.goldenState()
	if err != nil {
		return "", err
	}
	var b strings.Builder
	fmt.Fprintf(&b, "\n## %d idle instances on this machine\n\nEach instance on its own copy of one golden state, started in batches of 50, answering one GetRandom, then idle 2 s. "+
		"Totals in MiB; \"host memory used\" is the drop of MemAvailable (/proc/meminfo) from before the first start, so it includes the kernel's share (page tables, sockets, task structures).\n\n"+
		"| server | started in | RssAnon total | PSS total | VmRSS total | host memory used | per instance (host) |\n|---|---|---|---|---|---|---|\n", idle1000)
	var needed float64
	for _, im := range r.impls {
		avail0, err := meminfo("MemAvailable")
		if err != nil {
			return "", err
		}
		if im.name == "swtpm" && avail0 < 2*needed {
			fmt.Fprintf(&b, "| swtpm | not run: %.0f MiB available, vtpmd's instances took %.0f MiB |\n", avail0/1024, needed/1024)
			continue
		}
		t0 := time.Now()
		f, err := r.startIdle(golden, im, idle1000)
		if err != nil {
			return "", err
		}
		took := time.Since(t0)
		time.Sleep(2 * time.Second)
		var sum procMemory
		for _, in := range f.insts {
			m, err := readMemory(in.cmd.Process.Pid)
			if err != nil {
				f.stop()
				return "", err
			}
			sum.rssAnon += m.rssAnon
			sum.pss += m.pss
			sum.vmRSS += m.vmRSS
		}
		avail1, err := meminfo("MemAvailable")
		f.stop()
		if err != nil {
			return "", err
		}
		used := avail0 - avail1
		if im.name == "vtpmd" {
			needed = used
		}
		fmt.Fprintf(&b, "| %s | %s | %.0f | %.0f | %.0f | %.0f | %.2f |\n", im.name, fmtDur(took), sum.rssAnon/1024, sum.pss/1024, sum.vmRSS/1024, used/1024, used/1024/idle1000)
	}
	return b.String(), nil
}

// singleLatency is one instance of each server, GetRandom(32) and PCR_Extend through go-tpm,
// both ways: back-to-back (a block of calls to one server, as during measured boot) and
// interleaved (the servers take turns call by call: an idle TPM woken per command).
func (r *run) singleLatency(golden string) (string, error) {
	const per = 200
	fleets := map[string]*fleet{}
	defer func() {
		for _, f := range fleets {
			f.stop()
		}
	}()
	for _, im := range r.impls {
		dirs, err := r.fleetDirs(golden, im, 1)
		if err != nil {
			return "", err
		}
		f, _, err := startFleet(im, dirs)
		if err != nil {
			return "", err
		}
		fleets[im.name] = f
	}
	digest := make([]byte, 32)
	ops := []struct {
		name string
		call func(t transport.TPM) func() error
	}{
		{"GetRandom(32)", func(t transport.TPM) func() error {
			return func() error { _, err := tpmclient.GetRandom(t, 32); return err }
		}},
		{"PCR_Extend", func(t transport.TPM) func() error {
			return func() error { return tpmclient.PCRExtend(t, 16, digest) }
		}},
	}
	var b strings.Builder
	fmt.Fprintf(&b, "\n### One instance: latency both ways (go-tpm client; %d windows of %d calls per server and way)\n\n"+
		"| operation | way | vtpmd median | swtpm median | ratio | vtpmd p99 | swtpm p99 | vtpmd ops/s | swtpm ops/s |\n|---|---|---|---|---|---|---|---|---|\n", densityWindows, per)
	for _, op := range ops {
		fs := map[string]timed{}
		for name, f := range fleets {
			fs[name] = clock(op.call(tpmclient.Stream(f.conns[0])))
		}
		med, p99, mean := map[string]perServer{}, map[string]perServer{}, map[string]perServer{}
		for _, way := range []string{"back-to-back", "interleaved"} {
			med[way], p99[way], mean[way] = perServer{}, perServer{}, perServer{}
		}
		for w := 0; w < densityWindows; w++ {
			b2b := map[string][]time.Duration{}
			for _, im := range r.order(w) {
				ds, err := timeBlocks(1, per, map[string]timed{im.name: fs[im.name]})
				if err != nil {
					return "", fmt.Errorf("%s %s: %w", im.name, op.name, err)
				}
				b2b[im.name] = ds[im.name]
			}
			inter, err := timeBlocks(per, 1, fs)
			if err != nil {
				return "", fmt.Errorf("%s interleaved: %w", op.name, err)
			}
			for way, ds := range map[string]map[string][]time.Duration{"back-to-back": b2b, "interleaved": inter} {
				for name, d := range ds {
					st := summarize(d)
					med[way].add(name, float64(st.median))
					p99[way].add(name, float64(st.p99))
					mean[way].add(name, float64(st.mean))
				}
			}
		}
		for _, way := range []string{"back-to-back", "interleaved"} {
			m, p, a := med[way], p99[way], mean[way]
			fmt.Fprintf(&b, "| %s | %s | %s | %s | %.2f | %s | %s | %.0f | %.0f |\n", op.name, way,
				fmtDur(time.Duration(m.med("vtpmd"))), fmtDur(time.Duration(m.med("swtpm"))), m.ratio(),
				fmtDur(time.Duration(p.med("vtpmd"))), fmtDur(time.Duration(p.med("swtpm"))),
				opsPerSec(time.Duration(a.med("vtpmd"))), opsPerSec(time.Duration(a.med("swtpm"))))
		}
		r.summarize(op.name+", one instance, back-to-back median", fmtDur(time.Duration(med["back-to-back"].med("vtpmd"))),
			fmtDur(time.Duration(med["back-to-back"].med("swtpm"))), med["back-to-back"].ratio())
	}
	return b.String(), nil
}
