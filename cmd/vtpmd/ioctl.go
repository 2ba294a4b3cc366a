package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"

	"github.com/vtpmd/vtpmd/internal/tpmwire"

	"github.com/vtpmd/vtpmd/socket"
)

// ioctlRequest is one parsed swtpm_ioctl command line.
type ioctlRequest struct {
	network, addr string
	action        string // c i stop s e r v C l h save load g b info
	arg           string // locality, data, buffer size, info flags
	blobType      uint32
	file          string
}

const ioctlUsage = `Usage: %s command <device path>

The following commands are supported:
--tpm-device <device> : use the given device (not supported by vtpmd: use --unix or --tcp)
--tcp [<host>]:[<prt>]: connect to TPM on given host and port;
                        default host is 127.0.0.1, default port is 6546
--unix <path>         : connect to TPM using UnixIO socket
-c                    : get ptm capabilities
-i                    : do a hardware TPM_Init; if volatile state is found,
                        it will resume the TPM with it and delete it
                        afterwards
--stop                : stop the TPM without exiting
-s                    : shutdown the TPM; stops and exists
-e                    : get the tpmEstablished bit
-r <loc>              : reset the tpmEstablished bit; use the given locality
-v                    : store the TPM's volatile data
-C                    : cancel an ongoing TPM command
-l <loc>              : set the locality to the given number; valid
                        localities are 0-4
-h <data>             : hash the given data; if data is '-' then data are
                        read from stdin
--save <type> <file>  : store the TPM state blob of given type in a file;
                        type may be one of volatile, permanent, or savestate
--load <type> <file>  : load the TPM state blob of given type from a file;
                        type may be one of volatile, permanent, or savestate
-g                    : get configuration flags indicating which keys are in
                        use
-b <buffersize>       : set the buffer size of the TPM and get its current
                        size; get minimum and maximum supported sizes
--info <flags>        : get TPM implementation specific information;
                        flags must be an integer value
--version             : display version and exit
--help                : display help screen and exit
`

// cliMessage is an error whose text is printed verbatim, matching the C tool's messages.
type cliMessage string

func (m cliMessage) Error() string { return string(m) }

var errIoctlUsage = cliMessage("No valid command.")

// parseIoctlArgs parses swtpm_ioctl's command line (getopt style).
func parseIoctlArgs(prog string, args []string, stdout io.Writer) (*ioctlRequest, bool, error) {
	req := &ioctlRequest{}
	need := func(i int, opt string) (string, error) {
		if i+1 >= len(args) {
			return "", fmt.Errorf("%s: option '%s' requires an argument", prog, opt)
		}
		return args[i+1], nil
	}
	setAction := func(a string) error {
		if req.action != "" && req.action != a {
			return errIoctlUsage
		}
		req.action = a
		return nil
	}
	var positional []string
	for i := 0; i < len(args); i++ {
		a := args[i]
		var err error
		switch a {
		case "--help":
			fmt.Fprintf(stdout, "TPM emulator control tool version %s, Copyright (c) 2015 IBM Corp.\n\n"+ioctlUsage, swtpmCompatVersion, prog)
			return nil, true, nil
		case "--version":
			fmt.Fprintf(stdout, "TPM emulator control tool version %s, Copyright (c) 2015 IBM Corp.\n", swtpmCompatVersion)
			return nil, true, nil
		case "--unix":
			if req.addr, err = need(i, a); err != nil {
				return nil, false, err
			}
			req.network = "unix"
			i++
		case "--tcp":
			v, err := need(i, a)
			if err != nil {
				return nil, false, err
			}
			host, port, found := strings.Cut(v, ":")
			if !found {
				host, port = v, ""
			}
			if host == "" {
				host = "127.0.0.1"
			}
			if port == "" {
				port = "6546"
			}
			if _, err := strconv.ParseUint(port, 10, 16); err != nil {
				return nil, false, cliMessage(fmt.Sprintf("Could not parse port '%s'.", port))
			}
			req.network, req.addr = "tcp", net.JoinHostPort(host, port)
			i++
		case "--tpm-device":
			return nil, false, cliMessage("CUSE devices are not supported by vtpmd; use --unix or --tcp")
		case "-c", "-i", "--stop", "-s", "-e", "-v", "-C", "-g":
			if err := setAction(strings.TrimLeft(a, "-")); err != nil {
				return nil, false, err
			}
		case "-r", "-l", "-h", "-b", "--info":
			v, err := need(i, a)
			if err != nil {
				return nil, false, err
			}
			if err := setAction(strings.TrimLeft(a, "-")); err != nil {
				return nil, false, err
			}
			req.arg = v
			i++
		case "--save", "--load":
			if i+2 >= len(args) {
				return nil, false, fmt.Errorf("%s: option '%s' requires 2 arguments", prog, a)
			}
			if err := setAction(strings.TrimLeft(a, "-")); err != nil {
				return nil, false, err
			}
			switch args[i+1] {
			case "permanent":
				req.blobType = socket.BlobPermanent
			case "volatile":
				req.blobType = socket.BlobVolatile
			case "savestate":
				req.blobType = socket.BlobSavestate
			default:
				return nil, false, cliMessage(fmt.Sprintf("Unknown blob type '%s'.", args[i+1]))
			}
			req.file = args[i+2]
			i += 2
		default:
			if strings.HasPrefix(a, "-") {
				return nil, false, fmt.Errorf("%s: unrecognized option '%s'", prog, a)
			}
			positional = append(positional, a)
		}
	}
	if req.action == "" {
		return nil, false, errIoctlUsage
	}
	if req.network == "" {
		if len(positional) == 0 {
			return nil, false, cliMessage("Error: Missing device name.")
		}
		return nil, false, cliMessage("CUSE devices are not supported by vtpmd; use --unix or --tcp")
	}
	switch req.action {
	case "l", "r":
		n, err := strconv.Atoi(req.arg)
		if err != nil || n < 0 || n > 4 {
			return nil, false, cliMessage("Locality outside valid range of [0..4].")
		}
	case "b":
		if _, err := strconv.ParseUint(req.arg, 10, 32); err != nil {
			return nil, false, cliMessage(fmt.Sprintf("Could not parse buffersize '%s'.", req.arg))
		}
	case "info":
		if _, err := strconv.ParseUint(req.arg, 0, 64); err != nil {
			return nil, false, cliMessage(fmt.Sprintf("Could not parse info flags '%s'.", req.arg))
		}
	}
	return req, false, nil
}

// ioctlMain is swtpm_ioctl: one control command against a socket, swtpm_ioctl's output.
func ioctlMain(ctx context.Context, args []string) int {
	prog := args[0]
	req, done, err := parseIoctlArgs(prog, args[1:], os.Stdout)
	if done {
		return 0
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	c, err := socket.Dial(req.network, req.addr)
	if err != nil {
		if req.network == "tcp" {
			host, port, _ := net.SplitHostPort(req.addr)
			fmt.Fprintf(os.Stderr, "Could not connect to host '%s' on port '%s' using TCP socket: %v\n", host, port, unwrapSyscall(err))
		} else {
			fmt.Fprintf(os.Stderr, "Connect failed: %v\n", unwrapSyscall(err))
		}
		return 1
	}
	defer c.Close()
	if err := runIoctl(c, req, os.Stdout, os.Stdin); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}

// unwrapSyscall gives the bare errno text ("No such file or directory") like the C tool.
func unwrapSyscall(err error) error {
	var se *os.SyscallError
	if errors.As(err, &se) {
		return se.Err
	}
	return err
}

// resultErr formats a failed command as swtpm_ioctl does.
func resultErr(name string, err error) error {
	var r tpmwire.Result
	if errors.As(err, &r) {
		return cliMessage(fmt.Sprintf("TPM result from PTM_%s: 0x%x", name, uint32(r)))
	}
	return cliMessage(fmt.Sprintf("PTM_%s failed: %v", name, err))
}

func runIoctl(c *socket.Client, req *ioctlRequest, out io.Writer, in io.Reader) error {
	switch req.action {
	case "c":
		caps, err := c.GetCapability()
		if err != nil {
			return resultErr("GET_CAPABILITY", err)
		}
		fmt.Fprintf(out, "ptm capability is 0x%x\n", caps)
	case "i":
		if err := c.Init(socket.InitFlagDeleteVolatile); err != nil {
			return resultErr("INIT", err)
		}
	case "stop":
		if err := c.Stop(); err != nil {
			return resultErr("STOP", err)
		}
	case "s":
		if err := c.Shutdown(); err != nil {
			return resultErr("SHUTDOWN", err)
		}
	case "e":
		b, err := c.GetEstablished()
		if err != nil {
			return resultErr("GET_TPMESTABLISHED", err)
		}
		v := 0
		if b {
			v = 1
		}
		fmt.Fprintf(out, "tpmEstablished is %d\n", v)
	case "r":
		n, _ := strconv.Atoi(req.arg)
		if err := c.ResetEstablished(uint8(n)); err != nil {
			return resultErr("RESET_TPMESTABLISHED", err)
		}
	case "l":
		n, _ := strconv.Atoi(req.arg)
		if err := c.SetLocality(uint8(n)); err != nil {
			return resultErr("SET_LOCALITY", err)
		}
	case "v":
		if err := c.StoreVolatile(); err != nil {
			return resultErr("STORE_VOLATILE", err)
		}
	case "C":
		if err := c.Cancel(); err != nil {
			return resultErr("CANCEL_TPM_CMD", err)
		}
	case "g":
		f, err := c.GetConfig()
		if err != nil {
			return resultErr("GET_CONFIG", err)
		}
		fmt.Fprintf(out, "ptm configuration flags: 0x%x\n", f)
	case "b":
		n, _ := strconv.ParseUint(req.arg, 10, 32)
		size, mn, mx, err := c.SetBufferSize(uint32(n))
		if err != nil {
			return resultErr("SET_BUFFERSIZE", err)
		}
		fmt.Fprintf(out, "TPM buffersize: %d\nminimum size  : %d\nmaximum size  : %d\n", size, mn, mx)
	case "info":
		flags, _ := strconv.ParseUint(req.arg, 0, 64)
		s, err := c.GetInfo(flags)
		if err != nil {
			return resultErr("GET_INFO", err)
		}
		fmt.Fprintln(out, s)
	case "h":
		return ioctlHash(c, req.arg, in)
	case "save":
		b, _, err := c.GetStateBlob(req.blobType, 0)
		var r tpmwire.Result
		if err != nil && !(errors.As(err, &r) && r&tpmwire.ResRetry != 0) {
			return resultErr("GET_STATEBLOB", err)
		}
		if err := os.WriteFile(req.file, b, 0o600); err != nil {
			return cliMessage(fmt.Sprintf("Could not write to file '%s': %v", req.file, err))
		}
	case "load":
		b, err := os.ReadFile(req.file)
		if err != nil {
			return cliMessage(fmt.Sprintf("Could not read file '%s': %v", req.file, err))
		}
		if err := c.SetStateBlob(req.blobType, 0, b); err != nil {
			return resultErr("SET_STATEBLOB", err)
		}
	}
	return nil
}

// ioctlHash runs _TPM_Hash_Start/Data/End over data ('-' reads stdin), 4096 bytes per message.
func ioctlHash(c *socket.Client, data string, in io.Reader) error {
	var r io.Reader = strings.NewReader(data)
	if data == "-" {
		r = in
	}
	if err := c.HashStart(); err != nil {
		return resultErr("HASH_START", err)
	}
	buf := make([]byte, 4096)
	for {
		n, err := r.Read(buf)
		if n > 0 {
			if herr := c.HashData(buf[:n]); herr != nil {
				return resultErr("HASH_DATA", herr)
			}
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			return fmt.Errorf("read hash data: %w", err)
		}
	}
	if err := c.HashEnd(); err != nil {
		return resultErr("HASH_END", err)
	}
	return nil
}
