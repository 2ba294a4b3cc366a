//go:build integration

package integration

// The migration tests' hosts: the libvirt environment of libvirt_env_test.go (host A, and host B
// in its own mount namespace) with a vtpmd manager on each host, each on its own stand-in
// hardware TPM (Debian's swtpm), and a third host C that is only a manager (and the vTPMs a test
// starts against it by hand). Host B's manager runs inside B's mount namespace, where a private
// directory is bound over /run/vtpmd: the vTPMs B's libvirtd starts find their manager at the
// default socket, as on a real second host, and the manager sees B's /var/lib/libvirt.
//
// Also here: a recording TCP proxy for QEMU's migration stream and the parser that takes the
// vTPM's state blobs out of it (the "tpm-emulator" section).

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/binary"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/internal/swtpmtest"
	"github.com/vtpmd/vtpmd/internal/syncbuf"
	"github.com/vtpmd/vtpmd/manager"
)

// lvHosts is the libvirt environment with a manager per host.
type lvHosts struct {
	*lvEnv
	mgr map[string]*lvMgr // "A", "B", "C"
}

// lvMgr is one host's `vtpmd manager`.
type lvMgr struct {
	t      *testing.T
	host   string
	hw     *swtpmtest.TPM
	dir    string   // records
	sock   string   // the API socket as this test process reaches it
	listen string   // the API socket as the manager (and its host's vTPMs) name it
	nsPID  int      // enter this process's mount namespace (host B), 0: none
	tls    string   // the manager-to-manager TLS listener (--migration-listen)
	extra  []string // more flags, from the test
	env    []string // more environment (VTPMD_MIGRATION_PAUSE)
	cmd    *exec.Cmd
	exited chan struct{}
	out    *syncbuf.Buffer
	bin    string
}

// lvMgrExtra gives each host's manager more flags; set by the tests before lvSetupHosts.
type lvMgrExtra func(host string, m *lvMgr) []string

// lvSetupHosts prepares the libvirt environment and starts a manager on hosts A, B and C.
// withManagers false starts none (the plain path), and the managers can be started later
// with startManagers.
func lvSetupHosts(t *testing.T, withManagers bool, extra lvMgrExtra) *lvHosts {
	t.Helper()
	needRefSwtpm(t)
	need(t, "nsenter", "mount")
	if manager.Available(manager.DefaultSocket) {
		t.Fatalf("%s exists: another manager runs on this host; refusing to replace it", manager.DefaultSocket)
	}
	e := lvSetup(t)
	h := &lvHosts{lvEnv: e, mgr: map[string]*lvMgr{}}
	run := filepath.Dir(manager.DefaultSocket) // /run/vtpmd
	hadRun := lvExists(run)
	if err := os.MkdirAll(run, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		os.Remove(manager.DefaultSocket)
		if !hadRun {
			os.Remove(run)
		}
	})
	// host B: its own /run/vtpmd, bound in B's mount namespace only
	bRun := filepath.Join(e.w, "B", "vtpmdrun")
	if err := os.MkdirAll(bRun, 0o755); err != nil {
		t.Fatal(err)
	}
	os.Chmod(bRun, 0o755)
	pidB := lvPidFile(filepath.Join(e.hostB, "libvirtd.pid"))
	if pidB == 0 || !lvProcAlive(pidB) {
		t.Fatal("no libvirtd B to take the mount namespace from")
	}
	if out, err := lvRun(context.Background(), "nsenter", "-t", strconv.Itoa(pidB), "-m", "--", "mount", "--bind", bRun, run); err != nil {
		t.Fatalf("bind %s over %s in B's mount namespace: %v\n%s", bRun, run, err, out)
	}
	cDir := filepath.Join(e.w, "C")
	os.MkdirAll(cDir, 0o755)
	h.mgr["A"] = &lvMgr{host: "A", sock: manager.DefaultSocket, listen: manager.DefaultSocket, tls: "127.0.0.1:29410"}
	h.mgr["B"] = &lvMgr{host: "B", sock: filepath.Join(bRun, "manager.sock"), listen: manager.DefaultSocket, nsPID: pidB, tls: "127.0.0.1:29411"}
	h.mgr["C"] = &lvMgr{host: "C", sock: filepath.Join(cDir, "manager.sock"), tls: "127.0.0.1:29412"}
	h.mgr["C"].listen = h.mgr["C"].sock
	for _, name := range []string{"A", "B", "C"} {
		m := h.mgr[name]
		m.t, m.bin, m.out = t, e.vtpmd, &syncbuf.Buffer{}
		m.hw = swtpmtest.Start(t)
		m.dir = filepath.Join(e.w, name, "manager")
		if extra != nil {
			m.extra = extra(name, m)
		}
		t.Cleanup(func() {
			m.stop()
			if t.Failed() {
				t.Logf("manager %s output:\n%s", name, tail(m.out.String(), 6000))
			}
		})
	}
	if withManagers {
		h.startManagers()
	}
	return h
}

// startManagers starts the three managers; A and B trust each other's host CA (each has the
// other's root in its trusted-cas.pem), C trusts both and is trusted by neither.
func (h *lvHosts) startManagers() {
	for _, name := range []string{"A", "B", "C"} {
		h.mgr[name].start()
	}
	h.trust("A", "B")
	h.trust("B", "A")
	h.trust("C", "A", "B")
}

// trust writes the host CA roots of the managers of hosts into the trusted-cas.pem of the
// manager of host (which re-reads it at each use), replacing what it held.
func (h *lvHosts) trust(host string, hosts ...string) {
	t := h.t
	t.Helper()
	var pemData []byte
	for _, o := range hosts {
		pemData = append(pemData, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: h.mgr[o].caRoot()})...)
	}
	if err := os.WriteFile(filepath.Join(h.mgr[host].dir, manager.TrustedCAsName), pemData, 0o600); err != nil {
		t.Fatal(err)
	}
}

// caRoot is the manager's host CA root certificate (DER), from its identity.json.
func (m *lvMgr) caRoot() []byte {
	m.t.Helper()
	raw, err := os.ReadFile(filepath.Join(m.dir, "identity.json"))
	if err != nil {
		m.t.Fatalf("manager %s has no identity: %v", m.host, err)
	}
	var id struct {
		CARoot []byte `json:"ca_root"`
	}
	if err := json.Unmarshal(raw, &id); err != nil || len(id.CARoot) == 0 {
		m.t.Fatalf("manager %s: identity.json: %v (no ca_root)", m.host, err)
	}
	if _, err := x509.ParseCertificate(id.CARoot); err != nil {
		m.t.Fatalf("manager %s: ca_root: %v", m.host, err)
	}
	return id.CARoot
}

// args is the manager's command line after the executable.
func (m *lvMgr) args() []string {
	reg := filepath.Join(filepath.Dir(m.dir), "registry")
	group := "tss"
	if m.host == "C" {
		group = "" // vTPMs on C are this test's, running as root
	}
	return append([]string{"manager", "--tpm", m.hw.Spec(), "--dir", m.dir, "--listen", m.listen, "--group", group,
		"--registry", reg, "--auto-enroll", "--log", "fd=2", "--migration-listen", m.tls}, m.extra...)
}

// start runs the manager (in its host's mount namespace) and waits for its socket.
func (m *lvMgr) start() {
	t := m.t
	t.Helper()
	if m.running() {
		t.Fatalf("manager %s is running already", m.host)
	}
	os.MkdirAll(m.dir, 0o700)
	argv := append([]string{m.bin}, m.args()...)
	if m.nsPID != 0 {
		argv = append([]string{"nsenter", "-t", strconv.Itoa(m.nsPID), "-m", "--"}, argv...)
	}
	fmt.Fprintf(m.out, "=== %s start: %s\n", time.Now().UTC().Format(time.RFC3339Nano), strings.Join(argv, " "))
	m.cmd = exec.Command(argv[0], argv[1:]...)
	m.cmd.Env = append(os.Environ(), m.env...)
	var w io.Writer = m.out
	logf, err := os.OpenFile(filepath.Join(filepath.Dir(m.dir), "manager.log"), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
	if err == nil {
		w = io.MultiWriter(m.out, logf) // also in the work dir, kept when a test fails
	}
	m.cmd.Stdout, m.cmd.Stderr = w, w
	if err := m.cmd.Start(); err != nil {
		t.Fatalf("manager %s: %v", m.host, err)
	}
	m.exited = make(chan struct{})
	cmd, exited := m.cmd, m.exited
	go func() {
		cmd.Wait()
		if logf != nil {
			logf.Close()
		}
		close(exited)
	}()
	if !lvWait(20*time.Second, func() bool { return manager.Available(m.sock) || !m.running() }) || !m.running() {
		t.Fatalf("manager %s did not listen on %s:\n%s", m.host, m.sock, tail(m.out.String(), 3000))
	}
}

func (m *lvMgr) running() bool {
	if m.cmd == nil {
		return false
	}
	select {
	case <-m.exited:
		return false
	default:
		return true
	}
}

// stop ends the manager with SIGTERM and waits (SIGKILL after 20 s).
func (m *lvMgr) stop() {
	if !m.running() {
		return
	}
	m.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-m.exited:
	case <-time.After(20 * time.Second):
		m.t.Errorf("manager %s did not stop on SIGTERM within 20s; killing it", m.host)
		m.kill()
	}
}

// kill ends the manager with SIGKILL, as a crash, and waits.
func (m *lvMgr) kill() {
	if !m.running() {
		return
	}
	m.cmd.Process.Kill()
	<-m.exited
	fmt.Fprintf(m.out, "=== %s killed\n", time.Now().UTC().Format(time.RFC3339Nano))
}

// ctl runs `vtpmd args...` against this manager's socket (args[0] a subcommand taking --socket).
func (m *lvMgr) ctl(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	return lvRun(ctx, m.bin, args...)
}

// status is `vtpmd manager status` of this manager.
func (m *lvMgr) status() []lvManagerVM {
	m.t.Helper()
	out, err := m.ctl("manager", "status", "--socket", m.sock)
	if err != nil {
		m.t.Fatalf("vtpmd manager status (%s): %v\n%s", m.host, err, out)
	}
	var st struct {
		VMs []lvManagerVM `json:"vms"`
	}
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		m.t.Fatalf("vtpmd manager status (%s): %v\n%s", m.host, err, out)
	}
	return st.VMs
}

// record waits for the manager's record of the domain's vTPM (by UUID, or by its state path,
// which holds the UUID: the manager names an external backend's vTPM by its path) and returns
// it.
func (m *lvMgr) record(d *lvDomain, d2 time.Duration) *lvManagerVM {
	m.t.Helper()
	var vm *lvManagerVM
	lvWait(d2, func() bool {
		vm = nil
		for _, v := range m.status() {
			if v.UUID == d.UUID || strings.Contains(v.StatePath, d.UUID) {
				v := v
				vm = &v
			}
		}
		return vm != nil
	})
	return vm
}

// streamRecorder is a TCP proxy on from that forwards to to and keeps what the client sent
// (QEMU's migration stream, source to destination). In mode recHold it holds the stream back
// at the start of the vTPM's section until release (the source has exported its blobs, the
// destination has not seen them); in mode recCut it forwards nothing from there on and closes
// the destination's connection once the section is complete (a migration that fails after
// the export).
type streamRecorder struct {
	ln   net.Listener
	to   string
	mode int
	mu   sync.Mutex
	cond *sync.Cond
	sent []byte
	// holdAt is where the vTPM's section starts in sent (-1: not seen yet); sec is the
	// section once complete, held closed then.
	holdAt   int
	sec      *qemuTPMSection
	held     chan struct{}
	released bool
	wg       sync.WaitGroup
	errs     []error
}

const (
	recPass = iota
	recHold
	recCut
)

func startRecorder(t *testing.T, from, to string, mode int) *streamRecorder {
	t.Helper()
	ln, err := net.Listen("tcp", from)
	if err != nil {
		t.Fatalf("recorder: %v", err)
	}
	r := &streamRecorder{ln: ln, to: to, mode: mode, holdAt: -1, held: make(chan struct{})}
	r.cond = sync.NewCond(&r.mu)
	r.wg.Add(1)
	go r.serve()
	t.Cleanup(r.close)
	return r
}

func (r *streamRecorder) serve() {
	defer r.wg.Done()
	for {
		c, err := r.ln.Accept()
		if err != nil {
			return
		}
		r.wg.Add(1)
		go func() {
			defer r.wg.Done()
			r.proxy(c)
		}()
	}
}

var tpmSectionID = append([]byte{byte(len("tpm-emulator"))}, "tpm-emulator"...)

// proxy serves one connection: a reader records what the source sends, a forwarder passes on
// what it may.
func (r *streamRecorder) proxy(c net.Conn) {
	defer c.Close()
	up, err := net.DialTimeout("tcp", r.to, 10*time.Second)
	if err != nil {
		r.mu.Lock()
		r.errs = append(r.errs, err)
		r.mu.Unlock()
		return
	}
	defer up.Close()
	back := make(chan struct{})
	go func() { io.Copy(c, up); c.(*net.TCPConn).CloseWrite(); close(back) }()
	r.mu.Lock()
	base := len(r.sent) // a second connection (none expected) is recorded after the first
	r.mu.Unlock()
	srcDone := false
	go func() {
		buf := make([]byte, 256<<10)
		for {
			n, err := c.Read(buf)
			r.mu.Lock()
			if n > 0 {
				from := max(base, len(r.sent)-64)
				r.sent = append(r.sent, buf[:n]...)
				r.scan(from)
			}
			if err != nil {
				srcDone = true
			}
			r.cond.Broadcast()
			r.mu.Unlock()
			if err != nil {
				return
			}
		}
	}()
	fwd := base
	r.mu.Lock()
	defer r.mu.Unlock()
	for {
		limit := len(r.sent)
		if r.holdAt >= 0 && !r.released {
			limit = r.holdAt
			if r.mode == recCut && r.sec != nil {
				up.Close() // the destination gets a stream cut short
				return
			}
		}
		if fwd < limit {
			chunk := r.sent[fwd:limit]
			r.mu.Unlock()
			_, err := up.Write(chunk)
			r.mu.Lock()
			if err != nil {
				return
			}
			fwd = limit
			continue
		}
		if srcDone {
			up.(*net.TCPConn).CloseWrite()
			r.mu.Unlock()
			select { // the destination's return path, until it closes
			case <-back:
			case <-time.After(30 * time.Second):
			}
			r.mu.Lock()
			return
		}
		r.cond.Wait()
	}
}

// scan looks for the vTPM's section from offset from on (r.mu held).
func (r *streamRecorder) scan(from int) {
	if r.mode == recPass {
		return
	}
	if r.holdAt < 0 {
		for i := from; ; i++ {
			j := bytes.Index(r.sent[i:], tpmSectionID)
			if j < 0 {
				return
			}
			i += j
			if i >= 5 && r.sent[i-5] == 4 {
				r.holdAt = i - 5
				break
			}
		}
	}
	if r.sec == nil {
		if sec, err := tpmSection(r.sent[r.holdAt:]); err == nil && sec.Offset == 0 {
			sec.Offset = r.holdAt
			r.sec = sec
			close(r.held)
		}
	}
}

// release lets a held stream go on.
func (r *streamRecorder) release() {
	r.mu.Lock()
	r.released = true
	r.cond.Broadcast()
	r.mu.Unlock()
}

// heldSection waits until the section is held (or cut) and returns it.
func (r *streamRecorder) heldSection(d time.Duration) *qemuTPMSection {
	select {
	case <-r.held:
		r.mu.Lock()
		defer r.mu.Unlock()
		return r.sec
	case <-time.After(d):
		return nil
	}
}

func (r *streamRecorder) close() {
	r.ln.Close()
	r.release()
	r.wg.Wait()
}

// stream is everything the source sent so far.
func (r *streamRecorder) stream() []byte {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]byte(nil), r.sent...)
}

// qemuTPMBlob is one state blob as QEMU's "tpm-emulator" vmstate carries it.
type qemuTPMBlob struct {
	Flags uint32
	Data  []byte
}

// qemuTPMSection is the vTPM's state in a migration stream: permanent, volatile and savestate
// blobs, in that order, each a big-endian u32 flags, u32 size and the bytes (QEMU's vmstate
// "tpm-emulator", version 0), and where the section starts in the stream.
type qemuTPMSection struct {
	Blobs  [3]qemuTPMBlob
	Offset int
}

var errNoTPMSection = errors.New("no tpm-emulator section in the migration stream")

// tpmSection finds the last complete "tpm-emulator" device section in a QEMU migration
// stream: QEMU_VM_SECTION_FULL (4), section id (u32), idstr length (u8) and idstr, instance id
// (u32), version id (u32), the fields, then QEMU_VM_SECTION_FOOTER (0x7e) and the section id.
func tpmSection(stream []byte) (*qemuTPMSection, error) {
	id := append([]byte{byte(len("tpm-emulator"))}, "tpm-emulator"...)
	for end := len(stream); end > 0; {
		i := bytes.LastIndex(stream[:end], id)
		if i < 0 {
			return nil, errNoTPMSection
		}
		end = i
		if i < 5 || stream[i-5] != 4 {
			continue
		}
		secID := stream[i-4 : i]
		p := i + len(id) + 8 // instance id, version id
		var s qemuTPMSection
		s.Offset = i - 5
		ok := true
		for k := range s.Blobs {
			if p+8 > len(stream) {
				ok = false
				break
			}
			flags, size := binary.BigEndian.Uint32(stream[p:]), binary.BigEndian.Uint32(stream[p+4:])
			p += 8
			if uint64(p)+uint64(size) > uint64(len(stream)) {
				ok = false
				break
			}
			s.Blobs[k] = qemuTPMBlob{Flags: flags, Data: append([]byte(nil), stream[p:p+int(size)]...)}
			p += int(size)
		}
		if !ok || p+5 > len(stream) || stream[p] != 0x7e || !bytes.Equal(stream[p+1:p+5], secID) {
			continue
		}
		return &s, nil
	}
	return nil, errNoTPMSection
}

// migrateRecorded live-migrates d from A to B through a recording proxy: B's QEMU listens on
// 127.0.0.1:port, the source connects to 127.0.0.2:port, where the proxy forwards and keeps the
// stream. It returns the vTPM's section of the stream and the error of virsh migrate (the
// caller decides whether the migration had to succeed).
func (h *lvHosts) migrateRecorded(d *lvDomain, port int) (*qemuTPMSection, string, error) {
	t := h.t
	t.Helper()
	rec := startRecorder(t, fmt.Sprintf("127.0.0.2:%d", port), fmt.Sprintf("127.0.0.1:%d", port), recPass)
	start := time.Now()
	out, err := h.virshErr("A", "migrate", "--live", d.Name, lvURIB, "--listen-address", "127.0.0.1",
		"--migrateuri", fmt.Sprintf("tcp://127.0.0.2:%d", port))
	t.Logf("virsh migrate --live %s (through the recorder) took %v: %v %s", d.Name, time.Since(start).Round(time.Millisecond), err, strings.TrimSpace(out))
	rec.close()
	stream := rec.stream()
	sec, serr := tpmSection(stream)
	if serr != nil {
		if err == nil {
			t.Fatalf("%v (%d bytes recorded; recorder errors %v)", serr, len(stream), rec.errs)
		}
		return nil, out, err
	}
	t.Logf("recorded %d bytes of migration stream; tpm-emulator section at %d: permanent %d B (flags %#x), volatile %d B (flags %#x), savestate %d B",
		len(stream), sec.Offset, len(sec.Blobs[0].Data), sec.Blobs[0].Flags, len(sec.Blobs[1].Data), sec.Blobs[1].Flags, len(sec.Blobs[2].Data))
	return sec, out, err
}

// writeSmallXML writes the domain's XML with 192 MiB of memory instead of 512 (the tiny guest
// needs little; a smaller RAM migrates faster) and returns its path.
func (d *lvDomain) writeSmallXML() string {
	x := strings.Replace(d.xml(), "<memory unit='MiB'>512</memory>", "<memory unit='MiB'>192</memory>", 1)
	if !strings.Contains(x, "<memory unit='MiB'>192</memory>") {
		d.e.t.Fatal("the domain XML's memory element changed; update writeSmallXML")
	}
	p := filepath.Join(d.e.w, d.Name+".xml")
	if err := os.WriteFile(p, []byte(x), 0o644); err != nil {
		d.e.t.Fatal(err)
	}
	return p
}
