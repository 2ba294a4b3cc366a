// Package archtest holds the architecture test: the allowed imports between vtpmd's packages
// (the arrows of docs/architecture.md), in the spirit of the Go standard library's
// go/build/deps_test.go. It has no code of its own; `go test ./internal/archtest` fails when a
// new import breaks the map, when a package is not on it, or when cgo spreads beyond
// emulator/libtpms.
package archtest
