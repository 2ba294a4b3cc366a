package hwtpm

import (
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
)

// Kind names how the manager reaches a TPM, spelled as tpm2-tools names its TCTIs.
type Kind string

// The kinds of TPM this package opens.
const (
	// KindDevice is a character device: the kernel's resource manager /dev/tpmrm0 (the
	// default) or a raw /dev/tpm0.
	KindDevice Kind = "device"
	// KindSwtpm is swtpm's data channel: a unix socket (swtpm socket --server
	// type=unixio,path=…) or a TCP port (--server type=tcp,port=…). Only the data channel is
	// used; the TPM must already be initialized and started (--flags
	// not-need-init,startup-clear).
	KindSwtpm Kind = "swtpm"
	// KindMssim is the Microsoft/IBM simulator protocol over TCP: commands on a data port,
	// power and NV signals on the platform port next to it.
	KindMssim Kind = "mssim"
)

// Defaults of the spellings, as tpm2-tools has them (except the device: the manager wants the
// resource manager, not the raw device).
const (
	DefaultDevice = "/dev/tpmrm0"
	DefaultHost   = "localhost"
	DefaultPort   = 2321
)

// maxUnixPath is the longest unix socket path Linux accepts (sun_path less its NUL).
const maxUnixPath = 107

// ErrBadSpec is wrapped by every ParseSpec error.
var ErrBadSpec = errors.New("bad TPM spec")

// Spec says which TPM to open: a device path, a unix socket path, or a TCP host and port.
// The zero Spec is not valid; ParseSpec("") gives the default device.
type Spec struct {
	Kind Kind
	// Path is the device (KindDevice) or the unix socket (KindSwtpm with a path).
	Path string
	// Host and Port are the TCP address (KindSwtpm without a path, KindMssim). For KindMssim
	// Port is the data port and Port+1 the platform port.
	Host string
	Port int
}

// ParseSpec reads tpm2-tools' TCTI spelling of a TPM:
//
//	""  "device"  "device:"         the default device, /dev/tpmrm0
//	"device:/dev/tpm0"  "/dev/tpm0"  a device by absolute path
//	"swtpm:path=/run/tpm.sock"        swtpm's data channel on a unix socket
//	"swtpm"  "swtpm:host=H,port=P"    swtpm's data channel on TCP (default localhost:2321)
//	"mssim"  "mssim:host=H,port=P"    the MS simulator protocol (default localhost:2321)
//
// Errors wrap ErrBadSpec and say what was expected.
func ParseSpec(s string) (Spec, error) {
	if strings.ContainsRune(s, 0) {
		return Spec{}, fmt.Errorf("hwtpm: %w: %q contains a NUL byte", ErrBadSpec, s)
	}
	if strings.HasPrefix(s, "/") {
		return deviceSpec(s)
	}
	name, conf, hasConf := strings.Cut(s, ":")
	switch Kind(name) {
	case "":
		if hasConf {
			return Spec{}, fmt.Errorf("hwtpm: %w: %q: no TPM interface before the colon (want device, swtpm or mssim)", ErrBadSpec, s)
		}
		return deviceSpec(DefaultDevice)
	case KindDevice:
		if conf == "" {
			return deviceSpec(DefaultDevice)
		}
		return deviceSpec(conf)
	case KindSwtpm:
		return netSpec(KindSwtpm, conf, true)
	case KindMssim:
		return netSpec(KindMssim, conf, false)
	case "tabrmd":
		return Spec{}, fmt.Errorf("hwtpm: %w: %q: tpm2-abrmd is not supported; use device:%s (the kernel's resource manager)",
			ErrBadSpec, s, DefaultDevice)
	}
	if !hasConf && strings.Contains(name, "/") {
		return Spec{}, fmt.Errorf("hwtpm: %w: %q: a device path must be absolute", ErrBadSpec, s)
	}
	return Spec{}, fmt.Errorf("hwtpm: %w: %q: unknown TPM interface %q (want device, swtpm or mssim)", ErrBadSpec, s, name)
}

func deviceSpec(path string) (Spec, error) {
	if !strings.HasPrefix(path, "/") {
		return Spec{}, fmt.Errorf("hwtpm: %w: device path %q must be absolute", ErrBadSpec, path)
	}
	return Spec{Kind: KindDevice, Path: path}, nil
}

// netSpec parses "key=value,…" for swtpm and mssim; path= is allowed for swtpm only.
func netSpec(kind Kind, conf string, pathAllowed bool) (Spec, error) {
	spec := Spec{Kind: kind}
	seen := map[string]bool{}
	if conf != "" {
		for _, kv := range strings.Split(conf, ",") {
			key, value, ok := strings.Cut(kv, "=")
			if !ok {
				return Spec{}, fmt.Errorf("hwtpm: %w: %s: %q is not key=value", ErrBadSpec, kind, kv)
			}
			if seen[key] {
				return Spec{}, fmt.Errorf("hwtpm: %w: %s: %s= given twice", ErrBadSpec, kind, key)
			}
			seen[key] = true
			if value == "" {
				return Spec{}, fmt.Errorf("hwtpm: %w: %s: %s= is empty", ErrBadSpec, kind, key)
			}
			switch key {
			case "host":
				host := value
				if strings.HasPrefix(host, "[") && strings.HasSuffix(host, "]") {
					host = host[1 : len(host)-1]
				}
				if host == "" || strings.ContainsFunc(host, func(r rune) bool { return r <= ' ' || r == 0x7f || strings.ContainsRune("[]/", r) }) {
					return Spec{}, fmt.Errorf("hwtpm: %w: %s: host=%q is not a host name or address", ErrBadSpec, kind, value)
				}
				spec.Host = host
			case "port":
				port, err := strconv.Atoi(value)
				maxPort := 65535
				if kind == KindMssim {
					maxPort = 65534 // the platform port is port+1
				}
				if err != nil || port < 1 || port > maxPort {
					return Spec{}, fmt.Errorf("hwtpm: %w: %s: port=%q is not a port number from 1 to %d", ErrBadSpec, kind, value, maxPort)
				}
				spec.Port = port
			case "path":
				if !pathAllowed {
					return Spec{}, fmt.Errorf("hwtpm: %w: %s has no path= (want host= and port=)", ErrBadSpec, kind)
				}
				if !strings.HasPrefix(value, "/") {
					return Spec{}, fmt.Errorf("hwtpm: %w: %s: socket path %q must be absolute", ErrBadSpec, kind, value)
				}
				if len(value) > maxUnixPath {
					return Spec{}, fmt.Errorf("hwtpm: %w: %s: socket path is %d bytes; unix sockets allow %d", ErrBadSpec, kind, len(value), maxUnixPath)
				}
				spec.Path = value
			default:
				want := "host=, port="
				if pathAllowed {
					want = "path=, or host= and port="
				}
				return Spec{}, fmt.Errorf("hwtpm: %w: %s: unknown option %q (want %s)", ErrBadSpec, kind, key, want)
			}
		}
	}
	if spec.Path != "" {
		if spec.Host != "" || spec.Port != 0 {
			return Spec{}, fmt.Errorf("hwtpm: %w: %s: path= excludes host= and port=", ErrBadSpec, kind)
		}
		return spec, nil
	}
	if spec.Host == "" {
		spec.Host = DefaultHost
	}
	if spec.Port == 0 {
		spec.Port = DefaultPort
	}
	return spec, nil
}

// String spells s as ParseSpec reads it.
func (s Spec) String() string {
	switch {
	case s.Kind == KindDevice:
		return "device:" + s.Path
	case s.Path != "":
		return string(s.Kind) + ":path=" + s.Path
	default:
		return fmt.Sprintf("%s:host=%s,port=%d", s.Kind, s.Host, s.Port)
	}
}

// dataAddr is the TCP address of the data port.
func (s Spec) dataAddr() string { return net.JoinHostPort(s.Host, strconv.Itoa(s.Port)) }

// platformAddr is the TCP address of the MS simulator's platform port.
func (s Spec) platformAddr() string { return net.JoinHostPort(s.Host, strconv.Itoa(s.Port+1)) }
