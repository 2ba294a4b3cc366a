// Package qemu is `vtpmd run`: one QEMU run with a vTPM, for people who test OS images with a
// TPM (in CI, by hand) without libvirt. Run manufactures the TPM's state in-process
// (backend/setup, with EK certificates from a local CA unless told otherwise), serves it from
// a `vtpmd socket` child (libtpms holds one TPM per process, and this process must stay free
// to clean up), adds the -chardev/-tpmdev/-device arguments QEMU needs, runs QEMU in the
// foreground and returns its exit status, and removes everything it made.
//
// What it promises:
//
//   - Everything it makes lives in one private temporary directory (mode 0700): the control
//     socket (0600), the pid file, the vTPM's log, an ephemeral state and an ephemeral CA.
//     It is removed when QEMU exits, when it fails to start, and on SIGINT, SIGTERM or
//     SIGHUP (QEMU gets SIGTERM, the vTPM stops after it, both are killed after a grace
//     period). Only what the caller names (a state directory, a CA directory, a log file) is
//     kept.
//   - QEMU runs in the caller's process group with the caller's standard streams (so
//     -nographic and a terminal work); the vTPM runs in its own process group, so a
//     terminal's ^C reaches QEMU, not the vTPM, which is stopped once QEMU is gone. Both
//     get SIGTERM if this process dies first.
//   - The result is QEMU's exit status (128+N when QEMU died of signal N), 128+N when the
//     run itself was interrupted by signal N, 127 when QEMU could not be started, 1 for any
//     other failure before QEMU ran.
//   - It adds nothing to a QEMU command line that already has a TPM (ErrHasTPM), and no path
//     it hands to QEMU or vtpmd contains a comma (ErrBadPath).
package qemu
