package projection

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"testing"

	"github.com/vtpmd/vtpmd/manager/eventlog"
)

func ev(pcr, typ uint32, data string) eventlog.Event {
	e := eventlog.Event{PCR: pcr, Type: typ, Data: []byte(data)}
	for _, b := range []uint16{eventlog.AlgSHA1, eventlog.AlgSHA256} {
		h, _ := eventlog.Hash(b)
		w := h.New()
		w.Write([]byte(data))
		e.Digests = append(e.Digests, eventlog.Digest{Alg: b, Value: w.Sum(nil)})
	}
	return e
}

// host is a host whose firmware measured firmware into PCR 0; its hardware PCRs are what the
// log replays to.
func host(t *testing.T, firmware string, extra ...eventlog.Event) Host {
	t.Helper()
	evs := []eventlog.Event{
		ev(0, 0x80000008, firmware),
		ev(7, 0x80000001, "SecureBoot=0"),
		{PCR: 0, Type: eventlog.EvNoAction, Data: []byte("not extended")},
		ev(4, 0x80000007, "Calling EFI Application from Boot Option"),
		ev(9, 0x6, "initrd (not a firmware PCR)"),
	}
	for i := range 8 {
		evs = append(evs, ev(uint32(i), eventlog.EvSeparator, "\x00\x00\x00\x00"))
	}
	evs = append(evs, extra...)
	b, err := eventlog.Build([]uint16{eventlog.AlgSHA1, eventlog.AlgSHA256}, evs)
	if err != nil {
		t.Fatal(err)
	}
	l, err := eventlog.Parse(b)
	if err != nil {
		t.Fatal(err)
	}
	h := Host{Log: l, PCRs: map[uint16][][]byte{}, Identity: []byte("\x00\x0bEK name of this host")}
	for _, bank := range []uint16{eventlog.AlgSHA1, eventlog.AlgSHA256} {
		if h.PCRs[bank], err = l.Replay(bank); err != nil {
			t.Fatal(err)
		}
	}
	return h
}

// apply replays a plan's SHA-256 digests into fresh PCRs, as the vTPM's guard does.
func apply(p *Plan) [][]byte {
	pcrs := make([][]byte, 24)
	for i := range pcrs {
		pcrs[i] = make([]byte, 32)
	}
	for _, e := range p.Events {
		d := sha256.Sum256(append(pcrs[e.PCR], e.Digest(eventlog.AlgSHA256)...))
		pcrs[e.PCR] = d[:]
	}
	return pcrs
}

func TestMirror(t *testing.T) {
	h := host(t, "OVMF build 1")
	p, err := Mirror(h)
	if err != nil {
		t.Fatal(err)
	}
	got := apply(p)
	for i := range 8 {
		if !bytes.Equal(got[i], h.PCRs[eventlog.AlgSHA256][i]) {
			t.Fatalf("mirrored PCR %d = %x, hardware %x", i, got[i], h.PCRs[eventlog.AlgSHA256][i])
		}
	}
	if !bytes.Equal(got[9], make([]byte, 32)) {
		t.Fatal("mirror extended PCR 9")
	}
	if fmt.Sprint(p.ReadOnly) != "[0 1 2 3 4 5 6 7]" {
		t.Fatalf("read-only %v", p.ReadOnly)
	}

	// a log that does not replay to the hardware (a PCR extended past the log) is refused
	bad := host(t, "OVMF build 1")
	bad.PCRs[eventlog.AlgSHA1][3] = bytes.Repeat([]byte{1}, 20)
	if _, err := Mirror(bad); !errors.Is(err, ErrMismatch) {
		t.Fatalf("mismatching sha1 bank: %v", err)
	}
	// no bank in common: nothing checked, refused
	none := host(t, "OVMF build 1")
	none.PCRs = map[uint16][][]byte{eventlog.AlgSHA384: make([][]byte, 24)}
	if _, err := Mirror(none); !errors.Is(err, ErrMismatch) {
		t.Fatalf("no common bank: %v", err)
	}
	// a host started at locality 3
	loc := host(t, "OVMF build 1", eventlog.Event{PCR: 0, Type: eventlog.EvNoAction, Data: append([]byte("StartupLocality\x00"), 3)})
	if _, err := Mirror(loc); !errors.Is(err, ErrStartupLocality) {
		t.Fatalf("startup locality 3: %v", err)
	}
	if _, err := Mirror(Host{}); !errors.Is(err, ErrInput) {
		t.Fatalf("no log: %v", err)
	}
}

func TestSummary(t *testing.T) {
	h := host(t, "OVMF build 1")
	p, err := Summary(h, 23)
	if err != nil {
		t.Fatal(err)
	}
	// the documented formula, computed here on its own
	pre := []byte("vtpmd summary v1\x00")
	for i := range 8 {
		pre = append(pre, byte(i))
		pre = append(pre, h.PCRs[eventlog.AlgSHA256][i]...)
	}
	pre = append(pre, 0, byte(len(h.Identity)))
	pre = append(pre, h.Identity...)
	d := sha256.Sum256(pre)
	want := sha256.Sum256(append(make([]byte, 32), d[:]...))
	if got := apply(p)[23]; !bytes.Equal(got, want[:]) {
		t.Fatalf("PCR 23 = %x, want %x", got, want)
	}
	if len(p.ReadOnly) != 1 || p.ReadOnly[0] != 23 || len(p.Events[0].Digests) != len(Banks) {
		t.Fatalf("plan %+v", p)
	}
	// another identity (another host's TPM) gives another value
	h2 := h
	h2.Identity = []byte("other")
	p2, _ := Summary(h2, 23)
	if bytes.Equal(apply(p2)[23], want[:]) {
		t.Fatal("the identity does not change the summary")
	}
	if _, err := Summary(Host{PCRs: h.PCRs}, 23); !errors.Is(err, ErrInput) {
		t.Fatalf("no identity: %v", err)
	}
	if _, err := Summary(h, 24); !errors.Is(err, ErrInput) {
		t.Fatalf("PCR 24: %v", err)
	}
}

func digestOf(s string) string {
	d := sha256.Sum256([]byte(s))
	return hex.EncodeToString(d[:])
}

func testPolicy(t *testing.T) *Policy {
	t.Helper()
	p, err := ParsePolicy([]byte(fmt.Sprintf(`{
		"rules": [
			{"property": "firmware: approved build", "pcr": 0, "type": "EV_EFI_PLATFORM_FIRMWARE_BLOB", "digests": [%q, %q]},
			{"property": "secure boot: off", "pcr": 7, "digests": [%q]},
			{"property": "boot: separators and actions", "type": "EV_SEPARATOR", "digests": [%q]},
			{"property": "boot: separators and actions", "type": "EV_EFI_ACTION"}
		]}`, digestOf("OVMF build 1"), digestOf("OVMF build 2"), digestOf("SecureBoot=0"), digestOf("\x00\x00\x00\x00"))))
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func TestProperty(t *testing.T) {
	pol := testPolicy(t)
	a, b, c := host(t, "OVMF build 1"), host(t, "OVMF build 2"), host(t, "OVMF build 3 (unapproved)")
	if bytes.Equal(a.PCRs[eventlog.AlgSHA256][0], b.PCRs[eventlog.AlgSHA256][0]) {
		t.Fatal("hosts a and b should differ in PCR 0")
	}
	pa, err := Property(a, 15, pol)
	if err != nil {
		t.Fatal(err)
	}
	pb, err := Property(b, 15, pol)
	if err != nil {
		t.Fatal(err)
	}
	pc, err := Property(c, 15, pol)
	if err != nil {
		t.Fatal(err)
	}
	va, vb, vc := apply(pa)[15], apply(pb)[15], apply(pc)[15]
	if !bytes.Equal(va, vb) {
		t.Fatalf("two approved hosts give different values: %x %x", va, vb)
	}
	if bytes.Equal(va, vc) {
		t.Fatal("an unapproved host gives an approved host's value")
	}
	props, _ := pol.Properties(c.Log)
	if fmt.Sprint(props) != "[boot: separators and actions secure boot: off unknown]" {
		t.Fatalf("host c's properties: %q", props)
	}
	props, _ = pol.Properties(a.Log)
	if fmt.Sprint(props) != "[boot: separators and actions firmware: approved build secure boot: off]" {
		t.Fatalf("host a's properties: %q", props)
	}
	// an approved host whose log does not replay to its PCRs is refused
	a.PCRs[eventlog.AlgSHA256][7] = make([]byte, 32)
	if _, err := Property(a, 15, pol); !errors.Is(err, ErrMismatch) {
		t.Fatalf("mismatch: %v", err)
	}
	// a startup locality the policy does not name is unknown
	loc := host(t, "OVMF build 1", eventlog.Event{PCR: 0, Type: eventlog.EvNoAction, Data: append([]byte("StartupLocality\x00"), 3)})
	if props, _ := pol.Properties(loc.Log); props[len(props)-1] != Unknown {
		t.Fatalf("locality 3: %q", props)
	}
	if _, err := Property(b, 15, nil); !errors.Is(err, ErrInput) {
		t.Fatalf("no policy: %v", err)
	}
}

func TestPolicyRejects(t *testing.T) {
	for name, s := range map[string]string{
		"unknown property":  `{"rules":[{"property":"unknown","type":"EV_SEPARATOR"}]}`,
		"Unknown property":  `{"rules":[{"property":" Unknown ","type":"EV_SEPARATOR"}]}`,
		"catch-all rule":    `{"rules":[{"property":"anything"}]}`,
		"no rules":          `{"rules":[]}`,
		"bad digest":        `{"rules":[{"property":"x","digests":["abcd"]}]}`,
		"bad type":          `{"rules":[{"property":"x","type":"EV_NONSENSE"}]}`,
		"no action":         `{"rules":[{"property":"x","type":"EV_NO_ACTION"}]}`,
		"pcr not in policy": `{"pcrs":[0],"rules":[{"property":"x","pcr":4,"type":"EV_SEPARATOR"}]}`,
		"bank":              `{"bank":"md5","rules":[{"property":"x","type":"EV_SEPARATOR"}]}`,
		"unknown field":     `{"rules":[{"property":"x","type":"EV_SEPARATOR","approve_all":true}]}`,
		"trailing data":     `{"rules":[{"property":"x","type":"EV_SEPARATOR"}]} {}`,
		"multi-line name":   `{"rules":[{"property":"a\nb","type":"EV_SEPARATOR"}]}`,
		"pcr out of range":  `{"pcrs":[24],"rules":[{"property":"x","type":"EV_SEPARATOR"}]}`,
		"not an object":     `[]`,
	} {
		if _, err := ParsePolicy([]byte(s)); !errors.Is(err, ErrPolicy) {
			t.Errorf("%s: %v, want ErrPolicy", name, err)
		}
	}
}

func FuzzParsePolicy(f *testing.F) {
	f.Add([]byte(`{"rules":[{"property":"firmware ok","pcr":0,"type":"EV_EFI_PLATFORM_FIRMWARE_BLOB","digests":["` + digestOf("x") + `"]}]}`))
	f.Add([]byte(`{"bank":"sha1","pcrs":[0,7],"startup_localities":[0,3],"rules":[{"property":"sep","type":"4"}]}`))
	f.Add([]byte(`{"rules":[{"property":"unknown","type":"EV_SEPARATOR"}]}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		p, err := ParsePolicy(b)
		if err != nil {
			if !errors.Is(err, ErrPolicy) {
				t.Fatalf("error not ErrPolicy: %v", err)
			}
			return
		}
		for _, r := range p.Rules {
			if r.Property == Unknown || (r.typ == nil && len(r.digests) == 0) {
				t.Fatalf("accepted rule %+v", r)
			}
		}
	})
}
