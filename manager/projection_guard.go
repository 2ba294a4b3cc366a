package manager

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/vtpmd/vtpmd/backend/seam"
	"github.com/vtpmd/vtpmd/internal/tpmclient"
	"github.com/vtpmd/vtpmd/internal/tpmwire"
	"github.com/vtpmd/vtpmd/manager/eventlog"
	"github.com/vtpmd/vtpmd/manager/projection"
)

// The guest-visible log of the projected extends: a TCG PC Client crypto-agile event log,
// split into chunks of up to ProjectionLogChunk bytes in the NV indices ProjectionLogFirst,
// ProjectionLogFirst+1, ... (at most ProjectionLogCount); the guest concatenates them in order
// (tpm2_nvread -C o 0x01400010 ...). The indices are platform-created and write-locked, and
// defined anew at every TPM2_Startup(CLEAR).
const (
	ProjectionLogFirst = 0x01400010
	ProjectionLogCount = 16
	ProjectionLogChunk = 1024
)

// noHostDigest is what a bank the host gives no digests for gets in each projected PCR:
// the bank's hash of this string, once.
const noHostDigest = "vtpmd: no host measurements in this bank"

// projectionTimeout bounds asking the manager.
const projectionTimeout = 30 * time.Second

// projectionRetry is how long a resumed vTPM whose manager failed to answer refuses PCR
// changes before it asks again.
const projectionRetry = 10 * time.Second

func init() {
	registerGuardPart(func(cfg GuardConfig) seam.Guard {
		return &projectionGuard{cfg: cfg, path: statePathOfURI(cfg.StateURI), log: cfg.Log.With("part", "projection")}
	})
}

// projectionGuard applies the manager's projection after every TPM2_Startup(CLEAR) and keeps
// the projected PCRs and the guest-visible log's indices read-only.
type projectionGuard struct {
	cfg  GuardConfig
	path string
	log  *slog.Logger

	mu       sync.Mutex
	asked    bool      // the manager was asked (readOnly is its answer)
	failed   time.Time // when asking after a resumed state last failed
	readOnly uint32    // bit i: PCR i is projected
	logIdx   []uint32  // the indices holding the guest-visible log
}

// PCR commands whose first handle is the PCR they change.
var pcrCommands = []uint32{
	uint32(tpm2.TPMCCPCRExtend), uint32(tpm2.TPMCCPCREvent), uint32(tpm2.TPMCCPCRReset),
	uint32(tpm2.TPMCCEventSequenceComplete),
}

// NV commands that change or remove an index, and where their index handle is (after the
// header: 0 for the first handle, 4 for the second).
var nvCommands = map[uint32]int{
	uint32(tpm2.TPMCCNVUndefineSpace): 4, uint32(tpm2.TPMCCNVWrite): 4, uint32(tpm2.TPMCCNVIncrement): 4,
	uint32(tpm2.TPMCCNVExtend): 4, uint32(tpm2.TPMCCNVSetBits): 4, uint32(tpm2.TPMCCNVWriteLock): 4,
	uint32(tpm2.TPMCCNVUndefineSpaceSpecial): 0, uint32(tpm2.TPMCCNVChangeAuth): 0,
}

// Commands implements seam.CommandFilter: the PCR and NV commands Check looks at, and
// TPM2_Startup for Started.
func (g *projectionGuard) Commands() []uint32 {
	cs := append([]uint32{uint32(tpm2.TPMCCStartup)}, pcrCommands...)
	for c := range nvCommands {
		cs = append(cs, c)
	}
	return cs
}

// rcNVAuthorization is TPM_RC_NV_AUTHORIZATION: the guest may not change the log's indices.
const rcNVAuthorization = 0x149

// Check implements seam.Guard: an extend, event, reset or sequence completion naming a
// projected PCR gets TPM_RC_LOCALITY; a change or removal of the log's indices gets
// TPM_RC_NV_AUTHORIZATION.
func (g *projectionGuard) Check(cmd []byte) []byte {
	h, err := tpmwire.ParseHeader(cmd)
	if err != nil || len(cmd) < tpmwire.HeaderSize+4 {
		return nil
	}
	first := binary.BigEndian.Uint32(cmd[tpmwire.HeaderSize:])
	if slices.Contains(pcrCommands, h.Code) {
		if first >= eventlog.NumPCRs {
			return nil // TPM_RH_NULL (a sequence completed without a PCR) or a bad handle
		}
		if g.projected(int(first)) {
			return tpmwire.ErrorResponse(true, tpmwire.RCLocality)
		}
		return nil
	}
	if off, ok := nvCommands[h.Code]; ok && len(cmd) >= tpmwire.HeaderSize+off+4 {
		idx := binary.BigEndian.Uint32(cmd[tpmwire.HeaderSize+off:])
		g.mu.Lock()
		defer g.mu.Unlock()
		if slices.Contains(g.logIdx, idx) {
			return tpmwire.ErrorResponse(true, rcNVAuthorization)
		}
	}
	return nil
}

// projected reports whether PCR i is projected. A vTPM that resumed a saved state (its guest
// never sent TPM2_Startup(CLEAR) to this process) asks the manager at its first PCR change.
func (g *projectionGuard) projected(i int) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	if !g.asked {
		if time.Since(g.failed) < projectionRetry {
			return true
		}
		resp, err := g.ask()
		switch {
		case err == nil:
			g.setPlan(resp)
		case errors.Is(err, ErrUnavailable):
			// no manager: nothing is projected (a vTPM enrolled with it would not run)
		default:
			// the manager knows this VM but cannot project now: keep every PCR this VM
			// may have projected closed rather than let the guest fill them
			g.log.Warn("host PCR projection unknown after a resumed state: PCR changes refused", "err", err)
			g.failed = time.Now()
			return true
		}
	}
	return g.readOnly&(1<<i) != 0
}

func (g *projectionGuard) ask() (*ProjectionResponse, error) {
	ctx, cancel := context.WithTimeout(context.Background(), projectionTimeout)
	defer cancel()
	return g.cfg.Client.Projection(ctx, g.path)
}

// setPlan records the manager's answer (mu held).
func (g *projectionGuard) setPlan(resp *ProjectionResponse) {
	g.asked = true
	g.readOnly = 0
	for _, p := range resp.ReadOnly {
		if p >= 0 && p < eventlog.NumPCRs {
			g.readOnly |= 1 << p
		}
	}
}

// Started implements seam.Guard: the manager's extends are applied in every active bank of the
// vTPM, then the guest-visible log is written. The guest's startup fails if the manager cannot
// say what to project for a VM it knows, or the extends fail: the guest never sees an
// unprojected TPM. Without a manager, nothing is projected.
func (g *projectionGuard) Started(exec seam.Exec) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	tp := tpmclient.SendFunc(exec)
	resp, err := g.ask()
	if errors.Is(err, ErrUnavailable) {
		g.log.Debug("no manager: no host PCR projection", "err", err)
		g.asked, g.readOnly = true, 0
		return nil
	}
	if err != nil {
		return fmt.Errorf("host PCR projection: %w", err)
	}
	switch resp.Mode {
	case projection.ModeOff, projection.ModeMirror, projection.ModeSummary, projection.ModeProperty:
	default:
		return fmt.Errorf("host PCR projection: %w: mode %q", errNoProjection, resp.Mode)
	}
	g.setPlan(resp)
	if err := g.removeLog(tp); err != nil {
		return err
	}
	if resp.Mode == projection.ModeOff || len(resp.Events) == 0 {
		return nil
	}
	logBanks, err := applyExtends(tp, resp)
	if err != nil {
		return fmt.Errorf("host PCR projection (%s): %w", resp.Mode, err)
	}
	if err := g.writeLog(tp, resp, logBanks); err != nil {
		// the PCRs are projected; only the guest's copy of the log is missing
		g.log.Warn("host PCR projection applied, but its guest-visible log was not written", "err", err)
	}
	g.log.Info("host PCR projection applied", "mode", resp.Mode, "pcrs", resp.ReadOnly, "extends", len(resp.Events), "log_banks", bankNames(logBanks))
	return nil
}

// Done implements seam.Guard.
func (g *projectionGuard) Done([]byte, []byte, seam.Exec) {}

// activeBanks are the vTPM's banks with PCRs allocated.
func activeBanks(tp transport.TPM) ([]uint16, error) {
	resp, err := tpm2.GetCapability{Capability: tpm2.TPMCapPCRs, PropertyCount: 1}.Execute(tp)
	if err != nil {
		return nil, fmt.Errorf("the vTPM's PCR banks: %w", err)
	}
	sels, err := resp.CapabilityData.Data.AssignedPCR()
	if err != nil {
		return nil, fmt.Errorf("the vTPM's PCR banks: %w", err)
	}
	var out []uint16
	for _, s := range sels.PCRSelections {
		if slices.ContainsFunc(s.PCRSelect, func(b byte) bool { return b != 0 }) {
			out = append(out, uint16(s.Hash))
		}
	}
	return out, nil
}

// applyExtends extends each event's digests into the vTPM's active banks; a bank some event
// has no digest for gets noHostDigest in each projected PCR instead. It returns the banks
// every event covered (those the guest-visible log lists).
func applyExtends(tp transport.TPM, resp *ProjectionResponse) ([]uint16, error) {
	banks, err := activeBanks(tp)
	if err != nil {
		return nil, err
	}
	var covered, lacking []uint16
	for _, b := range banks {
		name := eventlog.AlgName(b)
		if !slices.ContainsFunc(resp.Events, func(e ProjectionEvent) bool { return e.Digests[name] == nil }) {
			covered = append(covered, b)
		} else if _, err := eventlog.Hash(b); err == nil {
			lacking = append(lacking, b)
		}
	}
	for i, e := range resp.Events {
		if e.PCR < 0 || e.PCR >= eventlog.NumPCRs || !slices.Contains(resp.ReadOnly, e.PCR) {
			return nil, fmt.Errorf("%w: event %d extends PCR %d, which is not projected", errNoProjection, i+1, e.PCR)
		}
		var vals []tpm2.TPMTHA
		for _, b := range covered {
			vals = append(vals, tpm2.TPMTHA{HashAlg: tpm2.TPMIAlgHash(b), Digest: e.Digests[eventlog.AlgName(b)]})
		}
		if err := extend(tp, e.PCR, vals); err != nil {
			return nil, err
		}
	}
	for _, b := range lacking {
		h, _ := eventlog.Hash(b)
		w := h.New()
		w.Write([]byte(noHostDigest))
		for _, p := range resp.ReadOnly {
			if err := extend(tp, p, []tpm2.TPMTHA{{HashAlg: tpm2.TPMIAlgHash(b), Digest: w.Sum(nil)}}); err != nil {
				return nil, err
			}
		}
	}
	return covered, nil
}

func extend(tp transport.TPM, pcr int, vals []tpm2.TPMTHA) error {
	if len(vals) == 0 {
		return nil
	}
	_, err := tpm2.PCRExtend{
		PCRHandle: tpm2.AuthHandle{Handle: tpm2.TPMHandle(pcr), Auth: tpm2.PasswordAuth(nil)},
		Digests:   tpm2.TPMLDigestValues{Digests: vals},
	}.Execute(tp)
	if err != nil {
		return fmt.Errorf("extend PCR %d: %w", pcr, err)
	}
	return nil
}

// removeLog undefines the log's indices a previous startup defined (platform auth is empty
// right after TPM2_Startup(CLEAR)). Indices the platform did not create are left alone and
// reported: something else owns that range.
func (g *projectionGuard) removeLog(tp transport.TPM) error {
	g.logIdx = nil
	for i := range uint32(ProjectionLogCount) {
		idx := tpm2.TPMHandle(ProjectionLogFirst + i)
		pub, err := tpm2.NVReadPublic{NVIndex: idx}.Execute(tp)
		if err != nil {
			continue // not defined
		}
		contents, err := pub.NVPublic.Contents()
		if err != nil || !contents.Attributes.PlatformCreate {
			g.log.Warn("an NV index of the projection log's range was not made by vtpmd: left alone", "index", fmt.Sprintf("0x%08x", uint32(idx)))
			continue
		}
		if _, err := (tpm2.NVUndefineSpace{
			AuthHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHPlatform, Auth: tpm2.PasswordAuth(nil)},
			NVIndex:    tpm2.NamedHandle{Handle: idx, Name: pub.NVName},
		}).Execute(tp); err != nil {
			return fmt.Errorf("host PCR projection: remove the old log index 0x%08x: %w", uint32(idx), err)
		}
	}
	return nil
}

// logAttributes: written once by the platform, then locked until the index is removed; read by
// the owner (tpm2_nvread -C o), with the index's empty auth, or by the platform.
var logAttributes = tpm2.TPMANV{PPWrite: true, WriteDefine: true, PPRead: true, OwnerRead: true, AuthRead: true,
	NoDA: true, PlatformCreate: true, NT: tpm2.TPMNTOrdinary}

// writeLog writes the guest-visible log of resp's events (banks: those every event covers).
func (g *projectionGuard) writeLog(tp transport.TPM, resp *ProjectionResponse, banks []uint16) error {
	if len(banks) == 0 {
		return errors.New("no vTPM bank has every projected digest")
	}
	evs := make([]eventlog.Event, 0, len(resp.Events))
	for _, e := range resp.Events {
		ev := eventlog.Event{PCR: uint32(e.PCR), Type: e.Type, Data: e.Data}
		for _, b := range banks {
			ev.Digests = append(ev.Digests, eventlog.Digest{Alg: b, Value: e.Digests[eventlog.AlgName(b)]})
		}
		evs = append(evs, ev)
	}
	log, err := eventlog.Build(banks, evs)
	if err != nil {
		return err
	}
	if len(log) > ProjectionLogCount*ProjectionLogChunk {
		return fmt.Errorf("the log is %d bytes, more than the %d the indices hold", len(log), ProjectionLogCount*ProjectionLogChunk)
	}
	platform := tpm2.AuthHandle{Handle: tpm2.TPMRHPlatform, Auth: tpm2.PasswordAuth(nil)}
	for i := 0; len(log) > 0; i++ {
		chunk := log[:min(len(log), ProjectionLogChunk)]
		log = log[len(chunk):]
		idx := tpm2.TPMHandle(ProjectionLogFirst + uint32(i))
		if _, err := (tpm2.NVDefineSpace{
			AuthHandle: platform,
			PublicInfo: tpm2.New2B(tpm2.TPMSNVPublic{NVIndex: idx, NameAlg: tpm2.TPMAlgSHA256,
				Attributes: logAttributes, DataSize: uint16(len(chunk))}),
		}).Execute(tp); err != nil {
			return fmt.Errorf("define NV index 0x%08x: %w", uint32(idx), err)
		}
		g.logIdx = append(g.logIdx, uint32(idx))
		pub, err := tpm2.NVReadPublic{NVIndex: idx}.Execute(tp)
		if err != nil {
			return fmt.Errorf("NV index 0x%08x: %w", uint32(idx), err)
		}
		nv := tpm2.NamedHandle{Handle: idx, Name: pub.NVName}
		if _, err := (tpm2.NVWrite{AuthHandle: platform, NVIndex: nv, Data: tpm2.TPM2BMaxNVBuffer{Buffer: chunk}}).Execute(tp); err != nil {
			return fmt.Errorf("write NV index 0x%08x: %w", uint32(idx), err)
		}
		// written: the name changed (TPMA_NV_WRITTEN)
		if pub, err = (tpm2.NVReadPublic{NVIndex: idx}).Execute(tp); err != nil {
			return fmt.Errorf("NV index 0x%08x: %w", uint32(idx), err)
		}
		nv.Name = pub.NVName
		if _, err := (tpm2.NVWriteLock{AuthHandle: platform, NVIndex: nv}).Execute(tp); err != nil {
			return fmt.Errorf("lock NV index 0x%08x: %w", uint32(idx), err)
		}
	}
	return nil
}

func bankNames(banks []uint16) []string {
	out := make([]string, len(banks))
	for i, b := range banks {
		out[i] = eventlog.AlgName(b)
	}
	return out
}
