package qemu

import (
	"slices"
	"strings"
	"testing"
)

func TestMachineAndModel(t *testing.T) {
	tests := []struct {
		argv    string
		tpm2    bool
		machine string
		model   string
	}{
		{"qemu-system-x86_64 -m 512", true, "", ModelTIS},
		{"qemu-system-x86_64 -machine q35,accel=kvm", true, "q35", ModelCRB},
		{"qemu-system-x86_64 -machine q35,accel=kvm", false, "q35", ModelTIS},
		{"qemu-system-x86_64 -M pc-q35-8.2", true, "pc-q35-8.2", ModelCRB},
		{"qemu-system-x86_64 --machine type=q35,smm=on", true, "q35", ModelCRB},
		{"qemu-system-x86_64 -machine accel=tcg -machine q35", true, "q35", ModelCRB},
		{"qemu-system-x86_64 -machine q35 -machine accel=tcg", true, "q35", ModelCRB},
		{"qemu-system-x86_64 -machine pc-i440fx-8.2", true, "pc-i440fx-8.2", ModelTIS},
		{"/usr/bin/qemu-system-aarch64 -M virt", true, "virt", ModelTISDevice},
		{"qemu-system-ppc64 -M pseries", true, "pseries", ModelSPAPR},
		{"qemu-system-x86_64 -machine", true, "", ModelTIS},
	}
	for _, tt := range tests {
		argv := strings.Fields(tt.argv)
		if got := machineType(argv[1:]); got != tt.machine {
			t.Errorf("%q: machine %q, want %q", tt.argv, got, tt.machine)
		}
		if got := chooseModel(argv, tt.tpm2, ""); got != tt.model {
			t.Errorf("%q (tpm2 %v): model %q, want %q", tt.argv, tt.tpm2, got, tt.model)
		}
		if got := chooseModel(argv, tt.tpm2, "tpm-tis"); got != "tpm-tis" {
			t.Errorf("%q: a given model is not kept: %q", tt.argv, got)
		}
	}
}

func TestHasTPM(t *testing.T) {
	tests := []struct {
		args string
		want bool
	}{
		{"-m 512 -device virtio-net-pci", false},
		{"-tpmdev emulator,id=tpm0,chardev=c", true},
		{"--tpmdev passthrough,id=tpm0", true},
		{"-device tpm-crb,tpmdev=tpm0", true},
		{"-device driver=tpm-tis,tpmdev=tpm0", true},
		{"-append tpm-tis -device e1000", false},
	}
	for _, tt := range tests {
		if got := hasTPM(strings.Fields(tt.args)); got != tt.want {
			t.Errorf("%q: %v", tt.args, got)
		}
	}
}

func TestSplitOpts(t *testing.T) {
	if got := splitOpts("socket,id=a,,b,path=/x"); !slices.Equal(got, []string{"socket", "id=a,b", "path=/x"}) {
		t.Fatalf("%q", got)
	}
	if got := splitOpts(""); !slices.Equal(got, []string{""}) {
		t.Fatalf("%q", got)
	}
}

func TestTPMArgs(t *testing.T) {
	got := strings.Join(tpmArgs("/tmp/r/ctrl.sock", ModelCRB), " ")
	want := "-chardev socket,id=vtpmd-run-chr,path=/tmp/r/ctrl.sock -tpmdev emulator,id=vtpmd-run-tpm,chardev=vtpmd-run-chr -device tpm-crb,tpmdev=vtpmd-run-tpm"
	if got != want {
		t.Fatalf("%s\nwant %s", got, want)
	}
}

func TestConfigCheck(t *testing.T) {
	bad := map[string]Config{
		"no qemu":       {},
		"has tpm":       {QEMU: []string{"qemu", "-tpmdev", "emulator,id=x"}},
		"crb for 1.2":   {QEMU: []string{"qemu"}, Model: ModelCRB},
		"odd model":     {QEMU: []string{"qemu"}, TPM2: true, Model: "e1000"},
		"model options": {QEMU: []string{"qemu"}, TPM2: true, Model: "tpm-tis,x=y"},
		"comma state":   {QEMU: []string{"qemu"}, TPM2: true, StateDir: "/a,b"},
		"comma tmp":     {QEMU: []string{"qemu"}, TPM2: true, TempDir: "/a,b"},
		"bank":          {QEMU: []string{"qemu"}, TPM2: true, PCRBanks: []string{"sha256,sha1"}},
	}
	for name, c := range bad {
		if err := c.check(); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	c := Config{QEMU: []string{"qemu"}, StateDir: "rel"}
	if err := c.check(); err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(c.StateDir, "/") || c.Vtpmd == "" || c.Grace != DefaultGrace || !slices.Equal(c.PCRBanks, DefaultPCRBanks) {
		t.Fatalf("defaults: %+v", c)
	}
}
