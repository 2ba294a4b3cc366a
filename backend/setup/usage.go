package setup

import (
	"fmt"
	"strings"
)

// CompatVersion is the swtpm_setup whose options and output Run reproduces.
const CompatVersion = "0.7.1"

// capabilities is swtpm_setup --print-capabilities for what Run implements.
func capabilities() string {
	features := []string{"tpm-1.2", "tpm-2.0", "cmdarg-keyfile-fd", "cmdarg-pwdfile-fd", "tpm12-not-need-root",
		"cmdarg-write-ek-cert-files", "cmdarg-create-config-files", "cmdarg-reconfigure-pcr-banks",
		"tpm2-rsa-keysize-2048", "tpm2-rsa-keysize-3072", "cmdarg-ek1keyalgo", "cmdarg-ek2keyalgo"}
	q := make([]string, len(features))
	for i, f := range features {
		q[i] = `"` + f + `"`
	}
	return fmt.Sprintf(`{ "type": "swtpm_setup", "features": [ %s ], "version": "%s" }`, strings.Join(q, ", "), CompatVersion)
}

// Usage is the help text for program (swtpm_setup, vtpmd setup) of vtpmd release: --help
// prints it, and so does a command line that cannot be parsed.
func Usage(program, release string) string {
	return "TPM emulator setup tool version " + CompatVersion + " (vtpmd " + release + ")\n" +
		"Usage: " + program + ` [options]

vtpmd setup manufactures a vTPM's state in-process, with swtpm_setup's options:

--tpm-state <dir>|dir://<dir>|file://<file>
                 : Where the TPM's state is written (--tpmstate is an alias); mandatory.
--tpm2           : Set up a TPM 2; by default a TPM 1.2 is set up.
--createek       : Create the EKs (RSA and ECC P-384 for a TPM 2).
--allow-signing  : Create EKs that can sign (non-standard EKs!).
--decryption     : Keep such EKs able to decrypt.
--ecc            : Make the storage primary key an ECC key (with --create-spk).
--take-ownership : Take ownership of a TPM 1.2 (implies --createek); with
  --ownerpass <password> (default ooo) or --owner-well-known, and
  --srkpass <password> (default sss) or --srk-well-known.
--create-ek-cert : Create EK certificates with the local CA; implies --createek.
--create-platform-cert
                 : Create a platform certificate; implies --createek (not
                   --create-ek-cert: swtpm_setup 0.7.1 behaves so, whatever its help says).
--create-spk     : Create a storage primary key at 0x81000001.
--lock-nvram     : Write-lock the certificate NV indices.
--display        : Show what was created.
--config <file>  : swtpm_setup.conf to use (default: the user's, else /etc/swtpm_setup.conf).
--vmid <vmid>    : VM identity for the certificates' subject.
--logfile <file> : Append the log to <file> (default: stdout/stderr).
--keyfile <file>, --keyfile-fd <fd>, --pwdfile <file>, --pwdfile-fd <fd>
                 : Encrypt the state with a key or a passphrase (swtpm's --key).
--cipher <cipher>: aes-128-cbc (default) or aes-256-cbc.
--overwrite      : Replace existing state.
--not-overwrite  : Keep existing state and succeed.
--pcr-banks <banks>
                 : Comma-separated PCR banks to keep active; '-' keeps all (default: sha256).
--rsa-keysize <bits>
                 : 2048 (default), 3072 or max.
--ek1keyalgo <alg>, --ek2keyalgo <alg>
                 : The two EKs (swtpm master's options): rsa2048, rsa3072, secp256r1 or
                   secp384r1; default RSA of --rsa-keysize, then secp384r1.
--write-ek-cert-files <dir>
                 : Also write the EK certificates into <dir>.
--reconfigure    : Change the PCR banks of existing state; creates nothing.
--create-config-files [overwrite][,root][,skip-if-exist]
                 : Create per-user swtpm_setup and swtpm-localca config files.
--runas <user>   : Run as <user>.
--tpm, --swtpm_ioctl, --tcsd-system-ps-file
                 : Accepted for compatibility; vtpmd runs the TPM in-process.
--print-capabilities
                 : Print JSON capabilities and exit.
--version        : Display version and exit.
--help,-h        : Display this help screen.
`
}
