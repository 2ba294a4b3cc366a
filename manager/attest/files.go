package attest

import (
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/vtpmd/vtpmd/manager/hwtpm"
)

// Files names the inputs of `vtpmd attest verify`, one file each ("" when not given).
type Files struct {
	Quote, Signature, AKPublic string
	Report                     string
	// Nonce is the nonce in hex; NonceFile a file holding it raw.
	Nonce, NonceFile         string
	HostAKCert, HostAKPublic string
	TrustAnchors             string
	EventLog                 string
	// HostIdentity is a directory as `vtpmd manager identity --out` writes it: the host AK
	// (ak.pub, and ak.pem with ak-chain.pem when the operator certified it), the host CA
	// (ca.pub, ca-certify.attest/.sig, ca-root.pem, ca.pem, ca-chain.pem).
	HostIdentity string
	// EKCert is the vTPM's EK certificate; HostAKCertify the JSON quote of `vtpmd manager
	// certify-vtpm-ak` over the guest's AK.
	EKCert, HostAKCertify string
	ExpectEK              string
	ExpectVM              string
	JSON                  bool
}

// maxInput bounds every input file (an event log is the largest).
const maxInput = 16 << 20

// VerifyFiles reads the inputs, verifies them (Verify) and writes what is proven to out.
func VerifyFiles(f Files, out io.Writer) error {
	var ev Evidence
	var err error
	read := func(what, path string, dst *[]byte) {
		if err != nil || path == "" {
			return
		}
		*dst, err = readInput(what, path)
	}
	read("--quote", f.Quote, &ev.Quote)
	read("--signature", f.Signature, &ev.QuoteSignature)
	read("--ak", f.AKPublic, &ev.AKPublic)
	read("--report", f.Report, &ev.Report)
	read("--nonce-file", f.NonceFile, &ev.Nonce)
	read("--host-ak-cert", f.HostAKCert, &ev.HostAKCert)
	read("--host-ak", f.HostAKPublic, &ev.HostAKPublic)
	read("--ca", f.TrustAnchors, &ev.TrustAnchors)
	read("--eventlog", f.EventLog, &ev.EventLog)
	read("--ek", f.ExpectEK, &ev.ExpectEK)
	read("--ek-cert", f.EKCert, &ev.EKCert)
	if err != nil {
		return err
	}
	if f.HostIdentity != "" {
		if err := readIdentityDir(f.HostIdentity, &ev); err != nil {
			return err
		}
	}
	if f.HostAKCertify != "" {
		b, err := readInput("--host-ak-certify", f.HostAKCertify)
		if err != nil {
			return err
		}
		var q hwtpm.Attestation
		if err := json.Unmarshal(b, &q); err != nil {
			return fmt.Errorf("%w: --host-ak-certify: %w", ErrInput, err)
		}
		ev.HostAKCertify = &q
	}
	if f.Nonce != "" {
		if ev.Nonce, err = hex.DecodeString(strings.TrimSpace(f.Nonce)); err != nil {
			return fmt.Errorf("%w: --nonce is not hex: %w", ErrInput, err)
		}
	}
	ev.ExpectVM = f.ExpectVM
	res, err := Verify(ev)
	if err != nil {
		return err
	}
	if f.JSON {
		enc := json.NewEncoder(out)
		enc.SetIndent("", "  ")
		return enc.Encode(struct {
			Verified   bool     `json:"verified"`
			HostAKName string   `json:"host_ak_name"`
			HostKey    string   `json:"host_key"`
			HostPCRs   string   `json:"host_pcrs"`
			EKName     string   `json:"ek_name"`
			AKName     string   `json:"ak_name"`
			VMUUID     string   `json:"vm_uuid,omitempty"`
			VTPMPCRs   string   `json:"vtpm_pcrs"`
			Nonce      string   `json:"nonce"`
			Proven     []string `json:"proven"`
			NotProven  []string `json:"not_proven"`
		}{true, hex.EncodeToString(res.HostAKName), res.HostKey, res.HostPCRs.String(), hex.EncodeToString(res.EKName),
			hex.EncodeToString(res.AKName), res.VMUUID, res.VTPMPCRs.String(), hex.EncodeToString(res.Nonce), res.Proven, res.NotProven})
	}
	fmt.Fprintln(out, "verified: deep attestation")
	for _, p := range res.Proven {
		fmt.Fprintln(out, "  proven:", p)
	}
	for _, p := range res.NotProven {
		fmt.Fprintln(out, "  not proven:", p)
	}
	return nil
}

func readInput(what, path string) ([]byte, error) {
	fh, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %w", ErrInput, what, err)
	}
	defer fh.Close()
	b, err := io.ReadAll(io.LimitReader(fh, maxInput+1))
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %w", ErrInput, what, err)
	}
	if len(b) > maxInput {
		return nil, fmt.Errorf("%w: %s: larger than %d bytes", ErrInput, what, maxInput)
	}
	return b, nil
}

// readIdentityDir fills what the evidence lacks from a host identity directory; files that
// are missing are skipped (a host not certified by an operator has no ak.pem).
func readIdentityDir(dir string, ev *Evidence) error {
	get := func(name string) ([]byte, error) {
		b, err := readInput("--host-identity", filepath.Join(dir, name))
		if errors.Is(err, fs.ErrNotExist) {
			return nil, nil
		}
		return b, err
	}
	var err error
	fill := func(dst *[]byte, names ...string) {
		if err != nil || len(*dst) > 0 {
			return
		}
		for _, n := range names {
			var b []byte
			if b, err = get(n); err != nil {
				return
			}
			*dst = append(*dst, b...)
		}
	}
	fill(&ev.HostAKPublic, "ak.pub")
	if len(ev.TrustAnchors) > 0 {
		fill(&ev.HostAKCert, "ak.pem", "ak-chain.pem")
	}
	fill(&ev.CAPublic, "ca.pub")
	fill(&ev.CARoot, "ca-root.pem")
	fill(&ev.CACert, "ca.pem")
	fill(&ev.CAChain, "ca-chain.pem")
	fill(&ev.CACertify.Attest, "ca-certify.attest")
	fill(&ev.CACertify.Signature, "ca-certify.sig")
	return err
}
