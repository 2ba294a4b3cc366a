// Package uuidstr recognises UUIDs in their canonical text form (8-4-4-4-12 hexadecimal
// digits), as libvirt writes a domain's UUID. It replaces the regular expressions that each
// package compiled at start-up: every vTPM process paid for them before serving a command.
package uuidstr
