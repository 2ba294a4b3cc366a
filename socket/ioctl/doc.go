// Package ioctl is swtpm_ioctl: one control-channel command sent to a TPM emulator (vtpmd or
// swtpm) over its --unix or --tcp control socket, with swtpm_ioctl's command line, messages and
// output.
//
// It promises what swtpm_ioctl prints: every line written to stdout ("ptm capability is 0x…",
// "tpmEstablished is 1", the buffer sizes, the --info JSON, --help and --version) and the text of
// every error, which callers print verbatim on stderr and follow with exit status 1. Errors also
// carry a sentinel (ErrInvalidArgs, ErrDeviceUnsupported, ErrConnect, ErrCommandFailed,
// ErrStateFile) and, where there is one, the cause: a control command the TPM refused has its
// tpmwire.Result in the chain.
//
// ParseArgs lives here rather than in cmd/vtpmd although it reads a command line: swtpm_ioctl's
// getopt-style parser is part of the behaviour being reproduced, not flag plumbing. Which option
// wins, that two different commands are "No valid command.", the locality range, the default TCP
// host and port, the blob type names and the messages for each mistake are swtpm_ioctl's, and a
// caller must not be able to get them subtly wrong. cmd/vtpmd only hands it os.Args and prints
// the error.
//
// The wire side is socket.Client; this package adds no protocol bytes of its own.
package ioctl
