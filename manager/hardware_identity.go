package manager

import (
	"context"
	"crypto"

	"github.com/vtpmd/vtpmd/manager/hwtpm"
)

// IdentityHardware is what the host's identity needs of the hardware TPM beyond Hardware: its
// EK, keys made and kept in it, quotes, certifications, credential activation and signing.
// The hwtpm adapter (OpenHardware) implements it; a Hardware without it gives a manager with
// no host identity (ErrNoHostIdentity).
type IdentityHardware interface {
	EndorsementKey(ctx context.Context) (*hwtpm.EK, error)
	CreateAK(ctx context.Context) (*hwtpm.Key, error)
	CreateSigningKey(ctx context.Context) (*hwtpm.Key, error)
	Quote(ctx context.Context, ak *hwtpm.Key, pcrs []int, qualifying []byte) (*hwtpm.PCRQuote, error)
	Certify(ctx context.Context, ak, obj *hwtpm.Key, qualifying []byte) (*hwtpm.Attestation, error)
	ActivateCredential(ctx context.Context, ak *hwtpm.Key, credentialBlob, secret []byte) ([]byte, error)
	Signer(key *hwtpm.Key) (crypto.Signer, error)
}

var _ IdentityHardware = (*hardware)(nil)

func (h *hardware) EndorsementKey(ctx context.Context) (*hwtpm.EK, error) {
	return h.tpm.EndorsementKey(ctx)
}

func (h *hardware) CreateAK(ctx context.Context) (*hwtpm.Key, error) { return h.tpm.CreateAK(ctx) }

func (h *hardware) CreateSigningKey(ctx context.Context) (*hwtpm.Key, error) {
	return h.tpm.CreateSigningKey(ctx)
}

func (h *hardware) Quote(ctx context.Context, ak *hwtpm.Key, pcrs []int, qualifying []byte) (*hwtpm.PCRQuote, error) {
	return h.tpm.Quote(ctx, ak, pcrs, qualifying)
}

func (h *hardware) Certify(ctx context.Context, ak, obj *hwtpm.Key, qualifying []byte) (*hwtpm.Attestation, error) {
	return h.tpm.Certify(ctx, ak, obj, qualifying)
}

func (h *hardware) ActivateCredential(ctx context.Context, ak *hwtpm.Key, blob, secret []byte) ([]byte, error) {
	return h.tpm.ActivateCredential(ctx, ak, blob, secret)
}

func (h *hardware) Signer(key *hwtpm.Key) (crypto.Signer, error) {
	s, err := h.tpm.Signer(key)
	if err != nil {
		return nil, err
	}
	return s, nil
}
