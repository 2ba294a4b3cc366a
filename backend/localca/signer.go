package localca

import (
	"bytes"
	"context"
	"crypto"
	"crypto/x509"
	"encoding/asn1"
	"errors"
	"fmt"
	"math/big"
)

// NewWithSigner is a CA that signs with signer (a key in a hardware TPM, say) as issuer:
// issuer must certify signer's public key. Serial numbers are random (20 octets), so it
// needs no files and no lock; the certificates are the ones Open's CA makes.
func NewWithSigner(signer crypto.Signer, issuer *x509.Certificate) (*CA, error) {
	if signer == nil || issuer == nil {
		return nil, fmt.Errorf("%w: a signer and its certificate are needed", ErrSigningKey)
	}
	if !publicKeysEqual(issuer.PublicKey, signer.Public()) {
		return nil, fmt.Errorf("%w: the certificate does not certify the signing key", ErrIssuerCert)
	}
	return &CA{signer: signer, issuer: issuer, serials: func(context.Context) (*big.Int, error) { return randomSerial() }}, nil
}

// nextSerial is the CA's next serial number: random for NewWithSigner, from the certserial
// counter for Open.
func (ca *CA) nextSerial(ctx context.Context) (*big.Int, error) {
	if ca.serials != nil {
		return ca.serials(ctx)
	}
	return ca.NextSerial(ctx)
}

// RandomSerial is a positive 20-octet serial number, for certificates made outside a CA.
func RandomSerial() (*big.Int, error) { return randomSerial() }

// Attribute is one attribute of a certificate's subjectDirectoryAttributes extension (RFC
// 5280 §4.2.1.8): a type, whose OID may have arcs larger than encoding/asn1 holds (the
// 2.25.<UUID> arc), and its values, each one DER encoding.
type Attribute struct {
	Type   x509.OID
	Values [][]byte
}

// ErrAttributes is wrapped when a subjectDirectoryAttributes extension does not parse.
var ErrAttributes = errors.New("malformed subjectDirectoryAttributes")

// marshalAttribute encodes Attribute ::= SEQUENCE { type OID, values SET OF ANY }.
func marshalAttribute(a Attribute) ([]byte, error) {
	oid, err := a.Type.MarshalBinary()
	if err != nil || len(oid) == 0 {
		return nil, fmt.Errorf("%w: attribute type %v", ErrRequest, a.Type)
	}
	oidTLV, err := asn1.Marshal(asn1.RawValue{Class: asn1.ClassUniversal, Tag: asn1.TagOID, Bytes: oid})
	if err != nil {
		return nil, err
	}
	var vals []byte
	for _, v := range a.Values {
		var rv asn1.RawValue
		if rest, err := asn1.Unmarshal(v, &rv); err != nil || len(rest) != 0 {
			return nil, fmt.Errorf("%w: attribute %v: a value is not one DER element", ErrRequest, a.Type)
		}
		vals = append(vals, v...)
	}
	set, err := asn1.Marshal(asn1.RawValue{Class: asn1.ClassUniversal, Tag: asn1.TagSet, IsCompound: true, Bytes: vals})
	if err != nil {
		return nil, err
	}
	return asn1.Marshal(asn1.RawValue{Class: asn1.ClassUniversal, Tag: asn1.TagSequence, IsCompound: true, Bytes: append(oidTLV, set...)})
}

// marshalDirectoryAttributes encodes SubjectDirectoryAttributes ::= SEQUENCE OF Attribute
// from encoded attributes.
func marshalDirectoryAttributes(encoded ...[]byte) ([]byte, error) {
	return asn1.Marshal(asn1.RawValue{Class: asn1.ClassUniversal, Tag: asn1.TagSequence, IsCompound: true, Bytes: bytes.Join(encoded, nil)})
}

// DirectoryAttributes returns the attributes of c's subjectDirectoryAttributes extension
// (none when it has none). Go's x509 leaves the extension unparsed, and encoding/asn1 cannot
// read a 2.25.<UUID> type, so it is read here; any malformed byte is ErrAttributes.
func DirectoryAttributes(c *x509.Certificate) ([]Attribute, error) {
	var out []Attribute
	for _, e := range c.Extensions {
		if !e.Id.Equal(oidSubjectDirectoryAttrs) {
			continue
		}
		attrs, err := ParseDirectoryAttributes(e.Value)
		if err != nil {
			return nil, err
		}
		out = append(out, attrs...)
	}
	return out, nil
}

// ParseDirectoryAttributes parses a subjectDirectoryAttributes extension's value.
func ParseDirectoryAttributes(der []byte) ([]Attribute, error) {
	var seq asn1.RawValue
	if rest, err := asn1.Unmarshal(der, &seq); err != nil || len(rest) != 0 || seq.Class != asn1.ClassUniversal || seq.Tag != asn1.TagSequence || !seq.IsCompound {
		return nil, fmt.Errorf("%w: not a SEQUENCE", ErrAttributes)
	}
	var out []Attribute
	for rest := seq.Bytes; len(rest) > 0; {
		var attr asn1.RawValue
		var err error
		if rest, err = asn1.Unmarshal(rest, &attr); err != nil || attr.Tag != asn1.TagSequence || !attr.IsCompound {
			return nil, fmt.Errorf("%w: an attribute is not a SEQUENCE", ErrAttributes)
		}
		var oid, set asn1.RawValue
		inner, err := asn1.Unmarshal(attr.Bytes, &oid)
		if err != nil || oid.Class != asn1.ClassUniversal || oid.Tag != asn1.TagOID {
			return nil, fmt.Errorf("%w: an attribute type is not an OID", ErrAttributes)
		}
		var typ x509.OID
		if err := typ.UnmarshalBinary(oid.Bytes); err != nil {
			return nil, fmt.Errorf("%w: attribute type: %w", ErrAttributes, err)
		}
		if inner, err = asn1.Unmarshal(inner, &set); err != nil || len(inner) != 0 || set.Class != asn1.ClassUniversal || set.Tag != asn1.TagSet || !set.IsCompound {
			return nil, fmt.Errorf("%w: attribute %v: values are not a SET", ErrAttributes, typ)
		}
		a := Attribute{Type: typ}
		for vals := set.Bytes; len(vals) > 0; {
			var v asn1.RawValue
			if vals, err = asn1.Unmarshal(vals, &v); err != nil {
				return nil, fmt.Errorf("%w: attribute %v: a value does not parse", ErrAttributes, typ)
			}
			a.Values = append(a.Values, bytes.Clone(v.FullBytes))
		}
		out = append(out, a)
	}
	return out, nil
}
