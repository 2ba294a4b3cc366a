// Package localca is a local certificate authority for vTPM endorsement keys, in pure Go: the
// job of swtpm_localca and swtpm_cert (Berger et al. §7.2, scheme 3: a local authority
// certifies the vTPM's EK).
//
// It reads swtpm-localca.conf and swtpm-localca.options, so a host whose swtpm_localca
// already made a CA under /var/lib/swtpm-localca keeps signing with that CA, and it creates
// the same two-level CA (swtpm-localca-rootca → swtpm-localca) on first use when there is
// none. Serial numbers come from the same certserial file under the same flock on
// .lock.swtpm-localca, so vtpmd setup, swtpm_localca and several VMs starting at once never
// hand out a serial twice. Every file it writes is replaced atomically (temp file, fsync,
// rename, fsync of the directory).
//
// Certificates follow the TCG EK Credential Profile as swtpm_cert writes them (tpmManufacturer,
// tpmModel and tpmVersion in a critical subjectAltName directory name, tpmSpecification in
// subjectDirectoryAttributes, the EK certificate EKU, key usage by key type) and mark the TPM
// as virtual in the subject (OU "virtual TPM"), so a verifier can tell a vTPM from hardware.
//
// NewWithSigner makes the same certificates with any crypto.Signer as the CA's key (the host
// manager's key inside the hardware TPM) and random serial numbers, and a request's
// Attributes go into subjectDirectoryAttributes, whose attribute types may be 2.25.<UUID>
// OIDs (which encoding/asn1 cannot hold; Go's x509 still parses such certificates because
// the extension's value is opaque to it). DirectoryAttributes reads them back.
package localca
