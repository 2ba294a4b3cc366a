package backend

import (
	"strings"
	"testing"

	"github.com/vtpmd/vtpmd/internal/seccomp"
)

func TestCapabilities(t *testing.T) {
	c2 := Capabilities(true)
	c1 := Capabilities(false)
	for _, want := range []string{`"type": "swtpm"`, `"tpm-2.0"`, `"cmdarg-pwd-fd"`, `"cmdarg-migration"`, `"rsa-keysize-2048"`} {
		if !strings.Contains(c2, want) {
			t.Errorf("--tpm2 capabilities lack %s: %s", want, c2)
		}
	}
	if strings.Contains(c1, "rsa-keysize") {
		t.Errorf("rsa-keysize listed without --tpm2: %s", c1)
	}
	if !strings.HasPrefix(c2, `{ "type": "swtpm", "features": [ "tpm-1.2", "tpm-2.0", "tpm-send-command-header"`) {
		t.Errorf("feature order differs from swtpm's: %s", c2)
	}
	// cmdarg-seccomp only where --seccomp installs a filter, where swtpm lists it
	if seccomp.Supported() != strings.Contains(c2, `"ctrl-opt-terminate", "cmdarg-seccomp", "cmdarg-key-fd"`) {
		t.Errorf("cmdarg-seccomp (supported: %v): %s", seccomp.Supported(), c2)
	}
}
