package attest

import (
	"crypto/sha256"
	"encoding/binary"
)

// qualifyLabel separates this use of a hardware quote from every other.
const qualifyLabel = "vtpmd deep attestation v1\x00"

// QualifyingData is what the hardware quote of a report carries as its qualifying data
// (extraData): SHA-256 over a label and, each length-prefixed, the guest's nonce, the vTPM's EK
// name, the guest AK's name, the VM's UUID, the vTPM PCR selection and the vTPM PCR digest.
// The hardware AK's signature over it binds them all to the host's PCRs at that moment.
func QualifyingData(r *Report) []byte {
	h := sha256.New()
	h.Write([]byte(qualifyLabel))
	for _, f := range [][]byte{r.Nonce, r.EKName, r.AKName, r.VMUUID} {
		h.Write(binary.BigEndian.AppendUint16(nil, uint16(len(f))))
		h.Write(f)
	}
	h.Write(appendSelection(nil, r.VTPMPCRs))
	h.Write(binary.BigEndian.AppendUint16(nil, uint16(len(r.VTPMPCRDigest))))
	h.Write(r.VTPMPCRDigest)
	return h.Sum(nil)
}

// PCRDigest is a quote's pcrDigest over values (in ascending PCR order) with hash alg: what
// a TPM2_Quote signed with a SHA-256 scheme reports for the same PCRs.
func PCRDigest(alg uint16, values [][]byte) ([]byte, error) {
	hf, err := hashOf(alg)
	if err != nil {
		return nil, err
	}
	h := hf.New()
	for _, v := range values {
		h.Write(v)
	}
	return h.Sum(nil), nil
}
