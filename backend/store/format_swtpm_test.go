package store

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestFormatLikeSwtpm: a file:// store without the magic (missing, empty, foreign) is formatted
// when it is opened, and the file is the one Debian's swtpm 0.7.1 makes of it when it opens the
// backend for --print-states: same bytes, size and mode. swtpm says so on stderr in the words
// of FormatNotice.
func TestFormatLikeSwtpm(t *testing.T) {
	bins := debianSwtpm(t)
	for _, c := range []struct {
		name    string
		content []byte // nil: no file
		mode    os.FileMode
	}{
		{"missing", nil, 0},
		{"empty", []byte{}, 0o600},
		{"foreign", bytes.Repeat([]byte("not a store "), 40), 0o644},
		{"short foreign", []byte("short"), 0o640},
	} {
		t.Run(c.name, func(t *testing.T) {
			var files [2]string
			for i := range files {
				files[i] = filepath.Join(t.TempDir(), "tpm2.img")
				if c.content != nil {
					if err := os.WriteFile(files[i], c.content, c.mode); err != nil {
						t.Fatal(err)
					}
					os.Chmod(files[i], c.mode)
				}
			}
			uri := "file://" + files[0]
			cmd := exec.Command(bins.swtpm, "socket", "--tpm2", "--print-states", "--tpmstate", "backend-uri="+uri)
			var stdout, stderr bytes.Buffer
			cmd.Stdout, cmd.Stderr = &stdout, &stderr
			if err := cmd.Run(); err != nil {
				t.Fatalf("swtpm --print-states: %v: %s", err, stderr.String())
			}
			if got := strings.TrimSpace(stdout.String()); got != `{ "type": "swtpm", "states": [] }` {
				t.Fatalf("swtpm --print-states: %q", got)
			}
			s := mustOpen(t, "file://"+files[1], Options{TPM2: true})
			if !s.Formatted() {
				t.Fatal("not formatted")
			}
			notice := strings.ReplaceAll(s.FormatNotice(), files[1], files[0])
			if got := strings.TrimSpace(stderr.String()); got != "swtpm: "+notice {
				t.Fatalf("swtpm says %q, FormatNotice %q", got, notice)
			}
			want, got := mustRead(t, files[0]), mustRead(t, files[1])
			if !bytes.Equal(got, want) {
				t.Fatalf("formatted store differs from swtpm's:\n% x\nswtpm:\n% x", got, want)
			}
			sw, _ := os.Stat(files[0])
			vt, _ := os.Stat(files[1])
			if sw.Mode() != vt.Mode() {
				t.Fatalf("mode %v, swtpm's %v", vt.Mode(), sw.Mode())
			}
		})
	}
}
