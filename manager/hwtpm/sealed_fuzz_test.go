package hwtpm

import (
	"encoding/json"
	"reflect"
	"testing"
)

// FuzzSealedJSON: a stored blob, whatever its bytes, is read and checked before anything goes
// to a TPM without panicking, and what passes the check marshals back to the same blob.
func FuzzSealedJSON(f *testing.F) {
	for _, seed := range []string{
		// Sealed on swtpm 0.7.1: PolicyNone, and PolicyPCR over sha256 PCR 7.
		`{"public":"AC4ACAALAAAEUgAAABAAIHuPKUNrepFzFfqbQrJuQY08M9uA2GljTHz71CkR1g8h","private":"AH8AIM1LHzmBQkkj0gqVepubb6Xi58cNMuU7AOOmq4qpaEpwABAVHBIXkPmgyc+bUZXJks7pUa8oiOZLfffzs/I3Fz3FiUnu4dwEACf9RtuVPJ//EEkARiVmq88l5gnJqP8kmuzYOvFfiA4ywJWFQrJB/r4rqBDaFlA/47Zi77F5","policy":{"kind":"none"},"storage_key":"AAtCRSLQ37QZEsubS4tPrq+3lyWxK/Lnj/yfxPcTde1aVQ=="}`,
		`{"public":"AE4ACAALAAAEkgAgi1aC2BspQ10I15J4FQYR3H5ZI7L+/M5oSglXe0ATCosAEAAgNR5RCADh4NUXPSMAcPwVCdy2L6lqornpH8TEMjOP/CE=","private":"AH8AIPA7fEsYCoVFLH74qO0j/ngqOSFzMCP9Z9njWz9kag2bABAuoQ1B+/WqiuEhxwDdswWRYDLbQHtvYFxTojj6IM5h2yaulA+2l3XN/euWLgMg0pDjABc6e1UHVranTY1lCvWU5therNQ0EaE6jSctZrQUJgufeYzlXEDXZLG1","policy":{"kind":"pcr","bank":"sha256","pcrs":[7]},"pcr_values":["AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="],"storage_key":"AAtCRSLQ37QZEsubS4tPrq+3lyWxK/Lnj/yfxPcTde1aVQ=="}`,
		`{"policy":{"kind":"pcr","bank":"sha1","pcrs":[23,0,0]}}`,
		`{}`,
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		var s Sealed
		if err := json.Unmarshal(data, &s); err != nil {
			return
		}
		if _, _, _, err := s.check(); err != nil {
			return
		}
		out, err := json.Marshal(s)
		if err != nil {
			t.Fatalf("Marshal of a checked blob: %v", err)
		}
		var back Sealed
		if err := json.Unmarshal(out, &back); err != nil || !reflect.DeepEqual(back, s) {
			t.Fatalf("%s read back as %+v, %v; want %+v", out, back, err, s)
		}
	})
}
