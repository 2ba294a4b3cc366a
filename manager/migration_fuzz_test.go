package manager

import (
	"bytes"
	"encoding/binary"
	"strings"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/backend/seam"
)

// FuzzEnvelope: the sealed-blob decoder (a blob from QEMU's stream, i.e. from anyone) never
// panics, and what opens is only what was sealed and signed.
func FuzzEnvelope(f *testing.F) {
	ca := newTestCA(&testing.T{}, "ops")
	id := ca.identity(&testing.T{}, "hostA", ca)
	key := bytes.Repeat([]byte{0x42}, oneTimeKeySize)
	hdr := envelopeHeader{Ticket: strings.Repeat("cd", 16), Type: 2, VM: "uuid", SourceID: id.ID(), Chain: id.chainDER(),
		Source: "127.0.0.1:1", Created: time.Unix(0, 0).UTC()}
	good, err := sealEnvelope(hdr, key, []byte("a volatile state"), id)
	if err != nil {
		f.Fatal(err)
	}
	ge, err := parseEnvelope(good)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(good)
	f.Add(good[:len(good)/2])
	f.Add([]byte(seam.SealedMagic))
	f.Add(binary.BigEndian.AppendUint32(append([]byte(seam.SealedMagic), 0, 1), 0xffffffff))
	f.Add(append(append([]byte(seam.SealedMagic), 0, 1, 0, 0, 0, 2), "{}"...))
	f.Fuzz(func(t *testing.T, b []byte) {
		e, err := parseEnvelope(b)
		if err != nil {
			return
		}
		if _, err := e.verify(id.Roots); err != nil {
			return
		}
		// (an ECDSA signature has two valid forms; the release compares whole blobs)
		plain, err := e.open(key)
		if err == nil && (!bytes.Equal(e.rawHdr, ge.rawHdr) || !bytes.Equal(e.ct, ge.ct)) {
			t.Fatalf("a header or ciphertext other than the sealed one opened: %q", plain)
		}
	})
}
