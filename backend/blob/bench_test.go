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

// BenchmarkSealVersioned and BenchmarkOpenVersioned are Seal and Open with a state version:
// one TLV and one short HMAC more.
func BenchmarkSealVersioned(b *testing.B) {
	k := key(b, 32, 7)
	vk, err := NewVersionKey(k)
	if err != nil {
		b.Fatal(err)
	}
	b.SetBytes(int64(len(plainBlob)))
	b.ReportAllocs()
	v := uint64(0)
	for b.Loop() {
		v++
		if _, err := SealVersioned(plainBlob, k, vk, "permall", Stamp{v, [3]uint64{v, 1, 0}}); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkOpenVersioned(b *testing.B) {
	k := key(b, 32, 7)
	vk, err := NewVersionKey(k)
	if err != nil {
		b.Fatal(err)
	}
	sealed, err := SealVersioned(plainBlob, k, vk, "permall", Stamp{2, [3]uint64{2, 1, 0}})
	if err != nil {
		b.Fatal(err)
	}
	b.SetBytes(int64(len(plainBlob)))
	b.ReportAllocs()
	for b.Loop() {
		if _, _, err := OpenVersioned(sealed, k, vk, "permall"); err != nil {
			b.Fatal(err)
		}
	}
}
