package libvirt

import (
	"bytes"
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/vtpmd/vtpmd/internal/uuidstr"
	"github.com/vtpmd/vtpmd/manager/registry"
)

// Limits on untrusted domain XML.
const (
	// MaxXMLSize bounds the domain XML read from stdin or a file (libvirt's own limit for a
	// domain definition is 10 MiB as well).
	MaxXMLSize = 10 << 20
	// MaxXMLDepth bounds element nesting; libvirt's schema needs well under 20 levels, the
	// rest is left for <metadata> written by other tools.
	MaxXMLDepth = 256
	// maxSocketPath is the longest path a unix socket address can hold (sun_path minus NUL).
	maxSocketPath = 107
	// maxPolicyXML bounds the policy element kept in the registry.
	maxPolicyXML = 64 << 10
)

// PolicyNamespace is the XML namespace of vtpmd's per-domain policy in <metadata>.
const PolicyNamespace = "https://vtpmd.dev/xmlns/policy/1"

// Sentinel errors wrapped by ParseDomain and the path checks.
var (
	ErrTooLarge     = errors.New("domain XML too large")
	ErrUnsafeXML    = errors.New("unsafe domain XML")
	ErrMalformed    = errors.New("malformed domain XML")
	ErrInvalid      = errors.New("invalid domain definition")
	ErrMultipleTPMs = errors.New("more than one emulated TPM")
	ErrBadPath      = errors.New("unacceptable path")
	ErrBadPolicy    = errors.New("invalid vtpmd policy")
)

// BackendType is a <tpm><backend type='...'> value.
type BackendType string

// Backend types vtpmd knows.
const (
	BackendEmulator    BackendType = "emulator"
	BackendExternal    BackendType = "external"
	BackendPassthrough BackendType = "passthrough"
)

// Domain is what vtpmd needs from a libvirt domain definition.
type Domain struct {
	Name string
	UUID string // canonical lower-case form
	ID   int    // the running domain's id, -1 when absent
	// TPM is the domain's emulated TPM (emulator or external backend), nil when there is none.
	TPM *TPM
	// Unmanaged lists the backend types of <tpm> devices vtpmd leaves alone (passthrough,
	// unknown types).
	Unmanaged []string
	// Policy is the vtpmd policy from <metadata>, nil when absent.
	Policy *Policy
}

// TPM describes one emulated TPM device.
type TPM struct {
	Model           string
	Backend         BackendType
	Version         string // "1.2", "2.0" or "" (emulator only)
	PersistentState bool
	// EncryptionSecret is the libvirt secret UUID of <encryption secret='...'/>, if any.
	EncryptionSecret string
	// ActivePCRBanks lists the banks of <active_pcr_banks>, e.g. ["sha256", "sha384"].
	ActivePCRBanks []string
	// SocketPath is the control socket of an external backend.
	SocketPath string
}

// StateSubdir is the per-version directory name libvirt and vtpmd use below <uuid>/.
func (t *TPM) StateSubdir() string {
	if t.Version == "1.2" {
		return "tpm1.2"
	}
	return "tpm2"
}

// Policy is the vtpmd policy element of a domain, as the registry records it.
type Policy = registry.Policy

// Projection is <vtpmd:projection mode='...' pcr='N'/>.
type Projection = registry.Projection

// ReadXML reads at most MaxXMLSize bytes of domain XML from r.
func ReadXML(r io.Reader) ([]byte, error) {
	data, err := io.ReadAll(io.LimitReader(r, MaxXMLSize+1))
	if err != nil {
		return nil, fmt.Errorf("read domain XML: %w", err)
	}
	if len(data) > MaxXMLSize {
		return nil, fmt.Errorf("%w: more than %d bytes", ErrTooLarge, MaxXMLSize)
	}
	return data, nil
}

// The XML shapes decoded from a domain definition. Elements other than these are skipped.
type xmlDomain struct {
	XMLName  xml.Name      `xml:"domain"`
	ID       string        `xml:"id,attr"`
	Name     string        `xml:"name"`
	UUID     string        `xml:"uuid"`
	Metadata []xmlMetadata `xml:"metadata"`
	Devices  []xmlDevices  `xml:"devices"`
}

type xmlMetadata struct {
	Policies []xmlPolicy `xml:"https://vtpmd.dev/xmlns/policy/1 policy"`
}

type xmlPolicy struct {
	Inner    string           `xml:",innerxml"`
	Children []xmlPolicyChild `xml:",any"`
}

// xmlPolicyChild is an element inside <vtpmd:policy>. Children may carry the policy namespace
// or none: `virsh metadata --set` puts the namespace on the top element only.
type xmlPolicyChild struct {
	XMLName xml.Name
	Attrs   []xml.Attr `xml:",any,attr"`
}

type xmlAny struct {
	XMLName xml.Name
}

type xmlDevices struct {
	TPMs []xmlTPM `xml:"tpm"`
}

type xmlTPM struct {
	Model   string       `xml:"model,attr"`
	Backend []xmlBackend `xml:"backend"`
}

type xmlBackend struct {
	Type            string          `xml:"type,attr"`
	Version         string          `xml:"version,attr"`
	PersistentState string          `xml:"persistent_state,attr"`
	Source          []xmlSource     `xml:"source"`
	Encryption      []xmlEncryption `xml:"encryption"`
	PCRBanks        []xmlPCRBanks   `xml:"active_pcr_banks"`
}

type xmlSource struct {
	Type string `xml:"type,attr"`
	Mode string `xml:"mode,attr"`
	Path string `xml:"path,attr"`
}

type xmlEncryption struct {
	Secret string `xml:"secret,attr"`
}

type xmlPCRBanks struct {
	Banks []xmlAny `xml:",any"`
}

// ValidUUID reports whether s is a UUID in canonical 8-4-4-4-12 form.
func ValidUUID(s string) bool { return uuidstr.Valid(s) }

// checkXML walks the token stream once: it enforces the depth bound, refuses DTDs (and with
// them entity definitions), and requires one root element named domain.
func checkXML(data []byte) error {
	d := xml.NewDecoder(bytes.NewReader(data))
	d.Strict = true
	depth, roots := 0, 0
	for {
		tok, err := d.RawToken()
		if err == io.EOF {
			break
		}
		if err != nil {
			return fmt.Errorf("%w: %v", ErrMalformed, err)
		}
		switch t := tok.(type) {
		case xml.StartElement:
			if depth == 0 {
				roots++
				if roots > 1 {
					return fmt.Errorf("%w: more than one root element", ErrMalformed)
				}
				if t.Name.Local != "domain" {
					return fmt.Errorf("%w: root element is <%s>, not <domain>", ErrMalformed, t.Name.Local)
				}
			}
			depth++
			if depth > MaxXMLDepth {
				return fmt.Errorf("%w: elements nested deeper than %d", ErrUnsafeXML, MaxXMLDepth)
			}
		case xml.EndElement:
			depth--
		case xml.Directive:
			return fmt.Errorf("%w: DTDs and entity declarations are not accepted", ErrUnsafeXML)
		case xml.CharData:
			if depth == 0 && len(bytes.TrimSpace(t)) > 0 {
				return fmt.Errorf("%w: text outside the root element", ErrMalformed)
			}
		}
	}
	if roots == 0 {
		return fmt.Errorf("%w: no <domain> element", ErrMalformed)
	}
	return nil
}

// ParseDomain decodes untrusted domain XML.
func ParseDomain(data []byte) (*Domain, error) {
	if len(data) > MaxXMLSize {
		return nil, fmt.Errorf("%w: %d bytes, limit %d", ErrTooLarge, len(data), MaxXMLSize)
	}
	if err := checkXML(data); err != nil {
		return nil, err
	}
	var x xmlDomain
	d := xml.NewDecoder(bytes.NewReader(data))
	d.Strict = true
	if err := d.Decode(&x); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrMalformed, err)
	}
	dom := &Domain{Name: strings.TrimSpace(x.Name), ID: -1}
	if err := checkName(dom.Name); err != nil {
		return nil, err
	}
	u := strings.TrimSpace(x.UUID)
	if !ValidUUID(u) {
		return nil, fmt.Errorf("%w: domain %q: uuid %q is not a canonical UUID", ErrInvalid, dom.Name, truncate(u, 64))
	}
	dom.UUID = strings.ToLower(u)
	if x.ID != "" {
		if id, err := strconv.Atoi(x.ID); err == nil && id >= 0 {
			dom.ID = id
		}
	}
	for _, devs := range x.Devices {
		for _, t := range devs.TPMs {
			tpm, err := convertTPM(t)
			if err != nil {
				return nil, fmt.Errorf("domain %q: %w", dom.Name, err)
			}
			if tpm.Backend != BackendEmulator && tpm.Backend != BackendExternal {
				dom.Unmanaged = append(dom.Unmanaged, string(tpm.Backend))
				continue
			}
			if dom.TPM != nil {
				return nil, fmt.Errorf("%w: domain %q has several <tpm> devices with emulator or external backends", ErrMultipleTPMs, dom.Name)
			}
			dom.TPM = tpm
		}
	}
	var policies []xmlPolicy
	for _, m := range x.Metadata {
		policies = append(policies, m.Policies...)
	}
	switch len(policies) {
	case 0:
	case 1:
		p, err := convertPolicy(policies[0])
		if err != nil {
			return nil, fmt.Errorf("domain %q: %w", dom.Name, err)
		}
		dom.Policy = p
	default:
		return nil, fmt.Errorf("%w: domain %q has %d <policy> elements in %s", ErrBadPolicy, dom.Name, len(policies), PolicyNamespace)
	}
	return dom, nil
}

func checkName(name string) error {
	if name == "" {
		return fmt.Errorf("%w: domain has no <name>", ErrInvalid)
	}
	if len(name) > 1024 {
		return fmt.Errorf("%w: domain name longer than 1024 bytes", ErrInvalid)
	}
	for _, r := range name {
		if r == '/' || r < 0x20 || r == 0x7f {
			return fmt.Errorf("%w: domain name %q contains '/' or control characters", ErrInvalid, truncate(name, 64))
		}
	}
	return nil
}

func convertTPM(t xmlTPM) (*TPM, error) {
	tpm := &TPM{Model: t.Model}
	if len(t.Backend) != 1 {
		return nil, fmt.Errorf("%w: <tpm> needs exactly one <backend>, has %d", ErrInvalid, len(t.Backend))
	}
	b := t.Backend[0]
	tpm.Backend = BackendType(b.Type)
	switch tpm.Backend {
	case BackendEmulator:
		switch b.Version {
		case "", "1.2", "2.0":
			tpm.Version = b.Version
		default:
			return nil, fmt.Errorf("%w: emulator TPM version %q (want 1.2 or 2.0)", ErrInvalid, truncate(b.Version, 32))
		}
		switch b.PersistentState {
		case "", "no":
		case "yes":
			tpm.PersistentState = true
		default:
			return nil, fmt.Errorf("%w: persistent_state=%q", ErrInvalid, truncate(b.PersistentState, 32))
		}
		if len(b.Encryption) > 1 {
			return nil, fmt.Errorf("%w: several <encryption> elements", ErrInvalid)
		}
		if len(b.Encryption) == 1 {
			if !ValidUUID(b.Encryption[0].Secret) {
				return nil, fmt.Errorf("%w: <encryption secret=%q> is not a UUID", ErrInvalid, truncate(b.Encryption[0].Secret, 64))
			}
			tpm.EncryptionSecret = strings.ToLower(b.Encryption[0].Secret)
		}
		for _, pb := range b.PCRBanks {
			for _, bank := range pb.Banks {
				switch n := bank.XMLName.Local; n {
				case "sha1", "sha256", "sha384", "sha512":
					tpm.ActivePCRBanks = append(tpm.ActivePCRBanks, n)
				default:
					return nil, fmt.Errorf("%w: unknown PCR bank <%s>", ErrInvalid, truncate(n, 32))
				}
			}
		}
	case BackendExternal:
		if len(b.Source) != 1 {
			return nil, fmt.Errorf("%w: external TPM backend needs exactly one <source>, has %d", ErrInvalid, len(b.Source))
		}
		s := b.Source[0]
		if s.Type != "unix" || (s.Mode != "" && s.Mode != "connect") {
			return nil, fmt.Errorf("%w: external TPM source type=%q mode=%q (want unix, connect)", ErrInvalid, truncate(s.Type, 32), truncate(s.Mode, 32))
		}
		if err := CheckSyntax(s.Path); err != nil {
			return nil, fmt.Errorf("external TPM socket: %w", err)
		}
		if len(s.Path) > maxSocketPath {
			return nil, fmt.Errorf("%w: socket path longer than %d bytes", ErrBadPath, maxSocketPath)
		}
		tpm.SocketPath = s.Path
	}
	return tpm, nil
}

var projectionModes = map[string]bool{"off": true, "mirror": true, "summary": true, "property": true}

func convertPolicy(x xmlPolicy) (*Policy, error) {
	if len(x.Inner) > maxPolicyXML {
		return nil, fmt.Errorf("%w: policy element larger than %d bytes", ErrBadPolicy, maxPolicyXML)
	}
	p := &Policy{XML: strings.TrimSpace(x.Inner)}
	seen := map[string]bool{}
	for _, c := range x.Children {
		n := c.XMLName
		if n.Space != PolicyNamespace && n.Space != "" {
			return nil, fmt.Errorf("%w: element <%s> in namespace %q inside <policy>", ErrBadPolicy, truncate(n.Local, 32), truncate(n.Space, 64))
		}
		if seen[n.Local] {
			return nil, fmt.Errorf("%w: repeated <%s>", ErrBadPolicy, truncate(n.Local, 32))
		}
		seen[n.Local] = true
		attrs, err := policyAttrs(c.Attrs, n.Local)
		if err != nil {
			return nil, err
		}
		switch n.Local {
		case "projection":
			if err := onlyAttrs(attrs, n.Local, "mode", "pcr"); err != nil {
				return nil, err
			}
			if p.Projection, err = convertProjection(attrs["mode"], attrs["pcr"]); err != nil {
				return nil, err
			}
		case "state":
			if err := onlyAttrs(attrs, n.Local, "keep"); err != nil {
				return nil, err
			}
			var keep bool
			switch attrs["keep"] {
			case "yes":
				keep = true
			case "no":
			default:
				return nil, fmt.Errorf("%w: state keep=%q (want yes or no)", ErrBadPolicy, truncate(attrs["keep"], 32))
			}
			p.KeepState = &keep
		default:
			return nil, fmt.Errorf("%w: unknown element <%s> in <policy>", ErrBadPolicy, truncate(n.Local, 32))
		}
	}
	return p, nil
}

func convertProjection(mode, pcr string) (*Projection, error) {
	if !projectionModes[mode] {
		return nil, fmt.Errorf("%w: projection mode %q (want off, mirror, summary or property)", ErrBadPolicy, truncate(mode, 32))
	}
	proj := &Projection{Mode: mode}
	if pcr != "" {
		n, err := strconv.Atoi(pcr)
		if err != nil || n < 0 || n > 23 {
			return nil, fmt.Errorf("%w: projection pcr %q (want 0..23)", ErrBadPolicy, truncate(pcr, 32))
		}
		if mode == "mirror" || mode == "off" {
			return nil, fmt.Errorf("%w: projection mode %q takes no pcr", ErrBadPolicy, mode)
		}
		proj.PCR = &n
	} else if mode == "summary" {
		return nil, fmt.Errorf("%w: projection mode summary needs pcr='N'", ErrBadPolicy)
	}
	return proj, nil
}

// policyAttrs collects a policy element's plain attributes, skipping namespace declarations.
func policyAttrs(attrs []xml.Attr, elem string) (map[string]string, error) {
	m := map[string]string{}
	for _, a := range attrs {
		if a.Name.Space == "xmlns" || (a.Name.Space == "" && a.Name.Local == "xmlns") {
			continue
		}
		if a.Name.Space != "" && a.Name.Space != PolicyNamespace {
			return nil, fmt.Errorf("%w: attribute %q in namespace %q on <%s>", ErrBadPolicy, truncate(a.Name.Local, 32), truncate(a.Name.Space, 64), elem)
		}
		if _, dup := m[a.Name.Local]; dup {
			return nil, fmt.Errorf("%w: repeated attribute %q on <%s>", ErrBadPolicy, truncate(a.Name.Local, 32), elem)
		}
		m[a.Name.Local] = a.Value
	}
	return m, nil
}

func onlyAttrs(attrs map[string]string, elem string, allowed ...string) error {
	for k := range attrs {
		ok := false
		for _, a := range allowed {
			ok = ok || k == a
		}
		if !ok {
			return fmt.Errorf("%w: unknown attribute %q on <%s>", ErrBadPolicy, truncate(k, 32), elem)
		}
	}
	return nil
}

// CheckSyntax accepts only absolute, clean paths: no "..", no "." or empty components, no NUL,
// no trailing slash.
func CheckSyntax(p string) error {
	switch {
	case p == "":
		return fmt.Errorf("%w: empty path", ErrBadPath)
	case strings.IndexByte(p, 0) >= 0:
		return fmt.Errorf("%w: path contains NUL", ErrBadPath)
	case len(p) > 4096:
		return fmt.Errorf("%w: path longer than 4096 bytes", ErrBadPath)
	case !filepath.IsAbs(p):
		return fmt.Errorf("%w: %q is relative", ErrBadPath, truncate(p, 128))
	case filepath.Clean(p) != p || p == "/":
		return fmt.Errorf("%w: %q is not clean (\"..\", \".\", \"//\" or a trailing slash)", ErrBadPath, truncate(p, 128))
	}
	for _, c := range strings.Split(p[1:], "/") {
		if c == ".." || c == "." {
			return fmt.Errorf("%w: %q contains %q", ErrBadPath, truncate(p, 128), c)
		}
	}
	return nil
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}
