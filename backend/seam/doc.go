// Package seam holds the two seams where the host manager plugs into a served vTPM, as types
// with no dependencies beyond the state formats (pure Go): a KeySource (where an instance's
// state and migration keys come from, and what it must report about state versions) and a
// Guard (sees every data-channel command and every successful TPM2_Startup(CLEAR): host PCR
// projection). backend.Run takes both; the manager implements them without linking libtpms.
package seam
