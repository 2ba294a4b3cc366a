package main

import (
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// attestPCRs is the vTPM PCR selection a deep-attestation report binds (manager's vtpmPCRs).
const attestPCRs = "sha256:0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23"

// deepAttest is the "attest" mode: with the stock tpm2-tools of the initramfs only, the guest
// makes an EK and an AK, keeps the AK persistent at 0x81000003, and for each nonce of
// attest_nonce=HEX[,HEX...] writes the nonce to NV 0x01400002, reads the report from NV
// 0x01400001 and quotes its PCRs with the same nonce. It prints ak.pub and ek.pub once and
// report-N, quote-N and sig-N per nonce.
func deepAttest(args []string) {
	var nonces []string
	for _, a := range args {
		if v, ok := strings.CutPrefix(a, "attest_nonce="); ok {
			nonces = strings.Split(v, ",")
		}
	}
	dir, err := os.MkdirTemp("", "attest")
	if err != nil {
		say("attest_error", err)
		return
	}
	os.Setenv("TPM2TOOLS_TCTI", "device:/dev/tpmrm0")
	os.Setenv("PATH", "/usr/bin:/bin")
	f := func(name string) string { return filepath.Join(dir, name) }
	steps := [][]string{
		{"tpm2_createek", "-c", f("ek.ctx"), "-G", "rsa", "-u", f("ek.pub")},
		{"tpm2_createak", "-C", f("ek.ctx"), "-c", f("ak.ctx"), "-G", "rsa", "-g", "sha256", "-s", "rsassa", "-u", f("ak.pub"), "-n", f("ak.name")},
	}
	for _, s := range steps {
		if !tool(s...) {
			return
		}
	}
	// an AK left persistent by an earlier boot makes room for this one
	exec.Command("tpm2_evictcontrol", "-C", "o", "-c", "0x81000003").Run()
	if !tool("tpm2_evictcontrol", "-C", "o", "-c", f("ak.ctx"), "0x81000003") {
		return
	}
	for _, name := range []string{"ak.pub", "ek.pub"} {
		b, err := os.ReadFile(f(name))
		if err != nil {
			say("attest_error", err)
			return
		}
		blob(name, b)
	}
	for i, n := range nonces {
		nonce, err := hex.DecodeString(n)
		if err != nil || len(nonce) == 0 {
			say("attest_error", fmt.Sprintf("nonce %q: %v", n, err))
			return
		}
		nf := f(fmt.Sprintf("nonce-%d", i))
		os.WriteFile(nf, nonce, 0o600)
		rep, msg, sig := f(fmt.Sprintf("report-%d", i)), f(fmt.Sprintf("quote-%d", i)), f(fmt.Sprintf("sig-%d", i))
		if !tool("tpm2_nvwrite", "0x01400002", "-i", nf) ||
			!tool("tpm2_nvread", "-C", "o", "0x01400001", "-o", rep) ||
			!tool("tpm2_quote", "-c", "0x81000003", "-l", attestPCRs, "-q", n, "-g", "sha256", "-m", msg, "-s", sig) {
			return
		}
		for _, p := range []string{rep, msg, sig} {
			b, err := os.ReadFile(p)
			if err != nil {
				say("attest_error", err)
				return
			}
			blob(filepath.Base(p), b)
		}
	}
	// the report index is the host's: the guest can neither write nor delete it, nor read the
	// key index that keeps its write authorization
	for _, try := range []struct {
		key  string
		args []string
	}{
		{"attest_report_write_owner", []string{"tpm2_nvwrite", "-C", "o", "0x01400001", "-i", f("nonce-0")}},
		{"attest_report_write_index", []string{"tpm2_nvwrite", "0x01400001", "-i", f("nonce-0")}},
		{"attest_report_undefine_platform", []string{"tpm2_nvundefine", "-C", "p", "0x01400001"}},
		{"attest_report_undefine_owner", []string{"tpm2_nvundefine", "-C", "o", "0x01400001"}},
		{"attest_key_read_index", []string{"tpm2_nvread", "0x01400003", "-o", f("key")}},
		{"attest_key_read_owner", []string{"tpm2_nvread", "-C", "o", "0x01400003", "-o", f("key")}},
	} {
		if exec.Command(try.args[0], try.args[1:]...).Run() == nil {
			say(try.key, "allowed")
		} else {
			say(try.key, "refused")
		}
	}
	say("attest", "done")
}

// tool runs one tpm2-tools command, saying what failed.
func tool(args ...string) bool {
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		say("attest_error", fmt.Sprintf("%s: %v: %s", strings.Join(args, " "), err, strings.ReplaceAll(strings.TrimSpace(string(out)), "\n", " | ")))
		return false
	}
	return true
}
