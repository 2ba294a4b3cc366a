// Package tpmclient runs the TPM 2.0 commands that vtpmd's tests, benchmarks and tools send,
// built with go-tpm, over any transport (a data-channel socket or an in-process engine).
package tpmclient

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/big"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
	"github.com/vtpmd/vtpmd/internal/tpmwire"
)

// SendFunc sends one raw command and returns the raw response.
type SendFunc func(cmd []byte) ([]byte, error)

// Send implements transport.TPM, retrying TPM_RC_RETRY / TPM_RC_YIELDED as a TSS does.
func (f SendFunc) Send(cmd []byte) ([]byte, error) {
	for i := 0; ; i++ {
		resp, err := f(cmd)
		if err != nil || i > 20 {
			return resp, err
		}
		rc, herr := tpmwire.ResponseCode(resp)
		if herr != nil || (rc != tpmwire.RCRetry && rc != tpmwire.RCYielded) {
			return resp, nil
		}
		time.Sleep(time.Millisecond)
	}
}

// Stream returns a transport over a stream connection to a data channel: one write per
// command, and a response framed by its header size.
func Stream(rw io.ReadWriter) transport.TPM {
	return SendFunc(func(cmd []byte) ([]byte, error) { return RoundTrip(rw, cmd) })
}

// RoundTrip writes cmd and reads exactly one response.
func RoundTrip(rw io.ReadWriter, cmd []byte) ([]byte, error) {
	if _, err := rw.Write(cmd); err != nil {
		return nil, fmt.Errorf("send command: %w", err)
	}
	var hdr [10]byte
	if _, err := io.ReadFull(rw, hdr[:]); err != nil {
		return nil, fmt.Errorf("read response header: %w", err)
	}
	size := binary.BigEndian.Uint32(hdr[2:6])
	if size < 10 || size > 1<<20 {
		return nil, fmt.Errorf("response size %d out of range", size)
	}
	resp := make([]byte, size)
	copy(resp, hdr[:])
	if _, err := io.ReadFull(rw, resp[10:]); err != nil {
		return nil, fmt.Errorf("read response body: %w", err)
	}
	return resp, nil
}

// Startup sends TPM2_Startup(CLEAR); an already started TPM is fine.
func Startup(t transport.TPM) error {
	_, err := tpm2.Startup{StartupType: tpm2.TPMSUClear}.Execute(t)
	if errors.Is(err, tpm2.TPMRCInitialize) {
		return nil
	}
	return err
}

// Shutdown sends TPM2_Shutdown(su).
func Shutdown(t transport.TPM, state bool) error {
	su := tpm2.TPMSUClear
	if state {
		su = tpm2.TPMSUState
	}
	_, err := tpm2.Shutdown{ShutdownType: su}.Execute(t)
	return err
}

// GetRandom asks for n random bytes.
func GetRandom(t transport.TPM, n uint16) ([]byte, error) {
	r, err := tpm2.GetRandom{BytesRequested: n}.Execute(t)
	if err != nil {
		return nil, err
	}
	return r.RandomBytes.Buffer, nil
}

// PCRExtend extends a SHA-256 PCR with digest.
func PCRExtend(t transport.TPM, pcr uint32, digest []byte) error {
	_, err := tpm2.PCRExtend{
		PCRHandle: tpm2.AuthHandle{Handle: tpm2.TPMHandle(pcr), Auth: tpm2.PasswordAuth(nil)},
		Digests:   tpm2.TPMLDigestValues{Digests: []tpm2.TPMTHA{{HashAlg: tpm2.TPMAlgSHA256, Digest: digest}}},
	}.Execute(t)
	return err
}

// Selection selects SHA-256 PCRs.
func Selection(pcrs ...uint) tpm2.TPMLPCRSelection {
	return tpm2.TPMLPCRSelection{PCRSelections: []tpm2.TPMSPCRSelection{{
		Hash: tpm2.TPMAlgSHA256, PCRSelect: tpm2.PCClientCompatible.PCRs(pcrs...),
	}}}
}

// PCRRead reads one SHA-256 PCR.
func PCRRead(t transport.TPM, pcr uint) ([]byte, error) {
	r, err := tpm2.PCRRead{PCRSelectionIn: Selection(pcr)}.Execute(t)
	if err != nil {
		return nil, err
	}
	if len(r.PCRValues.Digests) != 1 {
		return nil, fmt.Errorf("PCR_Read returned %d digests", len(r.PCRValues.Digests))
	}
	return r.PCRValues.Digests[0].Buffer, nil
}

// ECCSigningTemplate is a restricted ECDSA P-256 signing key (an AK).
var ECCSigningTemplate = tpm2.TPMTPublic{
	Type:    tpm2.TPMAlgECC,
	NameAlg: tpm2.TPMAlgSHA256,
	ObjectAttributes: tpm2.TPMAObject{
		FixedTPM: true, FixedParent: true, SensitiveDataOrigin: true, UserWithAuth: true,
		Restricted: true, SignEncrypt: true, NoDA: true,
	},
	Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgECC, &tpm2.TPMSECCParms{
		Scheme: tpm2.TPMTECCScheme{
			Scheme:  tpm2.TPMAlgECDSA,
			Details: tpm2.NewTPMUAsymScheme(tpm2.TPMAlgECDSA, &tpm2.TPMSSigSchemeECDSA{HashAlg: tpm2.TPMAlgSHA256}),
		},
		CurveID: tpm2.TPMECCNistP256,
	}),
}

// Key is a loaded primary key.
type Key struct {
	Handle tpm2.TPMHandle
	Name   tpm2.TPM2BName
	Public tpm2.TPMTPublic
}

// CreatePrimary creates a primary key in hierarchy h from tmpl.
func CreatePrimary(t transport.TPM, h tpm2.TPMHandle, tmpl tpm2.TPMTPublic) (*Key, error) {
	r, err := tpm2.CreatePrimary{
		PrimaryHandle: tpm2.AuthHandle{Handle: h, Auth: tpm2.PasswordAuth(nil)},
		InPublic:      tpm2.New2B(tmpl),
	}.Execute(t)
	if err != nil {
		return nil, err
	}
	pub, err := r.OutPublic.Contents()
	if err != nil {
		return nil, err
	}
	return &Key{Handle: r.ObjectHandle, Name: r.Name, Public: *pub}, nil
}

// Flush unloads a transient object.
func Flush(t transport.TPM, h tpm2.TPMHandle) error {
	_, err := tpm2.FlushContext{FlushHandle: h}.Execute(t)
	return err
}

// Quote signs the SHA-256 PCRs with an ECDSA AK and verifies the result against the PCR values
// read back: signature, nonce and PCR digest.
func Quote(t transport.TPM, ak *Key, nonce []byte, pcrs ...uint) error {
	q, err := tpm2.Quote{
		SignHandle:     tpm2.AuthHandle{Handle: ak.Handle, Name: ak.Name, Auth: tpm2.PasswordAuth(nil)},
		QualifyingData: tpm2.TPM2BData{Buffer: nonce},
		InScheme:       tpm2.TPMTSigScheme{Scheme: tpm2.TPMAlgNull},
		PCRSelect:      Selection(pcrs...),
	}.Execute(t)
	if err != nil {
		return err
	}
	return VerifyQuote(t, ak, q, nonce, pcrs...)
}

// VerifyQuote checks a quote's signature, nonce and PCR digest.
func VerifyQuote(t transport.TPM, ak *Key, q *tpm2.QuoteResponse, nonce []byte, pcrs ...uint) error {
	pub, err := tpm2.Pub(ak.Public)
	if err != nil {
		return err
	}
	ecPub, ok := pub.(*ecdsa.PublicKey)
	if !ok {
		return errors.New("quote: AK is not ECDSA")
	}
	sig, err := q.Signature.Signature.ECDSA()
	if err != nil {
		return err
	}
	digest := sha256.Sum256(q.Quoted.Bytes())
	if !ecdsa.Verify(ecPub, digest[:], new(big.Int).SetBytes(sig.SignatureR.Buffer), new(big.Int).SetBytes(sig.SignatureS.Buffer)) {
		return errors.New("quote: bad signature")
	}
	att, err := q.Quoted.Contents()
	if err != nil {
		return err
	}
	if att.Magic != tpm2.TPMGeneratedValue || !bytes.Equal(att.ExtraData.Buffer, nonce) {
		return errors.New("quote: bad magic or nonce")
	}
	info, err := att.Attested.Quote()
	if err != nil {
		return err
	}
	h := sha256.New()
	for _, p := range pcrs {
		v, err := PCRRead(t, p)
		if err != nil {
			return err
		}
		h.Write(v)
	}
	if !bytes.Equal(h.Sum(nil), info.PCRDigest.Buffer) {
		return errors.New("quote: PCR digest does not match the PCR values")
	}
	return nil
}

// NVDefine defines an owner-authorized ordinary NV index of size bytes.
func NVDefine(t transport.TPM, index uint32, size uint16) error {
	_, err := tpm2.NVDefineSpace{
		AuthHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)},
		PublicInfo: tpm2.New2B(tpm2.TPMSNVPublic{
			NVIndex: tpm2.TPMHandle(index),
			NameAlg: tpm2.TPMAlgSHA256,
			Attributes: tpm2.TPMANV{
				OwnerWrite: true, OwnerRead: true, AuthWrite: true, AuthRead: true, NoDA: true,
				NT: tpm2.TPMNTOrdinary,
			},
			DataSize: size,
		}),
	}.Execute(t)
	return err
}

func nvName(t transport.TPM, index uint32) (tpm2.TPM2BName, error) {
	r, err := tpm2.NVReadPublic{NVIndex: tpm2.TPMHandle(index)}.Execute(t)
	if err != nil {
		return tpm2.TPM2BName{}, err
	}
	return r.NVName, nil
}

// NVWrite writes data at offset with owner authorization.
func NVWrite(t transport.TPM, index uint32, data []byte, offset uint16) error {
	name, err := nvName(t, index)
	if err != nil {
		return err
	}
	_, err = tpm2.NVWrite{
		AuthHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)},
		NVIndex:    tpm2.NamedHandle{Handle: tpm2.TPMHandle(index), Name: name},
		Data:       tpm2.TPM2BMaxNVBuffer{Buffer: data},
		Offset:     offset,
	}.Execute(t)
	return err
}

// NVRead reads size bytes at offset with owner authorization.
func NVRead(t transport.TPM, index uint32, size, offset uint16) ([]byte, error) {
	name, err := nvName(t, index)
	if err != nil {
		return nil, err
	}
	r, err := tpm2.NVRead{
		AuthHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)},
		NVIndex:    tpm2.NamedHandle{Handle: tpm2.TPMHandle(index), Name: name},
		Size:       size,
		Offset:     offset,
	}.Execute(t)
	if err != nil {
		return nil, err
	}
	return r.Data.Buffer, nil
}
