package hwtpm

import (
	"context"
	"fmt"
	"slices"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
)

// ReadPCRs reads the listed PCRs of a bank ("sha1", "sha256", "sha384", "sha512"), in the
// order given. The bank must be active.
func (t *TPM) ReadPCRs(ctx context.Context, bank string, pcrs []int) ([][]byte, error) {
	d := policyDesc{Kind: policyKindPCR, Bank: bank, PCRs: slices.Clone(pcrs)}
	if err := d.check(); err != nil {
		return nil, fmt.Errorf("hwtpm: read PCRs: %w", err)
	}
	var sorted [][]byte
	err := t.do(ctx, func(tp transport.TPM) error {
		var err error
		sorted, err = d.readPCRs(tp)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("hwtpm: %w", err)
	}
	// d.PCRs is sorted and unique: answer in the caller's order
	out := make([][]byte, len(pcrs))
	for i, p := range pcrs {
		out[i] = sorted[slices.Index(d.PCRs, p)]
	}
	return out, nil
}

// PCRBanks lists the banks the TPM has active (at least one PCR allocated), by name.
func (t *TPM) PCRBanks(ctx context.Context) ([]string, error) {
	var out []string
	err := t.do(ctx, func(tp transport.TPM) error {
		resp, err := tpm2.GetCapability{Capability: tpm2.TPMCapPCRs, PropertyCount: 1}.Execute(tp)
		if err != nil {
			return fmt.Errorf("TPM2_GetCapability(PCRS): %w", err)
		}
		sels, err := resp.CapabilityData.Data.AssignedPCR()
		if err != nil {
			return fmt.Errorf("TPM2_GetCapability(PCRS): %w", err)
		}
		for _, s := range sels.PCRSelections {
			if !slices.ContainsFunc(s.PCRSelect, func(b byte) bool { return b != 0 }) {
				continue
			}
			for name, alg := range banks {
				if alg == s.Hash {
					out = append(out, name)
				}
			}
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("hwtpm: %w", err)
	}
	slices.Sort(out)
	return out, nil
}
