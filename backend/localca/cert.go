package localca

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"errors"
	"fmt"
	"strings"
	"time"
)

// TCG object identifiers (TCG EK Credential Profile, TCG Platform Certificate Profile).
var (
	oidTPMManufacturer      = asn1.ObjectIdentifier{2, 23, 133, 2, 1}
	oidTPMModel             = asn1.ObjectIdentifier{2, 23, 133, 2, 2}
	oidTPMVersion           = asn1.ObjectIdentifier{2, 23, 133, 2, 3}
	oidTPMSpecification     = asn1.ObjectIdentifier{2, 23, 133, 2, 16}
	oidPlatformManufacturer = asn1.ObjectIdentifier{2, 23, 133, 5, 1, 1}
	oidPlatformModel        = asn1.ObjectIdentifier{2, 23, 133, 5, 1, 4}
	oidPlatformVersion      = asn1.ObjectIdentifier{2, 23, 133, 5, 1, 5}
	// TPM 1.2 platform certificates use the older TPM attribute arc for the platform fields
	oidPlatformManufacturer12 = asn1.ObjectIdentifier{2, 23, 133, 2, 4}
	oidPlatformModel12        = asn1.ObjectIdentifier{2, 23, 133, 2, 5}
	oidPlatformVersion12      = asn1.ObjectIdentifier{2, 23, 133, 2, 6}
	oidEKCertificate          = asn1.ObjectIdentifier{2, 23, 133, 8, 1}
	oidPlatformCertificate    = asn1.ObjectIdentifier{2, 23, 133, 8, 2}

	oidSubjectAltName        = asn1.ObjectIdentifier{2, 5, 29, 17}
	oidSubjectDirectoryAttrs = asn1.ObjectIdentifier{2, 5, 29, 9}
)

// VirtualTPMUnit is the organizational unit in every certificate this CA issues: it marks
// the TPM as a virtual one, so verifiers can tell it from a hardware TPM.
const VirtualTPMUnit = "virtual TPM"

// ErrRequest is wrapped when a certificate request is unusable.
var ErrRequest = errors.New("bad certificate request")

// TPMInfo describes the TPM as its EK certificate states it (swtpm_setup takes these values
// from the TPM: CMD_GET_INFO, TPMLIB_INFO_TPMSPECIFICATION | TPMLIB_INFO_TPMATTRIBUTES).
type TPMInfo struct {
	Family              string // "2.0" or "1.2"
	Level, Revision     int
	Manufacturer, Model string // e.g. "id:00001014", "swtpm"
	Version             string // e.g. "id:20191023"
	TPM2                bool
}

// EKRequest asks for an EK certificate.
type EKRequest struct {
	// PublicKey is the EK: *rsa.PublicKey or *ecdsa.PublicKey.
	PublicKey crypto.PublicKey
	// VMID becomes the subject's common name ("unknown" when empty); '+' and ',' are
	// replaced by '_' as swtpm_localca does.
	VMID string
	TPM  TPMInfo
	// AllowSigning and Decryption set the key usage as swtpm_cert does for a signing EK.
	AllowSigning, Decryption bool
	// Attributes are added to the subjectDirectoryAttributes extension, after
	// tpmSpecification (e.g. the host that vouches for a vTPM).
	Attributes []Attribute
}

// PlatformRequest asks for a platform certificate over the EK.
type PlatformRequest struct {
	PublicKey crypto.PublicKey
	VMID      string
	TPM       TPMInfo
	Platform  Platform
	// Attributes, if any, make a subjectDirectoryAttributes extension.
	Attributes []Attribute
}

// SanitizeVMID applies swtpm_localca's replacement of '+' and ','.
func SanitizeVMID(vmid string) string {
	if vmid == "" {
		return "unknown"
	}
	return strings.NewReplacer("+", "_", ",", "_").Replace(vmid)
}

type attributeTypeAndValue struct {
	Type  asn1.ObjectIdentifier
	Value string `asn1:"utf8"`
}

// rdnSequence encodes attributes as a Name: one RDN set per attribute, as swtpm_cert does.
func rdnSequence(attrs []attributeTypeAndValue) ([]byte, error) {
	var rdns []byte
	for _, a := range attrs {
		set, err := asn1.MarshalWithParams([]attributeTypeAndValue{a}, "set")
		if err != nil {
			return nil, err
		}
		rdns = append(rdns, set...)
	}
	return asn1.Marshal(asn1.RawValue{Class: asn1.ClassUniversal, Tag: asn1.TagSequence, IsCompound: true, Bytes: rdns})
}

// directoryNameSAN encodes a subjectAltName holding one directoryName whose RDNs are the
// given attributes.
func directoryNameSAN(attrs []attributeTypeAndValue) ([]byte, error) {
	name, err := rdnSequence(attrs)
	if err != nil {
		return nil, err
	}
	return wrapDirectoryName(name)
}

// directoryNameSAN12Platform is swtpm_cert's TPM 1.2 platform SAN: the directoryName is a
// sequence of two RDN sequences, the TPM's attributes and the platform's (not a plain Name;
// reproduced for byte compatibility).
func directoryNameSAN12Platform(tpm, platform []attributeTypeAndValue) ([]byte, error) {
	a, err := rdnSequence(tpm)
	if err != nil {
		return nil, err
	}
	b, err := rdnSequence(platform)
	if err != nil {
		return nil, err
	}
	name, err := asn1.Marshal(asn1.RawValue{Class: asn1.ClassUniversal, Tag: asn1.TagSequence, IsCompound: true, Bytes: append(a, b...)})
	if err != nil {
		return nil, err
	}
	return wrapDirectoryName(name)
}

func wrapDirectoryName(name []byte) ([]byte, error) {
	// GeneralName directoryName [4] is explicit (Name is a CHOICE)
	dn, err := asn1.Marshal(asn1.RawValue{Class: asn1.ClassContextSpecific, Tag: 4, IsCompound: true, Bytes: name})
	if err != nil {
		return nil, err
	}
	return asn1.Marshal(asn1.RawValue{Class: asn1.ClassUniversal, Tag: asn1.TagSequence, IsCompound: true, Bytes: dn})
}

// tpmSpecification is TCG's TPMSpecification attribute.
type tpmSpecification struct {
	Family   string `asn1:"utf8"`
	Level    int
	Revision int
}

type attribute struct {
	Type   asn1.ObjectIdentifier
	Values []tpmSpecification `asn1:"set"`
}

func subjectDirectoryAttributes(info TPMInfo, extra []Attribute) ([]byte, error) {
	spec, err := asn1.Marshal(attribute{Type: oidTPMSpecification, Values: []tpmSpecification{{info.Family, info.Level, info.Revision}}})
	if err != nil {
		return nil, err
	}
	encoded := [][]byte{spec}
	for _, a := range extra {
		b, err := marshalAttribute(a)
		if err != nil {
			return nil, err
		}
		encoded = append(encoded, b)
	}
	return marshalDirectoryAttributes(encoded...)
}

func checkKey(pub crypto.PublicKey) error {
	switch k := pub.(type) {
	case *rsa.PublicKey:
		if k.N == nil || k.N.BitLen() < 1024 {
			return fmt.Errorf("%w: RSA key too small", ErrRequest)
		}
	case *ecdsa.PublicKey:
		if k.Curve == nil {
			return fmt.Errorf("%w: EC key without curve", ErrRequest)
		}
	default:
		return fmt.Errorf("%w: unsupported public key type %T", ErrRequest, pub)
	}
	return nil
}

func (ca *CA) template(ctx context.Context, pub crypto.PublicKey, vmid string, tpm2 bool) (*x509.Certificate, error) {
	if err := checkKey(pub); err != nil {
		return nil, err
	}
	serial, err := ca.nextSerial(ctx)
	if err != nil {
		return nil, err
	}
	// the TPM 1.2 credential profiles require an empty subject (swtpm_cert ignores --subject)
	subject := pkix.Name{}
	if tpm2 {
		subject = pkix.Name{CommonName: SanitizeVMID(vmid), OrganizationalUnit: []string{VirtualTPMUnit}}
	}
	return &x509.Certificate{
		SerialNumber:          serial,
		Subject:               subject,
		NotBefore:             time.Now().UTC().Truncate(time.Second),
		NotAfter:              notAfter,
		BasicConstraintsValid: true,
		SignatureAlgorithm:    signatureAlgorithm(ca.signer),
	}, nil
}

func (ca *CA) sign(tmpl *x509.Certificate, pub crypto.PublicKey) ([]byte, error) {
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.issuer, pub, ca.signer)
	if err != nil {
		return nil, fmt.Errorf("sign certificate: %w", err)
	}
	return der, nil
}

func tpmAttributes(info TPMInfo) []attributeTypeAndValue {
	return []attributeTypeAndValue{{oidTPMManufacturer, info.Manufacturer}, {oidTPMModel, info.Model}, {oidTPMVersion, info.Version}}
}

// IssueEK returns a DER EK certificate for req, signed by the CA.
func (ca *CA) IssueEK(ctx context.Context, req EKRequest) ([]byte, error) {
	tmpl, err := ca.template(ctx, req.PublicKey, req.VMID, req.TPM.TPM2)
	if err != nil {
		return nil, err
	}
	san, err := directoryNameSAN(tpmAttributes(req.TPM))
	if err != nil {
		return nil, err
	}
	sda, err := subjectDirectoryAttributes(req.TPM, req.Attributes)
	if err != nil {
		return nil, err
	}
	tmpl.ExtraExtensions = []pkix.Extension{
		{Id: oidSubjectAltName, Critical: true, Value: san},
		{Id: oidSubjectDirectoryAttrs, Value: sda},
	}
	tmpl.UnknownExtKeyUsage = []asn1.ObjectIdentifier{oidEKCertificate}
	_, isRSA := req.PublicKey.(*rsa.PublicKey)
	encipher := x509.KeyUsageKeyEncipherment
	if !isRSA {
		encipher = x509.KeyUsageKeyAgreement
	}
	switch {
	case !req.TPM.TPM2: // a TPM 1.2 EK only decrypts
		tmpl.KeyUsage = x509.KeyUsageKeyEncipherment
	case req.AllowSigning && req.Decryption:
		tmpl.KeyUsage = x509.KeyUsageDigitalSignature | encipher
	case req.AllowSigning:
		tmpl.KeyUsage = x509.KeyUsageDigitalSignature
	default:
		tmpl.KeyUsage = encipher
	}
	return ca.sign(tmpl, req.PublicKey)
}

// IssuePlatform returns a DER platform certificate over the EK (an X.509 certificate, as
// swtpm_cert --type platform writes it, not an attribute certificate).
func (ca *CA) IssuePlatform(ctx context.Context, req PlatformRequest) ([]byte, error) {
	tmpl, err := ca.template(ctx, req.PublicKey, req.VMID, req.TPM.TPM2)
	if err != nil {
		return nil, err
	}
	var attrs []attributeTypeAndValue
	platform := []attributeTypeAndValue{
		{oidPlatformManufacturer, req.Platform.Manufacturer},
		{oidPlatformModel, req.Platform.Model},
		{oidPlatformVersion, req.Platform.Version}}
	if !req.TPM.TPM2 { // TPM 1.2: the TPM's attributes, then the platform's in the 2.23.133.2 arc
		platform = []attributeTypeAndValue{
			{oidPlatformManufacturer12, req.Platform.Manufacturer},
			{oidPlatformModel12, req.Platform.Model},
			{oidPlatformVersion12, req.Platform.Version}}
	}
	for _, a := range platform {
		if a.Value != "" {
			attrs = append(attrs, a)
		}
	}
	if len(attrs) == 0 {
		return nil, fmt.Errorf("%w: a platform certificate needs a platform manufacturer, model or version (swtpm-localca.options)", ErrRequest)
	}
	var san []byte
	if req.TPM.TPM2 {
		san, err = directoryNameSAN(attrs)
	} else {
		san, err = directoryNameSAN12Platform(tpmAttributes(req.TPM), attrs)
	}
	if err != nil {
		return nil, err
	}
	tmpl.ExtraExtensions = []pkix.Extension{{Id: oidSubjectAltName, Critical: true, Value: san}}
	if len(req.Attributes) > 0 {
		var encoded [][]byte
		for _, a := range req.Attributes {
			b, err := marshalAttribute(a)
			if err != nil {
				return nil, err
			}
			encoded = append(encoded, b)
		}
		sda, err := marshalDirectoryAttributes(encoded...)
		if err != nil {
			return nil, err
		}
		tmpl.ExtraExtensions = append(tmpl.ExtraExtensions, pkix.Extension{Id: oidSubjectDirectoryAttrs, Value: sda})
	}
	tmpl.UnknownExtKeyUsage = []asn1.ObjectIdentifier{oidPlatformCertificate}
	if _, isRSA := req.PublicKey.(*rsa.PublicKey); isRSA {
		tmpl.KeyUsage = x509.KeyUsageKeyEncipherment
	} else {
		tmpl.KeyUsage = x509.KeyUsageKeyAgreement
	}
	return ca.sign(tmpl, req.PublicKey)
}

// Verify checks an EK or platform certificate against roots (and intermediates). Go's x509
// does not understand a subjectAltName that holds only a directoryName, which is what TCG
// profiles put there, and would refuse it as an unhandled critical extension; Verify accepts
// that one extension (after checking it parses as a directoryName) and nothing else unknown.
func Verify(c *x509.Certificate, roots, intermediates *x509.CertPool) ([][]*x509.Certificate, error) {
	cc := *c
	cc.UnhandledCriticalExtensions = nil
	for _, id := range c.UnhandledCriticalExtensions {
		if id.Equal(oidSubjectAltName) {
			if err := checkDirectoryNameSAN(c); err != nil {
				return nil, err
			}
			continue
		}
		cc.UnhandledCriticalExtensions = append(cc.UnhandledCriticalExtensions, id)
	}
	return cc.Verify(x509.VerifyOptions{Roots: roots, Intermediates: intermediates, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}})
}

func checkDirectoryNameSAN(c *x509.Certificate) error {
	for _, e := range c.Extensions {
		if !e.Id.Equal(oidSubjectAltName) {
			continue
		}
		var names []asn1.RawValue
		if rest, err := asn1.Unmarshal(e.Value, &names); err != nil || len(rest) != 0 {
			return fmt.Errorf("%w: subjectAltName does not parse", ErrRequest)
		}
		for _, n := range names {
			if n.Class != asn1.ClassContextSpecific || n.Tag != 4 {
				return fmt.Errorf("%w: subjectAltName holds a name other than a directoryName", ErrRequest)
			}
		}
	}
	return nil
}
