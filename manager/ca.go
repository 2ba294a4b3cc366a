package manager

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/x509"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"

	"github.com/vtpmd/vtpmd/backend/localca"
	"github.com/vtpmd/vtpmd/internal/uuidstr"
	"github.com/vtpmd/vtpmd/manager/hwtpm"
)

// API paths of the host identity and its certificates.
const (
	pathIdentity         = "/v1/identity"
	pathIdentityActivate = "/v1/identity/activate"
	pathIdentityCerts    = "/v1/identity/certificates"
	pathVTPMCertificate  = "/v1/vtpm/certificate"
	pathVTPMAKCertify    = "/v1/vtpm/ak-certify"
)

// ErrBadCertificate: certificates given to the manager do not certify its keys or do not
// chain.
var ErrBadCertificate = errors.New("manager: certificate does not fit the host's keys")

func init() {
	errorKinds = append(errorKinds, struct {
		err    error
		kind   string
		status int
	}{ErrNoHostIdentity, "no-host-identity", http.StatusServiceUnavailable}, struct {
		err    error
		kind   string
		status int
	}{ErrBadCertificate, "bad-certificate", http.StatusBadRequest})
	registerRoutes(func(s *Server) []route {
		return []route{
			{"GET " + pathIdentity, handle(s.identityGet)},
			{"POST " + pathIdentityActivate, handle(s.identityActivate)},
			{"POST " + pathIdentityCerts, handle(s.identityCertificates)},
			{"POST " + pathVTPMCertificate, handle(s.vtpmCertificate)},
			{"POST " + pathVTPMAKCertify, handle(s.vtpmAKCertify)},
		}
	})
}

// ActivateRequest carries a credential made for the host's EK and AK name
// (TPM2_MakeCredential): CredentialBlob is the TPM2B_ID_OBJECT's contents, Secret the
// TPM2B_ENCRYPTED_SECRET's.
type ActivateRequest struct {
	CredentialBlob []byte `json:"credential_blob"`
	Secret         []byte `json:"secret"`
}

// ActivateResponse is the secret the TPM released.
type ActivateResponse struct {
	Secret []byte `json:"secret"`
}

// HostCertificates are the operator's certificates of the host's keys (DER): the AK's from
// its privacy CA and the CA key's, each with its issuers up to the operator's root (the last
// one). Either pair may be left empty.
type HostCertificates struct {
	AKCert  []byte   `json:"ak_cert,omitempty"`
	AKChain [][]byte `json:"ak_chain,omitempty"`
	CACert  []byte   `json:"ca_cert,omitempty"`
	CAChain [][]byte `json:"ca_chain,omitempty"`
}

// VTPMCertRequest asks the host CA for a vTPM's EK (Kind "ek") or platform ("platform")
// certificate. The peer must be the process making the vTPM at StatePath (vtpmd setup, or
// vtpmd as swtpm_setup), not the one serving it.
type VTPMCertRequest struct {
	StatePath string `json:"state_path"`
	Kind      string `json:"kind"`
	// PublicKey is the vTPM's EK (PKIX DER).
	PublicKey    []byte           `json:"public_key"`
	VMID         string           `json:"vmid"`
	TPM          localca.TPMInfo  `json:"tpm"`
	AllowSigning bool             `json:"allow_signing,omitempty"`
	Decryption   bool             `json:"decryption,omitempty"`
	Platform     localca.Platform `json:"platform"`
}

// VTPMCertResponse is the certificate (DER) and its issuers: the host CA's certificate and,
// when the operator certified it, the operator's chain up to its root.
type VTPMCertResponse struct {
	Cert  []byte   `json:"cert"`
	Chain [][]byte `json:"chain"`
}

// AKCertifyRequest asks the hardware AK to vouch for a vTPM's AK: it quotes PCRs (SHA-256;
// none given: PCR 0) with qualifying data SHA-256(AKPublic), AKPublic being the vTPM AK's
// TPMT_PUBLIC.
type AKCertifyRequest struct {
	AKPublic []byte `json:"ak_public"`
	PCRs     []int  `json:"pcrs,omitempty"`
}

// identityGet answers the host identity: public material, to any peer.
func (s *Server) identityGet(_ context.Context, _ Peer, _ *struct{}) (*HostIdentity, error) {
	id, err := s.HostIdentity()
	if err != nil {
		return nil, err
	}
	return &id, nil
}

// identityActivate lets the operator's privacy CA check that the AK lives beside the EK.
func (s *Server) identityActivate(ctx context.Context, p Peer, req *ActivateRequest) (*ActivateResponse, error) {
	if err := authorizeOperator(p); err != nil {
		return nil, err
	}
	id, err := s.hostID()
	if err != nil {
		return nil, err
	}
	secret, err := id.hw.ActivateCredential(ctx, id.rec.AK, req.CredentialBlob, req.Secret)
	if err != nil {
		return nil, err
	}
	s.log.Info("activated a credential for the host AK (certify-host)")
	return &ActivateResponse{Secret: secret}, nil
}

// identityCertificates stores the operator's certificates of the AK and the CA key, once they
// are found to certify exactly those keys and to chain to their last certificate.
func (s *Server) identityCertificates(_ context.Context, p Peer, req *HostCertificates) (*HostIdentity, error) {
	if err := authorizeOperator(p); err != nil {
		return nil, err
	}
	id, err := s.hostID()
	if err != nil {
		return nil, err
	}
	if err := id.setCertificates(req); err != nil {
		return nil, err
	}
	s.log.Info("stored the operator's host certificates", "ak", len(req.AKCert) > 0, "ca", len(req.CACert) > 0)
	out, err := s.HostIdentity()
	return &out, err
}

func (id *hostIdentity) setCertificates(req *HostCertificates) error {
	id.mu.Lock()
	defer id.mu.Unlock()
	root, err := x509.ParseCertificate(id.rec.CARoot)
	if err != nil {
		return err
	}
	if len(req.AKCert) > 0 {
		akPub, err := id.rec.AK.PublicKey()
		if err != nil {
			return err
		}
		if _, err := checkIssued(req.AKCert, req.AKChain, akPub); err != nil {
			return fmt.Errorf("%w: AK certificate: %w", ErrBadCertificate, err)
		}
	}
	if len(req.CACert) > 0 {
		c, err := checkIssued(req.CACert, req.CAChain, id.caSigner.Public())
		if err != nil {
			return fmt.Errorf("%w: CA certificate: %w", ErrBadCertificate, err)
		}
		// the vTPM certificates name the CA by subject and key identifier: the operator's
		// certificate must carry the root's, so they chain through either
		if !c.IsCA || !bytes.Equal(c.RawSubject, root.RawSubject) || !bytes.Equal(c.SubjectKeyId, root.SubjectKeyId) {
			return fmt.Errorf("%w: CA certificate: not a CA certificate with the host CA's subject and key identifier", ErrBadCertificate)
		}
	}
	next := id.rec
	if len(req.AKCert) > 0 {
		next.AKCert, next.AKChain = req.AKCert, req.AKChain
	}
	if len(req.CACert) > 0 {
		next.CACert, next.CAChain = req.CACert, req.CAChain
	}
	old := id.rec
	id.rec = next
	if err := id.save(); err != nil {
		id.rec = old
		return err
	}
	return nil
}

// checkIssued parses cert, checks it is over pub and verifies it up to the last certificate
// of chain (the root), the others being intermediates.
func checkIssued(certDER []byte, chain [][]byte, pub any) (*x509.Certificate, error) {
	c, err := x509.ParseCertificate(certDER)
	if err != nil {
		return nil, err
	}
	if !publicEqual(c.PublicKey, pub) {
		return nil, errors.New("it certifies another key")
	}
	if len(chain) == 0 {
		return nil, errors.New("no issuer chain (the operator's root at least)")
	}
	roots, inter := x509.NewCertPool(), x509.NewCertPool()
	for i, d := range chain {
		ic, err := x509.ParseCertificate(d)
		if err != nil {
			return nil, fmt.Errorf("chain certificate %d: %w", i, err)
		}
		if i == len(chain)-1 {
			roots.AddCert(ic)
		} else {
			inter.AddCert(ic)
		}
	}
	if _, err := c.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		return nil, err
	}
	return c, nil
}

// vtpmCertificate issues a vTPM's EK or platform certificate with the host CA, to the
// process making that vTPM, for a vTPM the manager has enrolled. The certificate carries the
// vTPM host attribute: the TPM is virtual, served on the host with this AK, for this VM.
func (s *Server) vtpmCertificate(ctx context.Context, p Peer, req *VTPMCertRequest) (*VTPMCertResponse, error) {
	path, err := s.instancePath(p, req.StatePath)
	if err != nil {
		return nil, err
	}
	// only while the vTPM is being made: a running vTPM process does not get keys of its
	// choice certified as its EK
	if !manufactures(p) {
		return nil, fmt.Errorf("%w: pid %d is not vtpmd setup (swtpm_setup)", ErrForbidden, p.PID)
	}
	id, err := s.hostID()
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	rec := s.ledger.findByPath(path)
	var uuid, label string
	if rec != nil {
		uuid, label = rec.UUID, rec.label()
	}
	s.mu.Unlock()
	if rec == nil {
		return nil, fmt.Errorf("%w: %s", ErrNotEnrolled, path)
	}
	if uuid == "" {
		uuid = uuidOfVMID(req.VMID)
	}
	pub, err := x509.ParsePKIXPublicKey(req.PublicKey)
	if err != nil {
		return nil, fmt.Errorf("%w: EK public key: %w", errBadRequest, err)
	}
	attr, err := id.hostAttribute(uuid)
	if err != nil {
		return nil, err
	}
	ca, _, err := id.hostCA()
	if err != nil {
		return nil, err
	}
	var der []byte
	switch req.Kind {
	case "ek":
		der, err = ca.IssueEK(ctx, localca.EKRequest{PublicKey: pub, VMID: req.VMID, TPM: req.TPM,
			AllowSigning: req.AllowSigning, Decryption: req.Decryption, Attributes: []localca.Attribute{attr}})
	case "platform":
		der, err = ca.IssuePlatform(ctx, localca.PlatformRequest{PublicKey: pub, VMID: req.VMID, TPM: req.TPM,
			Platform: req.Platform, Attributes: []localca.Attribute{attr}})
	default:
		return nil, fmt.Errorf("%w: certificate kind %q (ek or platform)", errBadRequest, req.Kind)
	}
	if errors.Is(err, localca.ErrRequest) {
		return nil, fmt.Errorf("%w: %w", errBadRequest, err)
	}
	if err != nil {
		return nil, err
	}
	h, _ := s.HostIdentity()
	s.log.Info("issued a vTPM certificate with the host CA", "kind", req.Kind, "vm", label, "uuid", uuid)
	return &VTPMCertResponse{Cert: der, Chain: append([][]byte{h.CACert}, h.CAChain...)}, nil
}

// uuidOfVMID is the VM UUID at the end of swtpm_setup's --vmid (libvirt gives NAME:UUID),
// lower-case, or "".
func uuidOfVMID(vmid string) string {
	return uuidstr.Suffix(vmid)
}

// vtpmAKCertify has the hardware AK vouch for a vTPM's AK: a quote whose qualifying data is
// SHA-256 of the vTPM AK's TPMT_PUBLIC. The operator asks (it knows which VM the AK is from).
func (s *Server) vtpmAKCertify(ctx context.Context, p Peer, req *AKCertifyRequest) (*Quote, error) {
	if err := authorizeOperator(p); err != nil {
		return nil, err
	}
	pub, err := hwtpm.ParsePublic(req.AKPublic)
	if err != nil {
		return nil, fmt.Errorf("%w: vTPM AK: %w", errBadRequest, err)
	}
	if !pub.ObjectAttributes.SignEncrypt || pub.ObjectAttributes.Decrypt {
		return nil, fmt.Errorf("%w: vTPM AK: not a signing key", errBadRequest)
	}
	pcrs := req.PCRs
	if len(pcrs) == 0 {
		pcrs = []int{0}
	}
	sum := sha256.Sum256(req.AKPublic)
	return s.HostQuote(ctx, sum[:], slices.Clone(pcrs))
}

// HostIdentity asks the manager for the host's identity.
func (c *Client) HostIdentity(ctx context.Context) (*HostIdentity, error) {
	var id HostIdentity
	return &id, c.call(ctx, http.MethodGet, pathIdentity, nil, &id)
}

// ActivateCredential has the manager's TPM activate a credential for the host AK.
func (c *Client) ActivateCredential(ctx context.Context, req ActivateRequest) ([]byte, error) {
	var resp ActivateResponse
	if err := c.call(ctx, http.MethodPost, pathIdentityActivate, req, &resp); err != nil {
		return nil, err
	}
	return resp.Secret, nil
}

// SetHostCertificates stores the operator's certificates of the host's AK and CA key.
func (c *Client) SetHostCertificates(ctx context.Context, req HostCertificates) (*HostIdentity, error) {
	var id HostIdentity
	return &id, c.call(ctx, http.MethodPost, pathIdentityCerts, req, &id)
}

// VTPMCertificate asks the host CA for a vTPM certificate.
func (c *Client) VTPMCertificate(ctx context.Context, req VTPMCertRequest) (*VTPMCertResponse, error) {
	var resp VTPMCertResponse
	return &resp, c.call(ctx, http.MethodPost, pathVTPMCertificate, req, &resp)
}

// CertifyVTPMAK asks the hardware AK to quote with SHA-256 of a vTPM AK's TPMT_PUBLIC.
func (c *Client) CertifyVTPMAK(ctx context.Context, req AKCertifyRequest) (*Quote, error) {
	var q Quote
	return &q, c.call(ctx, http.MethodPost, pathVTPMAKCertify, req, &q)
}

// CertIssuer issues a vTPM's EK and platform certificates with the host manager's CA, for
// vtpmd setup (backend/setup's CertIssuer): StatePath is the vTPM's state location (a path,
// dir:// or file://). Errors wrap ErrNotEnrolled (the manager does not protect this vTPM) or
// ErrNoHostIdentity (the manager has no CA) when the local CA should issue instead.
type CertIssuer struct {
	Client    *Client
	StatePath string
}

func (c CertIssuer) request(kind string, pub any, vmid string, info localca.TPMInfo) (VTPMCertRequest, error) {
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return VTPMCertRequest{}, fmt.Errorf("EK public key: %w", err)
	}
	path := strings.TrimPrefix(strings.TrimPrefix(c.StatePath, "dir://"), "file://")
	return VTPMCertRequest{StatePath: path, Kind: kind, PublicKey: der, VMID: vmid, TPM: info}, nil
}

// IssueEK asks the manager for an EK certificate.
func (c CertIssuer) IssueEK(ctx context.Context, req localca.EKRequest) ([]byte, error) {
	r, err := c.request("ek", req.PublicKey, req.VMID, req.TPM)
	if err != nil {
		return nil, err
	}
	r.AllowSigning, r.Decryption = req.AllowSigning, req.Decryption
	resp, err := c.Client.VTPMCertificate(ctx, r)
	if err != nil {
		return nil, err
	}
	return resp.Cert, nil
}

// IssuePlatform asks the manager for a platform certificate.
func (c CertIssuer) IssuePlatform(ctx context.Context, req localca.PlatformRequest) ([]byte, error) {
	r, err := c.request("platform", req.PublicKey, req.VMID, req.TPM)
	if err != nil {
		return nil, err
	}
	r.Platform = req.Platform
	resp, err := c.Client.VTPMCertificate(ctx, r)
	if err != nil {
		return nil, err
	}
	return resp.Cert, nil
}
