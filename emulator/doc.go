// Package emulator is the vocabulary of a TPM engine without the engine: the TPM family
// (Version), libtpms' state blobs (StateType), the Store that keeps them durable, the
// sentinel errors callers branch on, and an in-memory Store. It is pure Go, so every package
// that only names these types builds without cgo and without libtpms.
//
// The engine itself, libtpms through cgo, is the subpackage libtpms: the only cgo in vtpmd.
package emulator
