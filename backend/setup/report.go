package setup

import (
	"fmt"
	"io"
	"path/filepath"

	"github.com/vtpmd/vtpmd/backend/setup/provision"
	"github.com/vtpmd/vtpmd/internal/atomicfile"
)

// writeEKCertFiles is --write-ek-cert-files: each EK certificate made, as DER in
// dir/ek-<kind>.crt (a TPM 1.2's is ek-rsa2048.crt).
func writeEKCertFiles(dir string, res *ManufactureResult) error {
	certs := map[string][]byte{} // file kind -> DER
	if res.TPM12 != nil && res.TPM12.EKCert != nil {
		certs["rsa2048"] = res.TPM12.EKCert
	}
	if res.Result != nil {
		for _, ek := range res.EKs {
			if ek.Cert != nil {
				certs[ek.Kind] = ek.Cert
			}
		}
	}
	for kind, der := range certs {
		if err := atomicfile.WriteFile(filepath.Join(dir, "ek-"+kind+".crt"), der, 0o640); err != nil {
			return err
		}
	}
	return nil
}

// displayResult prints what was made (swtpm_setup 0.7.1 accepts --display and prints nothing;
// vtpmd says what it made).
func displayResult(w io.Writer, res *ManufactureResult) {
	fmt.Fprintf(w, "TPM %s, manufacturer %s, model %s, firmware %s\n", res.TPM.Family, res.TPM.Manufacturer, res.TPM.Model, res.TPM.Version)
	if r := res.TPM12; r != nil {
		if r.EK != nil {
			fmt.Fprintf(w, "EK rsa2048 (%d-bit modulus)\n", r.EK.N.BitLen())
		}
		if r.EKCert != nil {
			fmt.Fprintf(w, "EK certificate in NV 0x%x (%d bytes)\n", provision.Index12EKCert, len(r.EKCert))
		}
		if r.PlatformCert != nil {
			fmt.Fprintf(w, "platform certificate in NV 0x%x (%d bytes)\n", provision.Index12PlatformCert, len(r.PlatformCert))
		}
		return
	}
	if res.Result == nil {
		return
	}
	for _, ek := range res.EKs {
		line := fmt.Sprintf("EK %s at handle 0x%x", ek.Kind, uint32(ek.Handle))
		if ek.CertIndex != 0 {
			line += fmt.Sprintf(", certificate in NV 0x%x (%d bytes)", ek.CertIndex, len(ek.Cert))
		}
		fmt.Fprintln(w, line)
	}
	if res.PlatformCert != nil {
		fmt.Fprintf(w, "platform certificate in NV 0x%x (%d bytes)\n", provision.IndexPlatformCert, len(res.PlatformCert))
	}
}
