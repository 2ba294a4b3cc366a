// Package atomicfile replaces a file so that a crash at any moment leaves either the old or the
// new content: write a temporary file beside it, fsync, rename over the target, fsync the
// directory. It is for small files written whole (the local CA's keys, certificates and serial
// counter, EK certificate files); TPM state goes through backend/store.
package atomicfile
