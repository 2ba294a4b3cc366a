package manager

import (
	"testing"

	"github.com/vtpmd/vtpmd/manager/attest"
)

// FuzzNonceWrite: the guard's looks at a guest's command (Check, nonceWrite) never panic, and a nonce write it
// recognizes always ends within the nonce index.
func FuzzNonceWrite(f *testing.F) {
	f.Add(nvWriteTo(NonceIndex))
	f.Add(nvWriteTo(ReportIndex))
	f.Add([]byte{0x80, 0x02, 0, 0, 0, 0x16, 0, 0, 0x01, 0x37, 0x01, 0x40, 0, 2, 0x01, 0x40, 0, 2, 0xff, 0xff, 0xff, 0xff})
	f.Fuzz(func(t *testing.T, cmd []byte) {
		(&attestGuard{}).Check(cmd)
		definedIndex(cmd)
		end, ok := nonceWrite(cmd)
		if ok && (end <= 0 || end > attest.MaxNonce) {
			t.Fatalf("nonce end %d", end)
		}
	})
}
