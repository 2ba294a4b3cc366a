package main

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/vtpmd/vtpmd/internal/tpmclient"
)

// projectionChecks runs the host PCR projection modes:
//
//	projpcr=N  print PCR N (SHA-256) as proj_pcr, then try to extend it: proj_extend is
//	           "locality" when the vTPM answers TPM_RC_LOCALITY, "ok" or the error otherwise
//	projlog    read the guest-visible projection log from NV 0x01400010, 0x01400011, ...
//	           with stock tpm2_nvread -C o, and print it as the blob "projlog"; when the owner
//	           hierarchy is disabled (SeaBIOS disables it when one of its extends is refused)
//	           with the index's own (empty) auth instead: proj_log_auth says which;
//	           proj_eventlog says whether stock tpm2_eventlog parses it
func projectionChecks(tp transport.TPM, modes []string) {
	for _, m := range modes {
		if v, ok := strings.CutPrefix(m, "projpcr="); ok {
			n, err := strconv.Atoi(v)
			if err != nil || n < 0 || n > 23 {
				say("proj_error", "bad projpcr")
				continue
			}
			val, err := tpmclient.PCRRead(tp, uint(n))
			if err != nil {
				say("proj_error", err)
				continue
			}
			say("proj_pcr", fmt.Sprintf("%X", val))
			err = tpmclient.PCRExtend(tp, uint32(n), bytes.Repeat([]byte("P"), 32))
			switch {
			case err == nil:
				say("proj_extend", "ok")
			case errors.Is(err, tpm2.TPMRCLocality):
				say("proj_extend", "locality")
			default:
				say("proj_extend", err)
			}
		}
		if m == "projlog" {
			projectionLog()
		}
	}
}

// projectionLog concatenates the log's indices as stock tools read them.
func projectionLog() {
	os.Setenv("TPM2TOOLS_TCTI", "device:/dev/tpmrm0")
	os.Setenv("PATH", "/usr/bin:/bin")
	dir, err := os.MkdirTemp("", "projlog")
	if err != nil {
		say("proj_error", err)
		return
	}
	var log []byte
	byIndex := false
	for i := range 16 {
		idx := fmt.Sprintf("0x%08x", 0x01400010+i)
		out := filepath.Join(dir, idx)
		auth := "o"
		if byIndex {
			auth = idx
		}
		o, err := exec.Command("tpm2_nvread", "-C", auth, "-o", out, idx).CombinedOutput()
		if err != nil && i == 0 && strings.Contains(string(o), "hierarchy is not enabled") {
			byIndex, auth = true, idx
			o, err = exec.Command("tpm2_nvread", "-C", auth, "-o", out, idx).CombinedOutput()
		}
		if err != nil {
			if i == 0 {
				say("proj_error", fmt.Sprintf("tpm2_nvread -C %s %s: %v: %s", auth, idx, err, strings.TrimSpace(string(o))))
				return
			}
			break
		}
		b, err := os.ReadFile(out)
		if err != nil {
			say("proj_error", err)
			return
		}
		log = append(log, b...)
	}
	say("proj_log_auth", map[bool]string{false: "owner", true: "index"}[byIndex])
	// stock tpm2_eventlog parses it too
	all := filepath.Join(dir, "projection.log")
	if err := os.WriteFile(all, log, 0o600); err == nil {
		if o, err := exec.Command("tpm2_eventlog", all).CombinedOutput(); err != nil {
			say("proj_eventlog", fmt.Sprintf("%v: %s", err, strings.ReplaceAll(strings.TrimSpace(string(o)), "\n", " | ")))
		} else {
			say("proj_eventlog", "ok")
		}
	}
	say("proj_log_bytes", len(log))
	blob("projlog", log)
}
