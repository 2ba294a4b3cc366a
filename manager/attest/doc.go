// Package attest is deep attestation of a vTPM: the report a guest reads from its vTPM's NV
// index 0x01400001 after writing a nonce to 0x01400002, and the verifier behind `vtpmd attest
// verify`. It needs no TPM: everything here is bytes in, bytes or a verdict out.
//
// What it promises:
//
//   - The report is a versioned, compact binary (Encode/Decode) that fits one NV index
//     (MaxReportSize): magic, version, length, then length-prefixed fields, each bounded; the
//     NV index's zero padding after it is allowed, any other byte is refused (ErrMalformed).
//     Decode never panics on any input (FuzzDecode).
//   - The hardware quote in a report binds, through its qualifying data (QualifyingData), the
//     guest's nonce, the vTPM's EK name, the guest's AK name (the AK it made persistent at
//     0x81000003), the VM's UUID and the digest of the vTPM's PCRs at the time of the report.
//   - Verify checks every signature and every binding and reports what is proven; any
//     tampered byte, a wrong nonce, another vTPM's or VM's report, a replayed report or a host
//     event log that does not replay to the quoted PCRs fails with an error naming which.
//
// It does not talk to TPMs, the manager or the guest: the manager's attestation endpoint
// builds reports with it, the guard carries them into the vTPM.
package attest
