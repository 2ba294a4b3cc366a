package libvirt

import (
	"path/filepath"
	"strconv"

	"github.com/vtpmd/vtpmd/internal/proc"
)

// shortName is libvirt's <id>-<name up to 20 bytes>, used in swtpm socket and pid file names.
func shortName(dom *Domain) string {
	n := dom.Name
	if len(n) > 20 {
		n = n[:20]
	}
	return strconv.Itoa(dom.ID) + "-" + n
}

// EmulatorSocket is the control socket libvirt gives the swtpm of a running domain.
func (c *Config) EmulatorSocket(dom *Domain) string {
	if dom.ID < 0 {
		return ""
	}
	return filepath.Join(c.LibvirtSwtpmRunDir, shortName(dom)+"-swtpm.sock")
}

// EmulatorPID finds the swtpm (vtpmd) process libvirt started for a running domain: its pid
// file first, then any process serving the domain's state directory.
func (c *Config) EmulatorPID(dom *Domain) int {
	if dom.ID >= 0 {
		pf := filepath.Join(c.LibvirtSwtpmRunDir, shortName(dom)+"-swtpm.pid")
		if pid, err := proc.ReadPidFile(pf); err == nil && proc.Alive(pid) {
			return pid
		}
	}
	if pids := proc.FindInstances("dir", c.StateDir(dom)); len(pids) > 0 {
		return pids[0]
	}
	return 0
}
