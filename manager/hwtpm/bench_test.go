package hwtpm

import (
	"testing"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport/linuxudstpm"
)

// The benchmarks time the operations on Debian's swtpm (go test -bench . -run '^$').

func BenchmarkSeal(b *testing.B) {
	for _, policy := range []Policy{PolicyNone{}, PolicyPCR{PCRs: []int{0, 7}}} {
		b.Run(policyName(policy), func(b *testing.B) {
			tpm := startSwtpm(b).open()
			ctx := b.Context()
			for b.Loop() {
				if _, err := tpm.Seal(ctx, []byte("0123456789abcdef0123456789abcdef"), policy); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func BenchmarkUnseal(b *testing.B) {
	for _, policy := range []Policy{PolicyNone{}, PolicyPCR{PCRs: []int{0, 7}}} {
		b.Run(policyName(policy), func(b *testing.B) {
			tpm := startSwtpm(b).open()
			ctx := b.Context()
			sealed, err := tpm.Seal(ctx, []byte("0123456789abcdef0123456789abcdef"), policy)
			if err != nil {
				b.Fatal(err)
			}
			for b.Loop() {
				if _, err := tpm.Unseal(ctx, sealed); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func BenchmarkCounter(b *testing.B) {
	tpm := startSwtpm(b).open()
	ctx := b.Context()
	if err := tpm.DefineCounter(ctx, testIndex); err != nil {
		b.Fatal(err)
	}
	b.Run("Increment", func(b *testing.B) {
		for b.Loop() {
			if _, err := tpm.Increment(ctx, testIndex); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("Read", func(b *testing.B) {
		for b.Loop() {
			if _, err := tpm.ReadCounter(ctx, testIndex); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkSwtpmTransport compares one connection kept open (this package) with go-tpm's
// linuxudstpm, which connects for every command, on TPM2_GetRandom and on the storage key's
// TPM2_CreatePrimary.
func BenchmarkSwtpmTransport(b *testing.B) {
	getRandom := func(b *testing.B, tp transportTPM) {
		if _, err := (tpm2.GetRandom{BytesRequested: 32}).Execute(tp); err != nil {
			b.Fatal(err)
		}
	}
	createPrimary := func(b *testing.B, tp transportTPM) {
		key, err := createPrimary(tp, tpm2.ECCSRKTemplate)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := (tpm2.FlushContext{FlushHandle: key.handle}).Execute(tp); err != nil {
			b.Fatal(err)
		}
	}
	for _, cmd := range []struct {
		name string
		run  func(*testing.B, transportTPM)
	}{{"GetRandom", getRandom}, {"CreatePrimaryECC", createPrimary}} {
		b.Run(cmd.name+"/persistent", func(b *testing.B) {
			tpm := startSwtpm(b).open()
			tp := tpm.transport(b.Context())
			for b.Loop() {
				cmd.run(b, tp)
			}
		})
		b.Run(cmd.name+"/per-command", func(b *testing.B) {
			sw := startSwtpm(b)
			tp, err := linuxudstpm.Open(sw.Socket)
			if err != nil {
				b.Fatal(err)
			}
			defer tp.Close()
			for b.Loop() {
				cmd.run(b, tp)
			}
		})
	}
}

func policyName(p Policy) string {
	if _, ok := p.(PolicyNone); ok {
		return "none"
	}
	return "pcr"
}
