// Package eventlog reads and writes the TCG PC Client crypto-agile event log (the format of
// /sys/kernel/security/tpm0/binary_bios_measurements on a TPM 2.0 host: a SHA-1-format Spec ID
// event, then TCG_PCR_EVENT2 records with one digest per listed algorithm), replays it per PCR
// bank, and builds a log of given events in the same format.
//
// It promises: Parse never panics and never reads past its input (every size is checked
// against what is left, counts and sizes are bounded); Replay computes the PCR values the log
// leads to, starting PCR 0 from the log's startup locality; Build's output parses back to the
// same events.
package eventlog
