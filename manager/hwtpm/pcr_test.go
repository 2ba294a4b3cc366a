package hwtpm

import (
	"bytes"
	"crypto/sha256"
	"fmt"
	"testing"
)

func TestReadPCRs(t *testing.T) {
	tpm := startSwtpm(t).open()
	ctx := testContext(t)
	banks, err := tpm.PCRBanks(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(banks) == 0 || !bytes.Contains([]byte(fmt.Sprint(banks)), []byte("sha256")) {
		t.Fatalf("banks %v", banks)
	}
	extend(t, tpm, 3, "measurement")
	// twelve PCRs, out of order: more than one TPM2_PCR_Read
	want := []int{16, 3, 0, 1, 2, 4, 5, 6, 7, 8, 9, 10}
	vals, err := tpm.ReadPCRs(ctx, "sha256", want)
	if err != nil {
		t.Fatal(err)
	}
	d := sha256.Sum256([]byte("measurement"))
	pcr3 := sha256.Sum256(append(make([]byte, 32), d[:]...))
	if !bytes.Equal(vals[1], pcr3[:]) || !bytes.Equal(vals[0], make([]byte, 32)) || len(vals) != len(want) {
		t.Fatalf("PCR 16 %x, PCR 3 %x (want %x)", vals[0], vals[1], pcr3)
	}
	if _, err := tpm.ReadPCRs(ctx, "md5", []int{0}); err == nil {
		t.Fatal("bank md5 read")
	}
}
