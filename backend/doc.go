// Package backend serves one vTPM instance. Instance is the lifecycle state machine that swtpm's
// control channel drives (stopped / running, INIT as a TPM reset, automatic TPM2_Shutdown before
// a re-INIT, STOP or exit), over the state store it keeps its blobs in (subpackages store and
// blob: swtpm-compatible files, atomic durable writes, locking, encryption) and migration blobs.
// Run serves one instance from a RunConfig: keys, channels, state, power-on, until shutdown.
//
// Two seams are where the host manager plugs in: a KeySource (where the state and migration
// keys come from: swtpm's key options today) and a Guard (sees every data-channel command and
// every successful TPM2_Startup(CLEAR): host PCR projection; one that names its commands,
// seam.CommandFilter, sees those).
//
// An Instance implements socket.TPM, and socket.NativeDataServer: a data connection is served
// on libtpms' native data thread, which runs a command itself only after the previous one passed
// every check here (admission, state lock, guard) and no control call came since. Its methods return plain, wrapped errors; ResultOf is the
// one table that turns them into swtpm's control-channel result codes, applied by the socket's
// dispatcher.
package backend
