package libvirt

import (
	"bytes"
	"errors"
	"fmt"
	"strings"
	"testing"
)

const testUUID = "5b1e7c3a-1111-4c1e-9d3b-000000000001"

// domXML builds a domain definition around the given <devices> content and metadata.
func domXML(devices, metadata string) string {
	return fmt.Sprintf(`<domain type='qemu' id='7'>
  <name>vm1</name>
  <uuid>%s</uuid>
  <metadata>%s</metadata>
  <devices>%s</devices>
</domain>`, testUUID, metadata, devices)
}

const (
	emuTPM = `<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>`
	extTPM = `<tpm model='tpm-crb'><backend type='external'><source type='unix' mode='connect' path='/run/vtpmd/vm1/ctrl.sock'/></backend></tpm>`
	policy = `<vtpmd:policy xmlns:vtpmd="https://vtpmd.dev/xmlns/policy/1"><vtpmd:projection mode="summary" pcr="23"/><vtpmd:state keep="no"/></vtpmd:policy>`
)

func TestParseDomain(t *testing.T) {
	deep := strings.Repeat("<x>", MaxXMLDepth+1) + strings.Repeat("</x>", MaxXMLDepth+1)
	tests := []struct {
		name    string
		xml     string
		wantErr error
		check   func(*testing.T, *Domain)
	}{
		{name: "no tpm", xml: domXML("", ""), check: func(t *testing.T, d *Domain) {
			if d.TPM != nil || d.Name != "vm1" || d.UUID != testUUID || d.ID != 7 {
				t.Errorf("got %+v", d)
			}
		}},
		{name: "emulator", xml: domXML(`<tpm model='tpm-crb'><backend type='emulator' version='2.0' persistent_state='yes'>
			<encryption secret='6DD3E4A5-1D76-44CE-961F-F119F5AAD935'/>
			<active_pcr_banks><sha256/><sha384/></active_pcr_banks></backend></tpm>`, ""),
			check: func(t *testing.T, d *Domain) {
				tp := d.TPM
				if tp == nil || tp.Backend != BackendEmulator || tp.Version != "2.0" || !tp.PersistentState ||
					tp.EncryptionSecret != "6dd3e4a5-1d76-44ce-961f-f119f5aad935" || strings.Join(tp.ActivePCRBanks, ",") != "sha256,sha384" {
					t.Errorf("got %+v", tp)
				}
				if tp.StateSubdir() != "tpm2" {
					t.Errorf("subdir %s", tp.StateSubdir())
				}
			}},
		{name: "emulator 1.2", xml: domXML(`<tpm model='tpm-tis'><backend type='emulator' version='1.2'/></tpm>`, ""),
			check: func(t *testing.T, d *Domain) {
				if d.TPM.StateSubdir() != "tpm1.2" {
					t.Errorf("subdir %s", d.TPM.StateSubdir())
				}
			}},
		{name: "external", xml: domXML(extTPM, ""), check: func(t *testing.T, d *Domain) {
			if d.TPM == nil || d.TPM.Backend != BackendExternal || d.TPM.SocketPath != "/run/vtpmd/vm1/ctrl.sock" {
				t.Errorf("got %+v", d.TPM)
			}
		}},
		{name: "policy", xml: domXML(emuTPM, policy), check: func(t *testing.T, d *Domain) {
			p := d.Policy
			if p == nil || p.Projection == nil || p.Projection.Mode != "summary" || *p.Projection.PCR != 23 || p.Keep() {
				t.Errorf("got %+v", p)
			}
			if !strings.Contains(p.XML, "projection") {
				t.Errorf("raw policy %q", p.XML)
			}
		}},
		{name: "policy prefix declared on root", xml: `<domain xmlns:v="https://vtpmd.dev/xmlns/policy/1"><name>a</name><uuid>` + testUUID +
			`</uuid><metadata><v:policy><v:state keep="yes"/></v:policy></metadata></domain>`,
			check: func(t *testing.T, d *Domain) {
				if d.Policy == nil || !d.Policy.Keep() || d.Policy.KeepState == nil {
					t.Errorf("got %+v", d.Policy)
				}
			}},
		{name: "policy as virsh metadata --set stores it", xml: domXML(emuTPM, `<vtpmd:policy xmlns:vtpmd="https://vtpmd.dev/xmlns/policy/1"><projection mode="property"/><state keep="no"/></vtpmd:policy>`),
			check: func(t *testing.T, d *Domain) {
				p := d.Policy
				if p == nil || p.Projection == nil || p.Projection.Mode != "property" || p.Projection.PCR != nil || p.Keep() {
					t.Errorf("got %+v", p)
				}
			}},
		{name: "policy default namespace", xml: domXML(emuTPM, `<policy xmlns="https://vtpmd.dev/xmlns/policy/1"><state keep="yes"/></policy>`),
			check: func(t *testing.T, d *Domain) {
				if d.Policy == nil || d.Policy.KeepState == nil || !*d.Policy.KeepState {
					t.Errorf("got %+v", d.Policy)
				}
			}},
		{name: "empty policy", xml: domXML(emuTPM, `<vtpmd:policy xmlns:vtpmd="https://vtpmd.dev/xmlns/policy/1"/>`),
			check: func(t *testing.T, d *Domain) {
				if d.Policy == nil || d.Policy.Projection != nil || !d.Policy.Keep() {
					t.Errorf("got %+v", d.Policy)
				}
			}},
		{name: "policy in other namespace ignored", xml: domXML(emuTPM, `<x:policy xmlns:x="urn:other"><x:bogus/></x:policy>`),
			check: func(t *testing.T, d *Domain) {
				if d.Policy != nil {
					t.Errorf("got %+v", d.Policy)
				}
			}},
		{name: "passthrough ignored", xml: domXML(`<tpm model='tpm-tis'><backend type='passthrough'><device path='/dev/tpm0'/></backend></tpm>`, ""),
			check: func(t *testing.T, d *Domain) {
				if d.TPM != nil || len(d.Unmanaged) != 1 || d.Unmanaged[0] != "passthrough" {
					t.Errorf("got %+v", d)
				}
			}},
		{name: "unknown backend ignored", xml: domXML(`<tpm><backend type='quantum'/></tpm>`, ""),
			check: func(t *testing.T, d *Domain) {
				if d.TPM != nil || len(d.Unmanaged) != 1 {
					t.Errorf("got %+v", d)
				}
			}},
		{name: "passthrough plus emulator", xml: domXML(`<tpm model='spapr-tpm-proxy'><backend type='passthrough'><device path='/dev/tpmrm0'/></backend></tpm>`+emuTPM, ""),
			check: func(t *testing.T, d *Domain) {
				if d.TPM == nil || d.TPM.Backend != BackendEmulator {
					t.Errorf("got %+v", d)
				}
			}},
		{name: "uuid upper case", xml: strings.Replace(domXML("", ""), testUUID, strings.ToUpper(testUUID), 1),
			check: func(t *testing.T, d *Domain) {
				if d.UUID != testUUID {
					t.Errorf("uuid %s", d.UUID)
				}
			}},
		{name: "several tpms", xml: domXML(emuTPM+extTPM, ""), wantErr: ErrMultipleTPMs},
		{name: "tpms in two devices elements", xml: strings.Replace(domXML(emuTPM, ""), "</devices>", "</devices><devices>"+extTPM+"</devices>", 1), wantErr: ErrMultipleTPMs},
		{name: "doctype", xml: `<?xml version="1.0"?><!DOCTYPE domain [<!ENTITY x "boom">]><domain><name>&x;</name></domain>`, wantErr: ErrUnsafeXML},
		{name: "external entity", xml: `<!DOCTYPE domain SYSTEM "file:///etc/passwd"><domain/>`, wantErr: ErrUnsafeXML},
		{name: "undefined entity", xml: `<domain><name>&xxe;</name><uuid>` + testUUID + `</uuid></domain>`, wantErr: ErrMalformed},
		{name: "too deep", xml: `<domain><name>a</name><uuid>` + testUUID + `</uuid><metadata>` + deep + `</metadata></domain>`, wantErr: ErrUnsafeXML},
		{name: "too large", xml: "<domain>" + strings.Repeat(" ", MaxXMLSize) + "</domain>", wantErr: ErrTooLarge},
		{name: "empty", xml: "", wantErr: ErrMalformed},
		{name: "garbage", xml: "\x00\x01\x02", wantErr: ErrMalformed},
		{name: "wrong root", xml: `<network><name>a</name></network>`, wantErr: ErrMalformed},
		{name: "two roots", xml: domXML("", "") + domXML("", ""), wantErr: ErrMalformed},
		{name: "unclosed", xml: `<domain><name>a</name>`, wantErr: ErrMalformed},
		{name: "mismatched tags", xml: `<domain><name>a</uuid></domain>`, wantErr: ErrMalformed},
		{name: "latin1 declaration", xml: `<?xml version="1.0" encoding="ISO-8859-1"?><domain/>`, wantErr: ErrMalformed},
		{name: "no name", xml: `<domain><uuid>` + testUUID + `</uuid></domain>`, wantErr: ErrInvalid},
		{name: "name with slash", xml: `<domain><name>../../etc</name><uuid>` + testUUID + `</uuid></domain>`, wantErr: ErrInvalid},
		{name: "bad uuid", xml: `<domain><name>a</name><uuid>../../../etc/passwd</uuid></domain>`, wantErr: ErrInvalid},
		{name: "uuid without dashes", xml: `<domain><name>a</name><uuid>5b1e7c3a11114c1e9d3b000000000001</uuid></domain>`, wantErr: ErrInvalid},
		{name: "external relative", xml: domXML(strings.Replace(extTPM, "/run/vtpmd/vm1/ctrl.sock", "vm1/ctrl.sock", 1), ""), wantErr: ErrBadPath},
		{name: "external dotdot", xml: domXML(strings.Replace(extTPM, "/run/vtpmd/vm1/ctrl.sock", "/run/vtpmd/../../etc/x", 1), ""), wantErr: ErrBadPath},
		{name: "external double slash", xml: domXML(strings.Replace(extTPM, "/run/vtpmd/vm1/ctrl.sock", "/run//vtpmd/x", 1), ""), wantErr: ErrBadPath},
		{name: "external empty path", xml: domXML(strings.Replace(extTPM, "/run/vtpmd/vm1/ctrl.sock", "", 1), ""), wantErr: ErrBadPath},
		{name: "external long path", xml: domXML(strings.Replace(extTPM, "/run/vtpmd/vm1/ctrl.sock", "/"+strings.Repeat("a", 120), 1), ""), wantErr: ErrBadPath},
		{name: "external tcp", xml: domXML(`<tpm><backend type='external'><source type='tcp' path='/x'/></backend></tpm>`, ""), wantErr: ErrInvalid},
		{name: "external no source", xml: domXML(`<tpm><backend type='external'/></tpm>`, ""), wantErr: ErrInvalid},
		{name: "external two sources", xml: domXML(`<tpm><backend type='external'><source type='unix' path='/a/b'/><source type='unix' path='/a/c'/></backend></tpm>`, ""), wantErr: ErrInvalid},
		{name: "two backends", xml: domXML(`<tpm><backend type='emulator'/><backend type='emulator'/></tpm>`, ""), wantErr: ErrInvalid},
		{name: "bad version", xml: domXML(`<tpm><backend type='emulator' version='3.0'/></tpm>`, ""), wantErr: ErrInvalid},
		{name: "bad persistent_state", xml: domXML(`<tpm><backend type='emulator' persistent_state='maybe'/></tpm>`, ""), wantErr: ErrInvalid},
		{name: "bad secret", xml: domXML(`<tpm><backend type='emulator'><encryption secret='../x'/></backend></tpm>`, ""), wantErr: ErrInvalid},
		{name: "bad bank", xml: domXML(`<tpm><backend type='emulator'><active_pcr_banks><md5/></active_pcr_banks></backend></tpm>`, ""), wantErr: ErrInvalid},
		{name: "policy unknown element", xml: domXML(emuTPM, `<vtpmd:policy xmlns:vtpmd="https://vtpmd.dev/xmlns/policy/1"><vtpmd:exfiltrate/></vtpmd:policy>`), wantErr: ErrBadPolicy},
		{name: "policy unknown attribute", xml: domXML(emuTPM, `<vtpmd:policy xmlns:vtpmd="https://vtpmd.dev/xmlns/policy/1"><vtpmd:state keep="no" path="/etc"/></vtpmd:policy>`), wantErr: ErrBadPolicy},
		{name: "policy bad mode", xml: domXML(emuTPM, `<vtpmd:policy xmlns:vtpmd="https://vtpmd.dev/xmlns/policy/1"><vtpmd:projection mode="all"/></vtpmd:policy>`), wantErr: ErrBadPolicy},
		{name: "policy bad pcr", xml: domXML(emuTPM, `<vtpmd:policy xmlns:vtpmd="https://vtpmd.dev/xmlns/policy/1"><vtpmd:projection mode="summary" pcr="24"/></vtpmd:policy>`), wantErr: ErrBadPolicy},
		{name: "policy summary without pcr", xml: domXML(emuTPM, `<vtpmd:policy xmlns:vtpmd="https://vtpmd.dev/xmlns/policy/1"><vtpmd:projection mode="summary"/></vtpmd:policy>`), wantErr: ErrBadPolicy},
		{name: "policy mirror with pcr", xml: domXML(emuTPM, `<vtpmd:policy xmlns:vtpmd="https://vtpmd.dev/xmlns/policy/1"><vtpmd:projection mode="mirror" pcr="1"/></vtpmd:policy>`), wantErr: ErrBadPolicy},
		{name: "policy bad keep", xml: domXML(emuTPM, `<vtpmd:policy xmlns:vtpmd="https://vtpmd.dev/xmlns/policy/1"><vtpmd:state keep="sometimes"/></vtpmd:policy>`), wantErr: ErrBadPolicy},
		{name: "policy child in foreign namespace", xml: domXML(emuTPM, `<vtpmd:policy xmlns:vtpmd="https://vtpmd.dev/xmlns/policy/1"><x:state xmlns:x="urn:x" keep="no"/></vtpmd:policy>`), wantErr: ErrBadPolicy},
		{name: "policy repeated element", xml: domXML(emuTPM, `<vtpmd:policy xmlns:vtpmd="https://vtpmd.dev/xmlns/policy/1"><state keep="no"/><vtpmd:state keep="yes"/></vtpmd:policy>`), wantErr: ErrBadPolicy},
		{name: "policy foreign attribute", xml: domXML(emuTPM, `<vtpmd:policy xmlns:vtpmd="https://vtpmd.dev/xmlns/policy/1"><state xmlns:x="urn:x" x:keep="no" keep="yes"/></vtpmd:policy>`), wantErr: ErrBadPolicy},
		{name: "two policies", xml: domXML(emuTPM, policy+policy), wantErr: ErrBadPolicy},
		{name: "two policies in two metadata", xml: strings.Replace(domXML(emuTPM, policy), "<devices>", "<metadata>"+policy+"</metadata><devices>", 1), wantErr: ErrBadPolicy},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d, err := ParseDomain([]byte(tt.xml))
			if tt.wantErr != nil {
				if !errors.Is(err, tt.wantErr) {
					t.Fatalf("err = %v, want %v", err, tt.wantErr)
				}
				if d != nil {
					t.Fatalf("domain returned with error")
				}
				return
			}
			if err != nil {
				t.Fatalf("unexpected error: %v", err)
			}
			if tt.check != nil {
				tt.check(t, d)
			}
		})
	}
}

func TestReadXMLBound(t *testing.T) {
	if _, err := ReadXML(bytes.NewReader(make([]byte, MaxXMLSize+1))); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("err = %v", err)
	}
	data, err := ReadXML(strings.NewReader("<domain/>"))
	if err != nil || string(data) != "<domain/>" {
		t.Fatalf("%q %v", data, err)
	}
}

// TestBillionLaughs makes sure entity expansion cannot even start.
func TestBillionLaughs(t *testing.T) {
	x := `<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">]>
<domain><name>&lol2;</name></domain>`
	if _, err := ParseDomain([]byte(x)); !errors.Is(err, ErrUnsafeXML) {
		t.Fatalf("err = %v", err)
	}
}

func TestCheckSyntax(t *testing.T) {
	good := []string{"/a", "/run/vtpmd/x.sock", "/a/b c/d"}
	bad := []string{"", "a", "./a", "/a/../b", "/a/./b", "/a/", "//a", "/", "/a\x00b", "/..", "/a/.."}
	for _, p := range good {
		if err := CheckSyntax(p); err != nil {
			t.Errorf("%q: %v", p, err)
		}
	}
	for _, p := range bad {
		if err := CheckSyntax(p); !errors.Is(err, ErrBadPath) {
			t.Errorf("%q: err = %v", p, err)
		}
	}
}
