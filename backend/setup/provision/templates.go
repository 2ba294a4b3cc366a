package provision

import "github.com/google/go-tpm/tpm2"

// TCG EK Credential Profile policy digests: PolicyA (TPM2_PolicySecret(TPM_RH_ENDORSEMENT)) for
// the low-range SHA-256 templates, PolicyB SHA-384 (PolicyOR of PolicyA and PolicyC) for the
// high-range SHA-384 ones.
var (
	policyASHA256 = []byte{
		0x83, 0x71, 0x97, 0x67, 0x44, 0x84, 0xb3, 0xf8, 0x1a, 0x90, 0xcc, 0x8d, 0x46, 0xa5, 0xd7, 0x24,
		0xfd, 0x52, 0xd7, 0x6e, 0x06, 0x52, 0x0b, 0x64, 0xf2, 0xa1, 0xda, 0x1b, 0x33, 0x14, 0x69, 0xaa,
	}
	policyBSHA384 = []byte{
		0xb2, 0x6e, 0x7d, 0x28, 0xd1, 0x1a, 0x50, 0xbc, 0x53, 0xd8, 0x82, 0xbc, 0xf5, 0xfd, 0x3a, 0x1a,
		0x07, 0x41, 0x48, 0xbb, 0x35, 0xd3, 0xb4, 0xe4, 0xcb, 0x1c, 0x0a, 0xd9, 0xbd, 0xe4, 0x19, 0xca,
		0xcb, 0x47, 0xba, 0x09, 0x69, 0x96, 0x46, 0x15, 0x0f, 0x9f, 0xc0, 0x00, 0xf3, 0xf8, 0x0e, 0x12,
	}
)

func aesCFB(bits int) tpm2.TPMTSymDefObject {
	return tpm2.TPMTSymDefObject{
		Algorithm: tpm2.TPMAlgAES,
		KeyBits:   tpm2.NewTPMUSymKeyBits(tpm2.TPMAlgAES, tpm2.TPMKeyBits(bits)),
		Mode:      tpm2.NewTPMUSymMode(tpm2.TPMAlgAES, tpm2.TPMAlgCFB),
	}
}

var nullSym = tpm2.TPMTSymDefObject{Algorithm: tpm2.TPMAlgNull}

// ekAttributes are the EK object attributes: a restricted decryption key by default; with
// sign an unrestricted key that signs, and decrypts only when decrypt is also set.
func ekAttributes(userWithAuth, sign, decrypt bool) tpm2.TPMAObject {
	return tpm2.TPMAObject{
		FixedTPM: true, FixedParent: true, SensitiveDataOrigin: true, AdminWithPolicy: true,
		UserWithAuth: userWithAuth,
		Restricted:   !sign,
		Decrypt:      decrypt || !sign,
		SignEncrypt:  sign,
	}
}

// EKTemplateRSA is the TCG EK template for RSA 2048 (L-1: SHA-256, PolicyA, AES-128, a
// 256-byte zero unique) or RSA 3072 (H-6: SHA-384, PolicyB, AES-256, empty unique). A signing
// EK has no symmetric algorithm.
func EKTemplateRSA(bits int, sign, decrypt bool) tpm2.TPMTPublic {
	t := tpm2.TPMTPublic{Type: tpm2.TPMAlgRSA}
	sym := aesCFB(128)
	var unique []byte
	if bits == 3072 {
		t.NameAlg = tpm2.TPMAlgSHA384
		t.ObjectAttributes = ekAttributes(true, sign, decrypt)
		t.AuthPolicy = tpm2.TPM2BDigest{Buffer: policyBSHA384}
		sym = aesCFB(256)
	} else {
		bits = 2048
		t.NameAlg = tpm2.TPMAlgSHA256
		t.ObjectAttributes = ekAttributes(false, sign, decrypt)
		t.AuthPolicy = tpm2.TPM2BDigest{Buffer: policyASHA256}
		unique = make([]byte, 256)
	}
	if sign {
		sym = nullSym
	}
	t.Parameters = tpm2.NewTPMUPublicParms(tpm2.TPMAlgRSA, &tpm2.TPMSRSAParms{
		Symmetric: sym, Scheme: tpm2.TPMTRSAScheme{Scheme: tpm2.TPMAlgNull}, KeyBits: tpm2.TPMKeyBits(bits)})
	t.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgRSA, &tpm2.TPM2BPublicKeyRSA{Buffer: unique})
	return t
}

// EKTemplateP384 is the TCG EK template H-3: ECC NIST P-384, SHA-384, PolicyB, AES-256, empty
// unique.
func EKTemplateP384(sign, decrypt bool) tpm2.TPMTPublic {
	return ekTemplateECC(tpm2.TPMECCNistP384, tpm2.TPMAlgSHA384, policyBSHA384, true, 256, 0, sign, decrypt)
}

// EKTemplateP256 is the TCG EK template L-2: ECC NIST P-256, SHA-256, PolicyA, AES-128, 32-byte
// zero x and y.
func EKTemplateP256(sign, decrypt bool) tpm2.TPMTPublic {
	return ekTemplateECC(tpm2.TPMECCNistP256, tpm2.TPMAlgSHA256, policyASHA256, false, 128, 32, sign, decrypt)
}

// ekTemplateECC is an ECC EK template; uniqueLen is the size of the zero-filled x and y. A
// signing EK has no symmetric algorithm.
func ekTemplateECC(curve tpm2.TPMECCCurve, nameAlg tpm2.TPMAlgID, policy []byte, userWithAuth bool, aesBits, uniqueLen int, sign, decrypt bool) tpm2.TPMTPublic {
	sym := aesCFB(aesBits)
	if sign {
		sym = nullSym
	}
	return tpm2.TPMTPublic{
		Type:             tpm2.TPMAlgECC,
		NameAlg:          nameAlg,
		ObjectAttributes: ekAttributes(userWithAuth, sign, decrypt),
		AuthPolicy:       tpm2.TPM2BDigest{Buffer: policy},
		Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgECC, &tpm2.TPMSECCParms{
			Symmetric: sym,
			Scheme:    tpm2.TPMTECCScheme{Scheme: tpm2.TPMAlgNull},
			CurveID:   curve,
			KDF:       tpm2.TPMTKDFScheme{Scheme: tpm2.TPMAlgNull},
		}),
		Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{
			X: tpm2.TPM2BECCParameter{Buffer: make([]byte, uniqueLen)}, Y: tpm2.TPM2BECCParameter{Buffer: make([]byte, uniqueLen)}}),
	}
}

func spkAttributes() tpm2.TPMAObject {
	return tpm2.TPMAObject{FixedTPM: true, FixedParent: true, SensitiveDataOrigin: true,
		UserWithAuth: true, NoDA: true, Restricted: true, Decrypt: true}
}

// SPKTemplateRSA is swtpm_setup's storage primary key template: RSA 2048 (SHA-256, AES-128)
// or RSA 3072 (SHA-384, AES-256), CFB, zero-filled unique of the modulus size.
func SPKTemplateRSA(bits int) tpm2.TPMTPublic {
	nameAlg, sym := tpm2.TPMAlgSHA256, aesCFB(128)
	if bits == 3072 {
		nameAlg, sym = tpm2.TPMAlgSHA384, aesCFB(256)
	} else {
		bits = 2048
	}
	return tpm2.TPMTPublic{
		Type: tpm2.TPMAlgRSA, NameAlg: nameAlg, ObjectAttributes: spkAttributes(),
		Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgRSA, &tpm2.TPMSRSAParms{
			Symmetric: sym, Scheme: tpm2.TPMTRSAScheme{Scheme: tpm2.TPMAlgNull}, KeyBits: tpm2.TPMKeyBits(bits)}),
		Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgRSA, &tpm2.TPM2BPublicKeyRSA{Buffer: make([]byte, bits/8)}),
	}
}

// SPKTemplateP384 is swtpm_setup's ECC storage primary key template (--create-spk --ecc):
// P-384, SHA-384, AES-256 CFB, 48-byte zero x and y.
func SPKTemplateP384() tpm2.TPMTPublic {
	return tpm2.TPMTPublic{
		Type: tpm2.TPMAlgECC, NameAlg: tpm2.TPMAlgSHA384, ObjectAttributes: spkAttributes(),
		Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgECC, &tpm2.TPMSECCParms{
			Symmetric: aesCFB(256), Scheme: tpm2.TPMTECCScheme{Scheme: tpm2.TPMAlgNull},
			CurveID: tpm2.TPMECCNistP384, KDF: tpm2.TPMTKDFScheme{Scheme: tpm2.TPMAlgNull}}),
		Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{
			X: tpm2.TPM2BECCParameter{Buffer: make([]byte, 48)}, Y: tpm2.TPM2BECCParameter{Buffer: make([]byte, 48)}}),
	}
}
