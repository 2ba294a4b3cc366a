//go:build integration

package integration

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"

	"github.com/vtpmd/vtpmd/internal/swtpmtest"
	"github.com/vtpmd/vtpmd/internal/tpmclient"
	"github.com/vtpmd/vtpmd/manager"
	"github.com/vtpmd/vtpmd/manager/eventlog"
	"github.com/vtpmd/vtpmd/manager/registry"
)

// projectedVM is a vTPM state whose VM's registry record asks for a projection, and the
// manager (on a measured host) that projects into it.
type projectedVM struct {
	host  *hostTPM
	m     *hostManager
	reg   string
	state string
	uuid  string
}

// newProjectedVM starts a manager on host (its event log, and extra flags) with a registry
// holding one VM whose state is a fresh directory and whose policy is mode (pcr -1: none).
func newProjectedVM(t *testing.T, host *hostTPM, mode string, pcr int, extra ...string) *projectedVM {
	t.Helper()
	dir := t.TempDir()
	v := &projectedVM{host: host, reg: filepath.Join(dir, "registry"), state: filepath.Join(dir, "state"),
		uuid: "6a1e5c2d-0000-4000-8000-" + fmt.Sprintf("%012x", time.Now().UnixNano()&0xffffffffffff)}
	if err := os.MkdirAll(v.state, 0o700); err != nil {
		t.Fatal(err)
	}
	proj := &registry.Projection{Mode: mode}
	if pcr >= 0 {
		proj.PCR = &pcr
	}
	if _, err := registry.New(v.reg).Update(context.Background(), v.uuid, func(r *registry.Record) error {
		r.Name, r.Backend, r.StateDir = "proj-"+mode, "emulator", v.state
		r.Policy = &registry.Policy{Projection: proj}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	sockDir := swtpmtest.ShortDir(t)
	args := append([]string{"--tpm", host.Spec, "--eventlog", host.EventLog, "--log", "fd=2,level=20"}, extra...)
	v.m = newHostManager(t, env.bin, filepath.Join(sockDir, "manager.sock"), "", v.reg, args...)
	return v
}

// ekName is the name of the host TPM's ECC P-256 EK (the TCG template; the stand-in has no EK
// certificate, so it is the EK the manager's identity uses), read before the manager runs.
func ekName(t *testing.T, h *hostTPM) []byte {
	t.Helper()
	c, err := net.Dial("unix", h.Socket)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	tp := tpmclient.Stream(c)
	k, err := tpmclient.CreatePrimary(tp, tpm2.TPMRHEndorsement, tpm2.ECCEKTemplate)
	if err != nil {
		t.Fatal(err)
	}
	tpmclient.Flush(tp, k.Handle)
	return k.Name.Buffer
}

// summaryValue is PCR pcr after summary projection, by docs/projection.md's formula:
// SHA-256(0^32 ‖ SHA-256("vtpmd summary v1\0" ‖ (i ‖ PCR_i) for i in 0..7 ‖ len16(EK name) ‖ EK name)).
func summaryValue(pcrs [][]byte, ek []byte) string {
	p := []byte("vtpmd summary v1\x00")
	for i := range 8 {
		p = append(p, byte(i))
		p = append(p, pcrs[i]...)
	}
	p = binary.BigEndian.AppendUint16(p, uint16(len(ek)))
	p = append(p, ek...)
	d := sha256.Sum256(p)
	v := sha256.Sum256(append(make([]byte, 32), d[:]...))
	return strings.ToUpper(hex.EncodeToString(v[:]))
}

// checkGuestLog parses the guest-visible log the guest read and replays it (SHA-256); it
// returns the replayed PCRs.
func checkGuestLog(t *testing.T, out string) [][]byte {
	t.Helper()
	raw, ok := guestBlob(out, "projlog")
	if !ok {
		t.Fatalf("the guest printed no projection log: %v", guestValues(out)["proj_error"])
	}
	if v := guestValues(out)["proj_eventlog"]; v != "ok" {
		t.Fatalf("stock tpm2_eventlog in the guest does not parse the projection log: %s", v)
	}
	l, err := eventlog.Parse(raw)
	if err != nil {
		t.Fatalf("the guest-visible log: %v", err)
	}
	pcrs, err := l.Replay(eventlog.AlgSHA256)
	if err != nil {
		t.Fatal(err)
	}
	return pcrs
}

var reExtendOK = regexp.MustCompile(`GUEST: extend_ok=`)

// TestProjectionSummaryQEMU (issue 13 acceptance 1, without libvirt): a QEMU guest on a vTPM
// with summary projection into PCR 23 reads the documented value (the measured host's PCRs
// 0-7 and its EK's name), its PCR_Extend of PCR 23 gets TPM_RC_LOCALITY, its log read with
// tpm2_nvread -C o replays to the value; after a reset (a reboot: INIT, Startup(CLEAR)) the
// same value is there again, and PCR 16 (not projected) starts over.
func TestProjectionSummaryQEMU(t *testing.T) {
	h := measuredHost(t, hostA)
	ek := ekName(t, h)
	want := summaryValue(h.SHA256, ek)
	v := newProjectedVM(t, h, "summary", 23)
	e := startEmulator(t, env.bin, v.state, "--tpm2", "--manager", v.m.sock)
	q := startQEMU(t, vm{firmware: "seabios", machine: "q35", model: "tpm-crb", ctrl: e.ctrl, cmdline: "projpcr=23 projlog hang"})
	out := q.waitSerial(t, reExtendOK, 1, 3*time.Minute)
	for boot := 1; boot <= 2; boot++ {
		part := out[strings.LastIndex(out, "GUEST: booted"):]
		g := guestValues(part)
		if g["proj_pcr"] != want {
			t.Fatalf("boot %d: the guest reads PCR 23 = %s, want %s (guest: %v)\nvTPM log:\n%s", boot, g["proj_pcr"], want, g, tail(readFile(t, e.log), 2000))
		}
		if g["proj_extend"] != "locality" {
			t.Fatalf("boot %d: the guest's extend of PCR 23: %q, want TPM_RC_LOCALITY", boot, g["proj_extend"])
		}
		if g["extend_ok"] != "true" {
			t.Fatalf("boot %d: PCR 16 (not projected) did not extend: %v", boot, g)
		}
		replayed := checkGuestLog(t, part)
		if got := strings.ToUpper(hex.EncodeToString(replayed[23])); got != want {
			t.Fatalf("boot %d: the guest-visible log replays PCR 23 to %s, want %s", boot, got, want)
		}
		t.Logf("boot %d: PCR 23 = %s (summary), extend refused, log of %s bytes replays to it", boot, want[:16], g["proj_log_bytes"])
		if boot == 1 {
			q.hmp(t, "system_reset")
			out = q.waitSerial(t, reExtendOK, 2, 3*time.Minute)
		}
	}
}

// TestProjectionMirror (acceptance 2): a direct-kernel-boot guest (-kernel) with mirror: its
// PCRs 0-7 equal the host TPM's, its extend of PCR 0 gets TPM_RC_LOCALITY, and the log it reads
// from the NV indices with tpm2_nvread replays to them. Under qboot (no TPM support in the
// firmware: the guest's kernel starts the TPM) the guest reads the log with owner auth. Under
// SeaBIOS, which measures, SeaBIOS's first extend is refused and it disables the owner and
// endorsement hierarchies (its tpm_set_failure) [observed]: the PCRs are still the host's,
// and the guest reads the log with the index's own auth.
func TestProjectionMirror(t *testing.T) {
	for _, c := range []struct{ firmware, auth string }{{"qboot", "owner"}, {"seabios", "index"}} {
		t.Run(c.firmware, func(t *testing.T) {
			// a host of its own: a manager's records belong to one hardware TPM (a second
			// manager directory on the same TPM finds its migration counter taken)
			h := measuredHost(t, hostA)
			v := newProjectedVM(t, h, "mirror", -1)
			e := startEmulator(t, env.bin, v.state, "--tpm2", "--manager", v.m.sock)
			q := startQEMU(t, vm{firmware: c.firmware, machine: "q35", model: "tpm-crb", ctrl: e.ctrl, cmdline: "projpcr=0 projlog", noReboot: true})
			out := q.waitSerial(t, reExtendOK, 1, 3*time.Minute)
			g := guestValues(out)
			replayed := checkGuestLog(t, out)
			for i := range 8 {
				if got := g[fmt.Sprintf("pcr%d", i)]; got != h.PCRHex(i) {
					t.Errorf("PCR %d: guest %s, host %s", i, got, h.PCRHex(i))
				}
				if !bytes.Equal(replayed[i], h.SHA256[i]) {
					t.Errorf("PCR %d: the guest-visible log replays to %x, host %x", i, replayed[i], h.SHA256[i])
				}
			}
			if g["proj_extend"] != "locality" {
				t.Errorf("the guest's extend of PCR 0: %q, want TPM_RC_LOCALITY", g["proj_extend"])
			}
			if g["proj_log_auth"] != c.auth {
				t.Errorf("the guest read the log with %s auth, want %s", g["proj_log_auth"], c.auth)
			}
			if t.Failed() {
				t.Logf("guest: %v\nvTPM log:\n%s", g, tail(readFile(t, e.log), 3000))
			}
		})
	}
}

// propertyPolicy is the operator's policy for hosts a and b: every measurement of their PCRs
// 0-7 is approved, the firmware volumes of both firmware builds under one property.
func propertyPolicy(t *testing.T, hosts ...*hostTPM) string {
	t.Helper()
	type rule struct {
		Property string   `json:"property"`
		PCR      int      `json:"pcr"`
		Type     string   `json:"type"`
		Digests  []string `json:"digests"`
	}
	rules := map[string]*rule{}
	var order []string
	for _, h := range hosts {
		for _, e := range h.Log.Events {
			if e.Type == eventlog.EvNoAction || e.PCR > 7 {
				continue
			}
			name := fmt.Sprintf("pcr%d %s: approved", e.PCR, eventlog.TypeName(e.Type))
			if e.PCR == 0 && e.Type == 0x80000008 {
				name = "firmware: an approved OVMF build"
			}
			r := rules[name]
			if r == nil {
				r = &rule{Property: name, PCR: int(e.PCR), Type: eventlog.TypeName(e.Type)}
				rules[name] = r
				order = append(order, name)
			}
			d := hex.EncodeToString(e.Digest(eventlog.AlgSHA256))
			if !slices.Contains(r.Digests, d) {
				r.Digests = append(r.Digests, d)
			}
		}
	}
	var pol struct {
		Rules []*rule `json:"rules"`
	}
	for _, n := range order {
		pol.Rules = append(pol.Rules, rules[n])
	}
	b, err := json.MarshalIndent(pol, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(t.TempDir(), "properties.json")
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// propertyPCR starts the VM's vTPM, starts its TPM up as a guest would (CMD_INIT, then
// TPM2_Startup(CLEAR) on the data channel), and reads the projected PCR.
func propertyPCR(t *testing.T, v *projectedVM, pcr uint) []byte {
	t.Helper()
	e := startEmulator(t, env.bin, v.state, "--tpm2", "--manager", v.m.sock)
	c := ctrlClient(t, e.ctrl)
	if err := c.Init(0); err != nil {
		t.Fatalf("INIT: %v\n%s", err, readFile(t, e.log))
	}
	conn := dataChannel(t, c)
	tp := tpmclient.SendFunc(func(cmd []byte) ([]byte, error) { return tpmclient.RoundTrip(conn, cmd) })
	if err := tpmclient.Startup(tp); err != nil {
		t.Fatalf("TPM2_Startup: %v\nvTPM log:\n%s", err, tail(readFile(t, e.log), 2000))
	}
	val, err := tpmclient.PCRRead(tp, pcr)
	if err != nil {
		t.Fatal(err)
	}
	if err := tpmclient.PCRExtend(tp, uint32(pcr), make([]byte, 32)); err == nil {
		t.Fatalf("the guest extended the projected PCR %d", pcr)
	}
	c.Shutdown()
	e.cmd.Wait()
	return val
}

// propertyValue is the PCR after property projection of props (sorted), by the documented
// formula: each property p extends SHA-256("vtpmd property v1\0" ‖ p).
func propertyValue(props []string) []byte {
	v := make([]byte, 32)
	for _, p := range props {
		d := sha256.Sum256(append([]byte("vtpmd property v1\x00"), p...))
		n := sha256.Sum256(append(v, d[:]...))
		v = n[:]
	}
	return v
}

// TestProjectionProperty (acceptance 3): hosts a and b (different firmware builds: different
// PCR 0) under a policy approving both give their vTPMs the same PCR 15; host c (an enrolled
// variable store the policy does not know: different PCR 7) gives another value, the one of
// the approved properties plus "unknown".
func TestProjectionProperty(t *testing.T) {
	a, b, c := measuredHost(t, hostA), measuredHost(t, hostB), measuredHost(t, hostC)
	if bytes.Equal(a.SHA256[0], b.SHA256[0]) {
		t.Fatal("hosts a and b have the same PCR 0: not different raw measurements")
	}
	pol := propertyPolicy(t, a, b)
	vals := map[string][]byte{}
	for _, h := range []*hostTPM{a, b, c} {
		v := newProjectedVM(t, h, "property", 15, "--property-policy", pol)
		vals[h.Variant] = propertyPCR(t, v, 15)
		t.Logf("host %s: PCR 0 %x…, PCR 7 %x…; vTPM PCR 15 = %x", h.Variant, h.SHA256[0][:6], h.SHA256[7][:6], vals[h.Variant])
	}
	if !bytes.Equal(vals[hostA], vals[hostB]) {
		t.Fatalf("hosts a and b (same properties) give different PCR 15: %x, %x", vals[hostA], vals[hostB])
	}
	if bytes.Equal(vals[hostA], vals[hostC]) {
		t.Fatal("host c (an unapproved measurement) gives the approved hosts' PCR 15")
	}
	if bytes.Equal(vals[hostA], make([]byte, 32)) {
		t.Fatal("nothing was projected")
	}
	// the value is the documented one: the approved properties of a's log, sorted
	var props []string
	for _, e := range a.Log.Events {
		if e.Type == eventlog.EvNoAction || e.PCR > 7 {
			continue
		}
		name := fmt.Sprintf("pcr%d %s: approved", e.PCR, eventlog.TypeName(e.Type))
		if e.PCR == 0 && e.Type == 0x80000008 {
			name = "firmware: an approved OVMF build"
		}
		if !slices.Contains(props, name) {
			props = append(props, name)
		}
	}
	slices.Sort(props)
	if want := propertyValue(props); !bytes.Equal(vals[hostA], want) {
		t.Fatalf("PCR 15 = %x, the documented value of %q is %x", vals[hostA], props, want)
	}
}

// TestLibvirtProjection (acceptance 1 under libvirt): a persistent domain whose <metadata>
// policy asks for summary projection into PCR 23, its vTPM run by libvirt (vtpmd as swtpm, as
// tss) with the host's manager on the default socket, on a measured host: the guest reads the
// documented value, its extend of PCR 23 gets TPM_RC_LOCALITY, its log read with
// tpm2_nvread -C o replays to the value; after `virsh reset` (a reboot) the projection is
// there again, and after the VM is shut off and started again too.
func TestLibvirtProjection(t *testing.T) {
	needRefSwtpm(t)
	if manager.Available(manager.DefaultSocket) {
		t.Fatalf("%s exists: another manager runs on this host; refusing to replace it", manager.DefaultSocket)
	}
	h := measuredHost(t, hostA)
	want := summaryValue(h.SHA256, ekName(t, h))
	e := lvSetup(t)
	hadRun := lvExists(filepath.Dir(manager.DefaultSocket))
	t.Cleanup(func() {
		os.Remove(manager.DefaultSocket)
		if !hadRun {
			os.Remove(filepath.Dir(manager.DefaultSocket))
		}
	})
	m := newHostManager(t, e.vtpmd, manager.DefaultSocket, "tss", e.regA, "--log", "fd=2", "--tpm", h.Spec, "--eventlog", h.EventLog)
	t.Cleanup(m.stop)

	d := e.domain("lv-proj-sum", "41", "projpcr=23 projlog hang", "<backend type='emulator' version='2.0'/>")
	d.Metadata = `<vtpmd:policy xmlns:vtpmd="https://vtpmd.dev/xmlns/policy/1"><vtpmd:projection mode="summary" pcr="23"/></vtpmd:policy>`
	e.virsh("A", "define", d.writeXML())
	t.Cleanup(func() { e.virshErr("A", "destroy", d.Name); e.virshErr("A", "undefine", "--tpm", d.Name) })
	check := func(what string, n int) {
		t.Helper()
		var out string
		if !lvWait(3*time.Minute, func() bool {
			raw, _ := os.ReadFile(d.serial("A"))
			out = strings.ReplaceAll(string(raw), "\r", "")
			return len(reExtendOK.FindAllStringIndex(out, -1)) >= n || strings.Contains(out, "GUEST: error=")
		}) {
			t.Fatalf("%s: the guest did not report within 3m:\n%s\nswtpm log:\n%s", what, tail(out, 2000), e.swtpmLog(d))
		}
		part := out[strings.LastIndex(out, "GUEST: booted"):]
		g := guestValues(part)
		if g["proj_pcr"] != want || g["proj_extend"] != "locality" || g["proj_log_auth"] != "owner" {
			t.Fatalf("%s: guest %v\nwant PCR 23 = %s and TPM_RC_LOCALITY\nswtpm log:\n%s", what, g, want, e.swtpmLog(d))
		}
		if got := strings.ToUpper(hex.EncodeToString(checkGuestLog(t, part)[23])); got != want {
			t.Fatalf("%s: the guest-visible log replays PCR 23 to %s, want %s", what, got, want)
		}
		t.Logf("%s: PCR 23 = %s… (summary of the measured host), extend refused, log replays to it", what, want[:16])
	}
	os.Remove(d.serial("A"))
	e.virsh("A", "start", d.Name)
	check("boot 1", 1)
	e.virsh("A", "reset", d.Name)
	check("after virsh reset", 2)
	e.destroyAndWait(d, e.observeEmulator(d))
	os.Remove(d.serial("A"))
	e.virsh("A", "start", d.Name)
	check("after a restart of the VM", 1)
}
