package ioctl

// banner is swtpm_ioctl's first line for --help and --version; the verb is the swtpm version.
const banner = "TPM emulator control tool version %s, Copyright (c) 2015 IBM Corp.\n"

// usage is swtpm_ioctl's --help text after the banner; the verb is the program name.
const usage = `Usage: %s command <device path>

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
