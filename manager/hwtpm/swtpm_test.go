package hwtpm

import (
	"context"
	"crypto/sha256"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/internal/swtpmtest"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
)

// swtpm is Debian's swtpm standing in for the host's hardware TPM (internal/swtpmtest).
type swtpm struct {
	*swtpmtest.TPM
	t testing.TB
}

// startSwtpm starts a swtpm with a fresh state (a new TPM, with its own seeds) on a unix
// socket and stops it when the test ends.
func startSwtpm(t testing.TB) *swtpm { return startSwtpmFlags(t, swtpmtest.DefaultFlags) }

// startSwtpmFlags is startSwtpm with other --flags ("" for none).
func startSwtpmFlags(t testing.TB, flags string) *swtpm {
	t.Helper()
	return &swtpm{swtpmtest.StartWith(t, swtpmtest.Options{Flags: flags}), t}
}

// startSwtpmTCP is startSwtpm on TCP ports.
func startSwtpmTCP(t testing.TB) *swtpm {
	t.Helper()
	return &swtpm{swtpmtest.StartWith(t, swtpmtest.Options{TCP: true, Flags: swtpmtest.DefaultFlags}), t}
}

func (s *swtpm) restart() { s.Restart() }

// spec is the spec of this swtpm's data channel.
func (s *swtpm) spec() Spec {
	if s.Port != 0 {
		return Spec{Kind: KindSwtpm, Host: "127.0.0.1", Port: s.Port}
	}
	return Spec{Kind: KindSwtpm, Path: s.Socket}
}

// open opens the swtpm as a TPM and closes it when the test ends.
func (s *swtpm) open() *TPM {
	s.t.Helper()
	tpm, err := Open(testContext(s.t), s.spec())
	if err != nil {
		s.t.Fatalf("Open: %v\nswtpm: %s", err, s.Log())
	}
	s.t.Cleanup(func() { _ = tpm.Close() })
	return tpm
}

// extend extends a SHA-256 PCR, through the TPM's own connection (swtpm serves one at a time).
func extend(t testing.TB, tpm *TPM, pcr int, data string) {
	t.Helper()
	digest := sha256.Sum256([]byte(data))
	err := tpm.do(testContext(t), func(tp transport.TPM) error {
		_, err := tpm2.PCRExtend{
			PCRHandle: tpm2.AuthHandle{Handle: tpm2.TPMHandle(pcr), Auth: tpm2.PasswordAuth(nil)},
			Digests:   tpm2.TPMLDigestValues{Digests: []tpm2.TPMTHA{{HashAlg: tpm2.TPMAlgSHA256, Digest: digest[:]}}},
		}.Execute(tp)
		return err
	})
	if err != nil {
		t.Fatalf("extend PCR %d: %v", pcr, err)
	}
}

func testContext(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// transportTPM names go-tpm's transport in the tests.
type transportTPM = transport.TPM
