package store

import (
	"fmt"
	"testing"

	"github.com/vtpmd/vtpmd/emulator"
)

// BenchmarkStoreWrite measures one durable write of a permall-sized blob, the write libtpms
// makes for every NV change, with and without fsync, plain, encrypted, and encrypted with a
// state version.
func BenchmarkStoreWrite(b *testing.B) {
	for _, c := range []struct {
		name      string
		keyBytes  int
		linear    bool
		noFsync   bool
		versioned bool
	}{
		{"dir/plain/nofsync", 0, false, true, false},
		{"dir/aes256/nofsync", 32, false, true, false},
		{"dir/aes256-versioned/nofsync", 32, false, true, true},
		{"file/aes256/nofsync", 32, true, true, false},
		{"file/aes256-versioned/nofsync", 32, true, true, true},
		{"dir/aes256/fsync", 32, false, false, false},
		{"dir/aes256-versioned/fsync", 32, false, false, true},
	} {
		b.Run(c.name, func(b *testing.B) {
			o := Options{TPM2: true, NoFsync: c.noFsync, Versioned: c.versioned}
			if c.keyBytes > 0 {
				o.StateKey = mustKey(b, c.keyBytes, 7)
			}
			uri := "dir://" + b.TempDir()
			if c.linear {
				uri = fmt.Sprintf("file://%s/tpm2.img", b.TempDir())
			}
			s := mustOpen(b, uri, o)
			b.SetBytes(int64(len(testBlob)))
			b.ReportAllocs()
			for b.Loop() {
				if err := s.Store(emulator.StatePermanent, testBlob); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
