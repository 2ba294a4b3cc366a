package projection

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"

	"github.com/vtpmd/vtpmd/manager/eventlog"
)

// The modes of <vtpmd:projection mode='...'>.
const (
	ModeOff      = "off"
	ModeMirror   = "mirror"
	ModeSummary  = "summary"
	ModeProperty = "property"
)

// DefaultPropertyPCR is the vTPM PCR property mode extends when the policy names none.
const DefaultPropertyPCR = 15

// MirrorPCRs are the PCRs mirror replays (the platform firmware's PCRs 0-7).
var MirrorPCRs = []int{0, 1, 2, 3, 4, 5, 6, 7}

// SummaryPCRs are the host PCRs (SHA-256 bank) summary digests.
var SummaryPCRs = []int{0, 1, 2, 3, 4, 5, 6, 7}

// Banks are the PCR banks summary and property give digests for (every bank a vTPM may have
// active).
var Banks = []uint16{eventlog.AlgSHA1, eventlog.AlgSHA256, eventlog.AlgSHA384, eventlog.AlgSHA512}

// TagID is the taggedEventID of vtpmd's EV_EVENT_TAG events ("vTPM").
const TagID = 0x7654504d

// Sentinel errors callers branch on.
var (
	// ErrMismatch: the host's event log does not replay to the hardware TPM's PCRs.
	ErrMismatch = errors.New("projection: the host event log does not replay to the hardware TPM's PCRs")
	// ErrStartupLocality: the host started its TPM at a locality other than 0, which a vTPM
	// started by its guest cannot reproduce in PCR 0.
	ErrStartupLocality = errors.New("projection: the host's PCR 0 starts at a locality a vTPM cannot reproduce")
	// ErrInput: the host data a provider needs is missing or malformed.
	ErrInput = errors.New("projection: host measurements unavailable")
)

// Host is what the providers know of the host.
type Host struct {
	// Log is the host's event log (nil when there is none; summary does not need it).
	Log *eventlog.Log
	// PCRs are the hardware TPM's PCR values by bank, indexed by PCR (nil where not read).
	PCRs map[uint16][][]byte
	// Identity names the manager's hardware TPM (the EK's name).
	Identity []byte
}

// Plan is what a vTPM applies: extends in order, and the PCRs kept read-only to the guest.
type Plan struct {
	Mode     string
	ReadOnly []int
	// Events are the extends: each carries its digest for the banks the provider knows.
	Events []eventlog.Event
}

// Mirror replays the host log's PCR 0-7 events. Every bank the log and the hardware both have
// is checked first: the log must replay to the hardware's PCRs 0-7 (at least one bank must be
// checked), and the host's startup locality must be 0.
func Mirror(h Host) (*Plan, error) {
	if h.Log == nil {
		return nil, fmt.Errorf("%w: mirror needs the host's event log", ErrInput)
	}
	if loc := h.Log.StartupLocality(); loc != 0 {
		return nil, fmt.Errorf("%w: locality %d", ErrStartupLocality, loc)
	}
	if err := checkLog(h, MirrorPCRs); err != nil {
		return nil, err
	}
	p := &Plan{Mode: ModeMirror, ReadOnly: slices.Clone(MirrorPCRs)}
	for _, e := range h.Log.Events {
		if eventlog.Extended(&e) && slices.Contains(MirrorPCRs, int(e.PCR)) {
			p.Events = append(p.Events, e)
		}
	}
	return p, nil
}

// checkLog replays the log in every bank the hardware has values for and compares pcrs.
func checkLog(h Host, pcrs []int) error {
	checked := 0
	for _, bank := range Banks {
		hw := h.PCRs[bank]
		if hw == nil || !h.Log.HasAlgorithm(bank) {
			continue
		}
		replayed, err := h.Log.Replay(bank)
		if err != nil {
			return fmt.Errorf("%w: %w", ErrMismatch, err)
		}
		for _, i := range pcrs {
			if i >= len(hw) || hw[i] == nil {
				return fmt.Errorf("%w: hardware PCR %d (%s) not read", ErrInput, i, eventlog.AlgName(bank))
			}
			if !bytes.Equal(hw[i], replayed[i]) {
				return fmt.Errorf("%w: PCR %d (%s): hardware %x, log %x", ErrMismatch, i, eventlog.AlgName(bank), hw[i], replayed[i])
			}
		}
		checked++
	}
	if checked == 0 {
		return fmt.Errorf("%w: no bank both in the log and read from the hardware", ErrMismatch)
	}
	return nil
}

// SummaryPayload is the data summary extends: "vtpmd summary v1\0", the host's SHA-256 PCRs
// 0-7 (each: index byte, 32 bytes), then the identity's length (2 bytes, big-endian) and the
// identity (the hardware EK's name).
func SummaryPayload(pcrs [][]byte, identity []byte) ([]byte, error) {
	b := []byte("vtpmd summary v1\x00")
	for _, i := range SummaryPCRs {
		if i >= len(pcrs) || len(pcrs[i]) != sha256.Size {
			return nil, fmt.Errorf("%w: hardware SHA-256 PCR %d not read", ErrInput, i)
		}
		b = append(b, byte(i))
		b = append(b, pcrs[i]...)
	}
	if len(identity) == 0 || len(identity) > 0xffff {
		return nil, fmt.Errorf("%w: no identity of the manager's TPM", ErrInput)
	}
	b = binary.BigEndian.AppendUint16(b, uint16(len(identity)))
	return append(b, identity...), nil
}

// Summary extends pcr with one event: the digest (in every bank) of SummaryPayload.
func Summary(h Host, pcr int) (*Plan, error) {
	if err := checkPCR(pcr); err != nil {
		return nil, err
	}
	payload, err := SummaryPayload(h.PCRs[eventlog.AlgSHA256], h.Identity)
	if err != nil {
		return nil, err
	}
	return &Plan{Mode: ModeSummary, ReadOnly: []int{pcr}, Events: []eventlog.Event{tagEvent(pcr, payload)}}, nil
}

// PropertyPayload is the data property mode extends for one property:
// "vtpmd property v1\0" followed by the property's name.
func PropertyPayload(name string) []byte { return append([]byte("vtpmd property v1\x00"), name...) }

// Property maps the host's measurements through pol to properties and extends pcr with one
// event per property (sorted by name, each once). The log must replay to the hardware's PCRs
// (the policy's PCRs, in every bank both have).
func Property(h Host, pcr int, pol *Policy) (*Plan, error) {
	if err := checkPCR(pcr); err != nil {
		return nil, err
	}
	if pol == nil {
		return nil, fmt.Errorf("%w: property mode needs the operator's property policy (--property-policy)", ErrInput)
	}
	if h.Log == nil {
		return nil, fmt.Errorf("%w: property mode needs the host's event log", ErrInput)
	}
	if err := checkLog(h, pol.PCRs); err != nil {
		return nil, err
	}
	props, err := pol.Properties(h.Log)
	if err != nil {
		return nil, err
	}
	return propertyPlan(pcr, props), nil
}

func propertyPlan(pcr int, props []string) *Plan {
	p := &Plan{Mode: ModeProperty, ReadOnly: []int{pcr}}
	for _, name := range props {
		p.Events = append(p.Events, tagEvent(pcr, PropertyPayload(name)))
	}
	return p
}

func checkPCR(pcr int) error {
	if pcr < 0 || pcr >= eventlog.NumPCRs {
		return fmt.Errorf("%w: PCR %d out of range 0 to 23", ErrInput, pcr)
	}
	return nil
}

// tagEvent is an EV_EVENT_TAG event (TCG_PCClientTaggedEvent: taggedEventID, size, data)
// carrying payload, whose digest in every bank is the bank's hash of payload.
func tagEvent(pcr int, payload []byte) eventlog.Event {
	data := binary.LittleEndian.AppendUint32(nil, TagID)
	data = binary.LittleEndian.AppendUint32(data, uint32(len(payload)))
	data = append(data, payload...)
	e := eventlog.Event{PCR: uint32(pcr), Type: eventlog.EvEventTag, Data: data}
	for _, bank := range Banks {
		hf, _ := eventlog.Hash(bank)
		w := hf.New()
		w.Write(payload)
		e.Digests = append(e.Digests, eventlog.Digest{Alg: bank, Value: w.Sum(nil)})
	}
	return e
}
