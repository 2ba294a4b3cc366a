package hwtpm

import (
	"crypto/sha256"
	"fmt"
	"slices"
	"strconv"
	"strings"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
)

// Policy says what unsealing needs besides the sealed blob and the TPM it was sealed on:
// PolicyNone or PolicyPCR.
type Policy interface {
	// describe checks the policy and returns its normal form.
	describe() (policyDesc, error)
}

// PolicyNone seals to this TPM alone: anyone who holds the blob and can talk to this TPM can
// unseal it.
type PolicyNone struct{}

// PolicyPCR seals to the values the listed PCRs of a bank hold when Seal runs: after any of
// them changes, Unseal fails with ErrPolicy.
type PolicyPCR struct {
	// Bank is the PCR bank's hash: "sha1", "sha256" (the default when empty), "sha384" or
	// "sha512". The bank must be active on the TPM.
	Bank string
	// PCRs are the PCR indices, 0 to 23; order and repeats do not matter.
	PCRs []int
}

func (PolicyNone) describe() (policyDesc, error) { return policyDesc{Kind: policyKindNone}, nil }

func (p PolicyPCR) describe() (policyDesc, error) {
	d := policyDesc{Kind: policyKindPCR, Bank: p.Bank, PCRs: slices.Clone(p.PCRs)}
	return d, d.check()
}

// String is the policy as in "pcr:sha256:0,7".
func (p PolicyPCR) String() string {
	d, _ := p.describe()
	return d.String()
}

// String is "none".
func (PolicyNone) String() string { return policyKindNone }

const (
	policyKindNone = "none"
	policyKindPCR  = "pcr"
	maxPCR         = 23 // PC Client TPMs have 24 PCRs
)

// banks maps the PCR bank names to their hash algorithms.
var banks = map[string]tpm2.TPMIAlgHash{
	"sha1":   tpm2.TPMAlgSHA1,
	"sha256": tpm2.TPMAlgSHA256,
	"sha384": tpm2.TPMAlgSHA384,
	"sha512": tpm2.TPMAlgSHA512,
}

// policyDesc is a policy in normal form (bank named, PCRs sorted and unique), as Sealed
// records it.
type policyDesc struct {
	Kind string `json:"kind"`
	Bank string `json:"bank,omitempty"`
	PCRs []int  `json:"pcrs,omitempty"`
}

// check validates d and brings it to normal form.
func (d *policyDesc) check() error {
	switch d.Kind {
	case policyKindNone:
		if d.Bank != "" || len(d.PCRs) != 0 {
			return fmt.Errorf("policy %q takes no bank or PCRs", d.Kind)
		}
		return nil
	case policyKindPCR:
	default:
		return fmt.Errorf("unknown policy kind %q (want %q or %q)", d.Kind, policyKindNone, policyKindPCR)
	}
	if d.Bank == "" {
		d.Bank = "sha256"
	}
	if _, ok := banks[d.Bank]; !ok {
		return fmt.Errorf("unknown PCR bank %q (want sha1, sha256, sha384 or sha512)", d.Bank)
	}
	if len(d.PCRs) == 0 {
		return fmt.Errorf("a PCR policy needs at least one PCR")
	}
	for _, p := range d.PCRs {
		if p < 0 || p > maxPCR {
			return fmt.Errorf("PCR %d out of range 0 to %d", p, maxPCR)
		}
	}
	slices.Sort(d.PCRs)
	d.PCRs = slices.Compact(d.PCRs)
	return nil
}

func (d policyDesc) String() string {
	if d.Kind != policyKindPCR {
		return d.Kind
	}
	pcrs := make([]string, len(d.PCRs))
	for i, p := range d.PCRs {
		pcrs[i] = strconv.Itoa(p)
	}
	return d.Kind + ":" + d.Bank + ":" + strings.Join(pcrs, ",")
}

// policy is the Policy d describes.
func (d policyDesc) policy() Policy {
	if d.Kind == policyKindPCR {
		return PolicyPCR{Bank: d.Bank, PCRs: slices.Clone(d.PCRs)}
	}
	return PolicyNone{}
}

// selection is d's PCR selection (empty for PolicyNone).
func (d policyDesc) selection() tpm2.TPMLPCRSelection {
	return pcrSelection(banks[d.Bank], d.PCRs)
}

func pcrSelection(bank tpm2.TPMIAlgHash, pcrs []int) tpm2.TPMLPCRSelection {
	u := make([]uint, len(pcrs))
	for i, p := range pcrs {
		u[i] = uint(p)
	}
	return tpm2.TPMLPCRSelection{PCRSelections: []tpm2.TPMSPCRSelection{{
		Hash: bank, PCRSelect: tpm2.PCClientCompatible.PCRs(u...),
	}}}
}

// authPolicy is the policy digest (SHA-256, the sealed object's name algorithm) of
// TPM2_PolicyPCR over d's PCRs holding values.
func (d policyDesc) authPolicy(values [][]byte) ([]byte, error) {
	h := sha256.New()
	for _, v := range values {
		h.Write(v)
	}
	calc, err := tpm2.NewPolicyCalculator(tpm2.TPMAlgSHA256)
	if err != nil {
		return nil, err
	}
	cmd := tpm2.PolicyPCR{PcrDigest: tpm2.TPM2BDigest{Buffer: h.Sum(nil)}, Pcrs: d.selection()}
	if err := cmd.Update(calc); err != nil {
		return nil, fmt.Errorf("compute the PCR policy: %w", err)
	}
	return calc.Hash().Digest, nil
}

// readPCRs reads d's PCRs, in d's order. A TPM returns at most eight per TPM2_PCR_Read, and
// none of a bank it does not have active.
func (d policyDesc) readPCRs(tp transport.TPM) ([][]byte, error) {
	bank := banks[d.Bank]
	values := make(map[int][]byte, len(d.PCRs))
	remaining := d.PCRs
	for len(remaining) > 0 {
		resp, err := tpm2.PCRRead{PCRSelectionIn: pcrSelection(bank, remaining)}.Execute(tp)
		if err != nil {
			return nil, fmt.Errorf("read PCRs %v (%s): %w", remaining, d.Bank, err)
		}
		var got []int
		for _, sel := range resp.PCRSelectionOut.PCRSelections {
			if sel.Hash != bank {
				continue
			}
			for i, b := range sel.PCRSelect {
				for bit := range 8 {
					if b&(1<<bit) != 0 {
						got = append(got, 8*i+bit)
					}
				}
			}
		}
		if len(got) == 0 {
			return nil, fmt.Errorf("read PCRs %v: the TPM returned none; is the %s bank active?", remaining, d.Bank)
		}
		if len(got) != len(resp.PCRValues.Digests) {
			return nil, fmt.Errorf("read PCRs %v: the TPM selected %d PCRs but returned %d values", remaining, len(got), len(resp.PCRValues.Digests))
		}
		for i, p := range got {
			if !slices.Contains(remaining, p) {
				return nil, fmt.Errorf("read PCRs %v: the TPM returned PCR %d, which was not asked for", remaining, p)
			}
			values[p] = resp.PCRValues.Digests[i].Buffer
		}
		remaining = slices.DeleteFunc(slices.Clone(remaining), func(p int) bool { return slices.Contains(got, p) })
	}
	out := make([][]byte, len(d.PCRs))
	for i, p := range d.PCRs {
		out[i] = values[p]
	}
	return out, nil
}
