package libvirt

import (
	"bytes"
	"context"
	"strings"
	"testing"

	"github.com/vtpmd/vtpmd/manager/registry"
)

func domainSeeds() []string {
	return []string{
		domXML("", ""),
		domXML(emuTPM, policy),
		domXML(extTPM, ""),
		domXML(`<serial type='file'><source path='/srv/A/s.log'/></serial>`+extTPM, ""),
		domXML(`<tpm model='tpm-crb'><backend type='emulator' version='2.0' persistent_state='yes'><encryption secret='6dd3e4a5-1d76-44ce-961f-f119f5aad935'/><active_pcr_banks><sha256/></active_pcr_banks></backend></tpm>`, ""),
		domXML(emuTPM+extTPM, ""),
		`<!DOCTYPE domain [<!ENTITY x "y">]><domain>&x;</domain>`,
		`<domain><name>a</name><uuid>` + testUUID + `</uuid><devices><tpm><backend type='external'><source type='unix' path='/a/../b'/></backend></tpm></devices></domain>`,
		`<domain xmlns:v="https://vtpmd.dev/xmlns/policy/1"><name>a</name><uuid>` + testUUID + `</uuid><metadata><v:policy><v:state keep="no"/></v:policy></metadata></domain>`,
		strings.Repeat("<domain>", 300),
		"",
	}
}

// FuzzParseDomain feeds arbitrary bytes to the XML entry point: it must never panic, and what
// it accepts must satisfy the promises the hook relies on.
func FuzzParseDomain(f *testing.F) {
	for _, s := range domainSeeds() {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		d, err := ParseDomain(data)
		if err != nil {
			if d != nil {
				t.Fatal("domain and error")
			}
			return
		}
		if !ValidUUID(d.UUID) || d.Name == "" || strings.ContainsAny(d.Name, "/\x00") {
			t.Fatalf("accepted bad identity %q %q", d.Name, d.UUID)
		}
		if d.TPM != nil && d.TPM.Backend == BackendExternal {
			if err := CheckSyntax(d.TPM.SocketPath); err != nil {
				t.Fatalf("accepted socket path %q: %v", d.TPM.SocketPath, err)
			}
		}
		out, changed, err := RewritePaths(data, []Rewrite{{From: "/srv/A", To: "/srv/B&'\""}})
		if err != nil {
			t.Fatalf("rewrite of accepted XML failed: %v", err)
		}
		if changed {
			if _, err := ParseDomain(out); err != nil {
				t.Fatalf("rewritten XML does not parse: %v", err)
			}
		} else if !bytes.Equal(out, data) {
			t.Fatal("unchanged output differs")
		}
	})
}

// FuzzHookXML runs the hook's migrate filter (no processes are started) on arbitrary XML.
func FuzzHookXML(f *testing.F) {
	for _, s := range domainSeeds() {
		f.Add([]byte(s), "migrate")
		f.Add([]byte(s), "stopped")
	}
	dir := f.TempDir()
	cfg := &Config{StateRoot: dir + "/st", SocketRoots: []string{"/srv"}, Rewrites: []Rewrite{{From: "/srv/A", To: "/srv/B"}}}
	if err := cfg.Validate(); err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, data []byte, op string) {
		if op != OpMigrate && op != OpRestore && op != OpStopped && op != OpAttach {
			return // the other operations start and stop processes
		}
		var out, errb bytes.Buffer
		h := &Hook{Config: cfg, Registry: registry.New(cfg.RegistryDir), Exe: "/nonexistent", Stdout: &out, Stderr: &errb}
		err := h.Run(context.Background(), []string{"vm1", op, "begin", "-"}, bytes.NewReader(data))
		if err != nil && out.Len() > 0 {
			t.Fatal("output despite error")
		}
		if out.Len() > 0 {
			if _, err := ParseDomain(out.Bytes()); err != nil {
				t.Fatalf("filter printed unparsable XML: %v", err)
			}
		}
	})
}
