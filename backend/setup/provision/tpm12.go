package provision

import (
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha1"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"math/big"

	"github.com/vtpmd/vtpmd/internal/tpmwire"
)

// TPM 1.2 constants (TPM Main Part 2) used by manufacturing.
const (
	tag12RquCommand = 0x00c1
	tag12RquAuth1   = 0x00c2

	ord12OIAP                     = 0x0000000a
	ord12TakeOwnership            = 0x0000000d
	ord12PhysicalEnable           = 0x0000006f
	ord12PhysicalSetDeactivated   = 0x00000072
	ord12CreateEndorsementKeyPair = 0x00000078
	ord12Startup                  = 0x00000099
	ord12NVDefineSpace            = 0x000000cc
	ord12NVWriteValue             = 0x000000cd
	ord12GetCapability            = 0x00000065
	tscOrdPhysicalPresence        = 0x4000000a

	physPresenceCmdEnable = 0x0020
	physPresencePresent   = 0x0008

	// NV indices of the TCG PC Client specification.
	Index12EKCert       = 0x1000f000
	Index12PlatformCert = 0x1000f002
	index12Lock         = 0xffffffff
	nvPerOwnerRead      = 0x00020000
	nvPerOwnerWrite     = 0x00000002
)

// Default TPM 1.2 secrets: swtpm_setup's owner and SRK passwords, hashed with SHA-1.
var (
	DefaultOwnerPassword = "ooo"
	DefaultSRKPassword   = "sss"
)

// Secret12 is how swtpm_setup turns a TPM 1.2 password into an authorization secret:
// SHA-1 of the password, or, for a well-known secret, SHA-1 of 20 zero bytes (what swtpm_setup
// 0.7.1 does for --owner-well-known and --srk-well-known).
func Secret12(password string, wellKnown bool) [20]byte {
	if wellKnown {
		return sha1.Sum(make([]byte, 20))
	}
	return sha1.Sum([]byte(password))
}

// Options12 say what to make in a TPM 1.2, with swtpm_setup's meaning.
type Options12 struct {
	CreateEK bool
	// TakeOwnership installs OwnerAuth and SRKAuth (see Secret12).
	TakeOwnership      bool
	OwnerAuth, SRKAuth [20]byte
	// EKCert stores an EK certificate, and with it PlatformCert a platform certificate (as
	// swtpm_setup 0.7.1: the platform certificate only comes with the EK certificate).
	EKCert, PlatformCert bool
	// LockNVRAM sets nvLocked, after which NV access needs authorization.
	LockNVRAM bool
	Certifier Certifier
	Log       *slog.Logger
}

// Result12 is what TPM12 made.
type Result12 struct {
	EK                   *rsa.PublicKey
	EKCert, PlatformCert []byte // DER, without the NV header
}

// Send12 runs one raw TPM 1.2 command.
type Send12 func(cmd []byte) ([]byte, error)

// ErrTPM12 is wrapped when a TPM 1.2 command fails.
var ErrTPM12 = errors.New("TPM 1.2 command failed")

func (s Send12) run(name string, cmd []byte) ([]byte, error) {
	rsp, err := s(cmd)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	rc, err := tpmwire.ResponseCode(rsp)
	if err != nil {
		return nil, fmt.Errorf("%s: %w: %w", name, ErrTPM12, err)
	}
	if rc != 0 {
		return nil, fmt.Errorf("%s: %w: 0x%x", name, ErrTPM12, rc)
	}
	return rsp, nil
}

// Startup12 sends TPM_Startup(ST_CLEAR).
func Startup12(send Send12) error {
	_, err := send.run("TPM_Startup", tpmwire.Command(tag12RquCommand, ord12Startup, tpmwire.U16(1)))
	return err
}

// keyParms12 is TPM_KEY_PARMS for a 2048-bit RSA OAEP storage or endorsement key.
func keyParms12(sigScheme uint16) []byte {
	b := tpmwire.U32(1) // TPM_ALG_RSA
	b = append(b, tpmwire.U16(3)...)
	b = append(b, tpmwire.U16(sigScheme)...)
	b = append(b, tpmwire.U32(12)...)   // parmSize
	b = append(b, tpmwire.U32(2048)...) // keyLength
	b = append(b, tpmwire.U32(2)...)    // numPrimes
	return append(b, tpmwire.U32(0)...) // exponentSize: default 65537
}

// TPM12 manufactures a started TPM 1.2 the way swtpm_setup does: physical presence, enable and
// activate, the EK, ownership, the certificates in NV with the TCG PC Client header, and the
// NV lock. Its log lines are swtpm_setup's.
func TPM12(ctx context.Context, send Send12, o Options12) (*Result12, error) {
	log := o.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if o.EKCert && o.Certifier == nil {
		return nil, fmt.Errorf("%w: certificates asked for without a certificate authority", ErrOptions)
	}
	if err := enable12(send); err != nil {
		return nil, err
	}
	res := &Result12{}
	if o.CreateEK || o.TakeOwnership || o.EKCert {
		ek, err := createEK12(send)
		if err != nil {
			return nil, err
		}
		res.EK = ek
		log.Info("Successfully created EK.")
	}
	if o.TakeOwnership {
		if err := takeOwnership12(send, res.EK, o.OwnerAuth, o.SRKAuth); err != nil {
			return nil, err
		}
		log.Info("Successfully took ownership of the TPM.")
	}
	if o.EKCert {
		if err := certify12(ctx, send, o, res, log); err != nil {
			return nil, err
		}
	}
	if o.LockNVRAM {
		if err := defineNV12(send, index12Lock, 0, 0); err != nil {
			return nil, err
		}
		log.Info("Successfully locked NVRAM access.")
	}
	return res, nil
}

// enable12 asserts physical presence, then enables and activates the TPM 1.2.
func enable12(send Send12) error {
	for _, c := range []struct {
		name string
		cmd  []byte
	}{
		{"TSC_PhysicalPresence", tpmwire.Command(tag12RquCommand, tscOrdPhysicalPresence, tpmwire.U16(physPresenceCmdEnable))},
		{"TSC_PhysicalPresence", tpmwire.Command(tag12RquCommand, tscOrdPhysicalPresence, tpmwire.U16(physPresencePresent))},
		{"TPM_PhysicalEnable", tpmwire.Command(tag12RquCommand, ord12PhysicalEnable)},
		{"TPM_PhysicalSetDeactivated", tpmwire.Command(tag12RquCommand, ord12PhysicalSetDeactivated, []byte{0})},
	} {
		if _, err := send.run(c.name, c.cmd); err != nil {
			return err
		}
	}
	return nil
}

// certify12 has res.EK's certificate (and the platform certificate, when asked for) issued
// and stores them in their NV indices.
func certify12(ctx context.Context, send Send12, o Options12, res *Result12, log *slog.Logger) error {
	var err error
	if res.EKCert, err = o.Certifier.EKCertificate(ctx, res.EK, false, true); err != nil {
		return fmt.Errorf("create EK certificate: %w", err)
	}
	log.Info("Successfully created EK certificate locally.")
	if o.PlatformCert {
		if res.PlatformCert, err = o.Certifier.PlatformCertificate(ctx, res.EK); err != nil {
			return fmt.Errorf("create platform certificate: %w", err)
		}
		log.Info("Successfully created platform certificate locally.")
	}
	if err := writeNV12(send, Index12EKCert, StoredCert12(res.EKCert)); err != nil {
		return err
	}
	log.Info("Successfully created NVRAM area for EK certificate.")
	if res.PlatformCert != nil {
		if err := writeNV12(send, Index12PlatformCert, StoredCert12(res.PlatformCert)); err != nil {
			return err
		}
		log.Info("Successfully created NVRAM area for Platform certificate.")
	}
	return nil
}

// createEK12 runs TPM_CreateEndorsementKeyPair and returns the EK.
func createEK12(send Send12) (*rsa.PublicKey, error) {
	nonce := make([]byte, 20)
	if _, err := rand.Read(nonce); err != nil {
		return nil, err
	}
	rsp, err := send.run("TPM_CreateEndorsementKeyPair", tpmwire.Command(tag12RquCommand, ord12CreateEndorsementKeyPair, nonce, keyParms12(2)))
	if err != nil {
		return nil, err
	}
	// TPM_PUBKEY: algorithmParms (24 bytes: the parameters above), then TPM_STORE_PUBKEY
	const keyOff = 10 + 24
	if len(rsp) < keyOff+4+256 || binary.BigEndian.Uint32(rsp[keyOff:]) != 256 {
		return nil, fmt.Errorf("TPM_CreateEndorsementKeyPair: %w: unexpected public key layout", ErrTPM12)
	}
	return &rsa.PublicKey{N: new(big.Int).SetBytes(rsp[keyOff+4 : keyOff+4+256]), E: 65537}, nil
}

// takeOwnership12 runs TPM_OIAP and TPM_TakeOwnership: the owner and SRK secrets encrypted to
// the EK with RSA-OAEP (SHA-1, label "TCPA"), a 2048-bit SRK, authorized with the owner secret.
func takeOwnership12(send Send12, ek *rsa.PublicKey, owner, srk [20]byte) error {
	rsp, err := send.run("TPM_OIAP", tpmwire.Command(tag12RquCommand, ord12OIAP))
	if err != nil {
		return err
	}
	if len(rsp) < 34 {
		return fmt.Errorf("TPM_OIAP: %w: short response", ErrTPM12)
	}
	authHandle, nonceEven := rsp[10:14], rsp[14:34]
	encOwner, err := rsa.EncryptOAEP(sha1.New(), rand.Reader, ek, owner[:], []byte("TCPA"))
	if err != nil {
		return fmt.Errorf("encrypt owner secret: %w", err)
	}
	encSRK, err := rsa.EncryptOAEP(sha1.New(), rand.Reader, ek, srk[:], []byte("TCPA"))
	if err != nil {
		return fmt.Errorf("encrypt SRK secret: %w", err)
	}
	// TPM_KEY12 for the SRK: storage key, auth always, no PCRs, no public key or data yet
	srkParms := tpmwire.U16(0x0028)                     // TPM_TAG_KEY12
	srkParms = append(srkParms, 0, 0)                   // fill
	srkParms = append(srkParms, tpmwire.U16(0x0011)...) // TPM_KEY_STORAGE
	srkParms = append(srkParms, tpmwire.U32(0)...)      // keyFlags
	srkParms = append(srkParms, 1)                      // TPM_AUTH_ALWAYS
	srkParms = append(srkParms, keyParms12(1)...)
	srkParms = append(srkParms, tpmwire.U32(0)...) // PCRInfoSize
	srkParms = append(srkParms, tpmwire.U32(0)...) // pubKey
	srkParms = append(srkParms, tpmwire.U32(0)...) // encData
	params := tpmwire.U16(0x0005)                  // TPM_PID_OWNER
	params = append(params, tpmwire.U32(uint32(len(encOwner)))...)
	params = append(params, encOwner...)
	params = append(params, tpmwire.U32(uint32(len(encSRK)))...)
	params = append(params, encSRK...)
	params = append(params, srkParms...)

	nonceOdd := make([]byte, 20)
	if _, err := rand.Read(nonceOdd); err != nil {
		return err
	}
	// HMAC over SHA-1(ordinal || parameters), nonceEven, nonceOdd, continueAuthSession
	digest := sha1.Sum(append(tpmwire.U32(ord12TakeOwnership), params...))
	mac := hmac.New(sha1.New, owner[:])
	mac.Write(digest[:])
	mac.Write(nonceEven)
	mac.Write(nonceOdd)
	mac.Write([]byte{0})
	cmd := tpmwire.Command(tag12RquAuth1, ord12TakeOwnership, params, authHandle, nonceOdd, []byte{0}, mac.Sum(nil))
	_, err = send.run("TPM_TakeOwnership", cmd)
	return err
}

// pcrInfoShort12 is an empty TPM_PCR_INFO_SHORT (no PCRs, all localities).
func pcrInfoShort12() []byte {
	b := append(tpmwire.U16(3), 0, 0, 0) // sizeOfSelect 3, nothing selected
	b = append(b, 0x1f)                  // TPM_LOC_ALL
	return append(b, make([]byte, 20)...)
}

// defineNV12 runs TPM_NV_DefineSpace without authorization (allowed while nvLocked is FALSE).
func defineNV12(send Send12, index, attrs, size uint32) error {
	pub := tpmwire.U16(0x0018) // TPM_TAG_NV_DATA_PUBLIC
	pub = append(pub, tpmwire.U32(index)...)
	pub = append(pub, pcrInfoShort12()...)
	pub = append(pub, pcrInfoShort12()...)
	pub = append(pub, tpmwire.U16(0x0017)...) // TPM_TAG_NV_ATTRIBUTES
	pub = append(pub, tpmwire.U32(attrs)...)
	pub = append(pub, 0, 0, 0) // bReadSTClear, bWriteSTClear, bWriteDefine
	pub = append(pub, tpmwire.U32(size)...)
	_, err := send.run(fmt.Sprintf("TPM_NV_DefineSpace 0x%x", index), tpmwire.Command(tag12RquCommand, ord12NVDefineSpace, pub, make([]byte, 20)))
	return err
}

// writeNV12 defines an owner-readable, owner-writable index and writes data in one command.
func writeNV12(send Send12, index uint32, data []byte) error {
	if err := defineNV12(send, index, nvPerOwnerRead|nvPerOwnerWrite, uint32(len(data))); err != nil {
		return err
	}
	_, err := send.run(fmt.Sprintf("TPM_NV_WriteValue 0x%x", index),
		tpmwire.Command(tag12RquCommand, ord12NVWriteValue, tpmwire.U32(index), tpmwire.U32(0), tpmwire.U32(uint32(len(data))), data))
	return err
}

// StoredCert12 prefixes a DER certificate with the TCG PC Client TCG_PCCLIENT_STORED_CERT
// header (tag 0x1001, full certificate, size, tag 0x1002), as TPM 1.2 NV holds it.
func StoredCert12(der []byte) []byte {
	b := []byte{0x10, 0x01, 0x00}
	b = binary.BigEndian.AppendUint16(b, uint16(len(der)+2))
	b = append(b, 0x10, 0x02)
	return append(b, der...)
}

// ParseStoredCert12 strips that header; ok is false when data does not carry one.
func ParseStoredCert12(data []byte) (der []byte, ok bool) {
	if len(data) < 7 || data[0] != 0x10 || data[1] != 0x01 || data[2] != 0 || data[5] != 0x10 || data[6] != 0x02 {
		return nil, false
	}
	n := int(binary.BigEndian.Uint16(data[3:5]))
	if n < 2 || 7+n-2 > len(data) {
		return nil, false
	}
	return data[7 : 7+n-2], true
}

// Capability12 runs TPM_GetCapability(capArea, subCap) and returns the response data.
func Capability12(send Send12, capArea uint32, subCap []byte) ([]byte, error) {
	rsp, err := send.run("TPM_GetCapability", tpmwire.Command(tag12RquCommand, ord12GetCapability, tpmwire.U32(capArea), tpmwire.U32(uint32(len(subCap))), subCap))
	if err != nil {
		return nil, err
	}
	if len(rsp) < 14 {
		return nil, fmt.Errorf("TPM_GetCapability: %w: short response", ErrTPM12)
	}
	n := binary.BigEndian.Uint32(rsp[10:14])
	if uint64(n) > uint64(len(rsp)-14) {
		return nil, fmt.Errorf("TPM_GetCapability: %w: bad response size", ErrTPM12)
	}
	return rsp[14 : 14+n], nil
}
