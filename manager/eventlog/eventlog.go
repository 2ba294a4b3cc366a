package eventlog

import (
	"bytes"
	"crypto"
	_ "crypto/sha1" // the hash functions Replay may need
	_ "crypto/sha256"
	_ "crypto/sha512"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"strconv"
)

// Algorithm identifiers (TPM_ALG_ID) of the PCR banks this package replays.
const (
	AlgSHA1   uint16 = 0x0004
	AlgSHA256 uint16 = 0x000b
	AlgSHA384 uint16 = 0x000c
	AlgSHA512 uint16 = 0x000d
)

// Event types this package names (TCG PC Client Platform Firmware Profile).
const (
	EvNoAction  uint32 = 0x00000003
	EvSeparator uint32 = 0x00000004
	EvEventTag  uint32 = 0x00000006
)

// typeNames are the event types' names in the TCG PC Client Platform Firmware Profile.
var typeNames = map[uint32]string{
	0x0: "EV_PREBOOT_CERT", 0x1: "EV_POST_CODE", 0x2: "EV_UNUSED", 0x3: "EV_NO_ACTION", 0x4: "EV_SEPARATOR",
	0x5: "EV_ACTION", 0x6: "EV_EVENT_TAG", 0x7: "EV_S_CRTM_CONTENTS", 0x8: "EV_S_CRTM_VERSION",
	0x9: "EV_CPU_MICROCODE", 0xa: "EV_PLATFORM_CONFIG_FLAGS", 0xb: "EV_TABLE_OF_DEVICES", 0xc: "EV_COMPACT_HASH",
	0xd: "EV_IPL", 0xe: "EV_IPL_PARTITION_DATA", 0xf: "EV_NONHOST_CODE", 0x10: "EV_NONHOST_CONFIG",
	0x11: "EV_NONHOST_INFO", 0x12: "EV_OMIT_BOOT_DEVICE_EVENTS",
	0x80000001: "EV_EFI_VARIABLE_DRIVER_CONFIG", 0x80000002: "EV_EFI_VARIABLE_BOOT",
	0x80000003: "EV_EFI_BOOT_SERVICES_APPLICATION", 0x80000004: "EV_EFI_BOOT_SERVICES_DRIVER",
	0x80000005: "EV_EFI_RUNTIME_SERVICES_DRIVER", 0x80000006: "EV_EFI_GPT_EVENT", 0x80000007: "EV_EFI_ACTION",
	0x80000008: "EV_EFI_PLATFORM_FIRMWARE_BLOB", 0x80000009: "EV_EFI_HANDOFF_TABLES",
	0x8000000a: "EV_EFI_PLATFORM_FIRMWARE_BLOB2", 0x8000000b: "EV_EFI_HANDOFF_TABLES2",
	0x8000000c: "EV_EFI_VARIABLE_BOOT2", 0x8000000d: "EV_EFI_GPT_EVENT2", 0x80000010: "EV_EFI_HCRTM_EVENT",
	0x800000e0: "EV_EFI_VARIABLE_AUTHORITY", 0x800000e1: "EV_EFI_SPDM_FIRMWARE_BLOB",
	0x800000e2: "EV_EFI_SPDM_FIRMWARE_CONFIG",
}

// TypeName is an event type's name ("EV_SEPARATOR"), or its number in hex.
func TypeName(t uint32) string {
	if n, ok := typeNames[t]; ok {
		return n
	}
	return fmt.Sprintf("%#08x", t)
}

// TypeByName is the event type a name ("EV_SEPARATOR") or number ("0x80000008", "4") names.
func TypeByName(s string) (uint32, bool) {
	for t, n := range typeNames {
		if n == s {
			return t, true
		}
	}
	v, err := strconv.ParseUint(s, 0, 32)
	return uint32(v), err == nil
}

// Limits of what Parse accepts.
const (
	// MaxLogSize bounds a whole log.
	MaxLogSize = 16 << 20
	// MaxEvents bounds the number of events.
	MaxEvents = 1 << 16
	// MaxAlgorithms bounds the Spec ID event's algorithm list.
	MaxAlgorithms = 16
	// MaxDigestSize bounds one digest.
	MaxDigestSize = 64
	// NumPCRs is the number of PCRs of a PC Client TPM.
	NumPCRs = 24
)

// Sentinel errors.
var (
	// ErrFormat is wrapped by every Parse error: the bytes are not a crypto-agile log.
	ErrFormat = errors.New("eventlog: not a TCG crypto-agile event log")
	// ErrBank is returned when a bank's digests are not in the log or its hash is unknown.
	ErrBank = errors.New("eventlog: PCR bank not available")
)

// Algorithm is one entry of the Spec ID event: an algorithm and its digest size.
type Algorithm struct {
	ID   uint16
	Size uint16
}

// SpecID is the Spec ID event (TCG_EfiSpecIDEvent) that opens a crypto-agile log.
type SpecID struct {
	PlatformClass uint32
	VersionMinor  uint8
	VersionMajor  uint8
	Errata        uint8
	UintnSize     uint8
	Algorithms    []Algorithm
	VendorInfo    []byte
}

// Digest is one bank's digest of an event.
type Digest struct {
	Alg   uint16
	Value []byte
}

// Event is one TCG_PCR_EVENT2.
type Event struct {
	PCR     uint32
	Type    uint32
	Digests []Digest
	Data    []byte
}

// Digest returns the event's digest in bank alg, or nil.
func (e *Event) Digest(alg uint16) []byte {
	for _, d := range e.Digests {
		if d.Alg == alg {
			return d.Value
		}
	}
	return nil
}

// Log is a parsed crypto-agile event log.
type Log struct {
	Spec   SpecID
	Events []Event
}

// specSignature opens the Spec ID event's data.
var specSignature = []byte("Spec ID Event03\x00")

// startupLocalitySignature opens the data of the EV_NO_ACTION event that records the locality
// of TPM2_Startup (PCR 0 then starts at that locality instead of zero).
var startupLocalitySignature = []byte("StartupLocality\x00")

var le = binary.LittleEndian

// reader walks the log's bytes with bounds checks.
type reader struct {
	b   []byte
	off int
}

func (r *reader) need(n int, what string) ([]byte, error) {
	if n < 0 || len(r.b)-r.off < n {
		return nil, fmt.Errorf("%w: %s at offset %d: %d bytes needed, %d left", ErrFormat, what, r.off, n, len(r.b)-r.off)
	}
	s := r.b[r.off : r.off+n]
	r.off += n
	return s, nil
}

func (r *reader) u32(what string) (uint32, error) {
	s, err := r.need(4, what)
	if err != nil {
		return 0, err
	}
	return le.Uint32(s), nil
}

func (r *reader) u16(what string) (uint16, error) {
	s, err := r.need(2, what)
	if err != nil {
		return 0, err
	}
	return le.Uint16(s), nil
}

// Parse reads a crypto-agile log. Errors wrap ErrFormat.
func Parse(b []byte) (*Log, error) {
	if len(b) > MaxLogSize {
		return nil, fmt.Errorf("%w: %d bytes, more than %d", ErrFormat, len(b), MaxLogSize)
	}
	r := &reader{b: b}
	// the first event is in the SHA-1 format (TCG_PCClientPCREvent)
	pcr, err := r.u32("first event's PCR")
	if err != nil {
		return nil, err
	}
	typ, err := r.u32("first event's type")
	if err != nil {
		return nil, err
	}
	if _, err := r.need(20, "first event's digest"); err != nil {
		return nil, err
	}
	size, err := r.u32("Spec ID event size")
	if err != nil {
		return nil, err
	}
	if pcr != 0 || typ != EvNoAction {
		return nil, fmt.Errorf("%w: first event is PCR %d type %#x, not the Spec ID event (PCR 0, EV_NO_ACTION)", ErrFormat, pcr, typ)
	}
	data, err := r.need(int(min(size, MaxLogSize)), "Spec ID event")
	if err != nil {
		return nil, err
	}
	spec, err := parseSpecID(data)
	if err != nil {
		return nil, err
	}
	l := &Log{Spec: *spec}
	for r.off < len(b) {
		if len(l.Events) >= MaxEvents {
			return nil, fmt.Errorf("%w: more than %d events", ErrFormat, MaxEvents)
		}
		ev, err := l.parseEvent(r)
		if err != nil {
			return nil, fmt.Errorf("event %d: %w", len(l.Events)+1, err)
		}
		l.Events = append(l.Events, ev)
	}
	return l, nil
}

func parseSpecID(data []byte) (*SpecID, error) {
	r := &reader{b: data}
	sig, err := r.need(16, "Spec ID signature")
	if err != nil {
		return nil, err
	}
	if !bytes.Equal(sig, specSignature) {
		return nil, fmt.Errorf("%w: Spec ID signature %q (a SHA-1-only log is not supported)", ErrFormat, bytes.TrimRight(sig, "\x00"))
	}
	var s SpecID
	hdr, err := r.need(8, "Spec ID header")
	if err != nil {
		return nil, err
	}
	s.PlatformClass = le.Uint32(hdr)
	s.VersionMinor, s.VersionMajor, s.Errata, s.UintnSize = hdr[4], hdr[5], hdr[6], hdr[7]
	n, err := r.u32("number of algorithms")
	if err != nil {
		return nil, err
	}
	if n == 0 || n > MaxAlgorithms {
		return nil, fmt.Errorf("%w: %d algorithms in the Spec ID event (want 1 to %d)", ErrFormat, n, MaxAlgorithms)
	}
	for range n {
		id, err := r.u16("algorithm id")
		if err != nil {
			return nil, err
		}
		sz, err := r.u16("digest size")
		if err != nil {
			return nil, err
		}
		if sz == 0 || sz > MaxDigestSize {
			return nil, fmt.Errorf("%w: algorithm %#04x has digest size %d", ErrFormat, id, sz)
		}
		if slices.ContainsFunc(s.Algorithms, func(a Algorithm) bool { return a.ID == id }) {
			return nil, fmt.Errorf("%w: algorithm %#04x listed twice", ErrFormat, id)
		}
		if want := knownSize(id); want != 0 && want != int(sz) {
			return nil, fmt.Errorf("%w: algorithm %#04x has digest size %d, want %d", ErrFormat, id, sz, want)
		}
		s.Algorithms = append(s.Algorithms, Algorithm{ID: id, Size: sz})
	}
	vs, err := r.need(1, "vendor info size")
	if err != nil {
		return nil, err
	}
	if s.VendorInfo, err = r.need(int(vs[0]), "vendor info"); err != nil {
		return nil, err
	}
	s.VendorInfo = slices.Clone(s.VendorInfo)
	return &s, nil
}

func (l *Log) size(alg uint16) int {
	for _, a := range l.Spec.Algorithms {
		if a.ID == alg {
			return int(a.Size)
		}
	}
	return -1
}

func (l *Log) parseEvent(r *reader) (Event, error) {
	var ev Event
	var err error
	if ev.PCR, err = r.u32("PCR index"); err != nil {
		return ev, err
	}
	if ev.Type, err = r.u32("event type"); err != nil {
		return ev, err
	}
	count, err := r.u32("digest count")
	if err != nil {
		return ev, err
	}
	if count == 0 || int(count) > len(l.Spec.Algorithms) {
		return ev, fmt.Errorf("%w: %d digests (the log lists %d algorithms)", ErrFormat, count, len(l.Spec.Algorithms))
	}
	for range count {
		alg, err := r.u16("digest algorithm")
		if err != nil {
			return ev, err
		}
		sz := l.size(alg)
		if sz < 0 {
			return ev, fmt.Errorf("%w: digest of algorithm %#04x, which the Spec ID event does not list", ErrFormat, alg)
		}
		if ev.Digest(alg) != nil {
			return ev, fmt.Errorf("%w: two digests of algorithm %#04x", ErrFormat, alg)
		}
		v, err := r.need(sz, "digest")
		if err != nil {
			return ev, err
		}
		ev.Digests = append(ev.Digests, Digest{Alg: alg, Value: slices.Clone(v)})
	}
	n, err := r.u32("event size")
	if err != nil {
		return ev, err
	}
	data, err := r.need(int(min(n, MaxLogSize)), "event data")
	if err != nil {
		return ev, err
	}
	ev.Data = slices.Clone(data)
	return ev, nil
}

// knownSize is the digest size of the hash algorithms this package knows (0: unknown).
func knownSize(alg uint16) int {
	if h, ok := hashOf(alg); ok {
		return h.Size()
	}
	return 0
}

func hashOf(alg uint16) (crypto.Hash, bool) {
	switch alg {
	case AlgSHA1:
		return crypto.SHA1, true
	case AlgSHA256:
		return crypto.SHA256, true
	case AlgSHA384:
		return crypto.SHA384, true
	case AlgSHA512:
		return crypto.SHA512, true
	}
	return 0, false
}

// Hash returns the hash function of bank alg (SHA-1, SHA-256, SHA-384, SHA-512).
func Hash(alg uint16) (crypto.Hash, error) {
	h, ok := hashOf(alg)
	if !ok {
		return 0, fmt.Errorf("%w: algorithm %#04x is not a hash this package computes", ErrBank, alg)
	}
	return h, nil
}

// AlgName is the bank's name as tpm2-tools spells it ("sha256"), or its number.
func AlgName(alg uint16) string {
	switch alg {
	case AlgSHA1:
		return "sha1"
	case AlgSHA256:
		return "sha256"
	case AlgSHA384:
		return "sha384"
	case AlgSHA512:
		return "sha512"
	}
	return fmt.Sprintf("alg%#04x", alg)
}

// AlgByName is the algorithm id of a bank name ("sha256"), or false.
func AlgByName(name string) (uint16, bool) {
	for _, a := range []uint16{AlgSHA1, AlgSHA256, AlgSHA384, AlgSHA512} {
		if AlgName(a) == name {
			return a, true
		}
	}
	return 0, false
}

// HasAlgorithm reports whether the log carries digests of bank alg.
func (l *Log) HasAlgorithm(alg uint16) bool { return l.size(alg) >= 0 }

// StartupLocality is the locality of TPM2_Startup the log records (its "StartupLocality"
// EV_NO_ACTION event in PCR 0), or 0 when it records none.
func (l *Log) StartupLocality() uint8 {
	for _, e := range l.Events {
		if e.PCR == 0 && e.Type == EvNoAction && len(e.Data) == len(startupLocalitySignature)+1 &&
			bytes.HasPrefix(e.Data, startupLocalitySignature) {
			return e.Data[len(startupLocalitySignature)]
		}
	}
	return 0
}

// Extended reports whether an event is extended into its PCR (everything but EV_NO_ACTION).
func Extended(e *Event) bool { return e.Type != EvNoAction }

// Replay computes the PCR values of bank alg the log leads to: every PCR starts at zero (PCR 0
// at the startup locality), and each event but EV_NO_ACTION extends its digest. Events of a
// PCR outside 0..23 are an error.
func (l *Log) Replay(alg uint16) ([][]byte, error) {
	h, err := Hash(alg)
	if err != nil {
		return nil, err
	}
	if !l.HasAlgorithm(alg) {
		return nil, fmt.Errorf("%w: the log has no %s digests", ErrBank, AlgName(alg))
	}
	pcrs := make([][]byte, NumPCRs)
	for i := range pcrs {
		pcrs[i] = make([]byte, h.Size())
	}
	pcrs[0][h.Size()-1] = l.StartupLocality()
	for i := range l.Events {
		e := &l.Events[i]
		if !Extended(e) {
			continue
		}
		if e.PCR >= NumPCRs {
			return nil, fmt.Errorf("%w: event %d extends PCR %d", ErrFormat, i+1, e.PCR)
		}
		d := e.Digest(alg)
		if d == nil {
			return nil, fmt.Errorf("%w: event %d has no %s digest", ErrBank, i+1, AlgName(alg))
		}
		pcrs[e.PCR] = Extend(h, pcrs[e.PCR], d)
	}
	return pcrs, nil
}

// Extend is a PCR extend: H(old || digest).
func Extend(h crypto.Hash, old, digest []byte) []byte {
	w := h.New()
	w.Write(old)
	w.Write(digest)
	return w.Sum(nil)
}

// Build makes a crypto-agile log of events whose digests are in the banks algs (every event
// must carry exactly those banks' digests; EV_NO_ACTION events may carry zeros). The Spec ID
// event says PC Client platform class 0, spec version 2.0 errata 0, UINTN size 2 (8 bytes), as
// firmware writes it.
func Build(algs []uint16, events []Event) ([]byte, error) {
	if len(algs) == 0 || len(algs) > MaxAlgorithms {
		return nil, fmt.Errorf("eventlog: %d banks (want 1 to %d)", len(algs), MaxAlgorithms)
	}
	var spec []byte
	spec = append(spec, specSignature...)
	spec = le.AppendUint32(spec, 0) // platform class: client
	spec = append(spec, 0, 2, 0, 2) // version 2.0, errata 0, UINTN size 2 (UINT64)
	spec = le.AppendUint32(spec, uint32(len(algs)))
	sizes := map[uint16]int{}
	for _, a := range algs {
		sz := knownSize(a)
		if sz == 0 {
			return nil, fmt.Errorf("%w: algorithm %#04x", ErrBank, a)
		}
		if _, dup := sizes[a]; dup {
			return nil, fmt.Errorf("eventlog: bank %s listed twice", AlgName(a))
		}
		sizes[a] = sz
		spec = le.AppendUint16(spec, a)
		spec = le.AppendUint16(spec, uint16(sz))
	}
	spec = append(spec, 0) // no vendor info
	var out []byte
	out = le.AppendUint32(out, 0)
	out = le.AppendUint32(out, EvNoAction)
	out = append(out, make([]byte, 20)...)
	out = le.AppendUint32(out, uint32(len(spec)))
	out = append(out, spec...)
	for i, e := range events {
		out = le.AppendUint32(out, e.PCR)
		out = le.AppendUint32(out, e.Type)
		out = le.AppendUint32(out, uint32(len(algs)))
		for _, a := range algs {
			d := e.Digest(a)
			if d == nil && e.Type == EvNoAction {
				d = make([]byte, sizes[a])
			}
			if len(d) != sizes[a] {
				return nil, fmt.Errorf("eventlog: event %d: %s digest of %d bytes, want %d", i+1, AlgName(a), len(d), sizes[a])
			}
			out = le.AppendUint16(out, a)
			out = append(out, d...)
		}
		out = le.AppendUint32(out, uint32(len(e.Data)))
		out = append(out, e.Data...)
	}
	if len(out) > MaxLogSize {
		return nil, fmt.Errorf("eventlog: %d bytes, more than %d", len(out), MaxLogSize)
	}
	return out, nil
}
