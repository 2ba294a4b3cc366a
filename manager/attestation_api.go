package manager

import (
	"context"
	"fmt"
	"net/http"

	"github.com/vtpmd/vtpmd/manager/attest"
)

// pathAttest is the deep-attestation endpoint: a vTPM asks for a report for its guest.
const pathAttest = "/v1/attest/report"

// hostPCRs are the host PCRs a report's hardware quote covers: SHA-256 PCRs 0-7, the boot
// firmware's, which the host's event log describes.
var hostPCRs = []int{0, 1, 2, 3, 4, 5, 6, 7}

// AttestRequest is what a vTPM process sends when its guest wrote a nonce: the vTPM's own
// view (EK, the guest's AK, PCR digest). The manager adds the VM's UUID and the hardware
// quote.
type AttestRequest struct {
	StatePath string `json:"state_path"`
	Nonce     []byte `json:"nonce"`
	EKName    []byte `json:"ek_name"`
	AKName    []byte `json:"ak_name,omitempty"`
	PCRHash   uint16 `json:"pcr_hash"`
	PCRMask   uint32 `json:"pcr_mask"`
	PCRDigest []byte `json:"pcr_digest"`
}

// AttestResponse carries the encoded report (package attest).
type AttestResponse struct {
	Report []byte `json:"report"`
}

func init() {
	registerRoutes(func(s *Server) []route {
		return []route{{"POST " + pathAttest, handle(s.attestReport)}}
	})
}

// AttestReport asks the manager for a deep-attestation report.
func (c *Client) AttestReport(ctx context.Context, req AttestRequest) (*AttestResponse, error) {
	var resp AttestResponse
	return &resp, c.call(ctx, http.MethodPost, pathAttest, req, &resp)
}

// attestReport answers a vTPM process (the one serving req.StatePath, identified as for its
// key) with a report whose hardware quote binds the request and the VM's UUID.
func (s *Server) attestReport(ctx context.Context, p Peer, req *AttestRequest) (*AttestResponse, error) {
	path, err := s.instancePath(p, req.StatePath)
	if err != nil {
		return nil, err
	}
	b, err := s.buildReport(ctx, path, req)
	if err != nil {
		return nil, err
	}
	return &AttestResponse{Report: b}, nil
}

// buildReport makes the report for the vTPM at path.
func (s *Server) buildReport(ctx context.Context, path string, req *AttestRequest) ([]byte, error) {
	r := &attest.Report{
		Nonce: req.Nonce, EKName: req.EKName, AKName: req.AKName,
		VTPMPCRs:      attest.PCRSelection{Hash: req.PCRHash, Mask: req.PCRMask},
		VTPMPCRDigest: req.PCRDigest,
	}
	var err error
	if uuid := s.uuidOfPath(path); uuid != "" {
		if r.VMUUID, err = attest.ParseUUID(uuid); err != nil {
			return nil, err
		}
	}
	if err := r.CheckBinding(); err != nil {
		return nil, fmt.Errorf("%w: %w", errBadRequest, err)
	}
	q, err := s.hostQuote(ctx, attest.QualifyingData(r), hostPCRs)
	if err != nil {
		return nil, fmt.Errorf("hardware quote for vTPM %s: %w", path, err)
	}
	r.HostPCRs, r.HostPCRValues, r.HostAKName, r.Attest, r.Signature = q.pcrs, q.values, q.akName, q.attest, q.signature
	b, err := r.Encode()
	if err != nil {
		return nil, err
	}
	s.log.Info("deep-attestation report", "state", path, "vm", formatUUIDOrNone(r.VMUUID), "bytes", len(b))
	return b, nil
}

// uuidOfPath is the VM UUID the registry gives the vTPM at path, else the ledger's record of it.
func (s *Server) uuidOfPath(path string) string {
	if vm := s.vmOfPath(path); vm != nil && vm.UUID != "" {
		return vm.UUID
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if rec := s.ledger.findByPath(path); rec != nil {
		return rec.UUID
	}
	return ""
}

func formatUUIDOrNone(u []byte) string {
	if len(u) == 0 {
		return "none"
	}
	return fmt.Sprintf("%x", u)
}

// hostQuoteResult is the hardware AK's quote as a report carries it.
type hostQuoteResult struct {
	pcrs              attest.PCRSelection
	values            [][]byte
	akName            []byte
	attest, signature []byte
}

// hostQuote has the host's hardware AK quote the host PCRs with qualifying data.
func (s *Server) hostQuote(ctx context.Context, qualifying []byte, pcrs []int) (*hostQuoteResult, error) {
	id, err := s.HostIdentity()
	if err != nil {
		return nil, err
	}
	q, err := s.HostQuote(ctx, qualifying, pcrs)
	if err != nil {
		return nil, err
	}
	r := &hostQuoteResult{pcrs: attest.PCRSelection{Hash: 0x000b}, values: q.Values, akName: id.AKName,
		attest: q.Attest, signature: q.Signature}
	for _, p := range q.PCRs {
		if p < 0 || p > 31 {
			return nil, fmt.Errorf("hardware quote of PCR %d", p)
		}
		r.pcrs.Mask |= 1 << p
	}
	return r, nil
}
