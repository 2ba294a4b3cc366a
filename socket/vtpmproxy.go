package socket

import (
	"errors"
	"fmt"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Linux's vTPM proxy (include/uapi/linux/vtpm_proxy.h).
const (
	// vtpmProxyFlagTPM2 is VTPM_PROXY_FLAG_TPM2: the new device is a TPM 2.
	vtpmProxyFlagTPM2 = 1
	// vtpmProxyIOCNewDev is VTPM_PROXY_IOC_NEW_DEV, _IOWR(0xa1, 0x00, struct vtpm_proxy_new_dev).
	vtpmProxyIOCNewDev = 3<<30 | uint32(unsafe.Sizeof(vtpmProxyNewDev{}))<<16 | 0xa1<<8 // nr 0x00
)

// vtpmProxyNewDev is struct vtpm_proxy_new_dev: flags in; tpm_num, fd, major, minor out.
type vtpmProxyNewDev struct {
	Flags, TPMNum, FD, Major, Minor uint32
}

// vtpmxPath is the vTPM proxy's control device.
var vtpmxPath = "/dev/vtpmx"

// ErrNoVTPMProxy is wrapped when /dev/vtpmx cannot be opened.
var ErrNoVTPMProxy = errors.New("no vTPM proxy on this host (load the tpm_vtpm_proxy module, or pass /dev/vtpmx into the container)")

// VTPMProxy is a TPM device created through the vTPM proxy: /dev/tpmN (and /dev/tpmrmN for a
// TPM 2) for the host or a container, its commands served on the proxy's anonymous fd.
type VTPMProxy struct {
	TPMNum, Major, Minor uint32
}

// Device is the new TPM's character device, /dev/tpmN.
func (p VTPMProxy) Device() string { return fmt.Sprintf("/dev/tpm%d", p.TPMNum) }

// NewVTPMProxy is swtpm chardev's --vtpm-proxy: it asks the kernel for a new TPM device
// (ioctl VTPM_PROXY_IOC_NEW_DEV on /dev/vtpmx, with VTPM_PROXY_FLAG_TPM2 for a TPM 2; it needs
// CAP_SYS_ADMIN) and returns the data channel the device's commands arrive on, one command
// per read and one response per write. The kernel starts talking to it at once (locality,
// start-up, self-test); closing it removes the device.
func NewVTPMProxy(tpm2 bool) (*ListenSpec, VTPMProxy, error) {
	ctl, err := unix.Open(vtpmxPath, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, VTPMProxy{}, fmt.Errorf("%w: could not open %s: %w", ErrNoVTPMProxy, vtpmxPath, err)
	}
	defer unix.Close(ctl)
	dev := vtpmProxyNewDev{}
	if tpm2 {
		dev.Flags = vtpmProxyFlagTPM2
	}
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(ctl), uintptr(vtpmProxyIOCNewDev), uintptr(unsafe.Pointer(&dev))); errno != 0 {
		return nil, VTPMProxy{}, fmt.Errorf("ioctl to create vtpm proxy failed: %w", errno)
	}
	unix.CloseOnExec(int(dev.FD))
	return charDevSpec("--vtpm-proxy", int(dev.FD)), VTPMProxy{TPMNum: dev.TPMNum, Major: dev.Major, Minor: dev.Minor}, nil
}
