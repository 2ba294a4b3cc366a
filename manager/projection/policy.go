package projection

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"

	"github.com/vtpmd/vtpmd/manager/eventlog"
)

// Unknown is the property of every measurement no rule matches. No policy may name it.
const Unknown = "unknown"

// MaxPolicySize bounds a policy file.
const MaxPolicySize = 1 << 20

// ErrPolicy is wrapped by every error about a policy file's content.
var ErrPolicy = errors.New("projection: bad property policy")

// Policy is the operator's property policy: which host measurements mean which property.
//
//	{
//	  "bank": "sha256",
//	  "pcrs": [0, 1, 2, 3, 4, 5, 6, 7],
//	  "startup_localities": [0],
//	  "rules": [
//	    {"property": "firmware: approved OVMF build", "pcr": 0,
//	     "type": "EV_EFI_PLATFORM_FIRMWARE_BLOB", "digests": ["9f2c...", "41aa..."]},
//	    {"property": "boot: separators", "type": "EV_SEPARATOR", "digests": ["df3f..."]}
//	  ]
//	}
//
// Every event of the host log in one of pcrs (EV_NO_ACTION aside) is matched against the
// rules in order; the first rule whose pcr, type and digests all match gives the event's
// property. A rule names at least a type or digests (one that matched everything would
// approve what nobody looked at). An event no rule matches, and a startup locality not in
// startup_localities, give the property "unknown".
type Policy struct {
	// Bank is the bank whose digests the rules list ("sha256" by default).
	Bank string `json:"bank,omitempty"`
	// PCRs are the host PCRs whose events are mapped (0-7 by default).
	PCRs []int `json:"pcrs,omitempty"`
	// StartupLocalities are the startup localities the host may have (0 by default).
	StartupLocalities []int  `json:"startup_localities,omitempty"`
	Rules             []Rule `json:"rules"`

	bank uint16
}

// Rule maps matching measurements to a property.
type Rule struct {
	Property string `json:"property"`
	// PCR limits the rule to one host PCR (nil: any of the policy's PCRs).
	PCR *int `json:"pcr,omitempty"`
	// Type limits the rule to one event type: a name ("EV_SEPARATOR") or a number.
	Type string `json:"type,omitempty"`
	// Digests are the accepted digests (hex, in the policy's bank); empty: any.
	Digests []string `json:"digests,omitempty"`

	typ     *uint32
	digests [][]byte
}

// LoadPolicy reads and checks a policy file.
func LoadPolicy(path string) (*Policy, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("property policy: %w", err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, MaxPolicySize+1))
	if err != nil {
		return nil, fmt.Errorf("property policy %s: %w", path, err)
	}
	p, err := ParsePolicy(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return p, nil
}

// ParsePolicy reads a policy from JSON (unknown fields are an error) and checks it.
func ParsePolicy(b []byte) (*Policy, error) {
	if len(b) > MaxPolicySize {
		return nil, fmt.Errorf("%w: more than %d bytes", ErrPolicy, MaxPolicySize)
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	var p Policy
	if err := dec.Decode(&p); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrPolicy, err)
	}
	if dec.More() {
		return nil, fmt.Errorf("%w: data after the policy object", ErrPolicy)
	}
	if err := p.check(); err != nil {
		return nil, err
	}
	return &p, nil
}

func (p *Policy) check() error {
	if p.Bank == "" {
		p.Bank = "sha256"
	}
	var ok bool
	if p.bank, ok = eventlog.AlgByName(p.Bank); !ok {
		return fmt.Errorf("%w: bank %q (want sha1, sha256, sha384 or sha512)", ErrPolicy, truncate(p.Bank))
	}
	size := 0
	if h, err := eventlog.Hash(p.bank); err == nil {
		size = h.Size()
	}
	if len(p.PCRs) == 0 {
		p.PCRs = slices.Clone(MirrorPCRs)
	}
	for _, i := range p.PCRs {
		if i < 0 || i >= eventlog.NumPCRs {
			return fmt.Errorf("%w: PCR %d out of range 0 to 23", ErrPolicy, i)
		}
	}
	if len(p.StartupLocalities) == 0 {
		p.StartupLocalities = []int{0}
	}
	if len(p.Rules) == 0 {
		return fmt.Errorf("%w: no rules", ErrPolicy)
	}
	for i := range p.Rules {
		r := &p.Rules[i]
		where := fmt.Sprintf("rule %d", i+1)
		switch name := r.Property; {
		case name == "" || len(name) > 256 || strings.ContainsAny(name, "\x00\n"):
			return fmt.Errorf("%w: %s: property name must be 1 to 256 characters on one line", ErrPolicy, where)
		case strings.EqualFold(strings.TrimSpace(name), Unknown):
			return fmt.Errorf("%w: %s: the property %q is reserved for unmatched measurements", ErrPolicy, where, Unknown)
		}
		if r.PCR != nil && !slices.Contains(p.PCRs, *r.PCR) {
			return fmt.Errorf("%w: %s: PCR %d is not among the policy's PCRs %v", ErrPolicy, where, *r.PCR, p.PCRs)
		}
		if r.Type != "" {
			t, ok := eventlog.TypeByName(r.Type)
			if !ok {
				return fmt.Errorf("%w: %s: unknown event type %q", ErrPolicy, where, truncate(r.Type))
			}
			if t == eventlog.EvNoAction {
				return fmt.Errorf("%w: %s: EV_NO_ACTION events are not measurements", ErrPolicy, where)
			}
			r.typ = &t
		}
		if r.typ == nil && len(r.Digests) == 0 {
			return fmt.Errorf("%w: %s: a rule names a type or digests (it would match every measurement)", ErrPolicy, where)
		}
		r.digests = nil
		for _, d := range r.Digests {
			v, err := hex.DecodeString(d)
			if err != nil || len(v) != size {
				return fmt.Errorf("%w: %s: digest %q is not %d bytes of hex", ErrPolicy, where, truncate(d), size)
			}
			r.digests = append(r.digests, v)
		}
	}
	return nil
}

func truncate(s string) string {
	if len(s) > 80 {
		return s[:80] + "..."
	}
	return s
}

// property is the property of one event, Unknown when no rule matches.
func (p *Policy) property(e *eventlog.Event) string {
	d := e.Digest(p.bank)
	for _, r := range p.Rules {
		if r.PCR != nil && uint32(*r.PCR) != e.PCR {
			continue
		}
		if r.typ != nil && *r.typ != e.Type {
			continue
		}
		if len(r.digests) > 0 && !slices.ContainsFunc(r.digests, func(v []byte) bool { return bytes.Equal(v, d) }) {
			continue
		}
		return r.Property
	}
	return Unknown
}

// Properties maps a host log to its properties: sorted, each once. An event of the policy's
// PCRs without a digest in the policy's bank is an error.
func (p *Policy) Properties(l *eventlog.Log) ([]string, error) {
	if !l.HasAlgorithm(p.bank) {
		return nil, fmt.Errorf("%w: the host log has no %s digests (the policy's bank)", ErrInput, p.Bank)
	}
	set := map[string]bool{}
	if !slices.Contains(p.StartupLocalities, int(l.StartupLocality())) {
		set[Unknown] = true
	}
	for i := range l.Events {
		e := &l.Events[i]
		if !eventlog.Extended(e) || !slices.Contains(p.PCRs, int(e.PCR)) {
			continue
		}
		if e.Digest(p.bank) == nil {
			return nil, fmt.Errorf("%w: event %d has no %s digest", ErrInput, i+1, p.Bank)
		}
		set[p.property(e)] = true
	}
	out := make([]string, 0, len(set))
	for k := range set {
		out = append(out, k)
	}
	slices.Sort(out)
	return out, nil
}
