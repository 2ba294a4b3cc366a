package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// swtpmSetupRef is Debian's swtpm_setup; it drives Debian's swtpm (never a swtpm on PATH, which
// may be a link to vtpmd) and its swtpm_localca.
const swtpmSetupRef = "/usr/bin/swtpm_setup"

// setupTool is one way to manufacture a vTPM, with its own local CA (created by a warm-up run,
// so the timed runs measure manufacturing, as on a host whose CA exists).
type setupTool struct {
	name string
	argv []string // program and leading arguments
	conf string   // swtpm_setup.conf
}

func (r *run) setupTools() ([]setupTool, error) {
	var tools []setupTool
	for _, t := range []struct {
		name string
		argv []string
	}{
		{"vtpmd", []string{r.impls[0].bin, "setup"}},
		{"swtpm", []string{swtpmSetupRef, "--tpm", r.impls[1].bin + " socket"}},
	} {
		ca := filepath.Join(r.work, "ca-"+t.name)
		if err := os.MkdirAll(ca, 0o700); err != nil {
			return nil, err
		}
		caConf := filepath.Join(ca, "swtpm-localca.conf")
		if err := os.WriteFile(caConf, []byte(fmt.Sprintf("statedir = %[1]s\nsigningkey = %[1]s/signkey.pem\nissuercert = %[1]s/issuercert.pem\ncertserial = %[1]s/certserial\n", ca)), 0o600); err != nil {
			return nil, err
		}
		conf := filepath.Join(ca, "swtpm_setup.conf")
		if err := os.WriteFile(conf, []byte("create_certs_tool = /usr/bin/swtpm_localca\ncreate_certs_tool_config = "+caConf+
			"\ncreate_certs_tool_options = /etc/swtpm-localca.options\nactive_pcr_banks = sha256\n"), 0o600); err != nil {
			return nil, err
		}
		tools = append(tools, setupTool{name: t.name, argv: t.argv, conf: conf})
	}
	return tools, nil
}

// setupCases are the invocations timed: libvirt's first start (RSA 2048 and ECC P-384 EKs with
// certificates, platform certificate, locked NV), the same with an RSA 3072 EK, and an ECC
// storage key on top.
var setupCases = []struct {
	name string
	args []string
}{
	{"libvirt first start (RSA 2048 + ECC P-384 EKs, certs, platform cert)", []string{"--createek", "--create-ek-cert", "--create-platform-cert", "--lock-nvram", "--not-overwrite"}},
	{"same with --rsa-keysize 3072", []string{"--createek", "--create-ek-cert", "--create-platform-cert", "--lock-nvram", "--rsa-keysize", "3072"}},
	{"same with --create-spk --ecc", []string{"--createek", "--create-ek-cert", "--create-platform-cert", "--lock-nvram", "--create-spk", "--ecc"}},
}

func (r *run) setupOnce(t setupTool, args []string) error {
	r.seq++
	state := filepath.Join(r.work, fmt.Sprintf("setup-%s-%d", t.name, r.seq))
	if err := os.MkdirAll(state, 0o700); err != nil {
		return err
	}
	defer os.RemoveAll(state)
	all := append(append(append([]string{}, t.argv[1:]...), "--config", t.conf, "--tpm2", "--tpm-state", state,
		"--vmid", "bench:00000000-0000-0000-0000-000000000001", "--logfile", filepath.Join(r.work, "setup-"+t.name+".log")), args...)
	cmd := exec.Command(t.argv[0], all...)
	// a host manager on the default socket must not take part (vtpmd setup would use it)
	cmd.Env = append(os.Environ(), "VTPMD_MANAGER=none")
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s: %v\n%s", strings.Join(t.argv, " "), err, out)
	}
	if _, err := os.Stat(filepath.Join(state, "tpm2-00.permall")); err != nil {
		return fmt.Errorf("%s made no state: %w", t.name, err)
	}
	return nil
}

// setup times vtpmd setup against swtpm_setup for the invocations above.
func (r *run) setup() (string, error) {
	tools, err := r.setupTools()
	if err != nil {
		return "", err
	}
	for _, t := range tools { // warm-up: creates each tool's CA
		if err := r.setupOnce(t, setupCases[0].args); err != nil {
			return "", err
		}
	}
	var b strings.Builder
	n := max(5, r.iters/20)
	fmt.Fprintf(&b, "\n## Manufacturing a vTPM: `vtpmd setup` vs Debian's `swtpm_setup` (median of %d runs each, local CA already created)\n\n"+
		"| invocation (`--tpm2 --tpm-state D --vmid N:U --logfile L` plus) | vtpmd setup | swtpm_setup | ratio |\n|---|---|---|---|\n", n)
	for _, c := range setupCases {
		fns := map[string]func() error{}
		for _, t := range tools {
			fns[t.name] = func() error { return r.setupOnce(t, c.args) }
		}
		vals, err := measureInterleaved(n, fns)
		if err != nil {
			return "", fmt.Errorf("setup %s: %w", c.name, err)
		}
		v, s := vals["vtpmd"], vals["swtpm"]
		fmt.Fprintf(&b, "| %s | %s | %s | %.2f |\n", c.name, fmtDur(v.median), fmtDur(s.median), float64(v.median)/float64(s.median))
		if c.name == setupCases[0].name {
			r.summarize("vtpmd setup vs swtpm_setup (libvirt first start)", fmtDur(v.median), fmtDur(s.median), float64(v.median)/float64(s.median))
		}
	}
	return b.String(), nil
}
