package backend

import (
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/vtpmd/vtpmd/backend/store"
	"github.com/vtpmd/vtpmd/internal/seccomp"
)

// SwtpmCompatVersion is the swtpm whose interfaces vtpmd reproduces: what
// --print-capabilities and swtpm --version report in swtpm's place.
const SwtpmCompatVersion = "0.8.0"

// Capabilities is swtpm socket --print-capabilities: only what vtpmd implements, in swtpm's
// JSON shape (libvirt reads it to choose options).
func Capabilities(tpm2 bool) string {
	features := []string{"tpm-1.2", "tpm-2.0", "tpm-send-command-header", "flags-opt-startup",
		"flags-opt-disable-auto-shutdown", "ctrl-opt-terminate"}
	if seccomp.Supported() { // --seccomp installs a filter here
		features = append(features, "cmdarg-seccomp")
	}
	features = append(features, "cmdarg-key-fd", "cmdarg-pwd-fd",
		"cmdarg-print-states", "cmdarg-chroot", "cmdarg-migration", "nvram-backend-dir", "nvram-backend-file")
	if tpm2 {
		for _, n := range rsaKeySizes() {
			features = append(features, fmt.Sprintf("rsa-keysize-%d", n))
		}
	}
	features = append(features, "tpmstate-opt-lock")
	q := make([]string, len(features))
	for i, f := range features {
		q[i] = `"` + f + `"`
	}
	return fmt.Sprintf(`{ "type": "swtpm", "features": [ %s ], "version": "%s" }`, strings.Join(q, ", "), SwtpmCompatVersion)
}

// rsaKeySizes are the RSA key sizes libtpms supports (its TPMFeatures info).
func rsaKeySizes() []int { return []int{1024, 2048, 3072} }

// PrintStates is swtpm socket --print-states: the stored blobs of the state at uri, as JSON.
func PrintStates(w io.Writer, uri string, tpm2 bool) error {
	st, err := store.Open(uri, store.Options{TPM2: tpm2})
	if err != nil {
		return err
	}
	defer st.Close()
	if st.Formatted() { // a new file:// store, formatted as swtpm formats it, and says so
		fmt.Fprintln(os.Stderr, "swtpm: "+st.FormatNotice())
	}
	states, err := st.States()
	if err != nil {
		return err
	}
	parts := make([]string, len(states))
	for i, s := range states {
		parts[i] = fmt.Sprintf(`{"name": "%s", "size": %d}`, s.Name, s.Size)
	}
	if len(parts) == 0 {
		_, err = fmt.Fprint(w, `{ "type": "swtpm", "states": [] }`)
	} else {
		_, err = fmt.Fprintf(w, `{ "type": "swtpm", "states": [ %s ] }`, strings.Join(parts, ", "))
	}
	return err
}
