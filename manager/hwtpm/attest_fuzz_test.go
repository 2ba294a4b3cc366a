package hwtpm

import (
	"encoding/hex"
	"testing"

	"github.com/google/go-tpm/tpm2"
)

// Seeds made on swtpm 0.7.1: an AK's TPMT_PUBLIC, a quote of PCRs 0 and 7 by it and a
// certification of a signing key by it (TPMS_ATTEST, TPMT_SIGNATURE).
const (
	seedAKPublic   = "0023000b00050472000000100018000b000300100020e84dc734d32593b89df40a7c692489b72af0ad94816584e313abbccf7e17a73d0020c9d990a8995db761a074d162d3f219e0fe75f712e143823fb47fd4ce96de59a4"
	seedQuote      = "ff54434780180022000bb2e98461f90f271692270045ecccc1e3614a31fcbe280062fed30dc64ae958bb00056e6f6e6365000000000000000df230f1f957a3d676019f6b128163486dfa00000001000b038100000020f5a5fd42d16a20302798ef6ed309979b43003d2320d9f0e8ea9831a92759fb4b"
	seedQuoteSig   = "0018000b0020e19abc072ef19e8ff1e0adff729e1583db4938f3bfb052db4eac6c33621a3c060020f117dab2989ae446c22da679d3b67c2f73f982109f2256003c0ebb444258a536"
	seedCertify    = "ff54434780170022000bb2e98461f90f271692270045ecccc1e3614a31fcbe280062fed30dc64ae958bb0001710000000000000014f230f1f957a3d676019f6b128163486dfa0022000bb8b55677af642def7aed4672dd34af4ecd19a2a041694794de8141eed0287aca0022000b320cc04c07b5b2490fd4fcdf89b65456d11b5843ee282c3d81ad894059bd66bb"
	seedCertifySig = "0018000b00204238ff164d8b397119e3515f91e5e42cde52d72058f3a72772621c97c030321e00206bf430afd0fd6df5726b6fc3696cdb05c0007c709011603cd86b9f22c5689a7a"
)

func unhex(s string) []byte {
	b, err := hex.DecodeString(s)
	if err != nil {
		panic(err)
	}
	return b
}

// FuzzParseAttest: any bytes given as an attestation are parsed or refused without a panic,
// and what parses marshals back to the same bytes.
func FuzzParseAttest(f *testing.F) {
	f.Add(unhex(seedQuote), uint16(tpm2.TPMSTAttestQuote))
	f.Add(unhex(seedCertify), uint16(tpm2.TPMSTAttestCertify))
	f.Add([]byte{0xff, 0x54, 0x43, 0x47}, uint16(tpm2.TPMSTAttestQuote))
	f.Fuzz(func(t *testing.T, b []byte, st uint16) {
		att, err := ParseAttest(b, tpm2.TPMST(st))
		if err != nil {
			return
		}
		if att.Type != tpm2.TPMST(st) || att.Magic != tpm2.TPMGeneratedValue {
			t.Fatalf("accepted type %v magic %v", att.Type, att.Magic)
		}
	})
}

// FuzzParsePublic: any bytes given as a public area are parsed or refused without a panic;
// what parses has a name and, for RSA and ECC, a public key or an error.
func FuzzParsePublic(f *testing.F) {
	f.Add(unhex(seedAKPublic))
	f.Add(tpm2.Marshal(tpm2.RSAEKTemplate))
	f.Add(tpm2.Marshal(tpm2.ECCEKTemplate))
	f.Fuzz(func(t *testing.T, b []byte) {
		pub, err := ParsePublic(b)
		if err != nil {
			return
		}
		_, _ = PublicName(pub)
		_, _ = CryptoPublic(pub)
	})
}

// FuzzVerifySignature: any bytes given as a signature are refused or verified without a
// panic; a signature that verifies over changed bytes is a failure.
func FuzzVerifySignature(f *testing.F) {
	pub, err := ParsePublic(unhex(seedAKPublic))
	if err != nil {
		f.Fatal(err)
	}
	key, err := CryptoPublic(pub)
	if err != nil {
		f.Fatal(err)
	}
	if err := VerifySignature(key, unhex(seedQuote), unhex(seedQuoteSig)); err != nil {
		f.Fatalf("seed quote: %v", err)
	}
	f.Add(unhex(seedQuote), unhex(seedQuoteSig))
	f.Add(unhex(seedCertify), unhex(seedCertifySig))
	f.Fuzz(func(t *testing.T, msg, sig []byte) {
		if VerifySignature(key, msg, sig) != nil {
			return
		}
		if string(msg) != string(unhex(seedQuote)) && string(msg) != string(unhex(seedCertify)) {
			t.Fatalf("a signature verified over %x", msg)
		}
	})
}
