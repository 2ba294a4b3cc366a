package setup

import (
	"io"

	"github.com/vtpmd/vtpmd/backend/seam"
)

// Options is swtpm_setup's command line, typed: what each option means, not how it was
// spelled. Field comments name the option. The zero value asks for a TPM 1.2 at no location,
// which Run refuses as swtpm_setup does (--tpm-state is mandatory).
type Options struct {
	// Program is the name the usage text shows (swtpm_setup, vtpmd setup); Release is vtpmd's
	// version, which --version and --help report next to swtpm_setup's.
	Program, Release string
	// Stdout and Stderr are swtpm_setup's standard output and error (nil discards).
	Stdout, Stderr io.Writer

	// Help, Version and PrintCapabilities (--help, --version, --print-capabilities) print
	// and succeed, before anything else is looked at.
	Help, Version, PrintCapabilities bool
	// CreateConfigFiles (--create-config-files) writes the per-user swtpm_setup and
	// swtpm-localca config files instead of a TPM; ConfigFilesFlags is its optional
	// argument, [overwrite][,root][,skip-if-exist].
	CreateConfigFiles bool
	ConfigFilesFlags  string

	// RunAs (--runas) is the user (a name or a uid) to become before anything is read or
	// written. SwitchUser becomes it; nil is daemon.RunAs, which changes the whole process.
	RunAs      string
	SwitchUser func(user string) error

	// LogFile (--logfile) gets the log appended; without it the log goes to Stdout and its
	// errors to Stderr.
	LogFile string
	// ConfigFile (--config) is the swtpm_setup.conf to read instead of the user's, else
	// /etc/swtpm_setup.conf.
	ConfigFile string

	// StatePath (--tpm-state, --tpmstate) is a directory, dir://DIR or file://FILE.
	StatePath string
	// TPM2 (--tpm2) sets up a TPM 2; without it, a TPM 1.2.
	TPM2 bool
	// VMID (--vmid) is the VM's identity in the certificates' subject.
	VMID string

	// KeyFile, PwdFile, KeyFileFD and PwdFileFD (--keyfile, --pwdfile, --keyfile-fd,
	// --pwdfile-fd) encrypt the state with a key or a passphrase, with swtpm's --key
	// semantics; the first given, in that order, wins. Cipher (--cipher) is aes-128-cbc
	// (the default; aes-cbc names it too) or aes-256-cbc.
	KeyFile, PwdFile, KeyFileFD, PwdFileFD string
	Cipher                                 string
	// Keys is the host manager's key source: without a key option, the state is encrypted
	// with the key it releases, if it releases one (nil: no manager).
	Keys seam.KeySource
	// CertIssuer, when set, issues the EK and platform certificates in place of the local
	// CA (the host manager's CA, whose key is in the hardware TPM); one that answers
	// ErrNotIssued leaves them to the local CA.
	CertIssuer CertIssuer

	// CreateEK (--createek) makes the EKs; CreateEKCert (--create-ek-cert) and
	// CreatePlatformCert (--create-platform-cert) also imply it.
	CreateEK, CreateEKCert, CreatePlatformCert bool
	// AllowSigning and Decryption (--allow-signing, --decryption) shape TPM 2 EKs.
	AllowSigning, Decryption bool
	// CreateSPK (--create-spk) makes a storage primary key, an ECC one with ECC (--ecc).
	CreateSPK, ECC bool
	// LockNVRAM (--lock-nvram) write-locks the certificate NV indices.
	LockNVRAM bool

	// TakeOwnership (--take-ownership) takes ownership of a TPM 1.2 with OwnerPassword
	// (--ownerpass, default ooo) or the well-known secret (--owner-well-known), and
	// SRKPassword (--srkpass, default sss) or the well-known secret (--srk-well-known).
	TakeOwnership                bool
	OwnerPassword, SRKPassword   string
	OwnerWellKnown, SRKWellKnown bool

	// RSAKeySize (--rsa-keysize) is 2048 (also when empty), 3072 or max.
	RSAKeySize string
	// EK1KeyAlgo and EK2KeyAlgo (--ek1keyalgo, --ek2keyalgo) choose the two EKs; empty takes
	// the config file's, then the default.
	EK1KeyAlgo, EK2KeyAlgo string
	// PCRBanks (--pcr-banks, every occurrence joined with ',') lists the banks to keep
	// active; PCRBanksGiven says the option was given at all, even empty, which a TPM 1.2
	// refuses.
	PCRBanks      string
	PCRBanksGiven bool

	// Overwrite (--overwrite) replaces existing state; NotOverwrite (--not-overwrite) keeps
	// it and succeeds, and wins over Overwrite.
	Overwrite, NotOverwrite bool
	// Reconfigure (--reconfigure) changes only the PCR banks of existing state.
	Reconfigure bool
	// WriteEKCertFiles (--write-ek-cert-files) is a directory that also gets the EK
	// certificates, as ek-<kind>.crt.
	WriteEKCertFiles string
	// Display (--display) prints what was made.
	Display bool
	// IgnoredOptions are the deprecated options given, without dashes and in swtpm_setup's
	// order (swtpm_ioctl, tcsd-system-ps-file): each gets a warning and has no effect.
	IgnoredOptions []string
}
