package attest

import (
	"bytes"
	"testing"
)

// FuzzDecode: Decode never panics, and what it accepts encodes back to the same bytes
// (without the padding).
func FuzzDecode(f *testing.F) {
	b, err := sampleReport().Encode()
	if err != nil {
		f.Fatal(err)
	}
	f.Add(b)
	f.Add(append(bytes.Clone(b), 0, 0))
	f.Add(b[:20])
	f.Add([]byte("vtAR\x01\x00\x00"))
	f.Fuzz(func(t *testing.T, in []byte) {
		r, err := Decode(in)
		if err != nil {
			return
		}
		out, err := r.Encode()
		if err != nil {
			t.Fatalf("decoded report does not encode: %v", err)
		}
		if !bytes.Equal(out, in[:len(out)]) {
			t.Fatal("decode/encode changed the bytes")
		}
	})
}

// FuzzTPMStructures: the quote, signature and public-area parsers never panic on any input.
func FuzzTPMStructures(f *testing.F) {
	f.Add([]byte{0xff, 0x54, 0x43, 0x47, 0x80, 0x18, 0, 0, 0, 0})
	f.Add([]byte{0, 0x14, 0, 0xb, 0, 2, 1, 2})
	f.Add([]byte{0, 0x18, 0, 0xb, 0, 1, 1, 0, 1, 2})
	f.Add(append([]byte{0, 1, 0, 0xb, 0, 0, 0, 0x72}, make([]byte, 30)...))
	f.Fuzz(func(t *testing.T, in []byte) {
		ParseQuote(in)
		ParseSignature(in)
		ParsePublic(in)
		expectedName(in)
	})
}
