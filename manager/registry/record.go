package registry

import "time"

// Record is everything the registry knows about one VM's vTPM.
type Record struct {
	UUID string `json:"uuid"`
	Name string `json:"name"`
	// Backend is the domain's <tpm><backend type>: "emulator" (libvirt runs the vTPM) or
	// "external" (the hook or the manager does).
	Backend  string `json:"backend"`
	Model    string `json:"model,omitempty"`
	Version  string `json:"version,omitempty"`
	StateDir string `json:"state_dir,omitempty"`
	Socket   string `json:"socket,omitempty"`
	// PID is the vTPM process last seen for the VM (0 when it is known to be stopped).
	PID int `json:"pid,omitempty"`
	// Exe is /proc/PID/exe of that process when it was recorded.
	Exe        string    `json:"exe,omitempty"`
	Policy     *Policy   `json:"policy,omitempty"`
	Persistent bool      `json:"persistent_state,omitempty"`
	Updated    time.Time `json:"updated"`
	Events     []Event   `json:"events"`
}

// Event is one lifecycle step of the VM's vTPM (a libvirt hook call, for now).
type Event struct {
	Time   time.Time `json:"time"`
	Op     string    `json:"op"`
	SubOp  string    `json:"subop,omitempty"`
	PID    int       `json:"pid,omitempty"`
	Detail string    `json:"detail,omitempty"`
	Error  string    `json:"error,omitempty"`
}

// Policy is a VM's vtpmd policy (the libvirt hook reads it from the domain's <metadata>).
type Policy struct {
	// Projection asks for host PCR projection into the vTPM (not applied yet; recorded for
	// the manager).
	Projection *Projection `json:"projection,omitempty"`
	// KeepState says whether an external backend's state directory is kept when the domain
	// is released. nil means the default, keep.
	KeepState *bool `json:"keep_state,omitempty"`
	// XML is the policy element's content as found, for features that read it later.
	XML string `json:"xml,omitempty"`
}

// Projection is the policy's <vtpmd:projection mode='...' pcr='N'/>.
type Projection struct {
	Mode string `json:"mode"` // off, mirror, summary or property
	PCR  *int   `json:"pcr,omitempty"`
}

// Keep reports whether an external backend's state should survive release.
func (p *Policy) Keep() bool { return p == nil || p.KeepState == nil || *p.KeepState }
