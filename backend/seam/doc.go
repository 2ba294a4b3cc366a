// Package seam holds the seams where the host manager plugs into a served vTPM, as types
// with no dependencies beyond the state formats (pure Go): a KeySource (where an instance's
// state and migration keys come from, and what it must report about state versions), a
// Guard (sees every data-channel command and every successful TPM2_Startup(CLEAR): host PCR
// projection), and a BlobHook (state blobs that leave and arrive: secure migration, and
// whether an instance whose state was exported may go on). backend.Run takes them; the
// manager implements them without linking libtpms.
package seam
