// Package provision manufactures a new vTPM the way swtpm_setup does, over any TPM 2
// transport (in vtpmd setup: libtpms in-process): endorsement keys from the TCG EK Credential
// Profile templates persisted at the standard handles, their certificates and the platform
// certificate in the standard NV indices with swtpm_setup's attributes and locking, an
// optional storage primary key, and the active PCR banks. Certificates come from a
// Certifier (the local CA), so this package knows nothing of files or keys on disk.
package provision
