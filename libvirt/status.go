package libvirt

import (
	"errors"
	"fmt"
	"os"
	"sort"
	"time"

	"github.com/vtpmd/vtpmd/manager"

	golibvirt "github.com/digitalocean/go-libvirt"

	"github.com/vtpmd/vtpmd/internal/proc"
	"github.com/vtpmd/vtpmd/manager/registry"
)

// VMStatus is one line of `vtpmd status`: a domain with a vTPM, or a registry record whose
// domain libvirt no longer knows (migrated away, transient and stopped).
type VMStatus struct {
	Name       string      `json:"name"`
	UUID       string      `json:"uuid"`
	Defined    bool        `json:"defined"` // known to the libvirt connection
	Active     bool        `json:"active"`  // domain running
	Backend    BackendType `json:"backend"`
	Model      string      `json:"model,omitempty"`
	Version    string      `json:"version,omitempty"`
	StateDir   string      `json:"state_dir,omitempty"`
	StateFound bool        `json:"state_found"`
	Socket     string      `json:"socket,omitempty"`
	// Running says whether the vTPM process is alive, PID and Exe identify it.
	Running bool             `json:"running"`
	PID     int              `json:"pid,omitempty"`
	Exe     string           `json:"exe,omitempty"`
	Policy  *Policy          `json:"policy,omitempty"`
	History []registry.Event `json:"history,omitempty"`
	Updated time.Time        `json:"registry_updated,omitempty"`
	// Manager is the host manager's view of this vTPM (nil: no manager, or not enrolled).
	Manager *manager.VMStatus `json:"manager,omitempty"`
}

// Status lists the vTPMs libvirt knows of (via l; nil means registry only), joined with the
// registry's records and the processes running on this host. history bounds the events per VM
// (0: none, <0: all).
func Status(l *golibvirt.Libvirt, cfg *Config, reg *registry.Registry, history int) ([]VMStatus, error) {
	byUUID := map[string]*VMStatus{}
	var order []string
	add := func(st *VMStatus) {
		byUUID[st.UUID] = st
		order = append(order, st.UUID)
	}
	var errs []error
	if l != nil {
		sts, derrs, err := domainStatuses(l, cfg)
		if err != nil {
			return nil, err
		}
		errs = append(errs, derrs...)
		for _, st := range sts {
			add(st)
		}
	}
	recs, rerrs := reg.List()
	errs = append(errs, rerrs...)
	for _, rec := range recs {
		st, ok := byUUID[rec.UUID]
		if !ok {
			st = recordStatus(rec)
			add(st)
		}
		st.Updated = rec.Updated
		ev := rec.Events
		if history >= 0 && len(ev) > history {
			ev = ev[len(ev)-history:]
		}
		st.History = append([]registry.Event(nil), ev...)
	}
	out := make([]VMStatus, 0, len(order))
	for _, u := range order {
		st := byUUID[u]
		st.observe()
		out = append(out, *st)
	}
	sort.SliceStable(out, func(i, j int) bool {
		if out[i].Defined != out[j].Defined {
			return out[i].Defined
		}
		return out[i].Name < out[j].Name
	})
	return out, errors.Join(errs...)
}

// domainStatuses describes the domains with a vTPM that libvirt knows. Domains it cannot read
// are reported in errs; err means libvirt could not list them at all.
func domainStatuses(l *golibvirt.Libvirt, cfg *Config) (sts []*VMStatus, errs []error, err error) {
	doms, _, err := l.ConnectListAllDomains(1, golibvirt.ConnectListDomainsActive|golibvirt.ConnectListDomainsInactive)
	if err != nil {
		return nil, nil, fmt.Errorf("list domains: %w", err)
	}
	for _, d := range doms {
		xml, err := l.DomainGetXMLDesc(d, 0)
		if err != nil {
			errs = append(errs, fmt.Errorf("domain %s: %w", d.Name, err))
			continue
		}
		dom, err := ParseDomain([]byte(xml))
		if err != nil {
			errs = append(errs, fmt.Errorf("domain %s: %w", d.Name, err))
			continue
		}
		if dom.TPM != nil {
			sts = append(sts, domainStatus(cfg, dom, d.ID != -1 && dom.ID >= 0))
		}
	}
	return sts, errs, nil
}

// domainStatus describes a domain libvirt knows and finds its vTPM process.
func domainStatus(cfg *Config, dom *Domain, active bool) *VMStatus {
	st := &VMStatus{
		Name: dom.Name, UUID: dom.UUID, Defined: true, Active: active,
		Backend: dom.TPM.Backend, Model: dom.TPM.Model, Version: dom.TPM.Version,
		StateDir: cfg.StateDir(dom), Policy: dom.Policy,
	}
	switch dom.TPM.Backend {
	case BackendExternal:
		st.Socket = dom.TPM.SocketPath
		if pids := proc.FindInstances("path", st.Socket); len(pids) > 0 {
			st.PID = pids[0]
		}
	case BackendEmulator:
		if dom.ID >= 0 {
			st.Socket = cfg.EmulatorSocket(dom)
		}
		st.PID = cfg.EmulatorPID(dom)
	}
	return st
}

// recordStatus describes a VM libvirt does not know from its registry record, and finds its
// vTPM process: the recorded one if it still serves the VM, else any serving its state.
func recordStatus(rec *registry.Record) *VMStatus {
	st := &VMStatus{
		Name: rec.Name, UUID: rec.UUID, Backend: BackendType(rec.Backend), Model: rec.Model,
		Version: rec.Version, StateDir: rec.StateDir, Socket: rec.Socket, Policy: rec.Policy,
	}
	if rec.PID > 0 && proc.Alive(rec.PID) && (proc.IsInstance(rec.PID, "path", rec.Socket) || proc.IsInstance(rec.PID, "dir", rec.StateDir)) {
		st.PID = rec.PID
	} else if rec.StateDir != "" {
		if pids := proc.FindInstances("dir", rec.StateDir); len(pids) > 0 {
			st.PID = pids[0]
		}
	}
	return st
}

// observe fills in what the host shows now: the process's executable, the state directory.
func (st *VMStatus) observe() {
	if st.PID > 0 {
		st.Running = true
		if info, err := proc.Inspect(st.PID); err == nil {
			st.Exe = info.Exe
		}
	}
	if st.StateDir != "" {
		if fi, err := os.Stat(st.StateDir); err == nil && fi.IsDir() {
			st.StateFound = true
		}
	}
}
