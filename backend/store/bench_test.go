package store

import (
	"fmt"
	"testing"

	"github.com/vtpmd/vtpmd/emulator"
)

// BenchmarkStoreWrite measures one durable write of a permall-sized blob, the write libtpms
// makes for every NV change, with and without fsync, plain and encrypted.
func BenchmarkStoreWrite(b *testing.B) {
	for _, c := range []struct {
		name     string
		keyBytes int
		linear   bool
		noFsync  bool
	}{
		{"dir/plain/nofsync", 0, false, true},
		{"dir/aes256/nofsync", 32, false, true},
		{"file/aes256/nofsync", 32, true, true},
		{"dir/aes256/fsync", 32, false, false},
	} {
		b.Run(c.name, func(b *testing.B) {
			o := Options{TPM2: true, NoFsync: c.noFsync}
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
