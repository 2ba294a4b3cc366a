package attest

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"math/bits"
)

// Format constants of the report.
const (
	// Version is the report format this package writes and reads.
	Version = 1
	// MaxReportSize is the largest report (the size of the vTPM's report NV index, libtpms'
	// largest NV index).
	MaxReportSize = 2048
	// MaxNonce is the largest nonce (the size of the nonce NV index; TPM2B_DATA of a quote
	// holds 64 bytes with SHA-512 compiled in).
	MaxNonce = 64
	// maxName bounds a TPM name (a hash algorithm and a digest of up to 64 bytes).
	maxName = 2 + 64
	// maxDigest bounds a digest.
	maxDigest = 64
	// maxBlob bounds the hardware quote's attestation structure and signature.
	maxBlob = 1024
)

var magic = [4]byte{'v', 't', 'A', 'R'}

// headerSize: magic, version, body length.
const headerSize = 4 + 1 + 2

// Sentinel errors callers branch on.
var (
	// ErrMalformed: the bytes are not a report of a known version (truncated, oversized,
	// trailing garbage, a field out of bounds).
	ErrMalformed = errors.New("attest: malformed report")
	// ErrVersion: a report of a format version this vtpmd does not know.
	ErrVersion = errors.New("attest: unknown report version")
)

// PCRSelection is one bank and up to 32 PCRs of it (bit i: PCR i).
type PCRSelection struct {
	Hash uint16 // TPM_ALG_ID of the bank
	Mask uint32
}

// PCRs lists the selected PCR indices in ascending order.
func (s PCRSelection) PCRs() []int {
	var out []int
	for i := range 32 {
		if s.Mask&(1<<i) != 0 {
			out = append(out, i)
		}
	}
	return out
}

// Count is the number of selected PCRs.
func (s PCRSelection) Count() int { return bits.OnesCount32(s.Mask) }

// Report is what the manager hands a guest: the host hardware TPM's quote whose qualifying
// data binds the guest's nonce, its vTPM and VM, and the vTPM's PCRs (see QualifyingData).
type Report struct {
	// Nonce is the guest's nonce (what it wrote into the nonce index), 1 to MaxNonce bytes.
	Nonce []byte
	// EKName is the vTPM's endorsement key name (nameAlg ‖ digest of its public area).
	EKName []byte
	// AKName is the name of the guest's attestation key persistent at 0x81000003 in the
	// vTPM; empty when there was none.
	AKName []byte
	// VMUUID is the VM's UUID from the manager's registry (16 bytes), empty when unknown.
	VMUUID []byte
	// VTPMPCRs and VTPMPCRDigest: the vTPM's PCR selection and the digest of their values
	// (as a TPM2_Quote's pcrDigest: SHA-256 over the values, in ascending order).
	VTPMPCRs      PCRSelection
	VTPMPCRDigest []byte
	// HostPCRs and HostPCRValues: the host PCRs the hardware quote covers and their values
	// (one digest per selected PCR, ascending). The quote signs only their digest; the values
	// let a verifier say which PCR disagrees with the event log.
	HostPCRs      PCRSelection
	HostPCRValues [][]byte
	// HostAKName is the name of the hardware AK that signed the quote.
	HostAKName []byte
	// Attest and Signature are the hardware TPM's quote: TPMS_ATTEST and TPMT_SIGNATURE.
	Attest    []byte
	Signature []byte
}

// Encode returns the report's bytes (at most MaxReportSize).
func (r *Report) Encode() ([]byte, error) {
	if err := r.check(); err != nil {
		return nil, err
	}
	b := make([]byte, headerSize, MaxReportSize)
	copy(b, magic[:])
	b[4] = Version
	b = appendField(b, r.Nonce)
	b = appendField(b, r.EKName)
	b = appendField(b, r.AKName)
	b = appendField(b, r.VMUUID)
	b = appendSelection(b, r.VTPMPCRs)
	b = appendField(b, r.VTPMPCRDigest)
	b = appendSelection(b, r.HostPCRs)
	b = appendField(b, bytes.Join(r.HostPCRValues, nil))
	b = appendField(b, r.HostAKName)
	b = appendField(b, r.Attest)
	b = appendField(b, r.Signature)
	if len(b) > MaxReportSize {
		return nil, fmt.Errorf("%w: %d bytes, at most %d fit", ErrMalformed, len(b), MaxReportSize)
	}
	binary.BigEndian.PutUint16(b[5:], uint16(len(b)-headerSize))
	return b, nil
}

// check bounds every field, so that what Encode writes Decode reads.
func (r *Report) check() error {
	if err := r.CheckBinding(); err != nil {
		return err
	}
	if err := checkName("host AK name", r.HostAKName, false); err != nil {
		return err
	}
	size, err := digestSize(r.HostPCRs.Hash)
	if err != nil {
		return err
	}
	if len(r.HostPCRValues) != r.HostPCRs.Count() {
		return fmt.Errorf("%w: %d host PCR values for %d selected PCRs", ErrMalformed, len(r.HostPCRValues), r.HostPCRs.Count())
	}
	for i, v := range r.HostPCRValues {
		if len(v) != size {
			return fmt.Errorf("%w: host PCR value %d has %d bytes, want %d", ErrMalformed, i, len(v), size)
		}
	}
	if len(r.Attest) == 0 || len(r.Attest) > maxBlob || len(r.Signature) == 0 || len(r.Signature) > maxBlob {
		return fmt.Errorf("%w: quote of %d bytes, signature of %d", ErrMalformed, len(r.Attest), len(r.Signature))
	}
	return nil
}

// CheckBinding bounds the fields the qualifying data binds (nonce, EK and AK names, VM UUID,
// vTPM PCR selection and digest): the manager checks a vTPM's request with it before it asks
// the hardware TPM for a quote.
func (r *Report) CheckBinding() error {
	if len(r.Nonce) == 0 || len(r.Nonce) > MaxNonce {
		return fmt.Errorf("%w: nonce of %d bytes (1 to %d)", ErrMalformed, len(r.Nonce), MaxNonce)
	}
	if err := checkName("vTPM EK name", r.EKName, false); err != nil {
		return err
	}
	if err := checkName("vTPM AK name", r.AKName, true); err != nil {
		return err
	}
	if len(r.VMUUID) != 0 && len(r.VMUUID) != 16 {
		return fmt.Errorf("%w: VM UUID of %d bytes", ErrMalformed, len(r.VMUUID))
	}
	if len(r.VTPMPCRDigest) == 0 || len(r.VTPMPCRDigest) > maxDigest {
		return fmt.Errorf("%w: vTPM PCR digest of %d bytes", ErrMalformed, len(r.VTPMPCRDigest))
	}
	if _, err := digestSize(r.VTPMPCRs.Hash); err != nil {
		return err
	}
	return nil
}

func checkName(what string, n []byte, optional bool) error {
	if len(n) == 0 && optional {
		return nil
	}
	if len(n) < 2 || len(n) > maxName {
		return fmt.Errorf("%w: %s of %d bytes", ErrMalformed, what, len(n))
	}
	size, err := digestSize(binary.BigEndian.Uint16(n))
	if err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	if len(n) != 2+size {
		return fmt.Errorf("%w: %s of %d bytes for its hash algorithm", ErrMalformed, what, len(n))
	}
	return nil
}

func appendField(b, f []byte) []byte {
	b = binary.BigEndian.AppendUint16(b, uint16(len(f)))
	return append(b, f...)
}

func appendSelection(b []byte, s PCRSelection) []byte {
	b = binary.BigEndian.AppendUint16(b, s.Hash)
	return binary.BigEndian.AppendUint32(b, s.Mask)
}

// Decode reads a report. b may be followed by zero bytes (an NV index larger than the
// report); anything else after it, or any field out of its bounds, is ErrMalformed.
func Decode(b []byte) (*Report, error) {
	if len(b) > MaxReportSize {
		return nil, fmt.Errorf("%w: %d bytes, at most %d", ErrMalformed, len(b), MaxReportSize)
	}
	if len(b) < headerSize || !bytes.Equal(b[:4], magic[:]) {
		return nil, fmt.Errorf("%w: no report header (an empty report index: no nonce written yet, or the manager did not answer)", ErrMalformed)
	}
	if b[4] != Version {
		return nil, fmt.Errorf("%w: version %d, this vtpmd reads %d", ErrVersion, b[4], Version)
	}
	n := int(binary.BigEndian.Uint16(b[5:]))
	if headerSize+n > len(b) {
		return nil, fmt.Errorf("%w: %d body bytes announced, %d present", ErrMalformed, n, len(b)-headerSize)
	}
	for _, c := range b[headerSize+n:] {
		if c != 0 {
			return nil, fmt.Errorf("%w: bytes after the report are not padding", ErrMalformed)
		}
	}
	d := decoder{b: b[headerSize : headerSize+n]}
	r := &Report{
		Nonce:  d.field(MaxNonce),
		EKName: d.field(maxName),
		AKName: d.field(maxName),
		VMUUID: d.field(16),
	}
	r.VTPMPCRs = d.selection()
	r.VTPMPCRDigest = d.field(maxDigest)
	r.HostPCRs = d.selection()
	values := d.field(MaxReportSize)
	r.HostAKName = d.field(maxName)
	r.Attest = d.field(maxBlob)
	r.Signature = d.field(maxBlob)
	if d.err != nil {
		return nil, d.err
	}
	if len(d.b) != 0 {
		return nil, fmt.Errorf("%w: %d bytes after the last field", ErrMalformed, len(d.b))
	}
	size, err := digestSize(r.HostPCRs.Hash)
	if err != nil {
		return nil, err
	}
	if len(values) != size*r.HostPCRs.Count() {
		return nil, fmt.Errorf("%w: %d bytes of host PCR values for %d PCRs", ErrMalformed, len(values), r.HostPCRs.Count())
	}
	for len(values) > 0 {
		r.HostPCRValues = append(r.HostPCRValues, values[:size])
		values = values[size:]
	}
	if err := r.check(); err != nil {
		return nil, err
	}
	return r, nil
}

// decoder reads length-prefixed fields; the first error sticks.
type decoder struct {
	b   []byte
	err error
}

func (d *decoder) field(max int) []byte {
	if d.err != nil {
		return nil
	}
	if len(d.b) < 2 {
		d.err = fmt.Errorf("%w: truncated", ErrMalformed)
		return nil
	}
	n := int(binary.BigEndian.Uint16(d.b))
	if n > max || 2+n > len(d.b) {
		d.err = fmt.Errorf("%w: field of %d bytes (at most %d, %d left)", ErrMalformed, n, max, len(d.b)-2)
		return nil
	}
	f := bytes.Clone(d.b[2 : 2+n])
	d.b = d.b[2+n:]
	if n == 0 {
		return nil
	}
	return f
}

func (d *decoder) selection() PCRSelection {
	if d.err != nil {
		return PCRSelection{}
	}
	if len(d.b) < 6 {
		d.err = fmt.Errorf("%w: truncated PCR selection", ErrMalformed)
		return PCRSelection{}
	}
	s := PCRSelection{Hash: binary.BigEndian.Uint16(d.b), Mask: binary.BigEndian.Uint32(d.b[2:])}
	d.b = d.b[6:]
	return s
}
