//go:build cgo

// These tests run against libtpms itself (emulator/libtpms, cgo); the package does not need it.

package tpmclient

import (
	"bytes"
	"crypto/sha256"
	"testing"

	"github.com/vtpmd/vtpmd/emulator/libtpms"

	"github.com/google/go-tpm/tpm2"

	"github.com/vtpmd/vtpmd/emulator"
)

func TestCommandsInProcess(t *testing.T) {
	e, err := libtpms.Open(emulator.TPM2, emulator.NewMemStore(), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	if err := e.Start(); err != nil {
		t.Fatal(err)
	}
	tp := SendFunc(e.Process)
	if err := Startup(tp); err != nil {
		t.Fatal(err)
	}
	if err := Startup(tp); err != nil {
		t.Fatalf("second startup should be tolerated: %v", err)
	}
	r, err := GetRandom(tp, 16)
	if err != nil || len(r) != 16 {
		t.Fatalf("GetRandom: %x %v", r, err)
	}
	d := sha256.Sum256([]byte("x"))
	if err := PCRExtend(tp, 16, d[:]); err != nil {
		t.Fatal(err)
	}
	v, err := PCRRead(tp, 16)
	if err != nil {
		t.Fatal(err)
	}
	want := sha256.Sum256(append(make([]byte, 32), d[:]...))
	if !bytes.Equal(v, want[:]) {
		t.Fatalf("PCR16 = %x, want %x", v, want)
	}
	ak, err := CreatePrimary(tp, tpm2.TPMRHOwner, ECCSigningTemplate)
	if err != nil {
		t.Fatal(err)
	}
	if err := Quote(tp, ak, []byte("nonce"), 0, 16); err != nil {
		t.Fatal(err)
	}
	if err := NVDefine(tp, 0x01500001, 32); err != nil {
		t.Fatal(err)
	}
	if err := NVWrite(tp, 0x01500001, []byte("hello"), 0); err != nil {
		t.Fatal(err)
	}
	got, err := NVRead(tp, 0x01500001, 5, 0)
	if err != nil || string(got) != "hello" {
		t.Fatalf("NVRead = %q %v", got, err)
	}
}
