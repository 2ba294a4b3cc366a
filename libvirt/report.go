package libvirt

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
)

// Report says what install or uninstall did.
type Report struct {
	Actions []string `json:"actions"`
	Notes   []string `json:"notes"`
}

func (r *Report) did(format string, a ...any) {
	r.Actions = append(r.Actions, fmt.Sprintf(format, a...))
}

func (r *Report) note(format string, a ...any) { r.Notes = append(r.Notes, fmt.Sprintf(format, a...)) }

// Print writes the report for people (a title, then actions and notes) or as JSON. A nil
// report prints nothing.
func (r *Report) Print(w io.Writer, title string, asJSON bool) error {
	if r == nil {
		return nil
	}
	if asJSON {
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		return enc.Encode(r)
	}
	fmt.Fprintln(w, title)
	for _, a := range r.Actions {
		fmt.Fprintln(w, "  "+a)
	}
	for _, n := range r.Notes {
		fmt.Fprintln(w, "note: "+n)
	}
	return nil
}

// RunInstall runs Install and prints its report to w, also what was done before a failure.
func RunInstall(ctx context.Context, o InstallOptions, w io.Writer, asJSON bool) error {
	rep, err := Install(ctx, o)
	// what was installed does not depend on the report reaching the terminal
	_ = rep.Print(w, "vtpmd install:", asJSON)
	return err
}

// RunUninstall runs Uninstall and prints its report to w, also what was done before a failure.
func RunUninstall(o InstallOptions, w io.Writer, asJSON bool) error {
	rep, err := Uninstall(o)
	// what was removed does not depend on the report reaching the terminal
	_ = rep.Print(w, "vtpmd uninstall:", asJSON)
	return err
}
