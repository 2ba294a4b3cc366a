//go:build cgo && linux && (amd64 || arm64)

package seccomp

// With runtime/cgo linked, the Go runtime starts its threads with glibc's pthread_create,
// which tries clone3 first, as in vtpmd (libtpms is linked with cgo): the children of
// install_test.go then run on such threads. CGO_ENABLED=0 tests the runtime's own clone.
import _ "runtime/cgo"
