package manager

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"slices"
	"sync"

	"github.com/vtpmd/vtpmd/manager/eventlog"
	"github.com/vtpmd/vtpmd/manager/hwtpm"
	"github.com/vtpmd/vtpmd/manager/projection"
	"github.com/vtpmd/vtpmd/manager/registry"
)

// DefaultEventLog is where Linux exposes the host's TCG event log.
const DefaultEventLog = "/sys/kernel/security/tpm0/binary_bios_measurements"

const pathProjection = "/v1/projection"

// ProjectionConfig is host PCR projection's part of the manager's configuration.
type ProjectionConfig struct {
	// EventLog is the host's TCG event log ("": DefaultEventLog).
	EventLog string
	// PropertyPolicy is the operator's property policy file ("": none; property mode is
	// refused). It is read at every request, so an edit applies at the guests' next startup.
	PropertyPolicy string
}

var projectionConfigs = struct {
	sync.Mutex
	m map[*Server]ProjectionConfig
}{m: map[*Server]ProjectionConfig{}}

// ConfigureProjection sets where the host's event log and the property policy are; a policy
// file that does not load is refused now rather than at a guest's startup.
func (s *Server) ConfigureProjection(cfg ProjectionConfig) error {
	if cfg.PropertyPolicy != "" {
		if _, err := projection.LoadPolicy(cfg.PropertyPolicy); err != nil {
			return err
		}
	}
	projectionConfigs.Lock()
	defer projectionConfigs.Unlock()
	projectionConfigs.m[s] = cfg
	return nil
}

func (s *Server) projectionConfig() ProjectionConfig {
	projectionConfigs.Lock()
	defer projectionConfigs.Unlock()
	cfg := projectionConfigs.m[s]
	if cfg.EventLog == "" {
		cfg.EventLog = DefaultEventLog
	}
	return cfg
}

// ProjectionRequest asks what to project into the vTPM serving StatePath.
type ProjectionRequest struct {
	StatePath string `json:"state_path"`
}

// ProjectionEvent is one extend: its PCR, its digest per bank ("sha256": ...), and its event
// type and data for the guest-visible log.
type ProjectionEvent struct {
	PCR     int               `json:"pcr"`
	Type    uint32            `json:"type"`
	Digests map[string][]byte `json:"digests"`
	Data    []byte            `json:"data,omitempty"`
}

// ProjectionResponse is what the vTPM applies after the guest's TPM2_Startup(CLEAR): the
// extends in order, and the PCRs the guest may not extend or reset. Mode "off": nothing.
type ProjectionResponse struct {
	Mode     string            `json:"mode"`
	ReadOnly []int             `json:"read_only,omitempty"`
	Events   []ProjectionEvent `json:"events,omitempty"`
}

func init() {
	registerRoutes(func(s *Server) []route {
		return []route{{"POST " + pathProjection, handle(s.projection)}}
	})
}

// Projection asks the manager what to project into the vTPM at statePath.
func (c *Client) Projection(ctx context.Context, statePath string) (*ProjectionResponse, error) {
	var resp ProjectionResponse
	return &resp, c.call(ctx, http.MethodPost, pathProjection, ProjectionRequest{StatePath: statePath}, &resp)
}

// projection answers the vTPM process serving a state: its VM's projection policy (from the
// registry) applied to the host's measurements, read now.
func (s *Server) projection(ctx context.Context, p Peer, req *ProjectionRequest) (*ProjectionResponse, error) {
	path, err := s.instancePath(p, req.StatePath)
	if err != nil {
		return nil, err
	}
	rec := s.recordOfPath(path)
	if rec == nil || rec.Policy == nil || rec.Policy.Projection == nil || rec.Policy.Projection.Mode == projection.ModeOff {
		return &ProjectionResponse{Mode: projection.ModeOff}, nil
	}
	pol := rec.Policy.Projection
	plan, err := s.plan(ctx, pol)
	if err != nil {
		s.log.Warn("host PCR projection refused", "vm", rec.Name, "uuid", rec.UUID, "mode", pol.Mode, "err", err)
		return nil, fmt.Errorf("host PCR projection (%s) for %s: %w", pol.Mode, rec.Name, err)
	}
	s.log.Info("host PCR projection", "vm", rec.Name, "uuid", rec.UUID, "mode", plan.Mode, "pcrs", plan.ReadOnly, "extends", len(plan.Events))
	return planResponse(plan), nil
}

// plan runs the provider the policy names on the host's measurements.
func (s *Server) plan(ctx context.Context, pol *registry.Projection) (*projection.Plan, error) {
	cfg := s.projectionConfig()
	host, err := s.hostMeasurements(ctx, pol.Mode != projection.ModeSummary)
	if err != nil {
		return nil, err
	}
	switch pol.Mode {
	case projection.ModeMirror:
		return projection.Mirror(host)
	case projection.ModeSummary:
		if pol.PCR == nil {
			return nil, fmt.Errorf("%w: summary projection without a pcr", errBadRequest)
		}
		if host.Identity, err = s.projectionIdentity(); err != nil {
			return nil, err
		}
		return projection.Summary(host, *pol.PCR)
	case projection.ModeProperty:
		pcr := projection.DefaultPropertyPCR
		if pol.PCR != nil {
			pcr = *pol.PCR
		}
		if cfg.PropertyPolicy == "" {
			return nil, fmt.Errorf("%w: property mode needs the manager's --property-policy", projection.ErrInput)
		}
		pp, err := projection.LoadPolicy(cfg.PropertyPolicy)
		if err != nil {
			return nil, err
		}
		return projection.Property(host, pcr, pp)
	}
	return nil, fmt.Errorf("%w: projection mode %q", errBadRequest, pol.Mode)
}

// pcrHardware is what projection needs of the hardware TPM; the hwtpm adapter has it.
type pcrHardware interface {
	PCRBanks(ctx context.Context) ([]string, error)
	ReadPCRs(ctx context.Context, bank string, pcrs []int) ([][]byte, error)
}

func (h *hardware) PCRBanks(ctx context.Context) ([]string, error) { return h.tpm.PCRBanks(ctx) }

func (h *hardware) ReadPCRs(ctx context.Context, bank string, pcrs []int) ([][]byte, error) {
	return h.tpm.ReadPCRs(ctx, bank, pcrs)
}

// allPCRs are PCRs 0-23.
var allPCRs = func() []int {
	p := make([]int, eventlog.NumPCRs)
	for i := range p {
		p[i] = i
	}
	return p
}()

// hostMeasurements reads the hardware PCRs of every active bank and, with withLog, the
// host's event log.
func (s *Server) hostMeasurements(ctx context.Context, withLog bool) (projection.Host, error) {
	hw, ok := s.hw.(pcrHardware)
	if !ok {
		return projection.Host{}, fmt.Errorf("%w: the hardware TPM cannot read PCRs", projection.ErrInput)
	}
	h := projection.Host{PCRs: map[uint16][][]byte{}}
	banks, err := hw.PCRBanks(ctx)
	if err != nil {
		return h, err
	}
	for _, name := range banks {
		alg, ok := eventlog.AlgByName(name)
		if !ok || !slices.Contains(projection.Banks, alg) {
			continue
		}
		if h.PCRs[alg], err = hw.ReadPCRs(ctx, name, allPCRs); err != nil {
			return h, err
		}
	}
	if withLog {
		path := s.projectionConfig().EventLog
		raw, err := readEventLog(path)
		if err != nil {
			return h, err
		}
		if h.Log, err = eventlog.Parse(raw); err != nil {
			return h, fmt.Errorf("%w: %s: %w", projection.ErrInput, path, err)
		}
	}
	return h, nil
}

func readEventLog(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("%w: the host's event log: %w", projection.ErrInput, err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, eventlog.MaxLogSize+1))
	if err != nil {
		return nil, fmt.Errorf("%w: the host's event log %s: %w", projection.ErrInput, path, err)
	}
	return b, nil
}

// projectionIdentity is the manager's identity summary binds: the hardware EK's TPM name
// (nameAlg ‖ digest of its TPMT_PUBLIC), from the host identity.
func (s *Server) projectionIdentity() ([]byte, error) {
	id, err := s.HostIdentity()
	if err != nil {
		return nil, fmt.Errorf("%w: the manager's identity: %w", projection.ErrInput, err)
	}
	pub, err := hwtpm.ParsePublic(id.EKPublic)
	if err != nil {
		return nil, fmt.Errorf("%w: the hardware EK: %w", projection.ErrInput, err)
	}
	return hwtpm.PublicName(pub)
}

// recordOfPath is the registry record of the VM whose vTPM state is at path, or nil.
func (s *Server) recordOfPath(path string) *registry.Record {
	recs, _ := s.cfg.Registry.List()
	for _, r := range recs {
		if r.StateDir == "" {
			continue
		}
		if c, err := cleanStatePath(r.StateDir); err == nil && c == path {
			return r
		}
	}
	return nil
}

func planResponse(p *projection.Plan) *ProjectionResponse {
	r := &ProjectionResponse{Mode: p.Mode, ReadOnly: slices.Clone(p.ReadOnly)}
	for _, e := range p.Events {
		pe := ProjectionEvent{PCR: int(e.PCR), Type: e.Type, Data: e.Data, Digests: map[string][]byte{}}
		for _, d := range e.Digests {
			pe.Digests[eventlog.AlgName(d.Alg)] = d.Value
		}
		r.Events = append(r.Events, pe)
	}
	return r
}

// errNoProjection is a projection answer the guard cannot apply.
var errNoProjection = errors.New("projection: unusable answer from the manager")
