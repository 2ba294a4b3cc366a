// Package libvirt plugs vtpmd into libvirt: the qemu hook (`vtpmd hook`), the domain XML it
// reads, the installer that makes vtpmd the host's swtpm (`vtpmd install`, `uninstall`), and
// a go-libvirt status client (`vtpmd status`). The hook records each VM in the registry of
// package manager/registry and runs external backends through package internal/proc; the
// commands' entry points (RunHook, ShowStatus, RunInstall, RunUninstall) take a typed request
// and print to the writers they are given.
//
// What it promises:
//
//   - ParseDomain reads untrusted domain XML (bounded size and depth, no DTDs or entities) into a
//     Domain with at most one vTPM and an optional vtpmd policy from <metadata>. It never panics;
//     anything it cannot vouch for is an error wrapping one of the sentinel errors below.
//   - The Hook never calls back into libvirt, returns within its start timeout, and writes only
//     into the registry directory, the configured state root and the socket directories that
//     lie under the configured socket roots (no symlinks, no "..", absolute paths only).
//   - For <backend type='external'> the Hook owns one `vtpmd socket` process per VM: started at
//     prepare (or reconnect when missing), stopped at release. For <backend type='emulator'>
//     libvirt itself runs vtpmd (through the swtpm links Install creates); the Hook only records.
//   - An external backend's `vtpmd socket` runs as the configured run_as user (tss unless the
//     configuration names another, root only when it says so) from its first instruction,
//     owns its state directory and nothing else: the hook creates the control socket (owned by
//     the qemu user, 0600) and the log and hands them on as descriptors.
//   - Registry records are replaced atomically under an exclusive lock (see manager/registry);
//     registry failures only warn: a VM never fails because bookkeeping did.
//   - As a migrate/restore filter the Hook prints the rewritten XML on stdout, or nothing when
//     nothing changed; rewriting touches only <source path='...'> attributes below <devices>.
//
// The vtpmd policy lives in the domain's <metadata> in the namespace PolicyNamespace:
//
//	<metadata>
//	  <vtpmd:policy xmlns:vtpmd="https://vtpmd.dev/xmlns/policy/1">
//	    <vtpmd:projection mode="summary" pcr="23"/>
//	    <vtpmd:state keep="no"/>
//	  </vtpmd:policy>
//	</metadata>
package libvirt
