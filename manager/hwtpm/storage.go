package hwtpm

import (
	"context"
	"errors"
	"fmt"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
)

// storageKey is the manager's storage root key, loaded as a transient object.
type storageKey struct {
	handle tpm2.TPMHandle
	name   tpm2.TPM2BName
	public tpm2.TPMTPublic
}

// createStorageKey derives the storage key in the owner hierarchy with TPM2_CreatePrimary
// from the TCG's SRK template: the same seed and template give the same key, so nothing is
// persisted and no persistent handle is taken from other users of the TPM. ECC P-256 is
// tried first (fast on every TPM); a TPM that refuses it gets RSA-2048, and the choice is
// kept for the life of t. The caller flushes the key.
func (t *TPM) createStorageKey(tp transport.TPM) (*storageKey, error) {
	if t.storage != nil {
		return createPrimary(tp, *t.storage)
	}
	key, eccErr := createPrimary(tp, tpm2.ECCSRKTemplate)
	var rc tpm2.TPMRC
	if eccErr == nil || !errors.As(eccErr, &rc) || isAuthError(eccErr) {
		if eccErr == nil {
			t.storage = &tpm2.ECCSRKTemplate
		}
		return key, eccErr
	}
	key, rsaErr := createPrimary(tp, tpm2.RSASRKTemplate)
	if rsaErr != nil {
		return nil, fmt.Errorf("%w (with RSA-2048: %w)", eccErr, rsaErr)
	}
	t.storage = &tpm2.RSASRKTemplate
	return key, nil
}

func createPrimary(tp transport.TPM, template tpm2.TPMTPublic) (*storageKey, error) {
	resp, err := tpm2.CreatePrimary{
		PrimaryHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)},
		InPublic:      tpm2.New2B(template),
	}.Execute(tp)
	if isAuthError(err) {
		return nil, fmt.Errorf("create the storage key: the owner hierarchy needs an empty authorization value: %w", err)
	} else if err != nil {
		return nil, fmt.Errorf("create the storage key: %w", err)
	}
	pub, err := resp.OutPublic.Contents()
	if err != nil {
		return nil, fmt.Errorf("create the storage key: its public area: %w", err)
	}
	return &storageKey{handle: resp.ObjectHandle, name: resp.Name, public: *pub}, nil
}

func isAuthError(err error) bool {
	return errors.Is(err, tpm2.TPMRCBadAuth) || errors.Is(err, tpm2.TPMRCAuthFail) || errors.Is(err, tpm2.TPMRCLockout)
}

// withStorageKey runs op with the storage key loaded and flushes it after.
func (t *TPM) withStorageKey(ctx context.Context, tp transport.TPM, op func(*storageKey) error) error {
	key, err := t.createStorageKey(tp)
	if err != nil {
		return err
	}
	defer t.flush(ctx, key.handle)
	return op(key)
}
