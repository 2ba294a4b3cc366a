package hwtpm

import (
	"errors"
	"strings"
	"testing"
)

func TestParseSpec(t *testing.T) {
	long := "/" + strings.Repeat("x", maxUnixPath)
	tests := []struct {
		in   string
		want Spec
		err  string // a part of the error; "" for none
	}{
		{"", Spec{Kind: KindDevice, Path: "/dev/tpmrm0"}, ""},
		{"device", Spec{Kind: KindDevice, Path: "/dev/tpmrm0"}, ""},
		{"device:", Spec{Kind: KindDevice, Path: "/dev/tpmrm0"}, ""},
		{"device:/dev/tpm0", Spec{Kind: KindDevice, Path: "/dev/tpm0"}, ""},
		{"/dev/tpmrm0", Spec{Kind: KindDevice, Path: "/dev/tpmrm0"}, ""},
		{"/odd:path,with=chars", Spec{Kind: KindDevice, Path: "/odd:path,with=chars"}, ""},
		{"swtpm:path=/run/vtpm/tpm.sock", Spec{Kind: KindSwtpm, Path: "/run/vtpm/tpm.sock"}, ""},
		{"swtpm", Spec{Kind: KindSwtpm, Host: "localhost", Port: 2321}, ""},
		{"swtpm:", Spec{Kind: KindSwtpm, Host: "localhost", Port: 2321}, ""},
		{"swtpm:host=10.0.0.1", Spec{Kind: KindSwtpm, Host: "10.0.0.1", Port: 2321}, ""},
		{"swtpm:port=2400,host=tpm.example", Spec{Kind: KindSwtpm, Host: "tpm.example", Port: 2400}, ""},
		{"mssim", Spec{Kind: KindMssim, Host: "localhost", Port: 2321}, ""},
		{"mssim:host=::1,port=2321", Spec{Kind: KindMssim, Host: "::1", Port: 2321}, ""},
		{"mssim:host=[::1],port=1", Spec{Kind: KindMssim, Host: "::1", Port: 1}, ""},
		{"mssim:port=65534", Spec{Kind: KindMssim, Host: "localhost", Port: 65534}, ""},

		{"device:dev/tpm0", Spec{}, "must be absolute"},
		{"dev/tpm0", Spec{}, "must be absolute"},
		{"./tpm", Spec{}, "must be absolute"},
		{":/dev/tpm0", Spec{}, "no TPM interface"},
		{"tabrmd", Spec{}, "not supported"},
		{"tabrmd:bus_type=system", Spec{}, "not supported"},
		{"libtpms", Spec{}, "unknown TPM interface"},
		{"Device:/dev/tpm0", Spec{}, "unknown TPM interface"},
		{"swtpm:path=relative.sock", Spec{}, "must be absolute"},
		{"swtpm:path=" + long, Spec{}, "unix sockets allow"},
		{"swtpm:path=/a,host=b", Spec{}, "excludes"},
		{"swtpm:path=/a,path=/b", Spec{}, "given twice"},
		{"swtpm:path=", Spec{}, "is empty"},
		{"swtpm:path", Spec{}, "not key=value"},
		{"swtpm:path=/a,", Spec{}, "not key=value"},
		{"swtpm:sock=/a", Spec{}, "unknown option"},
		{"swtpm:port=0", Spec{}, "not a port number"},
		{"swtpm:port=65536", Spec{}, "not a port number"},
		{"swtpm:port=-1", Spec{}, "not a port number"},
		{"swtpm:port=23x", Spec{}, "not a port number"},
		{"swtpm:host=a b", Spec{}, "not a host"},
		{"swtpm:host=[]", Spec{}, "not a host"},
		{"mssim:path=/a", Spec{}, "has no path="},
		{"mssim:port=65535", Spec{}, "from 1 to 65534"},
		{"device:/dev/tpm\x000", Spec{}, "NUL"},
	}
	for _, tt := range tests {
		got, err := ParseSpec(tt.in)
		switch {
		case tt.err == "" && err != nil:
			t.Errorf("ParseSpec(%q): %v", tt.in, err)
		case tt.err == "" && got != tt.want:
			t.Errorf("ParseSpec(%q) = %+v, want %+v", tt.in, got, tt.want)
		case tt.err != "" && (err == nil || !strings.Contains(err.Error(), tt.err) || !errors.Is(err, ErrBadSpec)):
			t.Errorf("ParseSpec(%q) = %+v, %v; want an ErrBadSpec with %q", tt.in, got, err, tt.err)
		case tt.err == "":
			if back, err := ParseSpec(got.String()); err != nil || back != got {
				t.Errorf("ParseSpec(%q).String() = %q, which parses to %+v, %v", tt.in, got.String(), back, err)
			}
		}
	}
}

// FuzzParseSpec: ParseSpec never panics, and what it accepts it spells back the same.
func FuzzParseSpec(f *testing.F) {
	for _, s := range []string{"", "device:/dev/tpm0", "/dev/tpmrm0", "swtpm:path=/s", "swtpm:host=h,port=1", "mssim:host=[::1],port=2321", "tabrmd"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		spec, err := ParseSpec(s)
		if err != nil {
			if !errors.Is(err, ErrBadSpec) {
				t.Fatalf("ParseSpec(%q): %v does not wrap ErrBadSpec", s, err)
			}
			return
		}
		back, err := ParseSpec(spec.String())
		if err != nil || back != spec {
			t.Fatalf("ParseSpec(%q) = %+v spelled %q, which parses to %+v, %v", s, spec, spec.String(), back, err)
		}
	})
}
