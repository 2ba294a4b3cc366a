package qemu

import (
	"fmt"
	"path/filepath"
	"strings"
)

// Device names QEMU knows for a TPM front end.
const (
	ModelCRB       = "tpm-crb"        // x86 q35 (TPM 2 only)
	ModelTIS       = "tpm-tis"        // x86 ISA bus: pc (i440fx), and q35 for a TPM 1.2
	ModelTISDevice = "tpm-tis-device" // Arm virt (sysbus)
	ModelSPAPR     = "tpm-spapr"      // POWER pseries
)

// QEMU object ids of what Run adds; chosen not to clash with a user's.
const (
	chardevID = "vtpmd-run-chr"
	tpmdevID  = "vtpmd-run-tpm"
)

// option returns the values of a QEMU option in args, in order: "-name V" and "--name V".
func option(args []string, name string) []string {
	var vals []string
	for i := 0; i < len(args); i++ {
		a := args[i]
		if (a == "-"+name || a == "--"+name) && i+1 < len(args) {
			vals = append(vals, args[i+1])
			i++
		}
	}
	return vals
}

// splitOpts splits a QEMU option string at commas, with ",," standing for a comma.
func splitOpts(s string) []string {
	var parts []string
	var cur strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == ',' {
			if i+1 < len(s) && s[i+1] == ',' {
				cur.WriteByte(',')
				i++
				continue
			}
			parts = append(parts, cur.String())
			cur.Reset()
			continue
		}
		cur.WriteByte(s[i])
	}
	return append(parts, cur.String())
}

// machineType is the machine type args select (-machine/-M, the last type given wins), ""
// when none is given (QEMU's default: pc on x86).
func machineType(args []string) string {
	var typ string
	for i := 0; i < len(args); i++ {
		a := args[i]
		if a != "-machine" && a != "--machine" && a != "-M" || i+1 >= len(args) {
			continue
		}
		i++
		for j, p := range splitOpts(args[i]) {
			if v, ok := strings.CutPrefix(p, "type="); ok {
				typ = v
			} else if j == 0 && !strings.Contains(p, "=") && p != "" {
				typ = p
			}
		}
	}
	return typ
}

// isQ35 reports whether a machine type is a q35 one (q35, pc-q35-X.Y).
func isQ35(typ string) bool { return typ == "q35" || strings.HasPrefix(typ, "pc-q35-") }

// hasTPM reports whether args already give QEMU a TPM: a -tpmdev, or a -device whose driver
// is a TPM front end.
func hasTPM(args []string) bool {
	if len(option(args, "tpmdev")) > 0 {
		return true
	}
	for _, d := range option(args, "device") {
		parts := splitOpts(d)
		drv := parts[0]
		for _, p := range parts {
			if v, ok := strings.CutPrefix(p, "driver="); ok {
				drv = v
			}
		}
		if strings.HasPrefix(drv, "tpm-") {
			return true
		}
	}
	return false
}

// chooseModel is the TPM device for QEMU's command line: model when given, else by the
// QEMU binary's target and machine: tpm-tis-device on Arm, tpm-spapr on POWER, tpm-crb on
// an x86 q35 machine with a TPM 2, tpm-tis otherwise.
func chooseModel(qemu []string, tpm2 bool, model string) string {
	if model != "" {
		return model
	}
	base := filepath.Base(qemu[0])
	switch {
	case strings.Contains(base, "aarch64") || strings.HasSuffix(base, "-arm"):
		return ModelTISDevice
	case strings.Contains(base, "ppc64"):
		return ModelSPAPR
	case tpm2 && isQ35(machineType(qemu[1:])):
		return ModelCRB
	}
	return ModelTIS
}

// tpmArgs are the arguments that connect QEMU to the vTPM's control socket.
func tpmArgs(sock, model string) []string {
	return []string{
		"-chardev", fmt.Sprintf("socket,id=%s,path=%s", chardevID, sock),
		"-tpmdev", fmt.Sprintf("emulator,id=%s,chardev=%s", tpmdevID, chardevID),
		"-device", fmt.Sprintf("%s,tpmdev=%s", model, tpmdevID),
	}
}
