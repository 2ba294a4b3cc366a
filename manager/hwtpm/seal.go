package hwtpm

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"slices"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
)

// Sentinel errors of Unseal.
var (
	// ErrWrongTPM: the blob was sealed under another TPM's storage key — another machine, or
	// this TPM before its owner hierarchy was cleared.
	ErrWrongTPM = errors.New("sealed on another TPM (or before this TPM was cleared)")
	// ErrPolicy: the TPM refused to unseal because the blob's policy is not met, e.g. a PCR
	// it is sealed to has changed.
	ErrPolicy = errors.New("the sealing policy is not satisfied")
	// ErrBadSealed: the blob is malformed or damaged.
	ErrBadSealed = errors.New("malformed sealed blob")
)

// MaxSecret is the most a sealed object holds (MAX_SYM_DATA).
const MaxSecret = 128

// sealAttempts bounds how often Seal starts over when a PCR it seals to changes meanwhile.
const sealAttempts = 3

// Sealed is a secret sealed by a TPM: a KeyedHash data object under the storage key, which
// only that TPM can load. Its JSON form is stable; Public and Private are TPM2B_PUBLIC and
// TPM2B_PRIVATE as tpm2-tools writes them (tpm2_load -u/-r reads them).
type Sealed struct {
	Public  []byte
	Private []byte
	// Policy is what unsealing needs.
	Policy Policy
	// PCRValues are, for PolicyPCR, the values sealed to, in the order of Policy's PCRs. They
	// only let Unseal say which PCR changed; the TPM holds the policy itself.
	PCRValues [][]byte
	// StorageKey is the name of the storage key sealed under: Unseal compares it before it
	// asks the TPM anything.
	StorageKey []byte
}

type sealedJSON struct {
	Public     []byte     `json:"public"`
	Private    []byte     `json:"private"`
	Policy     policyDesc `json:"policy"`
	PCRValues  [][]byte   `json:"pcr_values,omitempty"`
	StorageKey []byte     `json:"storage_key"`
}

// MarshalJSON writes s with its policy as {"kind":"pcr","bank":"sha256","pcrs":[7]}.
func (s Sealed) MarshalJSON() ([]byte, error) {
	d, err := describePolicy(s.Policy)
	if err != nil {
		return nil, fmt.Errorf("hwtpm: %w", err)
	}
	return json.Marshal(sealedJSON{s.Public, s.Private, d, s.PCRValues, s.StorageKey})
}

// UnmarshalJSON reads what MarshalJSON writes.
func (s *Sealed) UnmarshalJSON(b []byte) error {
	var j sealedJSON
	if err := json.Unmarshal(b, &j); err != nil {
		return err
	}
	if err := j.Policy.check(); err != nil {
		return fmt.Errorf("hwtpm: %w: %w", ErrBadSealed, err)
	}
	if len(j.PCRValues) == 0 {
		j.PCRValues = nil // as MarshalJSON leaves it out
	}
	*s = Sealed{j.Public, j.Private, j.Policy.policy(), j.PCRValues, j.StorageKey}
	return nil
}

func describePolicy(p Policy) (policyDesc, error) {
	switch p := p.(type) {
	case nil:
		return policyDesc{}, errors.New("no policy (use PolicyNone{} for none)")
	case *PolicyNone:
		if p == nil {
			return policyDesc{}, errors.New("nil *PolicyNone")
		}
	case *PolicyPCR:
		if p == nil {
			return policyDesc{}, errors.New("nil *PolicyPCR")
		}
	}
	return p.describe()
}

// sealedTemplate is the public area of a sealed data object. With no authPolicy it is
// unsealed with its (empty) authorization value; with one, only through a policy session.
// It cannot be duplicated (fixedTPM, fixedParent) and failed authorizations do not count
// towards the TPM's dictionary-attack lockout (noDA).
func sealedTemplate(authPolicy []byte) tpm2.TPMTPublic {
	return tpm2.TPMTPublic{
		Type:    tpm2.TPMAlgKeyedHash,
		NameAlg: tpm2.TPMAlgSHA256,
		ObjectAttributes: tpm2.TPMAObject{
			FixedTPM:        true,
			FixedParent:     true,
			UserWithAuth:    authPolicy == nil,
			AdminWithPolicy: authPolicy != nil,
			NoDA:            true,
		},
		AuthPolicy: tpm2.TPM2BDigest{Buffer: authPolicy},
		Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgKeyedHash,
			&tpm2.TPMSKeyedHashParms{Scheme: tpm2.TPMTKeyedHashScheme{Scheme: tpm2.TPMAlgNull}}),
	}
}

// encryptedSession is a one-use HMAC session salted with the storage key that encrypts the
// command's or the response's first parameter, so the secret does not cross the bus to a
// discrete TPM in the clear.
func encryptedSession(key *storageKey, encryption tpm2.AuthOption) tpm2.Session {
	return tpm2.HMAC(tpm2.TPMAlgSHA256, 16, encryption, tpm2.Salted(key.handle, key.public))
}

// Seal seals secret (1 to MaxSecret bytes) to this TPM under policy. The secret travels to
// the TPM encrypted; secret itself is the caller's to zero.
func (t *TPM) Seal(ctx context.Context, secret []byte, policy Policy) (*Sealed, error) {
	desc, err := describePolicy(policy)
	if err != nil {
		return nil, fmt.Errorf("hwtpm: seal: %w", err)
	}
	if len(secret) == 0 || len(secret) > MaxSecret {
		return nil, fmt.Errorf("hwtpm: seal: a secret is 1 to %d bytes, not %d", MaxSecret, len(secret))
	}
	var sealed *Sealed
	err = t.do(ctx, func(tp transport.TPM) error {
		return t.withStorageKey(ctx, tp, func(key *storageKey) error {
			for range sealAttempts {
				var values [][]byte
				var authPolicy []byte
				var err error
				if desc.Kind == policyKindPCR {
					if values, err = desc.readPCRs(tp); err != nil {
						return err
					}
					if authPolicy, err = desc.authPolicy(values); err != nil {
						return err
					}
				}
				resp, err := tpm2.Create{
					ParentHandle: tpm2.AuthHandle{Handle: key.handle, Name: key.name, Auth: encryptedSession(key, tpm2.AESEncryption(128, tpm2.EncryptIn))},
					InSensitive: tpm2.TPM2BSensitiveCreate{Sensitive: &tpm2.TPMSSensitiveCreate{
						Data: tpm2.NewTPMUSensitiveCreate(&tpm2.TPM2BSensitiveData{Buffer: secret}),
					}},
					InPublic: tpm2.New2B(sealedTemplate(authPolicy)),
				}.Execute(tp)
				if err != nil {
					return fmt.Errorf("create the sealed object: %w", err)
				}
				if desc.Kind == policyKindPCR {
					// A PCR that changed while sealing would leave a blob no one can unseal.
					after, err := desc.readPCRs(tp)
					if err != nil {
						return err
					}
					if !slices.EqualFunc(values, after, bytes.Equal) {
						continue
					}
				}
				sealed = &Sealed{
					Public:     tpm2.Marshal(resp.OutPublic),
					Private:    tpm2.Marshal(resp.OutPrivate),
					Policy:     desc.policy(),
					PCRValues:  values,
					StorageKey: slices.Clone(key.name.Buffer),
				}
				return nil
			}
			return fmt.Errorf("PCRs %s kept changing while sealing", desc)
		})
	})
	if err != nil {
		return nil, fmt.Errorf("hwtpm: seal (%s): %w", desc, err)
	}
	return sealed, nil
}

// Unseal returns the secret s holds. It fails with ErrWrongTPM if s was sealed under another
// TPM's storage key, with ErrPolicy if the TPM refuses s's policy (saying which PCRs changed
// when it can tell), and with ErrBadSealed if s is malformed. The secret comes back from the
// TPM encrypted; the caller zeroes the returned slice when done with it.
func (t *TPM) Unseal(ctx context.Context, s *Sealed) ([]byte, error) {
	if s == nil {
		return nil, fmt.Errorf("hwtpm: unseal: %w: nil", ErrBadSealed)
	}
	desc, pub, priv, err := s.check()
	if err != nil {
		return nil, fmt.Errorf("hwtpm: unseal: %w", err)
	}
	var secret []byte
	err = t.do(ctx, func(tp transport.TPM) error {
		return t.withStorageKey(ctx, tp, func(key *storageKey) error {
			if !bytes.Equal(key.name.Buffer, s.StorageKey) {
				return ErrWrongTPM
			}
			loaded, err := tpm2.Load{
				ParentHandle: tpm2.AuthHandle{Handle: key.handle, Name: key.name, Auth: tpm2.PasswordAuth(nil)},
				InPrivate:    priv,
				InPublic:     pub,
			}.Execute(tp)
			if isResourceError(err) {
				return fmt.Errorf("load the sealed object: the TPM is out of object or session memory: %w", err)
			}
			if err != nil {
				return fmt.Errorf("%w: the storage key does not load it: %w", ErrBadSealed, err)
			}
			defer t.flush(ctx, loaded.ObjectHandle)
			item := tpm2.AuthHandle{Handle: loaded.ObjectHandle, Name: loaded.Name}
			if desc.Kind == policyKindNone {
				item.Auth = encryptedSession(key, tpm2.AESEncryption(128, tpm2.EncryptOut))
			} else {
				sess, _, err := tpm2.PolicySession(tp, tpm2.TPMAlgSHA256, 16,
					tpm2.AESEncryption(128, tpm2.EncryptOut), tpm2.Salted(key.handle, key.public))
				if err != nil {
					return fmt.Errorf("start a policy session: %w", err)
				}
				defer t.flush(ctx, sess.Handle())
				if _, err := (tpm2.PolicyPCR{PolicySession: sess.Handle(), Pcrs: desc.selection()}).Execute(tp); err != nil {
					return fmt.Errorf("TPM2_PolicyPCR: %w", err)
				}
				item.Auth = sess
			}
			resp, err := tpm2.Unseal{ItemHandle: item}.Execute(tp)
			switch {
			case errors.Is(err, tpm2.TPMRCPolicyFail), errors.Is(err, tpm2.TPMRCPCRChanged):
				return t.policyError(tp, desc, s.PCRValues, err)
			case err != nil:
				return fmt.Errorf("TPM2_Unseal: %w", err)
			}
			secret = resp.OutData.Buffer // go-tpm's own copy, decrypted: handed over, not copied again
			return nil
		})
	})
	if err != nil {
		return nil, fmt.Errorf("hwtpm: unseal (%s): %w", desc, err)
	}
	return secret, nil
}

// policyError is ErrPolicy, naming the PCRs that no longer hold the values sealed to.
func (t *TPM) policyError(tp transport.TPM, desc policyDesc, sealedValues [][]byte, cause error) error {
	if desc.Kind != policyKindPCR || len(sealedValues) != len(desc.PCRs) {
		return fmt.Errorf("%w: %w", ErrPolicy, cause)
	}
	now, err := desc.readPCRs(tp)
	if err != nil {
		return fmt.Errorf("%w: %w", ErrPolicy, cause)
	}
	var changed []int
	for i, p := range desc.PCRs {
		if !bytes.Equal(now[i], sealedValues[i]) {
			changed = append(changed, p)
		}
	}
	if len(changed) == 0 {
		return fmt.Errorf("%w: %w", ErrPolicy, cause)
	}
	return fmt.Errorf("%w: PCRs %v (%s) changed since sealing: %w", ErrPolicy, changed, desc.Bank, cause)
}

// check validates s before anything is sent to the TPM: its policy, and a public area that is
// a sealed data object whose authorization matches the policy.
func (s *Sealed) check() (policyDesc, tpm2.TPM2BPublic, tpm2.TPM2BPrivate, error) {
	fail := func(format string, a ...any) (policyDesc, tpm2.TPM2BPublic, tpm2.TPM2BPrivate, error) {
		return policyDesc{}, tpm2.TPM2BPublic{}, tpm2.TPM2BPrivate{}, fmt.Errorf("%w: %s", ErrBadSealed, fmt.Sprintf(format, a...))
	}
	desc, err := describePolicy(s.Policy)
	if err != nil {
		return fail("%v", err)
	}
	if len(s.StorageKey) == 0 {
		return fail("no storage key name")
	}
	if len(s.PCRValues) > 0 {
		size := 0
		if h, err := banks[desc.Bank].Hash(); err == nil && desc.Kind == policyKindPCR {
			size = h.Size()
		}
		if len(s.PCRValues) != len(desc.PCRs) {
			return fail("%d PCR values for policy %s", len(s.PCRValues), desc)
		}
		for i, v := range s.PCRValues {
			if len(v) != size {
				return fail("PCR %d's value is %d bytes, not %d", desc.PCRs[i], len(v), size)
			}
		}
	}
	pubBytes, ok := unwrap2B(s.Public)
	if !ok {
		return fail("public area is not a TPM2B_PUBLIC")
	}
	privBytes, ok := unwrap2B(s.Private)
	if !ok || len(privBytes) == 0 {
		return fail("private area is not a TPM2B_PRIVATE")
	}
	pub, err := unmarshalPublic(pubBytes)
	if err != nil {
		return fail("public area: %v", err)
	}
	attrs := pub.ObjectAttributes
	if pub.Type != tpm2.TPMAlgKeyedHash || !attrs.FixedTPM || !attrs.FixedParent || attrs.SensitiveDataOrigin || attrs.SignEncrypt || attrs.Decrypt {
		return fail("public area is not a sealed data object")
	}
	if policy := len(pub.AuthPolicy.Buffer) > 0; attrs.UserWithAuth == policy || (desc.Kind == policyKindPCR) != policy {
		return fail("public area's authorization does not match policy %s", desc)
	}
	return desc, tpm2.BytesAs2B[tpm2.TPMTPublic](pubBytes), tpm2.TPM2BPrivate{Buffer: privBytes}, nil
}

// unwrap2B returns the contents of a TPM2B whose size matches its length.
func unwrap2B(b []byte) ([]byte, bool) {
	if len(b) < 2 || int(binary.BigEndian.Uint16(b)) != len(b)-2 {
		return nil, false
	}
	return b[2:], true
}

// unmarshalPublic parses a TPMT_PUBLIC from a blob that may be anything.
func unmarshalPublic(b []byte) (pub *tpm2.TPMTPublic, err error) {
	defer func() {
		if r := recover(); r != nil {
			pub, err = nil, fmt.Errorf("unparsable: %v", r)
		}
	}()
	return tpm2.Unmarshal[tpm2.TPMTPublic](b)
}
