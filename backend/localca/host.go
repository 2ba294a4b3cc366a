package localca

import (
	"bytes"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"errors"
	"fmt"

	"github.com/vtpmd/vtpmd/internal/uuidstr"
)

// vtpmdArc is vtpmd's own OID arc, 2.25.<UUID 2a0b055c-fbab-4298-83cb-af2e2b06eff6 as a
// decimal> (ITU-T X.667: an OID under 2.25 needs no registration).
const vtpmdArc = "2.25.55884799867337097606446469624992559094"

// OIDVTPMHost is vtpmd's directory attribute that marks a TPM as virtual and names the host
// that vouched for it: arc 1 under vtpmd's arc. Its value is HostAttribute's encoding.
var OIDVTPMHost = mustOID(vtpmdArc + ".1")

func mustOID(s string) x509.OID {
	o, err := x509.ParseOID(s)
	if err != nil {
		panic(err)
	}
	return o
}

// ErrNoHostAttribute: a certificate carries no (or more than one) vTPM host attribute.
var ErrNoHostAttribute = errors.New("no vTPM host attribute")

// HostAttribute is the value of OIDVTPMHost:
//
//	VTPMHost ::= SEQUENCE {
//	    version     INTEGER (1),
//	    hostAKName  OCTET STRING, -- TPM name (nameAlg ‖ digest) of the host's hardware AK
//	    vmUUID      UTF8String    -- the VM's UUID; empty in the host's own certificates
//	}
//
// In a vTPM's EK or platform certificate it says: this TPM is virtual, served on the host
// whose hardware AK has this name, for this VM. In the host CA's root and TLS certificates
// (vmUUID empty) it names the host's AK.
type HostAttribute struct {
	AKName []byte
	VMUUID string
}

type hostAttributeASN1 struct {
	Version int
	AKName  []byte
	VMUUID  string `asn1:"utf8"`
}

// Attribute encodes h as a directory attribute.
func (h HostAttribute) Attribute() (Attribute, error) {
	if len(h.AKName) < 2 || len(h.AKName) > 66 {
		return Attribute{}, fmt.Errorf("%w: host AK name of %d bytes", ErrRequest, len(h.AKName))
	}
	if h.VMUUID != "" && !uuidstr.ValidLower(h.VMUUID) {
		return Attribute{}, fmt.Errorf("%w: VM UUID %q is not a lower-case UUID", ErrRequest, h.VMUUID)
	}
	v, err := asn1.Marshal(hostAttributeASN1{1, h.AKName, h.VMUUID})
	if err != nil {
		return Attribute{}, err
	}
	return Attribute{Type: OIDVTPMHost, Values: [][]byte{v}}, nil
}

// FindHostAttribute reads the one vTPM host attribute of c (ErrNoHostAttribute when there
// is none or more than one; ErrAttributes when it is malformed).
func FindHostAttribute(c *x509.Certificate) (*HostAttribute, error) {
	attrs, err := DirectoryAttributes(c)
	if err != nil {
		return nil, err
	}
	var found *HostAttribute
	for _, a := range attrs {
		if !a.Type.Equal(OIDVTPMHost) {
			continue
		}
		if found != nil || len(a.Values) != 1 {
			return nil, fmt.Errorf("%w: more than one", ErrNoHostAttribute)
		}
		h, err := ParseHostAttribute(a.Values[0])
		if err != nil {
			return nil, err
		}
		found = h
	}
	if found == nil {
		return nil, ErrNoHostAttribute
	}
	return found, nil
}

// ParseHostAttribute parses a VTPMHost value (DER, nothing after it).
func ParseHostAttribute(der []byte) (*HostAttribute, error) {
	var v hostAttributeASN1
	rest, err := asn1.Unmarshal(der, &v)
	if err != nil || len(rest) != 0 || v.Version != 1 {
		return nil, fmt.Errorf("%w: vTPM host attribute", ErrAttributes)
	}
	if len(v.AKName) < 2 || (v.VMUUID != "" && !uuidstr.ValidLower(v.VMUUID)) {
		return nil, fmt.Errorf("%w: vTPM host attribute's values", ErrAttributes)
	}
	if again, err := asn1.Marshal(v); err != nil || !bytes.Equal(again, der) {
		return nil, fmt.Errorf("%w: vTPM host attribute is not DER", ErrAttributes)
	}
	return &HostAttribute{AKName: v.AKName, VMUUID: v.VMUUID}, nil
}

// DirectoryAttributesExtension is a subjectDirectoryAttributes extension holding attrs, for
// certificates made outside a CA (a host CA's root, a TLS certificate).
func DirectoryAttributesExtension(attrs ...Attribute) (pkix.Extension, error) {
	var enc [][]byte
	for _, a := range attrs {
		b, err := marshalAttribute(a)
		if err != nil {
			return pkix.Extension{}, err
		}
		enc = append(enc, b)
	}
	v, err := marshalDirectoryAttributes(enc...)
	if err != nil {
		return pkix.Extension{}, err
	}
	return pkix.Extension{Id: oidSubjectDirectoryAttrs, Value: v}, nil
}

// HostCACertifyData is the qualifying data of the host AK's TPM2_Certify of the host's CA
// key: SHA-256("vtpmd host CA key v1"). A certification with other data is not this one.
var HostCACertifyData = func() []byte { s := sha256.Sum256([]byte("vtpmd host CA key v1")); return s[:] }()

// KeyID is the RFC 5280 method-1 key identifier (SHA-1 of the subjectPublicKey), as Go's
// x509 and this package compute it.
func KeyID(pub any) ([]byte, error) { return keyID(pub) }
