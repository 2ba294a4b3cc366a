package backend

import (
	"bytes"
	"testing"

	"github.com/vtpmd/vtpmd/backend/seam"
	"github.com/vtpmd/vtpmd/internal/tpmclient"
	"github.com/vtpmd/vtpmd/internal/tpmwire"
)

// doneGuard runs its own command after each guest command (as the manager's attestation guard
// writes its report index), through the engine whose response the guest is about to get.
type doneGuard struct{ own []byte }

func (doneGuard) Check([]byte) []byte                { return nil }
func (doneGuard) Started(seam.Exec) error            { return nil }
func (g doneGuard) Done(_, _ []byte, exec seam.Exec) { _, _ = exec(g.own) }

// TestProcessAppend: the data channel's appending Process answers as Process does; without a
// guard it allocates nothing per command (so a busy vTPM's heap does not grow), and with a
// guard whose own commands run after the guest's, the guest still gets its own response.
func TestProcessAppend(t *testing.T) {
	getRandom := tpmwire.GetRandom2(8)
	for _, guarded := range []bool{false, true} {
		cfg := Config{}
		if guarded {
			cfg.Guard = doneGuard{own: tpmwire.GetRandom2(40)}
		}
		in := newInstance(t, t.TempDir(), cfg)
		if err := in.Init(0); err != nil {
			t.Fatal(err)
		}
		if err := tpmclient.Startup(tpmclient.SendFunc(in.Process)); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 0, 4096)
		resp, err := in.ProcessAppend(append(buf, "kept"...), getRandom)
		if err != nil || !bytes.HasPrefix(resp, []byte("kept")) || len(resp) != 4+20 {
			t.Fatalf("guard %v: ProcessAppend: %x %v", guarded, resp, err)
		}
		if rc, err := tpmwire.ResponseCode(resp[4:]); err != nil || rc != 0 {
			t.Fatalf("guard %v: GetRandom: rc %x %v", guarded, rc, err)
		}
		if guarded {
			in.Close()
			continue
		}
		allocs := testing.AllocsPerRun(100, func() {
			if resp, err = in.ProcessAppend(buf[:0], getRandom); err != nil || len(resp) != 20 {
				t.Fatalf("GetRandom: %x %v", resp, err)
			}
		})
		if allocs != 0 {
			t.Fatalf("ProcessAppend without a guard allocates %.1f times per command, want 0", allocs)
		}
		in.Close()
	}
}
