// Package ioctl is swtpm_ioctl: one control-channel command sent to a TPM emulator (vtpmd or
// swtpm) over its --unix or --tcp control socket, with swtpm_ioctl's command line, messages and
// output.
//
// It promises swtpm_ioctl 0.7.1's standard output byte for byte for every command ("ptm
// capability is 0x…", "tpmEstablished is 1", the buffer sizes, the --info JSON) and its "TPM
// result from PTM_<CMD>: 0x<code>" errors. --help and --version print swtpm_ioctl's texts with
// the version the caller passes and a --tpm-device line saying vtpmd has no CUSE devices. Every
// error's text is a fixed message that callers print verbatim on stderr before exiting with
// status 1; the argument, connect and file errors keep the wording vtpmd has always printed,
// which differs from swtpm_ioctl's in places (Go's lower-case errno text, "Could not parse
// buffersize 'x'." for "Could not get buffersize from x.", no "No valid command." after a getopt
// message). Errors also carry a sentinel (ErrInvalidArgs, ErrDeviceUnsupported, ErrConnect,
// ErrCommandFailed, ErrStateFile) and, where there is one, the cause: a control command the TPM
// refused has its tpmwire.Result in the chain.
//
// ParseArgs lives here rather than in cmd/vtpmd although it reads a command line: swtpm_ioctl's
// getopt-style parser is part of the behaviour being reproduced, not flag plumbing (urfave/cli
// does not parse these arguments at all). That --help and --version end parsing, that a second,
// different command is "No valid command.", the locality range, the default TCP host and port,
// the blob type names, which mistakes are found before and which after the whole line is read,
// and each mistake's message are the tool's semantics, and Run is only correct for a Request
// that ParseArgs's checks hold for. Keeping them together means cmd/vtpmd only hands over
// os.Args and prints the error.
//
// The wire side is socket.Client; this package adds no protocol bytes of its own.
package ioctl
