package libvirt

import (
	"errors"
	"strings"
	"testing"
)

func TestRewritePaths(t *testing.T) {
	rules := []Rewrite{{From: "/srv/A", To: "/srv/B"}, {From: "/var/log/a.log", To: "/var/log/b.log"}}
	tests := []struct {
		name, in, want string
		changed        bool
	}{
		{"external socket", domXML(`<tpm model='tpm-crb'><backend type='external'><source type='unix' mode='connect' path='/srv/A/ctrl.sock'/></backend></tpm>`, ""),
			domXML(`<tpm model='tpm-crb'><backend type='external'><source type='unix' mode='connect' path='/srv/B/ctrl.sock'/></backend></tpm>`, ""), true},
		{"double quotes and spaces kept", domXML(`<serial type="file"><source  path = "/srv/A/s.log" append="on" /></serial>`, ""),
			domXML(`<serial type="file"><source  path = "/srv/B/s.log" append="on" /></serial>`, ""), true},
		{"exact match", domXML(`<serial type='file'><source path='/var/log/a.log'/></serial>`, ""),
			domXML(`<serial type='file'><source path='/var/log/b.log'/></serial>`, ""), true},
		{"prefix must end at separator", domXML(`<serial type='file'><source path='/srv/AB/s.log'/></serial>`, ""), "", false},
		{"outside devices untouched", strings.Replace(domXML("", ""), "<metadata>", "<metadata><source path='/srv/A/x'/>", 1), "", false},
		{"other attribute untouched", domXML(`<disk><source file='/srv/A/disk.img'/></disk>`, ""), "", false},
		{"entity in value", domXML(`<serial><source path='/srv/A/a&amp;b'/></serial>`, ""),
			domXML(`<serial><source path='/srv/B/a&amp;b'/></serial>`, ""), true},
		{"several", domXML(`<serial><source path='/srv/A/1'/></serial><console><source path='/srv/A/2'></source></console>`, ""),
			domXML(`<serial><source path='/srv/B/1'/></serial><console><source path='/srv/B/2'></source></console>`, ""), true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := ParseDomain([]byte(tt.in)); err != nil {
				t.Fatalf("input does not parse: %v", err)
			}
			out, changed, err := RewritePaths([]byte(tt.in), rules)
			if err != nil {
				t.Fatal(err)
			}
			if changed != tt.changed {
				t.Fatalf("changed = %v", changed)
			}
			want := tt.want
			if !tt.changed {
				want = tt.in
			}
			if string(out) != want {
				t.Fatalf("got\n%s\nwant\n%s", out, want)
			}
		})
	}
}

func TestRewriteEscapes(t *testing.T) {
	in := domXML(`<serial><source path='/srv/A/x'/></serial>`, "")
	out, changed, err := RewritePaths([]byte(in), []Rewrite{{From: "/srv/A", To: `/srv/it's "B" & <c>`}})
	if err != nil || !changed {
		t.Fatal(err, changed)
	}
	d, err := ParseDomain(out)
	if err != nil {
		t.Fatalf("rewritten XML does not parse: %v\n%s", err, out)
	}
	_ = d
	if !strings.Contains(string(out), `/srv/it&apos;s &quot;B&quot; &amp; &lt;c&gt;/x`) {
		t.Fatalf("got %s", out)
	}
}

func TestRewriteCheck(t *testing.T) {
	for _, r := range []Rewrite{{From: "", To: "/a"}, {From: "/a", To: "b"}, {From: "/a/../b", To: "/c"}} {
		if err := r.Check(); !errors.Is(err, ErrBadPath) {
			t.Errorf("%+v: %v", r, err)
		}
	}
}

func TestFindAttrValue(t *testing.T) {
	tag := []byte(`<source type='unix' xpath="/no" path = '/yes' />`)
	s, e, err := findAttrValue(tag, "path")
	if err != nil || string(tag[s:e]) != "/yes" {
		t.Fatalf("%q %v", tag[s:e], err)
	}
	for _, bad := range []string{`source path='x'`, `<source path=x>`, `<source path='x>`, `<source path>`, `<source a='1'>`} {
		if _, _, err := findAttrValue([]byte(bad), "path"); err == nil {
			t.Errorf("%s: no error", bad)
		}
	}
}
