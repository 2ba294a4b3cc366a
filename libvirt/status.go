package libvirt

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"os"
	"sort"
	"time"

	golibvirt "github.com/digitalocean/go-libvirt"
	"github.com/digitalocean/go-libvirt/socket/dialers"
)

// DefaultURI is the connection `vtpmd status` uses unless told otherwise.
const DefaultURI = "qemu:///system"

// DefaultSocket is the system libvirtd's socket.
const DefaultSocket = "/var/run/libvirt/libvirt-sock"

// ErrConnect is wrapped when libvirt cannot be reached.
var ErrConnect = errors.New("cannot connect to libvirt")

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
	Running bool      `json:"running"`
	PID     int       `json:"pid,omitempty"`
	Exe     string    `json:"exe,omitempty"`
	Policy  *Policy   `json:"policy,omitempty"`
	History []Event   `json:"history,omitempty"`
	Updated time.Time `json:"registry_updated,omitempty"`
}

// Connect opens a go-libvirt connection for uri ("" means DefaultURI). qemu:///system and
// qemu:///session use the local socket (socket= in the query overrides it); qemu+tcp, +tls,
// +ssh and +unix are handled by go-libvirt.
func Connect(ctx context.Context, uri string, timeout time.Duration) (*golibvirt.Libvirt, error) {
	if uri == "" {
		uri = DefaultURI
	}
	u, err := url.Parse(uri)
	if err != nil {
		return nil, fmt.Errorf("%w: bad URI %q: %v", ErrConnect, uri, err)
	}
	type result struct {
		l   *golibvirt.Libvirt
		err error
	}
	ch := make(chan result, 1)
	go func() {
		if u.Host == "" && (u.Scheme == "qemu" || u.Scheme == "qemu+unix") {
			sock := u.Query().Get("socket")
			if sock == "" {
				sock = DefaultSocket
			}
			l := golibvirt.NewWithDialer(dialers.NewLocal(dialers.WithSocket(sock), dialers.WithLocalTimeout(timeout)))
			err := l.ConnectToURI(golibvirt.RemoteURI(u))
			ch <- result{l, err}
			return
		}
		l, err := golibvirt.ConnectToURI(u)
		ch <- result{l, err}
	}()
	select {
	case r := <-ch:
		if r.err != nil {
			return nil, fmt.Errorf("%w %s: %v", ErrConnect, uri, r.err)
		}
		return r.l, nil
	case <-ctx.Done():
		go func() {
			if r := <-ch; r.l != nil {
				r.l.Disconnect()
			}
		}()
		return nil, fmt.Errorf("%w %s: %v", ErrConnect, uri, ctx.Err())
	case <-time.After(timeout + time.Second):
		return nil, fmt.Errorf("%w %s: timed out after %v", ErrConnect, uri, timeout)
	}
}

// Status lists the vTPMs libvirt knows of (via l; nil means registry only), joined with the
// registry's records and the processes running on this host. history bounds the events per VM
// (0: none, <0: all).
func Status(l *golibvirt.Libvirt, cfg *Config, reg *Registry, history int) ([]VMStatus, error) {
	byUUID := map[string]*VMStatus{}
	var order []string
	var errs []error
	if l != nil {
		doms, _, err := l.ConnectListAllDomains(1, golibvirt.ConnectListDomainsActive|golibvirt.ConnectListDomainsInactive)
		if err != nil {
			return nil, fmt.Errorf("list domains: %w", err)
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
			if dom.TPM == nil {
				continue
			}
			st := &VMStatus{
				Name: dom.Name, UUID: dom.UUID, Defined: true, Active: d.ID != -1 && dom.ID >= 0,
				Backend: dom.TPM.Backend, Model: dom.TPM.Model, Version: dom.TPM.Version,
				StateDir: cfg.StateDir(dom), Policy: dom.Policy,
			}
			switch dom.TPM.Backend {
			case BackendExternal:
				st.Socket = dom.TPM.SocketPath
				if pids := FindInstances("path", st.Socket); len(pids) > 0 {
					st.PID = pids[0]
				}
			case BackendEmulator:
				if dom.ID >= 0 {
					st.Socket = cfg.EmulatorSocket(dom)
				}
				st.PID = cfg.EmulatorPID(dom)
			}
			byUUID[dom.UUID] = st
			order = append(order, dom.UUID)
		}
	}
	recs, rerrs := reg.List()
	errs = append(errs, rerrs...)
	for _, rec := range recs {
		st, ok := byUUID[rec.UUID]
		if !ok {
			st = &VMStatus{
				Name: rec.Name, UUID: rec.UUID, Backend: rec.Backend, Model: rec.Model,
				Version: rec.Version, StateDir: rec.StateDir, Socket: rec.Socket, Policy: rec.Policy,
			}
			if rec.PID > 0 && Alive(rec.PID) && (isInstance(rec.PID, "path", rec.Socket) || isInstance(rec.PID, "dir", rec.StateDir)) {
				st.PID = rec.PID
			} else if rec.StateDir != "" {
				if pids := FindInstances("dir", rec.StateDir); len(pids) > 0 {
					st.PID = pids[0]
				}
			}
			byUUID[rec.UUID] = st
			order = append(order, rec.UUID)
		}
		st.Updated = rec.Updated
		ev := rec.Events
		if history >= 0 && len(ev) > history {
			ev = ev[len(ev)-history:]
		}
		st.History = append([]Event(nil), ev...)
	}
	out := make([]VMStatus, 0, len(order))
	for _, u := range order {
		st := byUUID[u]
		if st.PID > 0 {
			st.Running = true
			if info, err := Inspect(st.PID); err == nil {
				st.Exe = info.Exe
			}
		}
		if st.StateDir != "" {
			if fi, err := os.Stat(st.StateDir); err == nil && fi.IsDir() {
				st.StateFound = true
			}
		}
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
