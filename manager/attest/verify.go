package attest

import (
	"bytes"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/vtpmd/vtpmd/manager/hwtpm"
)

// Sentinel errors of Verify; each says which input is wrong.
var (
	// ErrNonce: the guest's quote is not over the expected nonce.
	ErrNonce = errors.New("attest: the guest's quote is not over the expected nonce")
	// ErrReplay: the report was made for another nonce (an older report replayed).
	ErrReplay = errors.New("attest: the report was made for another nonce (replayed or stale)")
	// ErrWrongVTPM: the report names another vTPM, AK or VM than the guest's quote or the
	// expected ones.
	ErrWrongVTPM = errors.New("attest: the report is for another vTPM")
	// ErrBinding: the hardware quote's qualifying data does not bind the report's contents.
	ErrBinding = errors.New("attest: the hardware quote does not bind the report")
	// ErrHostKey: the host's AK (certificate or key) does not verify the hardware quote, or
	// does not chain to the trust anchors.
	ErrHostKey = errors.New("attest: host attestation key not trusted")
	// ErrEventLog: the host's event log does not replay to the quoted host PCRs.
	ErrEventLog = errors.New("attest: host event log does not match the hardware quote")
	// ErrPCRs: the guest's quote covers other vTPM PCR values than the report.
	ErrPCRs = errors.New("attest: the guest's quote and the report disagree on the vTPM's PCRs")
	// ErrInput: an input is missing or unreadable.
	ErrInput = errors.New("attest: missing or unreadable input")
)

// Evidence is everything `vtpmd attest verify` is given.
type Evidence struct {
	// The guest's vTPM quote: TPMS_ATTEST (tpm2_quote -m), TPMT_SIGNATURE (-s) and the vTPM
	// AK's TPM2B_PUBLIC (tpm2_createak -u).
	Quote, QuoteSignature, AKPublic []byte
	// Report is what the guest read from NV 0x01400001.
	Report []byte
	// Nonce is the nonce the verifier gave the guest.
	Nonce []byte
	// The host's AK: a certificate (PEM or DER) that chains to TrustAnchors, or its public
	// key (a TPM2B_PUBLIC, or PEM/DER SubjectPublicKeyInfo) taken on trust; Identity may carry
	// the host's identity file (manager/attest chain format) instead.
	HostAKCert, HostAKPublic []byte
	TrustAnchors             []byte
	// The host CA (optional; `vtpmd manager identity --out` writes them): CAPublic is its
	// key's TPMT_PUBLIC (or TPM2B_PUBLIC), CACertify the host AK's TPM2_Certify of it, CARoot
	// its self-signed root, CACert the certificate it issues under (the operator's, or the
	// root), CAChain the operator's issuers above CACert (PEM or DER).
	CAPublic                []byte
	CACertify               hwtpm.Attestation
	CARoot, CACert, CAChain []byte
	// EKCert (optional) is the vTPM's EK certificate (from the guest's NV 0x01c00002 or
	// 0x01c00016), checked up to the trust anchors or the host CA's root, and against the
	// report's host AK and VM.
	EKCert []byte
	// HostAKCertify (optional) is the hardware AK's quote over the guest AK (vtpmd manager
	// certify-vtpm-ak): the host vouching for that AK directly.
	HostAKCertify *hwtpm.Attestation
	// EventLog is the host's TCG event log (binary_bios_measurements).
	EventLog []byte
	// ExpectEK (optional): the vTPM EK the verifier expects, as a TPM2B_PUBLIC or its name
	// in hex. ExpectVM (optional): the VM's UUID.
	ExpectEK []byte
	ExpectVM string
	// Now is the verification time for certificates (zero: time.Now()).
	Now time.Time
}

// Result says what Verify proved.
type Result struct {
	HostAKName []byte
	HostKey    string // how the host AK is trusted
	HostPCRs   PCRSelection
	EKName     []byte
	AKName     []byte
	VMUUID     string
	VTPMPCRs   PCRSelection
	Nonce      []byte
	// Proven lists the statements, one line each.
	Proven []string
	// NotProven lists what these inputs cannot show.
	NotProven []string
}

// Verify checks the guest's vTPM quote and the host's report against each other, the host's
// AK, its event log and the nonce, and returns what is proven. Every check must pass.
func Verify(ev Evidence) (*Result, error) {
	if len(ev.Nonce) == 0 || len(ev.Quote) == 0 || len(ev.QuoteSignature) == 0 || len(ev.AKPublic) == 0 || len(ev.Report) == 0 {
		return nil, fmt.Errorf("%w: the nonce, the guest's quote, its signature, its AK public key and the report are all needed", ErrInput)
	}
	rep, err := Decode(ev.Report)
	if err != nil {
		return nil, fmt.Errorf("report: %w", err)
	}
	res := &Result{HostAKName: rep.HostAKName, HostPCRs: rep.HostPCRs, EKName: rep.EKName, AKName: rep.AKName,
		VTPMPCRs: rep.VTPMPCRs, Nonce: rep.Nonce}
	if len(rep.VMUUID) == 16 {
		res.VMUUID = formatUUID(rep.VMUUID)
	}

	// 1. the hardware quote: signed by a trusted host AK
	host, err := hostKey(ev, rep)
	if err != nil {
		return nil, err
	}
	res.HostKey = host.how
	hq, err := ParseQuote(rep.Attest)
	if err != nil {
		return nil, fmt.Errorf("report's hardware quote: %w", err)
	}
	hsig, err := ParseSignature(rep.Signature)
	if err != nil {
		return nil, fmt.Errorf("report's hardware quote: %w", err)
	}
	if err := verifySignature(host.key, rep.Attest, hsig); err != nil {
		return nil, fmt.Errorf("%w: the hardware quote's signature does not verify with the host AK: %w", ErrHostKey, err)
	}
	if host.name != nil && len(hq.QualifiedSigner) > 0 && !bytes.Equal(host.name, rep.HostAKName) {
		return nil, fmt.Errorf("%w: the report names host AK %x, the given key is %x", ErrHostKey, rep.HostAKName, host.name)
	}
	res.Proven = append(res.Proven, fmt.Sprintf("the report's quote was made by the host TPM's attestation key %x (%s)", rep.HostAKName, host.how))

	// 2. it binds this report: nonce, vTPM, AK, VM, vTPM PCR digest
	if !bytes.Equal(hq.ExtraData, QualifyingData(rep)) {
		return nil, fmt.Errorf("%w: its qualifying data is not the digest of the report's nonce, vTPM EK, AK, VM and PCR digest (the report was altered)", ErrBinding)
	}

	// 3. the host PCRs it covers are the report's values, and the event log replays to them
	if hq.PCRs != rep.HostPCRs {
		return nil, fmt.Errorf("%w: the hardware quote covers %s, the report lists %s", ErrBinding, hq.PCRs, rep.HostPCRs)
	}
	d, err := PCRDigest(hsig.Hash, rep.HostPCRValues)
	if err != nil {
		return nil, err
	}
	if !bytes.Equal(d, hq.PCRDigest) {
		return nil, fmt.Errorf("%w: the report's host PCR values are not the ones the hardware quote signed", ErrBinding)
	}
	if len(ev.EventLog) == 0 {
		return nil, fmt.Errorf("%w: the host's event log is needed", ErrInput)
	}
	replayed, events, err := replayLog(ev.EventLog, rep.HostPCRs)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrEventLog, err)
	}
	for i, pcr := range rep.HostPCRs.PCRs() {
		if !bytes.Equal(replayed[i], rep.HostPCRValues[i]) {
			return nil, fmt.Errorf("%w: PCR %d replays to %x, the host TPM quoted %x", ErrEventLog, pcr, replayed[i], rep.HostPCRValues[i])
		}
	}
	// (the reset and restart counts of a quote by a key outside the endorsement and platform
	// hierarchies are obfuscated by the TPM: not shown)
	res.Proven = append(res.Proven, fmt.Sprintf("the host's PCRs %s, quoted at hardware clock %d ms, are those of its event log (%d events)",
		rep.HostPCRs, hq.Clock, events))

	// 4. the guest's quote: by the AK the report names, over the nonce and the vTPM PCRs of the report
	ak, err := ParsePublic(ev.AKPublic)
	if err != nil {
		return nil, fmt.Errorf("guest AK: %w", err)
	}
	if !ak.Restricted || !ak.Sign {
		return nil, fmt.Errorf("%w: the guest's AK is not a restricted signing key", ErrQuote)
	}
	gq, err := ParseQuote(ev.Quote)
	if err != nil {
		return nil, fmt.Errorf("guest quote: %w", err)
	}
	gsig, err := ParseSignature(ev.QuoteSignature)
	if err != nil {
		return nil, fmt.Errorf("guest quote: %w", err)
	}
	if err := verifySignature(ak.Key, ev.Quote, gsig); err != nil {
		return nil, fmt.Errorf("guest quote: %w", err)
	}
	if !bytes.Equal(gq.ExtraData, ev.Nonce) {
		return nil, fmt.Errorf("%w: it carries %x, expected %x", ErrNonce, gq.ExtraData, ev.Nonce)
	}
	if !bytes.Equal(rep.Nonce, ev.Nonce) {
		return nil, fmt.Errorf("%w: the report is for nonce %x, expected %x", ErrReplay, rep.Nonce, ev.Nonce)
	}
	if len(rep.AKName) == 0 {
		return nil, fmt.Errorf("%w: the report names no AK (the guest had none persistent at 0x%08x when it asked): the guest's quote cannot be tied to the vTPM", ErrWrongVTPM, AKHandle)
	}
	if !bytes.Equal(rep.AKName, ak.Name) {
		return nil, fmt.Errorf("%w: the report names AK %x, the guest's quote is signed by AK %x", ErrWrongVTPM, rep.AKName, ak.Name)
	}
	if gq.PCRs != rep.VTPMPCRs {
		return nil, fmt.Errorf("%w: the guest quoted %s, the report covers %s", ErrPCRs, gq.PCRs, rep.VTPMPCRs)
	}
	if !bytes.Equal(gq.PCRDigest, rep.VTPMPCRDigest) {
		return nil, fmt.Errorf("%w: the vTPM's PCRs changed between the report and the guest's quote (or either was altered)", ErrPCRs)
	}

	// 5. the certificate chains given
	if err := verifyChains(ev, rep, host, ak, res); err != nil {
		return nil, err
	}

	// 6. the expected vTPM and VM
	if len(ev.ExpectEK) > 0 {
		want, err := expectedName(ev.ExpectEK)
		if err != nil {
			return nil, err
		}
		if !bytes.Equal(want, rep.EKName) {
			return nil, fmt.Errorf("%w: the report names EK %x, expected %x", ErrWrongVTPM, rep.EKName, want)
		}
	}
	if ev.ExpectVM != "" && !strings.EqualFold(ev.ExpectVM, res.VMUUID) {
		return nil, fmt.Errorf("%w: the report names VM %q, expected %q", ErrWrongVTPM, res.VMUUID, ev.ExpectVM)
	}
	vm := res.VMUUID
	if vm == "" {
		vm = "(not in the host's registry)"
	}
	res.Proven = append(res.Proven,
		fmt.Sprintf("the vTPM with EK %x, serving VM %s, ran on that host at that moment, its PCRs %s with digest %x", rep.EKName, vm, rep.VTPMPCRs, rep.VTPMPCRDigest),
		fmt.Sprintf("the guest's quote was signed by AK %x, which was persistent in that vTPM at 0x%08x", ak.Name, AKHandle),
		fmt.Sprintf("both quotes are fresh: they carry the nonce %x", ev.Nonce))
	res.NotProven = append(res.NotProven,
		"that the host's event log describes acceptable software: compare its events with your reference values",
		"that the vTPM's EK is the one you enrolled, unless you passed it (--ek)",
		"anything about the host after the hardware quote, or the guest after its own quote")
	if len(ev.ExpectEK) > 0 {
		res.NotProven = slices.Delete(res.NotProven, 1, 2)
	}
	return res, nil
}

// AKHandle is where the guest keeps the AK the report names (OpenVMM's AK handle).
const AKHandle = 0x81000003

// expectedName reads an expected EK: a TPM2B_PUBLIC or TPMT_PUBLIC, or a name in hex.
func expectedName(b []byte) ([]byte, error) {
	if s := strings.TrimSpace(string(b)); len(s) > 0 {
		if n, err := hex.DecodeString(s); err == nil && checkName("expected EK", n, false) == nil {
			return n, nil
		}
	}
	p, err := ParsePublic(b)
	if err != nil {
		return nil, fmt.Errorf("expected EK: %w", err)
	}
	return p.Name, nil
}

func formatUUID(u []byte) string {
	h := hex.EncodeToString(u)
	return h[:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
}

// ParseUUID reads a UUID in its usual text form.
func ParseUUID(s string) ([]byte, error) {
	h := strings.ReplaceAll(s, "-", "")
	b, err := hex.DecodeString(h)
	if err != nil || len(b) != 16 {
		return nil, fmt.Errorf("%w: UUID %q", ErrInput, s)
	}
	return b, nil
}

// String names a selection as tpm2-tools does: sha256:0,1,2.
func (s PCRSelection) String() string {
	names := map[uint16]string{algSHA1: "sha1", algSHA256: "sha256", algSHA384: "sha384", algSHA512: "sha512"}
	n, ok := names[s.Hash]
	if !ok {
		n = fmt.Sprintf("0x%04x", s.Hash)
	}
	var list []string
	for _, p := range s.PCRs() {
		list = append(list, fmt.Sprint(p))
	}
	return n + ":" + strings.Join(list, ",")
}
