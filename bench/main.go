// Command bench measures vtpmd side by side with Debian's swtpm in one run and writes the
// results, as ratios, to docs/benchmarks.md: start-up to first answer, command round trips over
// the data socket, memory per instance, state-blob transfer, durable NV writes, and the same
// commands with libtpms called in-process as the floor, manufacturing a vTPM (vtpmd setup
// against swtpm_setup), and vtpmd with the host manager (vtpmd manager on a stand-in hardware
// TPM) against vtpmd without it and swtpm, with the manager's own costs. It is run by
// `just bench`.
package main

import (
	"flag"
	"fmt"
	"log"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
)

func main() {
	if code, inBench := underReaper(); !inBench {
		os.Exit(code)
	}
	vtpmd := flag.String("vtpmd", "", "vtpmd binary (default: build ./cmd/vtpmd)")
	swtpm := flag.String("swtpm", "/usr/bin/swtpm", "reference swtpm binary (Debian's; a swtpm on PATH may be a link to vtpmd)")
	out := flag.String("out", "docs/benchmarks.md", "report file")
	readme := flag.String("readme", "", "also replace the summary table between the bench markers in this file (README.md)")
	iters := flag.Int("n", 200, "iterations per latency measurement")
	instances := flag.String("instances", "1,10,100", "instance counts for the memory measurement")
	echo := flag.String("echo", "", "internal: serve one unix-socket echo connection at this path (the Go floor)")
	mgrClient := flag.String("manager-client", "", "internal: time a vTPM's requests to the manager on this socket")
	tpmstate := flag.String("tpmstate", "", "internal: with -manager-client, the vTPM's state (dir=PATH), as vtpmd's --tpmstate")
	only := flag.String("only", "", "run only this section (migration, density, density-1000) and print it; the report files are left as they are")
	flag.Parse()
	if *echo != "" {
		if err := serveEcho(*echo); err != nil {
			log.Fatal(err)
		}
		return
	}
	if *mgrClient != "" {
		if err := managerClient(*mgrClient, *tpmstate, *iters); err != nil {
			log.Fatal(err)
		}
		return
	}
	if err := bench(*vtpmd, *swtpm, *out, *readme, *only, *iters, parseCounts(*instances)); err != nil {
		log.Fatal(err)
	}
}

// bench runs every measurement in a temporary directory, removed afterwards whatever happened
// (log.Fatal would skip the deferred removal).
func bench(vtpmd, swtpm, out, readme, only string, iters int, counts []int) error {
	work, err := os.MkdirTemp("", "vtpmd-bench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(work)
	if vtpmd == "" {
		vtpmd = filepath.Join(work, "vtpmd")
		cmd := exec.Command("go", "build", "-o", vtpmd, "./cmd/vtpmd")
		cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
		if err := cmd.Run(); err != nil {
			return fmt.Errorf("build vtpmd: %w", err)
		}
	}
	swPath, err := exec.LookPath(swtpm)
	if err != nil {
		return fmt.Errorf("reference swtpm not found: %w (install Debian's swtpm)", err)
	}
	r := &run{work: work, iters: iters, impls: []impl{
		// --manager none: a host manager (its default socket) must not serve the bench's vTPMs
		{name: "vtpmd", bin: vtpmd, args: []string{"socket", "--manager", "none"}},
		{name: "swtpm", bin: swPath, args: []string{"socket"}},
	}}
	sections := map[string]func() (string, error){"migration": r.migrationSection,
		"density": func() (string, error) { return r.densitySection(counts) }, "density-1000": r.idle1000Section,
		// one instance under sustained mixed load, alone (a part of density)
		"mixed": func() (string, error) {
			golden, err := r.goldenState()
			if err != nil {
				return "", err
			}
			return r.mixedLoadMemory(golden)
		}}
	if only != "" {
		f, ok := sections[only]
		if !ok {
			return fmt.Errorf("-only %q: no such section (%s)", only, strings.Join(sortedKeys(sections), ", "))
		}
		report, err := f()
		if err != nil {
			return err
		}
		fmt.Print(report)
		for _, s := range r.summary {
			fmt.Printf("summary: %s | %s | %s | %s\n", s[0], s[1], s[2], s[3])
		}
		return nil
	}
	report, err := r.all(counts)
	if err != nil {
		return err
	}
	if err := os.WriteFile(out, []byte(report), 0o644); err != nil {
		return err
	}
	if readme != "" {
		if err := updateReadme(readme, r.summary); err != nil {
			return err
		}
	}
	fmt.Print(report)
	return nil
}

func parseCounts(s string) []int {
	var out []int
	for _, part := range strings.Split(s, ",") {
		if n, err := strconv.Atoi(strings.TrimSpace(part)); err == nil && n > 0 {
			out = append(out, n)
		}
	}
	return out
}

// Markers around the generated table in README.md.
const (
	readmeStart = "<!-- bench:start (written by just bench) -->"
	readmeEnd   = "<!-- bench:end -->"
)

// updateReadme replaces the table between the markers with the summary of this run.
func updateReadme(path string, rows [][4]string) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	s := string(b)
	i, j := strings.Index(s, readmeStart), strings.Index(s, readmeEnd)
	if i < 0 || j < i {
		return fmt.Errorf("%s: no %q ... %q markers", path, readmeStart, readmeEnd)
	}
	var t strings.Builder
	t.WriteString(readmeStart + "\n\n| measure (median) | vtpmd | Debian swtpm | vtpmd / swtpm |\n|---|---|---|---|\n")
	for _, r := range rows {
		fmt.Fprintf(&t, "| %s | %s | %s | %s |\n", r[0], r[1], r[2], r[3])
	}
	t.WriteString("\n")
	return os.WriteFile(path, []byte(s[:i]+t.String()+s[j:]), 0o644)
}
