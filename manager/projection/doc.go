// Package projection turns a host's measurements into the extends a vTPM applies after the
// guest's TPM2_Startup(CLEAR) (host PCR projection): the providers mirror, summary and
// property, and the operator's property policy file.
//
// It promises: a provider either returns a complete plan or an error, never a partial one;
// mirror and property refuse a host event log that does not replay to the hardware TPM's PCRs;
// property maps every measurement it cannot match to the reserved property "unknown", which no
// policy may name, so an unapproved host never gets an approved host's PCR value. The package
// does no I/O besides reading the policy file: the manager supplies the log, the PCR values and
// its identity.
package projection
