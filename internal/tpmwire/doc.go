// Package tpmwire is the TPM command and response framing vtpmd needs itself: the 10-byte
// header (tag, size, code), the few commands vtpmd issues on its own behalf (Startup, Shutdown),
// error responses, and Result, the one result-code type of the TPM 1.2 error space that
// libtpms returns and swtpm's control channel answers with.
//
// It promises no allocation-free parsing and knows no transport; it is a leaf any package may
// import. Bigger TPM 2 commands are built with go-tpm.
package tpmwire
