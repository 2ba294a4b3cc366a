package opts

import (
	"errors"
	"testing"
)

func TestParse(t *testing.T) {
	tests := []struct {
		in      string
		allowed []string
		want    map[string]string
		err     bool
	}{
		{"type=unixio,path=/run/x.sock,mode=0600", []string{"type", "path", "mode"}, map[string]string{"type": "unixio", "path": "/run/x.sock", "mode": "0600"}, false},
		{"not-need-init,startup-clear", []string{"not-need-init", "startup-clear"}, map[string]string{"not-need-init": "true", "startup-clear": "true"}, false},
		{"dir=/a,dir=/b", []string{"dir"}, map[string]string{"dir": "/a"}, false},
		{"profile={\"Name\":\"a,b\"},name=x", []string{"profile", "name"}, map[string]string{"profile": `{"Name":"a,b"}`, "name": "x"}, false},
		{"dir=/x,bogus=1", []string{"dir"}, nil, true},
		{"profile={\"a\":1", []string{"profile"}, nil, true},
		{",,dir=/x,", []string{"dir"}, map[string]string{"dir": "/x"}, false},
		{"path=a=b", []string{"path"}, map[string]string{"path": "a=b"}, false},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			s, err := Parse(tt.in, tt.allowed...)
			if tt.err {
				if err == nil {
					t.Fatalf("Parse(%q) accepted", tt.in)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if len(s.Keys()) != len(tt.want) {
				t.Fatalf("keys %v, want %v", s.Keys(), tt.want)
			}
			for k, v := range tt.want {
				if got := s.String(k, "<none>"); got != v {
					t.Errorf("%s = %q, want %q", k, got, v)
				}
			}
		})
	}
	if _, err := Parse("zz", "a"); !errors.Is(err, ErrUnknown) {
		t.Fatalf("unknown: %v", err)
	}
}

func TestTyped(t *testing.T) {
	s, err := Parse("a=TRUE,b=no,c=1,m=0640,bad=0999,n=-3,u=0,g=root", "a", "b", "c", "m", "bad", "n", "u", "g")
	if err != nil {
		t.Fatal(err)
	}
	if !s.Bool("a", false) || s.Bool("b", true) || !s.Bool("c", false) || s.Bool("zz", false) {
		t.Error("bool parsing")
	}
	if m, err := s.Mode("m", 0); err != nil || m != 0o640 {
		t.Errorf("mode = %o %v", m, err)
	}
	if _, err := s.Mode("bad", 0); err == nil {
		t.Error("mode 0999 accepted")
	}
	if n, err := s.Int("n", 0); err != nil || n != -3 {
		t.Errorf("int = %d %v", n, err)
	}
	if _, err := s.Uint("n", 0); err == nil {
		t.Error("uint -3 accepted")
	}
	if u, err := s.UID("u"); err != nil || u != 0 {
		t.Errorf("uid = %d %v", u, err)
	}
	if g, err := s.GID("g"); err != nil || g != 0 {
		t.Errorf("gid = %d %v", g, err)
	}
	if u, _ := s.UID("absent"); u != -1 {
		t.Error("absent uid")
	}
}

func FuzzParse(f *testing.F) {
	for _, s := range []string{"type=unixio,path=/x,mode=0600", "a,b,c", "profile={\"x\":{\"y\":\"}\"}},a=1", "=,=", "{"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		set, err := Parse(s, "type", "path", "mode", "a", "b", "c", "profile")
		if err != nil {
			return
		}
		// property: re-parsing the first-wins view gives the same values.
		for _, k := range set.Keys() {
			if !set.Has(k) {
				t.Fatalf("key %q listed but absent", k)
			}
		}
	})
}
