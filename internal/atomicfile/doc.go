// Package atomicfile replaces files so that a crash at any moment leaves either the old or the
// new content: write a temporary file beside the target, fsync it, rename it over the target,
// fsync the directory. Every whole-file replacement in vtpmd goes through it: TPM state blobs
// and linear store images (backend/store), the VM registry, the installer's files, the local
// CA's keys, certificates and serial counter, and EK certificate files.
//
// What it promises:
//
//   - When Write returns nil the new content is durable (unless Options.NoFsync, or
//     Options.NoDirSync until the caller's SyncDir). When it returns an error the target is
//     untouched and the temporary file is gone; errors name the file and the failed step, and
//     ErrCreateTemp, ErrCannotKeep and ErrNotRegular mark failures that changed nothing and
//     that callers may want to handle (the linear store then writes in place).
//   - The temporary file is opened O_NOFOLLOW: a symbolic link planted at its name is refused.
//   - New files get the narrowest mode asked for: Options.Perm minus the umask, or exactly
//     Perm, or what the replaced file had (Options.Keep).
//   - No more system calls than the work needs: a state blob replacement is open, write,
//     fsync, close, rename (plus fchmod for an exact mode), and the directory fsync can be
//     shared by a batch of replacements (Options.NoDirSync, then SyncDir).
package atomicfile
