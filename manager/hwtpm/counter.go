package hwtpm

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
)

// Sentinel errors of the counters.
var (
	// ErrNoCounter: no counter is defined (or initialized) at the index; DefineCounter makes one.
	ErrNoCounter = errors.New("no counter at this NV index")
	// ErrIndexInUse: the index holds something other than a counter DefineCounter made.
	ErrIndexInUse = errors.New("NV index in use by something other than a counter")
)

// counterAttributes are a counter's NV attributes: read and incremented with the index's own
// empty authorization value (so an owner password set later does not lock the manager out),
// never counted towards dictionary-attack lockout, and not orderly, so every increment is in
// NV before the TPM answers and survives a power cut.
var counterAttributes = tpm2.TPMANV{NT: tpm2.TPMNTCounter, AuthRead: true, AuthWrite: true, NoDA: true}

const counterSize = 8

// DefineCounter makes a monotonic counter at NV index (0x01000000 to 0x01ffffff) with the
// owner hierarchy's (empty) authorization, and increments it once so that it has a value.
// A counter DefineCounter made before is kept as it is; any other use of the index is
// ErrIndexInUse.
func (t *TPM) DefineCounter(ctx context.Context, index uint32) error {
	if err := checkIndex(index); err != nil {
		return err
	}
	err := t.do(ctx, func(tp transport.TPM) error {
		pub, _, err := counterPublic(tp, index)
		if errors.Is(err, ErrNoCounter) {
			_, err = tpm2.NVDefineSpace{
				AuthHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)},
				PublicInfo: tpm2.New2B(tpm2.TPMSNVPublic{
					NVIndex:    tpm2.TPMHandle(index),
					NameAlg:    tpm2.TPMAlgSHA256,
					Attributes: counterAttributes,
					DataSize:   counterSize,
				}),
			}.Execute(tp)
			switch {
			case isAuthError(err):
				return fmt.Errorf("TPM2_NV_DefineSpace: the owner hierarchy needs an empty authorization value: %w", err)
			case err != nil && !errors.Is(err, tpm2.TPMRCNVDefined): // defined meanwhile: check it below
				return fmt.Errorf("TPM2_NV_DefineSpace: %w", err)
			}
			pub, _, err = counterPublic(tp, index)
		}
		if err != nil {
			return err
		}
		if !pub.Attributes.Written {
			_, err := t.increment(ctx, tp, index)
			return err
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("hwtpm: define counter 0x%08x: %w", index, err)
	}
	return nil
}

// Increment adds one to the counter at index and returns its value after (others may have
// incremented it meanwhile: the value is at least one more than before).
func (t *TPM) Increment(ctx context.Context, index uint32) (uint64, error) {
	if err := checkIndex(index); err != nil {
		return 0, err
	}
	var v uint64
	err := t.do(ctx, func(tp transport.TPM) (err error) {
		v, err = t.increment(ctx, tp, index)
		return err
	})
	if err != nil {
		return 0, fmt.Errorf("hwtpm: increment counter 0x%08x: %w", index, err)
	}
	return v, nil
}

// ReadCounter returns the counter's value.
func (t *TPM) ReadCounter(ctx context.Context, index uint32) (uint64, error) {
	if err := checkIndex(index); err != nil {
		return 0, err
	}
	var v uint64
	err := t.do(ctx, func(tp transport.TPM) error {
		return t.withStorageKey(ctx, tp, func(key *storageKey) (err error) {
			v, err = readCounter(tp, key, index)
			return err
		})
	})
	if err != nil {
		return 0, fmt.Errorf("hwtpm: read counter 0x%08x: %w", index, err)
	}
	return v, nil
}

func (t *TPM) increment(ctx context.Context, tp transport.TPM, index uint32) (v uint64, err error) {
	err = t.withStorageKey(ctx, tp, func(key *storageKey) error {
		_, name, err := counterPublic(tp, index)
		if err != nil {
			return err
		}
		_, err = tpm2.NVIncrement{
			AuthHandle: tpm2.AuthHandle{Handle: tpm2.TPMHandle(index), Name: name, Auth: authenticated(key)},
			NVIndex:    tpm2.NamedHandle{Handle: tpm2.TPMHandle(index), Name: name},
		}.Execute(tp)
		if err != nil {
			return fmt.Errorf("TPM2_NV_Increment: %w", err)
		}
		v, err = readCounter(tp, key, index)
		return err
	})
	return v, err
}

// readCounter reads the counter in an HMAC session salted with the storage key: the response
// is authenticated, so a bus interposer cannot answer with an old value.
func readCounter(tp transport.TPM, key *storageKey, index uint32) (uint64, error) {
	// The index's name changes when it is first written (TPMA_NV_WRITTEN), so it is read
	// afresh: the session's HMAC covers it.
	pub, name, err := counterPublic(tp, index)
	if err != nil {
		return 0, err
	}
	if !pub.Attributes.Written {
		return 0, fmt.Errorf("%w: defined but never incremented", ErrNoCounter)
	}
	resp, err := tpm2.NVRead{
		AuthHandle: tpm2.AuthHandle{Handle: tpm2.TPMHandle(index), Name: name, Auth: authenticated(key)},
		NVIndex:    tpm2.NamedHandle{Handle: tpm2.TPMHandle(index), Name: name},
		Size:       counterSize,
	}.Execute(tp)
	if err != nil {
		return 0, fmt.Errorf("TPM2_NV_Read: %w", err)
	}
	if len(resp.Data.Buffer) != counterSize {
		return 0, fmt.Errorf("TPM2_NV_Read returned %d bytes, not %d", len(resp.Data.Buffer), counterSize)
	}
	return binary.BigEndian.Uint64(resp.Data.Buffer), nil
}

// authenticated is a one-use HMAC session salted with the storage key, for the index's empty
// authorization value.
func authenticated(key *storageKey) tpm2.Session {
	return tpm2.HMAC(tpm2.TPMAlgSHA256, 16, tpm2.Salted(key.handle, key.public))
}

// counterPublic reads the index's public area and name and checks that it is a counter with
// DefineCounter's attributes.
func counterPublic(tp transport.TPM, index uint32) (*tpm2.TPMSNVPublic, tpm2.TPM2BName, error) {
	resp, err := tpm2.NVReadPublic{NVIndex: tpm2.TPMHandle(index)}.Execute(tp)
	if errors.Is(err, tpm2.TPMRCHandle) {
		return nil, tpm2.TPM2BName{}, ErrNoCounter
	} else if err != nil {
		return nil, tpm2.TPM2BName{}, fmt.Errorf("TPM2_NV_ReadPublic: %w", err)
	}
	pub, err := resp.NVPublic.Contents()
	if err != nil {
		return nil, tpm2.TPM2BName{}, fmt.Errorf("TPM2_NV_ReadPublic: %w", err)
	}
	attrs := pub.Attributes
	attrs.Written = false
	if attrs != counterAttributes || pub.NameAlg != tpm2.TPMAlgSHA256 || pub.DataSize != counterSize || len(pub.AuthPolicy.Buffer) != 0 {
		return nil, tpm2.TPM2BName{}, fmt.Errorf("%w: type %d, attributes 0x%08x, %d bytes",
			ErrIndexInUse, pub.Attributes.NT, binary.BigEndian.Uint32(tpm2.Marshal(pub.Attributes)), pub.DataSize)
	}
	return pub, resp.NVName, nil
}

// checkIndex refuses handles outside the NV index range.
func checkIndex(index uint32) error {
	if index>>24 != 0x01 {
		return fmt.Errorf("hwtpm: 0x%08x is not an NV index (0x01000000 to 0x01ffffff)", index)
	}
	return nil
}
