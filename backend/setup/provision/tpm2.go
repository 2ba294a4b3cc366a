package provision

import (
	"context"
	"crypto"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
	"github.com/vtpmd/vtpmd/internal/tpmwire"
)

// Persistent handles and NV indices of the TCG EK Credential Profile, as swtpm_setup uses them.
const (
	HandleEKRSA2048 tpm2.TPMHandle = 0x81010001
	HandleEKRSA3072 tpm2.TPMHandle = 0x8101001c
	HandleEKP384    tpm2.TPMHandle = 0x81010016
	HandleEKP256    tpm2.TPMHandle = 0x8101000a // swtpm's choice (master's --ek1keyalgo secp256r1)
	HandleSPK       tpm2.TPMHandle = 0x81000001

	IndexEKCertRSA2048     = 0x01c00002
	IndexEKCertRSA3072     = 0x01c0001c
	IndexEKCertP384        = 0x01c00016
	IndexEKCertP256        = 0x01c0000a
	IndexEKTemplateP256    = 0x01c0000b
	IndexEKTemplateRSA2048 = 0x01c00004
	IndexEKTemplateRSA3072 = 0x01c0001d
	IndexEKTemplateP384    = 0x01c00017
	IndexPlatformCert      = 0x01c08000

	// nvChunk is how much one TPM2_NV_Write carries (swtpm_setup writes 1024 bytes at a time).
	nvChunk = 1024
)

// ErrOptions is wrapped when provisioning options are inconsistent.
var ErrOptions = errors.New("bad provisioning options")

// Certifier issues the certificates stored in the TPM (a local CA, later a host manager).
type Certifier interface {
	// EKCertificate returns a DER certificate over an EK.
	EKCertificate(ctx context.Context, ek crypto.PublicKey, allowSigning, decryption bool) ([]byte, error)
	// PlatformCertificate returns a DER platform certificate over the (first) EK.
	PlatformCertificate(ctx context.Context, ek crypto.PublicKey) ([]byte, error)
}

// Options say what to manufacture, with swtpm_setup's meaning.
type Options struct {
	CreateEK bool
	// RSAKeyBits is the first EK's size: 2048 (default) or 3072.
	RSAKeyBits int
	// EK1 and EK2 name the two EKs as swtpm master's --ek1keyalgo/--ek2keyalgo do (rsa2048,
	// rsa3072, secp256r1, secp384r1); empty means swtpm 0.7.1's choice: RSA of RSAKeyBits,
	// then secp384r1. An EK2 equal to EK1 is made once.
	EK1, EK2 string
	// AllowSigning makes non-standard EKs that can sign; Decryption keeps them able to
	// decrypt (the default unless AllowSigning).
	AllowSigning, Decryption bool
	// EKCert and PlatformCert store certificates from Certifier in NV.
	EKCert, PlatformCert bool
	// LockNVRAM write-locks the certificate indices.
	LockNVRAM bool
	// CreateSPK persists a storage primary key at 0x81000001 (ECC P-384 with SPKECC, else RSA
	// of RSAKeyBits), as --create-spk.
	CreateSPK, SPKECC bool
	// PCRBanks are the banks to leave active (nil: leave all active).
	PCRBanks  []string
	Certifier Certifier
	Log       *slog.Logger
}

// EK is one endorsement key made.
type EK struct {
	// Kind is how swtpm names its certificate file: "rsa2048", "rsa3072", "secp384r1".
	Kind   string
	Handle tpm2.TPMHandle
	Public crypto.PublicKey
	// Cert is the DER certificate stored in NV, if one was made.
	Cert      []byte
	CertIndex uint32
}

// Result is what TPM2 made.
type Result struct {
	EKs          []EK
	PlatformCert []byte
}

// ekSpec is one EK swtpm_setup makes.
type ekSpec struct {
	kind, label             string
	handle                  tpm2.TPMHandle
	certIndex, templateIndx uint32
	template                func(sign, decrypt bool) tpm2.TPMTPublic
}

func rsaSpec(bits int) (ekSpec, error) {
	switch bits {
	case 0, 2048:
		return ekSpec{"rsa2048", "RSA 2048", HandleEKRSA2048, IndexEKCertRSA2048, IndexEKTemplateRSA2048,
			func(s, d bool) tpm2.TPMTPublic { return EKTemplateRSA(2048, s, d) }}, nil
	case 3072:
		return ekSpec{"rsa3072", "RSA 3072", HandleEKRSA3072, IndexEKCertRSA3072, IndexEKTemplateRSA3072,
			func(s, d bool) tpm2.TPMTPublic { return EKTemplateRSA(3072, s, d) }}, nil
	}
	return ekSpec{}, fmt.Errorf("%w: RSA key size %d is not supported (2048 or 3072)", ErrOptions, bits)
}

var (
	eccSpec  = ekSpec{"secp384r1", "ECC", HandleEKP384, IndexEKCertP384, IndexEKTemplateP384, EKTemplateP384}
	p256Spec = ekSpec{"secp256r1", "ECC P-256", HandleEKP256, IndexEKCertP256, IndexEKTemplateP256, EKTemplateP256}
)

// EKAlgorithms are the names EK1 and EK2 take.
var EKAlgorithms = []string{"rsa2048", "rsa3072", "secp256r1", "secp384r1"}

func specByName(name string) (ekSpec, error) {
	switch name {
	case "rsa2048":
		return rsaSpec(2048)
	case "rsa3072":
		return rsaSpec(3072)
	case "secp256r1":
		return p256Spec, nil
	case "secp384r1":
		return eccSpec, nil
	}
	return ekSpec{}, fmt.Errorf("%w: unsupported EK key algorithm %q (%s)", ErrOptions, name, strings.Join(EKAlgorithms, ", "))
}

// ekSpecs are the EKs to make, in order.
func ekSpecs(o Options) ([]ekSpec, error) {
	first, err := rsaSpec(o.RSAKeyBits)
	if err != nil {
		return nil, err
	}
	second := eccSpec
	if o.EK1 != "" {
		if first, err = specByName(o.EK1); err != nil {
			return nil, err
		}
	}
	if o.EK2 != "" {
		if second, err = specByName(o.EK2); err != nil {
			return nil, err
		}
	}
	if first.kind == second.kind {
		return []ekSpec{first}, nil
	}
	return []ekSpec{first, second}, nil
}

// TPM2 manufactures a started TPM 2 (after TPM2_Startup(CLEAR)) the way swtpm_setup does:
// the EK of RSAKeyBits with its certificate and the platform certificate, then an ECC P-384
// EK with its certificate, an optional SPK, the PCR banks, and TPM2_Shutdown(CLEAR). Its log
// lines are swtpm_setup's.
func TPM2(ctx context.Context, t transport.TPM, o Options) (*Result, error) {
	log := o.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if (o.EKCert || o.PlatformCert) && o.Certifier == nil {
		return nil, fmt.Errorf("%w: certificates asked for without a certificate authority", ErrOptions)
	}
	specs, err := ekSpecs(o)
	if err != nil {
		return nil, err
	}
	res := &Result{}
	if o.CreateSPK {
		if err := createSPK(t, o, log); err != nil {
			return nil, err
		}
	}
	if o.CreateEK {
		for i, spec := range specs {
			// the platform certificate is for the first EK
			if err := provisionEK(ctx, t, o, spec, i == 0 && o.PlatformCert, res, log); err != nil {
				return nil, err
			}
		}
	}
	if o.PCRBanks != nil {
		if err := activateBanks(t, o.PCRBanks, log); err != nil {
			return nil, err
		}
	}
	if _, err := (tpm2.Shutdown{ShutdownType: tpm2.TPMSUClear}).Execute(t); err != nil {
		return nil, fmt.Errorf("TPM2_Shutdown: %w", err)
	}
	return res, nil
}

// provisionEK creates the EK of spec with its certificate (and the platform certificate,
// withPlatform) in NV, and adds them to res.
func provisionEK(ctx context.Context, t transport.TPM, o Options, spec ekSpec, withPlatform bool, res *Result, log *slog.Logger) error {
	decrypt := o.Decryption || !o.AllowSigning
	ek, err := createEK(t, spec, o.AllowSigning, decrypt, o.LockNVRAM, log)
	if err != nil {
		return err
	}
	if o.EKCert {
		if ek.Cert, err = o.Certifier.EKCertificate(ctx, ek.Public, o.AllowSigning, decrypt); err != nil {
			return fmt.Errorf("create %s EK certificate: %w", spec.label, err)
		}
		log.Info("Successfully created EK certificate locally.")
	}
	var platform []byte
	if withPlatform {
		if platform, err = o.Certifier.PlatformCertificate(ctx, ek.Public); err != nil {
			return fmt.Errorf("create platform certificate: %w", err)
		}
		log.Info("Successfully created platform certificate locally.")
		res.PlatformCert = platform
	}
	if ek.Cert != nil {
		if err := WriteNV(t, spec.certIndex, ek.Cert, o.LockNVRAM); err != nil {
			return fmt.Errorf("store %s EK certificate: %w", spec.label, err)
		}
		ek.CertIndex = spec.certIndex
		log.Info(fmt.Sprintf("Successfully created NVRAM area 0x%x for %s EK certificate.", spec.certIndex, spec.label))
	}
	if platform != nil {
		if err := WriteNV(t, IndexPlatformCert, platform, o.LockNVRAM); err != nil {
			return fmt.Errorf("store platform certificate: %w", err)
		}
		log.Info(fmt.Sprintf("Successfully created NVRAM area 0x%x for platform certificate.", IndexPlatformCert))
	}
	res.EKs = append(res.EKs, *ek)
	return nil
}

func activateBanks(t transport.TPM, banks []string, log *slog.Logger) error {
	all, err := PCRBanks(t)
	if err != nil {
		return err
	}
	active, err := AllocatePCRBanks(t, banks)
	if err != nil {
		return err
	}
	log.Info(fmt.Sprintf("Successfully activated PCR banks %s among %s.", strings.Join(active, ","), strings.Join(all, ",")))
	return nil
}

// Reconfigure changes the active PCR banks of a started TPM and shuts it down, as
// swtpm_setup --reconfigure does.
func Reconfigure(t transport.TPM, banks []string, log *slog.Logger) error {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if banks != nil {
		if err := activateBanks(t, banks, log); err != nil {
			return err
		}
	}
	if _, err := (tpm2.Shutdown{ShutdownType: tpm2.TPMSUClear}).Execute(t); err != nil {
		return fmt.Errorf("TPM2_Shutdown: %w", err)
	}
	return nil
}

func createEK(t transport.TPM, spec ekSpec, sign, decrypt, lock bool, log *slog.Logger) (*EK, error) {
	tmpl := spec.template(sign, decrypt)
	pub, err := createPersistent(t, tpm2.TPMRHEndorsement, tmpl, spec.handle)
	if err != nil {
		return nil, fmt.Errorf("create %s EK: %w", spec.label, err)
	}
	log.Info(fmt.Sprintf("Successfully created %s EK with handle 0x%x.", spec.label, uint32(spec.handle)))
	if sign {
		// a non-standard EK cannot be recreated from the default template: store its own
		if err := WriteNV(t, spec.templateIndx, tpm2.Marshal(tmpl), lock); err != nil {
			return nil, fmt.Errorf("store %s EK template: %w", spec.label, err)
		}
		log.Info(fmt.Sprintf("Successfully created NVRAM area 0x%x for %s EK template.", spec.templateIndx, spec.label))
	}
	return &EK{Kind: spec.kind, Handle: spec.handle, Public: pub}, nil
}

func createSPK(t transport.TPM, o Options, log *slog.Logger) error {
	tmpl := SPKTemplateRSA(o.RSAKeyBits)
	if o.SPKECC {
		tmpl = SPKTemplateP384()
	}
	if _, err := createPersistent(t, tpm2.TPMRHOwner, tmpl, HandleSPK); err != nil {
		return fmt.Errorf("create storage primary key: %w", err)
	}
	log.Info(fmt.Sprintf("Successfully created storage primary key with handle 0x%x.", uint32(HandleSPK)))
	return nil
}

// createPersistent creates a primary key and makes it persistent at handle.
func createPersistent(t transport.TPM, hierarchy tpm2.TPMHandle, tmpl tpm2.TPMTPublic, handle tpm2.TPMHandle) (crypto.PublicKey, error) {
	r, err := tpm2.CreatePrimary{
		PrimaryHandle: tpm2.AuthHandle{Handle: hierarchy, Auth: tpm2.PasswordAuth(nil)},
		InPublic:      tpm2.New2B(tmpl),
	}.Execute(t)
	if err != nil {
		return nil, fmt.Errorf("TPM2_CreatePrimary: %w", err)
	}
	defer tpm2.FlushContext{FlushHandle: r.ObjectHandle}.Execute(t) //nolint:errcheck // transient copy
	out, err := r.OutPublic.Contents()
	if err != nil {
		return nil, err
	}
	pub, err := tpm2.Pub(*out)
	if err != nil {
		return nil, err
	}
	if _, err := (tpm2.EvictControl{
		Auth:             tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)},
		ObjectHandle:     tpm2.NamedHandle{Handle: r.ObjectHandle, Name: r.Name},
		PersistentHandle: handle,
	}).Execute(t); err != nil {
		return nil, fmt.Errorf("TPM2_EvictControl to 0x%x: %w", uint32(handle), err)
	}
	return pub, nil
}

// certNVAttributes are swtpm_setup's attributes for certificate indices (0x42072001):
// platform-created, readable with its own, owner or platform auth, platform-writable, no
// dictionary-attack protection, write-lockable until the next definition.
var certNVAttributes = tpm2.TPMANV{
	PPWrite: true, WriteDefine: true, PPRead: true, OwnerRead: true, AuthRead: true,
	NoDA: true, PlatformCreate: true, NT: tpm2.TPMNTOrdinary,
}

// WriteNV defines index with swtpm_setup's certificate attributes (a platform-created index),
// writes data in 1024-byte writes and write-locks it when lock is set: for certificates and
// stored EK templates alike.
func WriteNV(t transport.TPM, index uint32, data []byte, lock bool) error {
	if len(data) == 0 || len(data) > 0xffff {
		return fmt.Errorf("%w: NV data of %d bytes", ErrOptions, len(data))
	}
	platform := tpm2.AuthHandle{Handle: tpm2.TPMRHPlatform, Auth: tpm2.PasswordAuth(nil)}
	pub := tpm2.TPMSNVPublic{NVIndex: tpm2.TPMHandle(index), NameAlg: tpm2.TPMAlgSHA256, Attributes: certNVAttributes, DataSize: uint16(len(data))}
	if _, err := (tpm2.NVDefineSpace{AuthHandle: platform, PublicInfo: tpm2.New2B(pub)}).Execute(t); err != nil {
		return fmt.Errorf("TPM2_NV_DefineSpace 0x%x: %w", index, err)
	}
	rp, err := tpm2.NVReadPublic{NVIndex: tpm2.TPMHandle(index)}.Execute(t)
	if err != nil {
		return fmt.Errorf("TPM2_NV_ReadPublic 0x%x: %w", index, err)
	}
	nv := tpm2.NamedHandle{Handle: tpm2.TPMHandle(index), Name: rp.NVName}
	for off := 0; off < len(data); off += nvChunk {
		end := min(off+nvChunk, len(data))
		if _, err := (tpm2.NVWrite{AuthHandle: platform, NVIndex: nv, Data: tpm2.TPM2BMaxNVBuffer{Buffer: data[off:end]}, Offset: uint16(off)}).Execute(t); err != nil {
			return fmt.Errorf("TPM2_NV_Write 0x%x at %d: %w", index, off, err)
		}
		if off == 0 { // the name changes once WRITTEN is set
			if rp, err = (tpm2.NVReadPublic{NVIndex: tpm2.TPMHandle(index)}).Execute(t); err != nil {
				return fmt.Errorf("TPM2_NV_ReadPublic 0x%x: %w", index, err)
			}
			nv.Name = rp.NVName
		}
	}
	if lock {
		if _, err := (tpm2.NVWriteLock{AuthHandle: platform, NVIndex: nv}).Execute(t); err != nil {
			return fmt.Errorf("TPM2_NV_WriteLock 0x%x: %w", index, err)
		}
	}
	return nil
}

// bankAlgs maps swtpm_setup's PCR bank names to hash algorithms.
var bankAlgs = map[string]tpm2.TPMAlgID{
	"sha1": tpm2.TPMAlgSHA1, "sha256": tpm2.TPMAlgSHA256, "sha384": tpm2.TPMAlgSHA384,
	"sha512": tpm2.TPMAlgSHA512, "sm3-256": tpm2.TPMAlgSM3256,
	"sha3-256": tpm2.TPMAlgSHA3256, "sha3-384": tpm2.TPMAlgSHA3384, "sha3-512": tpm2.TPMAlgSHA3512,
}

// ParseBanks parses a --pcr-banks list ("sha1,sha256") as swtpm_setup does: unknown and
// repeated names are dropped (bank names are case-sensitive and not trimmed inside the list);
// "-" means leave all banks (nil). An empty result means "use the configured default".
func ParseBanks(s string) ([]string, error) {
	if s == "-" {
		return nil, nil
	}
	out := []string{}
	for _, b := range strings.Split(s, ",") {
		if _, ok := bankAlgs[b]; ok && !slices.Contains(out, b) {
			out = append(out, b)
		}
	}
	return out, nil
}

// PCRBanks lists the TPM's PCR banks (active or not), by name, in the TPM's order.
func PCRBanks(t transport.TPM) ([]string, error) {
	sel, err := pcrAllocation(t)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, s := range sel.PCRSelections {
		for name, alg := range bankAlgs {
			if alg == s.Hash {
				out = append(out, name)
			}
		}
	}
	return out, nil
}

func pcrAllocation(t transport.TPM) (*tpm2.TPMLPCRSelection, error) {
	r, err := tpm2.GetCapability{Capability: tpm2.TPMCapPCRs, PropertyCount: 1}.Execute(t)
	if err != nil {
		return nil, fmt.Errorf("TPM2_GetCapability(PCRS): %w", err)
	}
	sel, err := r.CapabilityData.Data.AssignedPCR()
	if err != nil {
		return nil, err
	}
	return sel, nil
}

// AllocatePCRBanks makes the named banks that the TPM has active (all 24 PCRs each) and the
// others inactive, with TPM2_PCR_Allocate under platform authorization; it takes effect at the
// next TPM2_Startup. As swtpm_setup, banks the TPM lacks are skipped; none usable is an error.
// It returns the banks activated.
func AllocatePCRBanks(t transport.TPM, banks []string) ([]string, error) {
	cur, err := pcrAllocation(t)
	if err != nil {
		return nil, err
	}
	var sel tpm2.TPMLPCRSelection
	var active []string
	for _, s := range cur.PCRSelections {
		bits := make([]byte, len(s.PCRSelect))
		for _, b := range banks {
			if bankAlgs[b] == s.Hash {
				for i := range bits {
					bits[i] = 0xff
				}
				active = append(active, b)
			}
		}
		sel.PCRSelections = append(sel.PCRSelections, tpm2.TPMSPCRSelection{Hash: s.Hash, PCRSelect: bits})
	}
	if len(active) == 0 {
		return nil, fmt.Errorf("%w: no PCR banks could be allocated: none of the selected algorithms (%s) is supported", ErrOptions, strings.Join(banks, ","))
	}
	// go-tpm has no TPM2_PCR_Allocate: TPM_ST_SESSIONS, TPM_RH_PLATFORM with an empty
	// password session, then the selection.
	params := tpm2.Marshal(sel)
	cmd := tpmwire.Command(tpmwire.TagSessions, uint32(tpm2.TPMCCPCRAllocate), tpmwire.U32(uint32(tpm2.TPMRHPlatform)),
		// authorization area: TPM_RS_PW, no nonce, no attributes, no hmac
		tpmwire.U32(9), tpmwire.U32(uint32(tpm2.TPMRSPW)), []byte{0, 0, 0, 0, 0}, params)
	rsp, err := t.Send(cmd)
	if err != nil {
		return nil, fmt.Errorf("TPM2_PCR_Allocate: %w", err)
	}
	rc, err := tpmwire.ResponseCode(rsp)
	if err != nil {
		return nil, fmt.Errorf("TPM2_PCR_Allocate: %w", err)
	}
	if rc != 0 {
		return nil, fmt.Errorf("TPM2_PCR_Allocate: %w", tpm2.TPMRC(rc))
	}
	// response: parameterSize, allocationSuccess, maxPCR, sizeNeeded, sizeAvailable
	if len(rsp) < 10+4+1 || rsp[14] != 1 {
		return nil, fmt.Errorf("TPM2_PCR_Allocate: the TPM did not allocate %s", strings.Join(active, ","))
	}
	return active, nil
}
