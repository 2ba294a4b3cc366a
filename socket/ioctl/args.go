package ioctl

import (
	"net"
	"strconv"
	"strings"
)

// Default --tcp host and port, as swtpm_ioctl fills in a missing part of [<host>]:[<port>].
const (
	defaultTCPHost = "127.0.0.1"
	defaultTCPPort = "6546"
)

// flagCommands are the options that select a command without an argument.
var flagCommands = map[string]Command{
	"-c": GetCapability, "-i": Init, "--stop": Stop, "-s": Shutdown, "-e": GetEstablished,
	"-v": StoreVolatile, "-C": Cancel, "-g": GetConfig,
}

// argCommands are the options that select a command and take one argument.
var argCommands = map[string]Command{
	"-r": ResetEstablished, "-l": SetLocality, "-h": Hash, "-b": SetBufferSize, "--info": GetInfo,
}

// argParser walks a command line option by option, as swtpm_ioctl's getopt_long loop does.
type argParser struct {
	tool       Program
	args       []string
	i          int // index of the option being parsed
	req        *Request
	arg        string // the argument of an argCommands option, checked once all are read
	positional []string
}

// ParseArgs parses swtpm_ioctl's command line, args without the program name. --help and
// --version give a Request of ShowHelp or ShowVersion at once. Every error is
// ErrInvalidArgs or ErrDeviceUnsupported with swtpm_ioctl's message as its text.
func ParseArgs(tool Program, args []string) (*Request, error) {
	p := &argParser{tool: tool, args: args, req: &Request{Program: tool}}
	for ; p.i < len(args); p.i++ {
		if cmd := infoCommand(args[p.i]); cmd != NoCommand {
			return &Request{Program: tool, Command: cmd}, nil
		}
		if err := p.option(args[p.i]); err != nil {
			return nil, err
		}
	}
	return p.finish()
}

// infoCommand is the command of an option that ends parsing (--help, --version).
func infoCommand(opt string) Command {
	switch opt {
	case "--help":
		return ShowHelp
	case "--version":
		return ShowVersion
	}
	return NoCommand
}

// option parses args[p.i] and the values it takes.
func (p *argParser) option(opt string) error {
	if cmd, ok := flagCommands[opt]; ok {
		return p.setCommand(cmd)
	}
	if cmd, ok := argCommands[opt]; ok {
		v, err := p.value(opt)
		if err != nil {
			return err
		}
		p.arg = v
		return p.setCommand(cmd)
	}
	switch opt {
	case "--unix":
		v, err := p.value(opt)
		if err != nil {
			return err
		}
		p.req.Endpoint = Endpoint{Network: "unix", Address: v}
		return nil
	case "--tcp":
		v, err := p.value(opt)
		if err != nil {
			return err
		}
		p.req.Endpoint, err = tcpEndpoint(v)
		return err
	case "--tpm-device":
		return failf(ErrDeviceUnsupported, nil, msgCUSE)
	case "--save", "--load":
		return p.blobOption(opt)
	}
	if strings.HasPrefix(opt, "-") {
		return failf(ErrInvalidArgs, nil, "%s: unrecognized option '%s'", p.tool.Name, opt)
	}
	p.positional = append(p.positional, opt)
	return nil
}

// value consumes the argument of opt.
func (p *argParser) value(opt string) (string, error) {
	if p.i+1 >= len(p.args) {
		return "", failf(ErrInvalidArgs, nil, "%s: option '%s' requires an argument", p.tool.Name, opt)
	}
	p.i++
	return p.args[p.i], nil
}

// setCommand records the command; a second, different one makes the line invalid.
func (p *argParser) setCommand(cmd Command) error {
	if p.req.Command != NoCommand && p.req.Command != cmd {
		return failf(ErrInvalidArgs, nil, msgNoValidCommand)
	}
	p.req.Command = cmd
	return nil
}

// blobOption parses --save or --load <type> <file>.
func (p *argParser) blobOption(opt string) error {
	if p.i+2 >= len(p.args) {
		return failf(ErrInvalidArgs, nil, "%s: option '%s' requires 2 arguments", p.tool.Name, opt)
	}
	cmd := SaveStateBlob
	if opt == "--load" {
		cmd = LoadStateBlob
	}
	if err := p.setCommand(cmd); err != nil {
		return err
	}
	name := p.args[p.i+1]
	typ, ok := blobTypes[name]
	if !ok {
		return failf(ErrInvalidArgs, nil, "Unknown blob type '%s'.", name)
	}
	p.req.BlobType, p.req.File = typ, p.args[p.i+2]
	p.i += 2
	return nil
}

// tcpEndpoint parses --tcp [<host>]:[<port>].
func tcpEndpoint(v string) (Endpoint, error) {
	host, port, found := strings.Cut(v, ":")
	if !found {
		host, port = v, ""
	}
	if host == "" {
		host = defaultTCPHost
	}
	if port == "" {
		port = defaultTCPPort
	}
	if _, err := strconv.ParseUint(port, 10, 16); err != nil {
		return Endpoint{}, failf(ErrInvalidArgs, err, "Could not parse port '%s'.", port)
	}
	return Endpoint{Network: "tcp", Address: net.JoinHostPort(host, port)}, nil
}

// finish checks what needs the whole line: a command, a socket, and the command's argument.
func (p *argParser) finish() (*Request, error) {
	if p.req.Command == NoCommand {
		return nil, failf(ErrInvalidArgs, nil, msgNoValidCommand)
	}
	if p.req.Endpoint.Network == "" {
		if len(p.positional) == 0 {
			return nil, failf(ErrInvalidArgs, nil, msgMissingDevice)
		}
		return nil, failf(ErrDeviceUnsupported, nil, msgCUSE)
	}
	if err := p.setArgument(); err != nil {
		return nil, err
	}
	return p.req, nil
}

// setArgument parses the argument of the command into its field of the request.
func (p *argParser) setArgument() error {
	switch p.req.Command {
	case SetLocality, ResetEstablished:
		n, err := strconv.Atoi(p.arg)
		if err != nil || n < 0 || n > 4 {
			return failf(ErrInvalidArgs, err, msgLocalityRange)
		}
		p.req.Locality = uint8(n)
	case SetBufferSize:
		n, err := strconv.ParseUint(p.arg, 10, 32)
		if err != nil {
			return failf(ErrInvalidArgs, err, "Could not parse buffersize '%s'.", p.arg)
		}
		p.req.BufferSize = uint32(n)
	case GetInfo:
		n, err := strconv.ParseUint(p.arg, 0, 64)
		if err != nil {
			return failf(ErrInvalidArgs, err, "Could not parse info flags '%s'.", p.arg)
		}
		p.req.InfoFlags = n
	case Hash:
		p.req.HashData = p.arg
	}
	return nil
}
