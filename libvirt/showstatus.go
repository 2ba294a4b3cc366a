package libvirt

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/vtpmd/vtpmd/manager"

	"github.com/vtpmd/vtpmd/manager/registry"
)

// StatusQuery is what `vtpmd status` is asked.
type StatusQuery struct {
	// ConfigPath is the hook configuration; "" means DefaultConfigPath, which may be absent.
	ConfigPath string
	Overrides
	// URI is the libvirt connection ("" means DefaultURI); NoLibvirt reports the registry
	// alone, without connecting.
	URI       string
	NoLibvirt bool
	// Timeout bounds the libvirt connection.
	Timeout time.Duration
	// History bounds the events shown per VM (0: none, <0: all).
	History int
	// JSON prints the []VMStatus as JSON instead of a table.
	JSON bool
	// ManagerSocket is the host manager's socket ("" means manager.DefaultSocket, asked only
	// when it exists; "none": do not ask).
	ManagerSocket string
}

// ShowStatus prints the status (Status) to out. When only part of it could be gathered it
// prints that part and the problems, as a warning, to warnings. Errors wrap ErrConnect when
// libvirt cannot be reached.
func ShowStatus(ctx context.Context, q StatusQuery, out, warnings io.Writer) error {
	cfg, err := LoadConfig(q.ConfigPath)
	if err != nil {
		return err
	}
	cfg.Apply(q.Overrides)
	reg := registry.New(cfg.RegistryDir)
	var sts []VMStatus
	var serr error
	if q.NoLibvirt {
		sts, serr = Status(nil, cfg, reg, q.History)
	} else {
		ctx, cancel := context.WithTimeout(ctx, q.Timeout+2*time.Second)
		defer cancel()
		l, err := Connect(ctx, q.URI, q.Timeout)
		if err != nil {
			return err
		}
		defer l.Disconnect()
		sts, serr = Status(l, cfg, reg, q.History)
	}
	if sts == nil && serr != nil {
		return serr
	}
	if merr := addManagerView(ctx, q.ManagerSocket, sts); merr != nil {
		serr = errors.Join(serr, merr)
	}
	if q.JSON {
		enc := json.NewEncoder(out)
		enc.SetIndent("", "  ")
		if err := enc.Encode(sts); err != nil {
			return fmt.Errorf("write status: %w", err)
		}
	} else {
		WriteStatusTable(out, sts)
	}
	if serr != nil {
		fmt.Fprintln(warnings, "vtpmd status: warning:", serr)
	}
	return nil
}

// WriteStatusTable prints statuses for people: a table of the VMs, then per VM its socket,
// executable, policy and history.
func WriteStatusTable(w io.Writer, sts []VMStatus) {
	if len(sts) == 0 {
		fmt.Fprintln(w, "no domains with a vTPM")
		return
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tUUID\tDOMAIN\tBACKEND\tVTPM\tPID\tKEY\tSTATE DIR")
	for _, s := range sts {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", s.Name, s.UUID, s.domainState(), s.Backend, s.vtpmState(), s.pidColumn(), s.keyColumn(), s.stateDirColumn())
	}
	tw.Flush()
	for _, s := range sts {
		if len(s.History) == 0 && s.Exe == "" && s.Socket == "" && s.Manager == nil {
			continue
		}
		fmt.Fprintf(w, "\n%s (%s)\n", s.Name, s.UUID)
		if s.Socket != "" {
			fmt.Fprintf(w, "  socket: %s\n", s.Socket)
		}
		if s.Exe != "" {
			fmt.Fprintf(w, "  exe:    %s\n", s.Exe)
		}
		if m := s.Manager; m != nil {
			fmt.Fprintf(w, "  manager: %s, policy %s, state version %d, last seen %s\n", m.Phase, m.Policy, m.Version, lastSeen(m.LastSeen))
		}
		if s.Policy != nil && s.Policy.XML != "" {
			fmt.Fprintf(w, "  policy: %s\n", strings.Join(strings.Fields(s.Policy.XML), " "))
		}
		for _, e := range s.History {
			fmt.Fprintln(w, "  "+eventLine(e))
		}
	}
}

func (s *VMStatus) domainState() string {
	switch {
	case !s.Defined:
		return "unknown"
	case s.Active:
		return "running"
	}
	return "inactive"
}

func (s *VMStatus) vtpmState() string {
	if s.Running {
		return "running"
	}
	return "stopped"
}

func (s *VMStatus) pidColumn() string {
	if s.Running {
		return fmt.Sprint(s.PID)
	}
	return "-"
}

func (s *VMStatus) stateDirColumn() string {
	switch {
	case s.StateDir == "":
		return "-"
	case !s.StateFound:
		return s.StateDir + " (absent)"
	}
	return s.StateDir
}

// eventLine is one history line: time, operation, sub-operation, then what is known.
func eventLine(e registry.Event) string {
	line := fmt.Sprintf("%s %s %s", e.Time.Format(time.RFC3339), e.Op, e.SubOp)
	if e.PID > 0 {
		line += fmt.Sprintf(" pid=%d", e.PID)
	}
	if e.Detail != "" {
		line += " " + e.Detail
	}
	if e.Error != "" {
		line += " ERROR: " + e.Error
	}
	return line
}

// keyColumn says what protects the state: a key sealed by the manager, or not known here.
func (s *VMStatus) keyColumn() string {
	if s.Manager != nil && s.Manager.Sealed {
		return "sealed"
	}
	return "-"
}

func lastSeen(t time.Time) string {
	if t.IsZero() {
		return "never (since the manager started)"
	}
	return t.Local().Format(time.DateTime)
}

// addManagerView joins the host manager's records to the statuses by state directory. No
// manager is not an error; an unreachable or refusing one is reported as a warning.
func addManagerView(ctx context.Context, socket string, sts []VMStatus) error {
	if socket == "none" || (socket == "" && !manager.Available(manager.DefaultSocket)) {
		return nil
	}
	st, err := manager.NewClient(socket).Status(ctx)
	if err != nil {
		return fmt.Errorf("the manager's view: %w", err)
	}
	byPath := map[string]*manager.VMStatus{}
	for i := range st.VMs {
		byPath[filepath.Clean(st.VMs[i].StatePath)] = &st.VMs[i]
	}
	for i := range sts {
		if sts[i].StateDir != "" {
			sts[i].Manager = byPath[filepath.Clean(sts[i].StateDir)]
		}
	}
	return nil
}
