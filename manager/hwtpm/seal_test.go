package hwtpm

import (
	"bytes"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"
)

func TestSealUnsealRoundTrip(t *testing.T) {
	tpm := startSwtpm(t).open()
	ctx := testContext(t)
	secret := []byte("a vTPM state key, 32 bytes long!")

	start := time.Now()
	sealed, err := tpm.Seal(ctx, secret, PolicyNone{})
	if err != nil {
		t.Fatal(err)
	}
	sealTime := time.Since(start)

	// The blob goes through JSON, as the manager stores it.
	data, err := json.Marshal(sealed)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(data, secret) {
		t.Fatal("the sealed blob's JSON holds the secret in the clear")
	}
	var back Sealed
	if err := json.Unmarshal(data, &back); err != nil {
		t.Fatalf("unmarshal %s: %v", data, err)
	}

	start = time.Now()
	got, err := tpm.Unseal(ctx, &back)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("swtpm 0.7.1: seal %v, unseal %v, blob %d bytes of JSON", sealTime, time.Since(start), len(data))
	if !bytes.Equal(got, secret) {
		t.Fatalf("Unseal = %q, want %q", got, secret)
	}

	// Many operations in a row leave no transient objects behind (swtpm holds three).
	for i := range 5 {
		if _, err := tpm.Unseal(ctx, sealed); err != nil {
			t.Fatalf("unseal #%d: %v", i+2, err)
		}
	}
}

func TestUnsealOnAnotherTPM(t *testing.T) {
	first := startSwtpm(t).open()
	second := startSwtpm(t).open()
	ctx := testContext(t)
	for _, policy := range []Policy{PolicyNone{}, PolicyPCR{PCRs: []int{7}}} {
		sealed, err := first.Seal(ctx, []byte("secret"), policy)
		if err != nil {
			t.Fatal(err)
		}
		_, err = second.Unseal(ctx, sealed)
		if !errors.Is(err, ErrWrongTPM) {
			t.Errorf("%v: Unseal on another TPM: %v, want ErrWrongTPM", policy, err)
		}
		// Even a blob whose storage key name is made to match does not unseal there.
		forged := *sealed
		forged.StorageKey = storageKeyName(t, second)
		if _, err := second.Unseal(ctx, &forged); err == nil || errors.Is(err, ErrWrongTPM) {
			t.Errorf("%v: forged blob: %v, want a load failure", policy, err)
		} else {
			t.Logf("%v: forged blob: %v", policy, err)
		}
	}
}

func TestPolicyPCR(t *testing.T) {
	tpm := startSwtpm(t).open()
	ctx := testContext(t)
	secret := []byte("sealed to PCRs 7 and 16")
	sealed, err := tpm.Seal(ctx, secret, PolicyPCR{Bank: "sha256", PCRs: []int{16, 7, 16}})
	if err != nil {
		t.Fatal(err)
	}
	if p, ok := sealed.Policy.(PolicyPCR); !ok || p.Bank != "sha256" || len(p.PCRs) != 2 || p.PCRs[0] != 7 || p.PCRs[1] != 16 {
		t.Fatalf("Sealed.Policy = %#v, want the normal form sha256 [7 16]", sealed.Policy)
	}

	extend(t, tpm, 23, "an unrelated measurement")
	got, err := tpm.Unseal(ctx, sealed)
	if err != nil || !bytes.Equal(got, secret) {
		t.Fatalf("after extending an unrelated PCR: Unseal = %q, %v", got, err)
	}

	extend(t, tpm, 16, "a new host component")
	_, err = tpm.Unseal(ctx, sealed)
	if !errors.Is(err, ErrPolicy) {
		t.Fatalf("after extending a sealed PCR: Unseal = %v, want ErrPolicy", err)
	}
	if !strings.Contains(err.Error(), "PCRs [16]") {
		t.Errorf("the error does not name the changed PCR: %v", err)
	}
	t.Log(err)

	// Sealing again to the new values works.
	resealed, err := tpm.Seal(ctx, secret, PolicyPCR{PCRs: []int{7, 16}})
	if err != nil {
		t.Fatal(err)
	}
	if got, err := tpm.Unseal(ctx, resealed); err != nil || !bytes.Equal(got, secret) {
		t.Fatalf("resealed: Unseal = %q, %v", got, err)
	}
}

// TestPolicyPCRManyPCRs: more PCRs than one TPM2_PCR_Read returns, in every bank (swtpm
// without swtpm_setup has all four active).
func TestPolicyPCRManyPCRs(t *testing.T) {
	tpm := startSwtpm(t).open()
	ctx := testContext(t)
	all := make([]int, 24)
	for i := range all {
		all[i] = i
	}
	for _, bank := range []string{"sha256", "sha1", "sha384", "sha512"} {
		sealed, err := tpm.Seal(ctx, []byte("x"), PolicyPCR{Bank: bank, PCRs: all})
		if err != nil {
			t.Fatalf("%s: %v", bank, err)
		}
		if len(sealed.PCRValues) != 24 {
			t.Fatalf("%s: %d PCR values recorded", bank, len(sealed.PCRValues))
		}
		if _, err := tpm.Unseal(ctx, sealed); err != nil {
			t.Fatalf("%s: %v", bank, err)
		}
	}
}

func TestSealRefusesBadInput(t *testing.T) {
	tpm := startSwtpm(t).open()
	ctx := testContext(t)
	var nilPCR *PolicyPCR
	tests := []struct {
		name   string
		secret []byte
		policy Policy
	}{
		{"empty secret", nil, PolicyNone{}},
		{"oversized secret", make([]byte, MaxSecret+1), PolicyNone{}},
		{"nil policy", []byte("x"), nil},
		{"nil *PolicyPCR", []byte("x"), nilPCR},
		{"no PCRs", []byte("x"), PolicyPCR{}},
		{"PCR out of range", []byte("x"), PolicyPCR{PCRs: []int{24}}},
		{"negative PCR", []byte("x"), PolicyPCR{PCRs: []int{-1}}},
		{"unknown bank", []byte("x"), PolicyPCR{Bank: "md5", PCRs: []int{0}}},
	}
	for _, tt := range tests {
		if _, err := tpm.Seal(ctx, tt.secret, tt.policy); err == nil {
			t.Errorf("%s: Seal succeeded", tt.name)
		}
	}
	if _, err := tpm.Seal(ctx, make([]byte, MaxSecret), &PolicyPCR{PCRs: []int{0}}); err != nil {
		t.Errorf("a secret of MaxSecret bytes, *PolicyPCR: %v", err)
	}
}

func TestUnsealRefusesMalformedBlobs(t *testing.T) {
	tpm := startSwtpm(t).open()
	ctx := testContext(t)
	good, err := tpm.Seal(ctx, []byte("secret"), PolicyNone{})
	if err != nil {
		t.Fatal(err)
	}
	mutate := func(f func(s *Sealed)) *Sealed {
		s := *good
		s.Public, s.Private = bytes.Clone(good.Public), bytes.Clone(good.Private)
		f(&s)
		return &s
	}
	tests := map[string]*Sealed{
		"nil":                  nil,
		"no policy":            mutate(func(s *Sealed) { s.Policy = nil }),
		"policy not as sealed": mutate(func(s *Sealed) { s.Policy = PolicyPCR{PCRs: []int{0}} }),
		"no public":            mutate(func(s *Sealed) { s.Public = nil }),
		"public size wrong":    mutate(func(s *Sealed) { s.Public = s.Public[:len(s.Public)-1] }),
		"public garbage":       mutate(func(s *Sealed) { s.Public = []byte{0, 4, 0xff, 0xff, 0xff, 0xff} }),
		"private size wrong":   mutate(func(s *Sealed) { s.Private = append(s.Private, 0) }),
		"no storage key":       mutate(func(s *Sealed) { s.StorageKey = nil }),
		"private tampered":     mutate(func(s *Sealed) { s.Private[len(s.Private)-1] ^= 1 }),
		"public tampered":      mutate(func(s *Sealed) { s.Public[len(s.Public)-3] ^= 1 }),
	}
	for name, s := range tests {
		got, err := tpm.Unseal(ctx, s)
		if err == nil {
			t.Errorf("%s: Unseal = %q", name, got)
			continue
		}
		if !errors.Is(err, ErrBadSealed) {
			t.Errorf("%s: %v, want ErrBadSealed", name, err)
		}
	}
	var s Sealed
	for _, bad := range []string{`{"policy":{"kind":"magic"}}`, `{"policy":{"kind":"pcr"}}`, `{"policy":{"kind":"none","pcrs":[1]}}`} {
		if err := json.Unmarshal([]byte(bad), &s); err == nil {
			t.Errorf("json.Unmarshal(%s) succeeded", bad)
		}
	}
	// The good blob still unseals: nothing above left the TPM in a bad state.
	if _, err := tpm.Unseal(ctx, good); err != nil {
		t.Fatal(err)
	}
}

// storageKeyName is the name of tpm's storage key.
func storageKeyName(t *testing.T, tpm *TPM) []byte {
	t.Helper()
	ctx := testContext(t)
	var name []byte
	err := tpm.do(ctx, func(tp transportTPM) error {
		return tpm.withStorageKey(ctx, tp, func(k *storageKey) error {
			name = k.name.Buffer
			return nil
		})
	})
	if err != nil {
		t.Fatal(err)
	}
	return name
}
