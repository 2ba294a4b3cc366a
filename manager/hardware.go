package manager

import (
	"context"
	"encoding/json"
	"fmt"
	"strconv"
	"strings"

	"github.com/vtpmd/vtpmd/manager/hwtpm"
)

// hardware is the host's TPM as the manager uses it (Hardware): sealing under one policy, and
// the ledger's counter at one NV index.
type hardware struct {
	tpm    *hwtpm.TPM
	policy hwtpm.Policy
	index  uint32
}

// OpenHardware opens the TPM at spec (hwtpm.ParseSpec's spellings), with the unseal policy
// ("none", or "pcr:BANK:N,N,...") and the ledger counter at NV index (defined if missing).
func OpenHardware(ctx context.Context, spec, policy string, index uint32) (Hardware, error) {
	sp, err := hwtpm.ParseSpec(spec)
	if err != nil {
		return nil, err
	}
	pol, err := ParsePolicy(policy)
	if err != nil {
		return nil, err
	}
	if index == 0 {
		index = DefaultCounterIndex
	}
	t, err := hwtpm.Open(ctx, sp)
	if err != nil {
		return nil, err
	}
	if err := t.DefineCounter(ctx, index); err != nil {
		t.Close()
		return nil, fmt.Errorf("ledger counter at NV 0x%08x: %w", index, err)
	}
	// a policy this TPM cannot seal to (a bank it lacks, a PCR it has not) is refused now,
	// not at the first vTPM's start
	if _, err := t.Seal(ctx, []byte{0}, pol); err != nil {
		t.Close()
		return nil, fmt.Errorf("unseal policy %s: %w", policy, err)
	}
	return &hardware{tpm: t, policy: pol, index: index}, nil
}

// ParsePolicy reads an unseal policy: "none" (or "") binds to this TPM only; "pcr:BANK:LIST"
// (e.g. pcr:sha256:0,2,4,7) also to those PCRs' current values.
func ParsePolicy(s string) (hwtpm.Policy, error) {
	if s == "" || s == "none" {
		return hwtpm.PolicyNone{}, nil
	}
	rest, ok := strings.CutPrefix(s, "pcr:")
	if !ok {
		return nil, fmt.Errorf("unseal policy %q: use none, or pcr:BANK:LIST (e.g. pcr:sha256:0,7)", s)
	}
	bank, list, ok := strings.Cut(rest, ":")
	if !ok {
		bank, list = "sha256", rest
	}
	var pcrs []int
	for _, f := range strings.Split(list, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil {
			return nil, fmt.Errorf("unseal policy %q: PCR %q: %w", s, f, err)
		}
		pcrs = append(pcrs, n)
	}
	return hwtpm.PolicyPCR{Bank: bank, PCRs: pcrs}, nil
}

func (h *hardware) Seal(ctx context.Context, secret []byte) (json.RawMessage, error) {
	s, err := h.tpm.Seal(ctx, secret, h.policy)
	if err != nil {
		return nil, err
	}
	return json.Marshal(s)
}

func (h *hardware) Unseal(ctx context.Context, sealed json.RawMessage) ([]byte, error) {
	var s hwtpm.Sealed
	if err := json.Unmarshal(sealed, &s); err != nil {
		return nil, fmt.Errorf("sealed key: %w", err)
	}
	return h.tpm.Unseal(ctx, &s)
}

func (h *hardware) Increment(ctx context.Context) (uint64, error) {
	return h.tpm.Increment(ctx, h.index)
}

func (h *hardware) Read(ctx context.Context) (uint64, error) {
	return h.tpm.ReadCounter(ctx, h.index)
}

func (h *hardware) PolicyName() string { return fmt.Sprint(h.policy) }
func (h *hardware) Describe() string   { return h.tpm.Spec().String() }
func (h *hardware) Close() error       { return h.tpm.Close() }
