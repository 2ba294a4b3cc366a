// Package setup is swtpm_setup's semantics: it manufactures a new vTPM's state (or changes
// the PCR banks of an existing one) in-process, with libtpms on an in-memory store, and
// writes it to the state location only when every step has succeeded.
//
// Run takes swtpm_setup's command line as typed Options and promises swtpm_setup 0.7.1's
// behaviour: the same checks in the same order, the same messages on the same streams (the
// log file, or stdout and stderr) and the same outcome for existing state. Flag parsing is
// the caller's. Manufacture is the step underneath, for callers that need no command-line
// semantics; subpackage provision issues the TPM commands.
package setup
