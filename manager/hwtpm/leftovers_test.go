package hwtpm

import (
	"net"
	"testing"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
)

// TestOpenFlushesLeftovers: objects and sessions left loaded in a TPM without a resource
// manager (a manager killed mid-operation) are flushed at Open, so sealing still works.
func TestOpenFlushesLeftovers(t *testing.T) {
	sw := startSwtpm(t)
	c, err := net.Dial("unix", sw.Socket)
	if err != nil {
		t.Fatal(err)
	}
	tp := transport.FromReadWriter(c)
	for range 3 {
		if _, err := (tpm2.CreatePrimary{PrimaryHandle: tpm2.TPMRHOwner, InPublic: tpm2.New2B(tpm2.ECCSRKTemplate)}).Execute(tp); err != nil {
			t.Fatal(err)
		}
	}
	if _, _, err := tpm2.HMACSession(tp, tpm2.TPMAlgSHA256, 16); err != nil {
		t.Fatal(err)
	}
	c.Close()
	tpm := sw.open()
	sealed, err := tpm.Seal(testContext(t), []byte("secret"), PolicyNone{})
	if err != nil {
		t.Fatalf("seal with leftovers: %v", err)
	}
	if got, err := tpm.Unseal(testContext(t), sealed); err != nil || string(got) != "secret" {
		t.Fatalf("unseal: %q %v", got, err)
	}
}
