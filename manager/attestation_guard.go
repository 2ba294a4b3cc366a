package manager

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/vtpmd/vtpmd/backend/seam"
	"github.com/vtpmd/vtpmd/internal/tpmclient"
	"github.com/vtpmd/vtpmd/internal/tpmwire"
	"github.com/vtpmd/vtpmd/manager/attest"
)

// The guest's attestation indices (OpenVMM's pattern): the guest writes a nonce of up to 64
// bytes into NonceIndex with tpm2_nvwrite and reads the report from ReportIndex with
// tpm2_nvread -C o.
const (
	ReportIndex = 0x01400001
	NonceIndex  = 0x01400002
	// keyIndex keeps the report index's write authValue for the vTPM process (one that did
	// not see the guest's startup: after an incoming migration, or restarted); the guest may
	// not touch it (Check).
	keyIndex = 0x01400003

	reportNV = tpm2.TPMHandle(ReportIndex)
	nonceNV  = tpm2.TPMHandle(NonceIndex)
	keyNV    = tpm2.TPMHandle(keyIndex)
)

// reportAuthSize is the size of the report index's authValue (a SHA-256 name algorithm's).
const reportAuthSize = 32

// vtpmPCRs are the vTPM PCRs whose digest a report binds: SHA-256 PCRs 0-23 (the guest quotes
// the same with tpm2_quote -l sha256:0,...,23).
var vtpmPCRs = attest.PCRSelection{Hash: uint16(tpm2.TPMAlgSHA256), Mask: 0xffffff}

// ekHandles are where swtpm_setup (and the TCG EK profile) keep the EK: RSA 2048, 3072, 4096,
// ECC P-256, P-384, P-521; the first present is the vTPM's EK.
var ekHandles = []tpm2.TPMHandle{0x81010001, 0x8101001c, 0x8101001e, 0x81010002, 0x8101000a, 0x81010016, 0x81010018}

func init() {
	registerGuardPart(func(cfg GuardConfig) seam.Guard {
		return &attestGuard{cfg: cfg, path: statePathOfURI(cfg.StateURI), log: cfg.Log.With("part", "attestation")}
	})
}

// attestGuard defines the attestation indices at every TPM2_Startup(CLEAR) and answers a
// nonce written by the guest with a report from the manager.
type attestGuard struct {
	cfg  GuardConfig
	path string
	log  *slog.Logger

	mu sync.Mutex
	// auth is the report index's authValue: random per startup, known only to this process,
	// so that only the guard writes the report once the firmware has changed platform auth.
	auth []byte
	// last is when the last report was asked for: a guest writing nonces in a loop is slowed
	// to one hardware quote per minReportInterval, so it cannot monopolize the host's TPM.
	last time.Time
}

// minReportInterval is the least time between two reports for one vTPM.
const minReportInterval = 250 * time.Millisecond

// guestRefused are the NV commands a guest may not run on the attestation indices, and where
// their index handle is (after the header: 0 for the first handle, 4 for the second, 8 for
// the third): the report index is the host's; the nonce index is the guest's to write, not to
// remove; the key index is not the guest's to read either (nor to compare with PolicyNV). The
// indices' attributes refuse most of these already once the firmware has set platform
// authorization; this also holds under firmware that leaves it empty.
var guestRefused = map[uint32]map[uint32]int{
	keyIndex: {
		uint32(tpm2.TPMCCNVUndefineSpace): 4, uint32(tpm2.TPMCCNVWrite): 4, uint32(tpm2.TPMCCNVIncrement): 4,
		uint32(tpm2.TPMCCNVExtend): 4, uint32(tpm2.TPMCCNVSetBits): 4, uint32(tpm2.TPMCCNVWriteLock): 4,
		uint32(tpm2.TPMCCNVUndefineSpaceSpecial): 0, uint32(tpm2.TPMCCNVChangeAuth): 0,
		uint32(tpm2.TPMCCNVRead): 4, uint32(tpm2.TPMCCNVReadLock): 4, uint32(tpm2.TPMCCNVCertify): 8,
		uint32(tpm2.TPMCCPolicyNV): 4, uint32(tpm2.TPMCCPolicyAuthorizeNV): 4,
	},
	ReportIndex: {
		uint32(tpm2.TPMCCNVUndefineSpace): 4, uint32(tpm2.TPMCCNVWrite): 4, uint32(tpm2.TPMCCNVIncrement): 4,
		uint32(tpm2.TPMCCNVExtend): 4, uint32(tpm2.TPMCCNVSetBits): 4, uint32(tpm2.TPMCCNVWriteLock): 4,
		uint32(tpm2.TPMCCNVUndefineSpaceSpecial): 0, uint32(tpm2.TPMCCNVChangeAuth): 0,
	},
	NonceIndex: {
		uint32(tpm2.TPMCCNVUndefineSpace): 4, uint32(tpm2.TPMCCNVWriteLock): 4,
		uint32(tpm2.TPMCCNVUndefineSpaceSpecial): 0, uint32(tpm2.TPMCCNVChangeAuth): 0,
	},
}

// Commands implements seam.CommandFilter: what Check refuses, TPM2_NV_DefineSpace, the nonce
// write Done answers, and TPM2_Startup for Started.
func (g *attestGuard) Commands() []uint32 {
	cs := []uint32{uint32(tpm2.TPMCCStartup), uint32(tpm2.TPMCCNVDefineSpace), uint32(tpm2.TPMCCNVWrite)}
	for _, cmds := range guestRefused {
		for c := range cmds {
			cs = append(cs, c)
		}
	}
	return cs
}

// rcNVAuth is TPM_RC_NV_AUTHORIZATION, the answer to a refused command.
const rcNVAuth = 0x149

// Check implements seam.Guard: the guest's removal, change or re-definition of the
// attestation indices gets TPM_RC_NV_AUTHORIZATION; reads and nonce writes run.
func (g *attestGuard) Check(cmd []byte) []byte {
	h, err := tpmwire.ParseHeader(cmd)
	if err != nil {
		return nil
	}
	for index, cmds := range guestRefused {
		if off, ok := cmds[h.Code]; ok && len(cmd) >= tpmwire.HeaderSize+off+4 &&
			binary.BigEndian.Uint32(cmd[tpmwire.HeaderSize+off:]) == index {
			return tpmwire.ErrorResponse(true, rcNVAuth)
		}
	}
	if h.Code == uint32(tpm2.TPMCCNVDefineSpace) {
		if idx, ok := definedIndex(cmd); ok && guestRefused[idx] != nil {
			return tpmwire.ErrorResponse(true, rcNVAuth)
		}
	}
	return nil
}

// definedIndex is the index a TPM2_NV_DefineSpace command defines: after the auth handle and
// the authorization area come TPM2B_AUTH (its size in the clear even when encrypted) and
// TPM2B_NV_PUBLIC, whose first field is the index.
func definedIndex(cmd []byte) (uint32, bool) {
	p := tpmwire.HeaderSize + 4
	if len(cmd) < p+4 {
		return 0, false
	}
	if h, _ := tpmwire.ParseHeader(cmd); h.Tag == uint16(tpm2.TPMSTSessions) {
		n := int(binary.BigEndian.Uint32(cmd[p:]))
		if n < 0 || n > len(cmd) {
			return 0, false
		}
		p += 4 + n
	}
	if len(cmd) < p+2 {
		return 0, false
	}
	p += 2 + int(binary.BigEndian.Uint16(cmd[p:]))
	if len(cmd) < p+2+4 {
		return 0, false
	}
	return binary.BigEndian.Uint32(cmd[p+2:]), true
}

// Started implements seam.Guard: right after TPM2_Startup(CLEAR) platform auth is empty,
// and the indices are (re)defined with it. A failure is logged, never fails the guest's boot.
func (g *attestGuard) Started(exec seam.Exec) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	clear(g.auth)
	g.auth = nil
	tp := tpmclient.SendFunc(exec)
	auth := make([]byte, reportAuthSize)
	if _, err := rand.Read(auth); err != nil {
		g.log.Warn("attestation indices not defined", "err", err)
		return nil
	}
	if err := defineIndices(tp, auth); err != nil {
		clear(auth)
		g.log.Warn("attestation indices not defined", "err", err)
		return nil
	}
	g.auth = auth
	return nil
}

// defineIndices replaces the indices by fresh ones (platform-created, so the guest cannot
// delete them once the firmware has set platform auth) and keeps the report index's authValue
// in the key index.
func defineIndices(tp transport.TPM, reportAuth []byte) error {
	common := tpm2.TPMANV{PPWrite: true, PPRead: true, OwnerRead: true, AuthRead: true, NoDA: true,
		PlatformCreate: true, NT: tpm2.TPMNTOrdinary}
	nonce := common
	nonce.OwnerWrite, nonce.AuthWrite = true, true
	report := common
	report.AuthWrite = true
	key := tpm2.TPMANV{PPWrite: true, PPRead: true, AuthRead: true, NoDA: true, PlatformCreate: true, NT: tpm2.TPMNTOrdinary}
	for _, ix := range []struct {
		index uint32
		attrs tpm2.TPMANV
		size  uint16
		auth  []byte
	}{
		{ReportIndex, report, attest.MaxReportSize, reportAuth},
		{NonceIndex, nonce, attest.MaxNonce, nil},
		{keyIndex, key, reportAuthSize, nil},
	} {
		if pub, err := (tpm2.NVReadPublic{NVIndex: tpm2.TPMHandle(ix.index)}).Execute(tp); err == nil {
			if _, err := (tpm2.NVUndefineSpace{
				AuthHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHPlatform, Auth: tpm2.PasswordAuth(nil)},
				NVIndex:    tpm2.NamedHandle{Handle: tpm2.TPMHandle(ix.index), Name: pub.NVName},
			}).Execute(tp); err != nil {
				return fmt.Errorf("remove the old NV index 0x%08x: %w", ix.index, err)
			}
		}
		if _, err := (tpm2.NVDefineSpace{
			AuthHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHPlatform, Auth: tpm2.PasswordAuth(nil)},
			Auth:       tpm2.TPM2BAuth{Buffer: ix.auth},
			PublicInfo: tpm2.New2B(tpm2.TPMSNVPublic{NVIndex: tpm2.TPMHandle(ix.index), NameAlg: tpm2.TPMAlgSHA256,
				Attributes: ix.attrs, DataSize: ix.size}),
		}).Execute(tp); err != nil {
			return fmt.Errorf("define NV index 0x%08x: %w", ix.index, err)
		}
	}
	pub, err := tpm2.NVReadPublic{NVIndex: keyNV}.Execute(tp)
	if err != nil {
		return fmt.Errorf("key index: %w", err)
	}
	if _, err := (tpm2.NVWrite{
		AuthHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHPlatform, Auth: tpm2.PasswordAuth(nil)},
		NVIndex:    tpm2.NamedHandle{Handle: keyNV, Name: pub.NVName},
		Data:       tpm2.TPM2BMaxNVBuffer{Buffer: reportAuth},
	}).Execute(tp); err != nil {
		return fmt.Errorf("write the key index: %w", err)
	}
	return nil
}

// readReportAuth reads the report index's authValue back from the key index (a vTPM process
// that did not define the indices itself).
func readReportAuth(tp transport.TPM) ([]byte, error) {
	pub, err := tpm2.NVReadPublic{NVIndex: keyNV}.Execute(tp)
	if err != nil {
		return nil, fmt.Errorf("key index: %w", err)
	}
	r, err := tpm2.NVRead{
		AuthHandle: tpm2.AuthHandle{Handle: keyNV, Name: pub.NVName, Auth: tpm2.PasswordAuth(nil)},
		NVIndex:    tpm2.NamedHandle{Handle: keyNV, Name: pub.NVName},
		Size:       reportAuthSize,
	}.Execute(tp)
	if err != nil {
		return nil, fmt.Errorf("read the key index: %w", err)
	}
	return r.Data.Buffer, nil
}

// Done implements seam.Guard: after the guest wrote the nonce index, the report for that
// nonce is written into the report index before the guest hears its write succeeded.
func (g *attestGuard) Done(cmd, rsp []byte, exec seam.Exec) {
	end, ok := nonceWrite(cmd)
	if !ok {
		return
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	tp := tpmclient.SendFunc(exec)
	if g.auth == nil {
		// the guest started before this process served it (an incoming migration, a restart)
		auth, err := readReportAuth(tp)
		if err != nil {
			g.log.Warn("the guest wrote a nonce, but the report index's key is not readable: no report", "err", err)
			return
		}
		g.auth = auth
	}
	if wait := minReportInterval - time.Since(g.last); wait > 0 {
		time.Sleep(wait)
	}
	g.last = time.Now()
	start := time.Now()
	report, err := g.report(tp, end)
	if err != nil {
		g.log.Warn("no attestation report for the guest", "err", err)
		report = nil // an empty index: the guest never reads a stale report as this one
	}
	if err := writeReport(tp, g.auth, report); err != nil {
		g.log.Warn("attestation report not written", "err", err)
		return
	}
	if report != nil {
		g.log.Info("attestation report written", "bytes", len(report), "took", time.Since(start).Round(time.Millisecond))
	}
}

// nonceWrite reports whether cmd is a TPM2_NV_Write to the nonce index, and where the written
// bytes end (offset + size: the size fields stay in the clear when parameters are encrypted).
func nonceWrite(cmd []byte) (end int, ok bool) {
	h, err := tpmwire.ParseHeader(cmd)
	if err != nil || h.Code != uint32(tpm2.TPMCCNVWrite) || h.Tag != uint16(tpm2.TPMSTSessions) || len(cmd) < 22 {
		return 0, false
	}
	if binary.BigEndian.Uint32(cmd[14:]) != NonceIndex {
		return 0, false
	}
	end = attest.MaxNonce
	authSize := int(binary.BigEndian.Uint32(cmd[18:]))
	p := 22 + authSize
	if authSize < 0 || p+2 > len(cmd) {
		return end, true
	}
	size := int(binary.BigEndian.Uint16(cmd[p:]))
	if p+2+size+2 > len(cmd) {
		return end, true
	}
	offset := int(binary.BigEndian.Uint16(cmd[p+2+size:]))
	if e := offset + size; e > 0 && e <= attest.MaxNonce {
		end = e
	}
	return end, true
}

// report reads the nonce, the vTPM's EK, the guest's AK and PCR digest, and asks the manager.
func (g *attestGuard) report(tp transport.TPM, end int) ([]byte, error) {
	nonce, err := readNonce(tp, end)
	if err != nil {
		return nil, err
	}
	ek, err := ekName(tp)
	if err != nil {
		return nil, fmt.Errorf("the vTPM's EK: %w", err)
	}
	var ak []byte
	if pub, err := (tpm2.ReadPublic{ObjectHandle: tpm2.TPMHandle(attest.AKHandle)}).Execute(tp); err == nil {
		ak = pub.Name.Buffer
	}
	digest, err := pcrDigest(tp, vtpmPCRs)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	resp, err := g.cfg.Client.AttestReport(ctx, AttestRequest{StatePath: g.path, Nonce: nonce, EKName: ek, AKName: ak,
		PCRHash: vtpmPCRs.Hash, PCRMask: vtpmPCRs.Mask, PCRDigest: digest})
	if err != nil {
		return nil, err
	}
	return resp.Report, nil
}

// readNonce reads the nonce back from the index with its (empty) authValue: the guest's
// command may have carried it encrypted.
func readNonce(tp transport.TPM, end int) ([]byte, error) {
	pub, err := tpm2.NVReadPublic{NVIndex: nonceNV}.Execute(tp)
	if err != nil {
		return nil, fmt.Errorf("nonce index: %w", err)
	}
	r, err := tpm2.NVRead{
		AuthHandle: tpm2.AuthHandle{Handle: nonceNV, Name: pub.NVName, Auth: tpm2.PasswordAuth(nil)},
		NVIndex:    tpm2.NamedHandle{Handle: nonceNV, Name: pub.NVName},
		Size:       uint16(end),
	}.Execute(tp)
	if err != nil {
		return nil, fmt.Errorf("read the nonce: %w", err)
	}
	return r.Data.Buffer, nil
}

// ekName is the name of the vTPM's EK: persistent where swtpm_setup puts it, else the primary
// key of the TCG RSA EK template (what tpm2_createek makes by default).
func ekName(tp transport.TPM) ([]byte, error) {
	for _, h := range ekHandles {
		pub, err := tpm2.ReadPublic{ObjectHandle: h}.Execute(tp)
		if err != nil {
			continue
		}
		if p, err := pub.OutPublic.Contents(); err == nil && p.ObjectAttributes.Restricted && p.ObjectAttributes.Decrypt {
			return pub.Name.Buffer, nil
		}
	}
	r, err := tpm2.CreatePrimary{PrimaryHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHEndorsement, Auth: tpm2.PasswordAuth(nil)},
		InPublic: tpm2.New2B(tpm2.RSAEKTemplate)}.Execute(tp)
	if err != nil {
		return nil, fmt.Errorf("no persistent EK, and none from the EK template: %w", err)
	}
	tpm2.FlushContext{FlushHandle: r.ObjectHandle}.Execute(tp)
	return r.Name.Buffer, nil
}

// pcrDigest reads the selected PCRs and digests them as a quote does.
func pcrDigest(tp transport.TPM, sel attest.PCRSelection) ([]byte, error) {
	var values [][]byte
	for _, p := range sel.PCRs() {
		r, err := tpm2.PCRRead{PCRSelectionIn: tpm2.TPMLPCRSelection{PCRSelections: []tpm2.TPMSPCRSelection{
			{Hash: tpm2.TPMAlgID(sel.Hash), PCRSelect: tpm2.PCClientCompatible.PCRs(uint(p))}}}}.Execute(tp)
		if err != nil {
			return nil, fmt.Errorf("read PCR %d: %w", p, err)
		}
		if len(r.PCRValues.Digests) != 1 {
			return nil, fmt.Errorf("read PCR %d: %w", p, errors.New("no value (bank not allocated?)"))
		}
		values = append(values, r.PCRValues.Digests[0].Buffer)
	}
	return attest.PCRDigest(sel.Hash, values)
}

// writeReport fills the report index: the report, then zeros to its end (nil: all zeros).
func writeReport(tp transport.TPM, auth, report []byte) error {
	pub, err := tpm2.NVReadPublic{NVIndex: reportNV}.Execute(tp)
	if err != nil {
		return fmt.Errorf("report index: %w", err)
	}
	buf := make([]byte, attest.MaxReportSize)
	copy(buf, report)
	const chunk = 1024 // TPM_PT_NV_BUFFER_MAX of libtpms
	for off := 0; off < len(buf); off += chunk {
		if _, err := (tpm2.NVWrite{
			AuthHandle: tpm2.AuthHandle{Handle: reportNV, Name: pub.NVName, Auth: tpm2.PasswordAuth(auth)},
			NVIndex:    tpm2.NamedHandle{Handle: reportNV, Name: pub.NVName},
			Data:       tpm2.TPM2BMaxNVBuffer{Buffer: buf[off:min(off+chunk, len(buf))]},
			Offset:     uint16(off),
		}).Execute(tp); err != nil {
			return fmt.Errorf("write the report index at %d: %w", off, err)
		}
		if off == 0 {
			// the index's name changes with its first write (TPMA_NV_WRITTEN)
			if pub, err = (tpm2.NVReadPublic{NVIndex: reportNV}).Execute(tp); err != nil {
				return fmt.Errorf("report index: %w", err)
			}
		}
	}
	return nil
}
