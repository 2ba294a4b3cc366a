package manager

import (
	"path/filepath"
	"slices"
	"testing"

	"github.com/google/go-tpm/tpm2"

	"github.com/vtpmd/vtpmd/backend/seam"
)

// TestInstanceGuardCommands: every part of a vTPM's guard names the commands it must see, so a
// vTPM under a manager keeps its native data thread; those commands include each part's.
func TestInstanceGuardCommands(t *testing.T) {
	g := InstanceGuard(GuardConfig{Client: NewClient(filepath.Join(t.TempDir(), "none.sock")), StateURI: "dir:///x", TPM2: true})
	cmds, ok := seam.CommandsOf(g)
	if !ok {
		t.Fatal("a part of the instance guard must see every command: no native data thread under a manager")
	}
	for _, c := range []tpm2.TPMCC{tpm2.TPMCCStartup, tpm2.TPMCCPCRExtend, tpm2.TPMCCPCRReset, tpm2.TPMCCPCREvent,
		tpm2.TPMCCEventSequenceComplete, tpm2.TPMCCNVWrite, tpm2.TPMCCNVDefineSpace, tpm2.TPMCCNVUndefineSpace,
		tpm2.TPMCCNVUndefineSpaceSpecial, tpm2.TPMCCNVRead, tpm2.TPMCCPolicyNV, tpm2.TPMCCNVCertify} {
		if !slices.Contains(cmds, uint32(c)) {
			t.Errorf("command %#x is not seen by the guard", uint32(c))
		}
	}
	for _, c := range []tpm2.TPMCC{tpm2.TPMCCGetRandom, tpm2.TPMCCQuote, tpm2.TPMCCCreate, tpm2.TPMCCPCRRead} {
		if slices.Contains(cmds, uint32(c)) {
			t.Errorf("command %#x goes through Go for nothing", uint32(c))
		}
	}
}
