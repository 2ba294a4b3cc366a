package blob

import "testing"

// BenchmarkSeal and BenchmarkOpen measure the codec's share of a state write and load of a
// permall-sized blob.
func BenchmarkSeal(b *testing.B) {
	k := key(b, 32, 7)
	b.SetBytes(int64(len(plainBlob)))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := Seal(plainBlob, k); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkOpen(b *testing.B) {
	k := key(b, 32, 7)
	sealed, err := Seal(plainBlob, k)
	if err != nil {
		b.Fatal(err)
	}
	b.SetBytes(int64(len(plainBlob)))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := Open(sealed, k); err != nil {
			b.Fatal(err)
		}
	}
}
