//go:build !linux || !(amd64 || arm64)

package seccomp

// Supported reports whether Install can install a filter on this platform: not here.
func Supported() bool { return false }

// Install installs nothing for None and refuses every other action here.
func Install(a Action) error {
	if a == None {
		return nil
	}
	return ErrUnsupported
}
