package archtest

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"os/exec"
	"slices"
	"sort"
	"strings"
	"testing"
)

const module = "github.com/vtpmd/vtpmd"

// allowed lists, for every package outside internal/, the vtpmd packages it may import besides
// internal/… (which anyone may import). Arrows point one way: cmd → libvirt → manager →
// backend/setup → backend → socket, emulator. A new package must be added here on purpose.
var allowed = map[string][]string{
	"emulator":         {},
	"emulator/libtpms": {"emulator"},
	"socket":           {},
	"socket/ioctl":     {"socket"},

	"backend/blob":            {},
	"backend/store":           {"backend/blob", "emulator"},
	"backend/seam":            {"backend/blob"},
	"backend":                 {"backend/blob", "backend/seam", "backend/store", "emulator", "emulator/libtpms", "socket"},
	"backend/localca":         {},
	"backend/setup/provision": {"backend/localca"},
	"backend/setup": {"backend", "backend/blob", "backend/seam", "backend/store", "backend/localca", "backend/setup/provision",
		"emulator", "emulator/libtpms"},
	// vtpmd run: manufactures in-process, serves from a `vtpmd socket` child, runs QEMU
	"backend/qemu": {"backend/setup", "backend/setup/provision", "backend/localca"},

	"manager/registry":   {},
	"manager/hwtpm":      {},
	"manager/attest":     {"manager/eventlog", "manager/hwtpm", "backend/localca"},
	"manager/eventlog":   {},
	"manager/projection": {"manager/eventlog"},
	"manager": {"backend/seam", "backend/blob", "backend/store", "backend/localca", "emulator", "manager/attest", "manager/hwtpm", "manager/registry",
		"manager/eventlog", "manager/projection"},

	"libvirt": {"manager", "manager/registry"},

	// the CLI, and the programs beside the product, may import anything but each other
	"cmd/vtpmd":         {"*"},
	"bench":             {"*"},
	"bench/floor":       {"*"},
	"integration":       {"*"},
	"integration/guest": {"*"},
}

// neverImported are the packages nothing may import.
var neverImported = []string{"cmd/", "bench", "integration"}

// needLibtpms are the packages that may depend on libtpms (cgo), directly or not; every other
// package builds and vets with CGO_ENABLED=0.
var needLibtpms = []string{"emulator/libtpms", "backend", "backend/setup", "backend/qemu", "cmd/vtpmd", "bench", "bench/floor", "integration"}

type pkg struct {
	ImportPath string
	Imports    []string
	Deps       []string
	CgoFiles   []string
}

// graph lists vtpmd's packages (integration tests included) with module-relative names.
func graph(t *testing.T) []pkg {
	t.Helper()
	cmd := exec.Command("go", "list", "-e", "-tags", "integration", "-json", module+"/...")
	var out, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("go list: %v\n%s", err, stderr.String())
	}
	var pkgs []pkg
	dec := json.NewDecoder(&out)
	for {
		var p pkg
		if err := dec.Decode(&p); err == io.EOF {
			break
		} else if err != nil {
			t.Fatal(err)
		}
		p.ImportPath = rel(p.ImportPath)
		p.Imports, p.Deps = ours(p.Imports), ours(p.Deps)
		pkgs = append(pkgs, p)
	}
	if len(pkgs) < 10 {
		t.Fatalf("go list found only %d packages", len(pkgs))
	}
	return pkgs
}

func rel(path string) string { return strings.TrimPrefix(strings.TrimPrefix(path, module), "/") }

func ours(paths []string) []string {
	var r []string
	for _, p := range paths {
		if p == module || strings.HasPrefix(p, module+"/") {
			r = append(r, rel(p))
		}
	}
	return r
}

// violations checks the import graph against the rules; each string is one broken rule.
func violations(pkgs []pkg) []string {
	var v []string
	for _, p := range pkgs {
		internal := strings.HasPrefix(p.ImportPath, "internal/")
		rules, listed := allowed[p.ImportPath]
		if !internal && !listed {
			v = append(v, fmt.Sprintf("%s is not in the architecture map (internal/archtest)", p.ImportPath))
		}
		for _, imp := range p.Imports {
			switch {
			case slices.ContainsFunc(neverImported, func(n string) bool { return imp == n || strings.HasPrefix(imp, n) }):
				v = append(v, fmt.Sprintf("%s imports %s, which nothing may import", p.ImportPath, imp))
			case internal && !strings.HasPrefix(imp, "internal/"):
				v = append(v, fmt.Sprintf("%s imports %s: internal/… packages are leaves", p.ImportPath, imp))
			case !internal && !strings.HasPrefix(imp, "internal/") && !slices.Contains(rules, "*") && !slices.Contains(rules, imp):
				v = append(v, fmt.Sprintf("%s imports %s: not an allowed arrow", p.ImportPath, imp))
			}
		}
		if len(p.CgoFiles) > 0 && p.ImportPath != "emulator/libtpms" {
			v = append(v, fmt.Sprintf("%s uses cgo: only emulator/libtpms may", p.ImportPath))
		}
		if !slices.Contains(needLibtpms, p.ImportPath) && (p.ImportPath == "emulator/libtpms" || slices.Contains(p.Deps, "emulator/libtpms")) {
			if p.ImportPath != "emulator/libtpms" {
				v = append(v, fmt.Sprintf("%s depends on emulator/libtpms (cgo): it must build without cgo", p.ImportPath))
			}
		}
	}
	sort.Strings(v)
	return v
}

func TestArchitecture(t *testing.T) {
	for _, msg := range violations(graph(t)) {
		t.Error(msg)
	}
}

// TestRulesBite: the checker refuses each kind of broken arrow.
func TestRulesBite(t *testing.T) {
	tests := []struct {
		name string
		p    pkg
		want string
	}{
		{"upward arrow", pkg{ImportPath: "socket", Imports: []string{"backend"}}, "not an allowed arrow"},
		{"import of cmd", pkg{ImportPath: "libvirt", Imports: []string{"cmd/vtpmd"}}, "nothing may import"},
		{"internal importing outward", pkg{ImportPath: "internal/opts", Imports: []string{"socket"}}, "leaves"},
		{"unlisted package", pkg{ImportPath: "newthing"}, "not in the architecture map"},
		{"cgo outside the engine", pkg{ImportPath: "socket", CgoFiles: []string{"x.go"}}, "uses cgo"},
		{"libtpms spreading", pkg{ImportPath: "backend/store", Deps: []string{"emulator/libtpms"}}, "must build without cgo"},
	}
	for _, tt := range tests {
		v := violations([]pkg{tt.p})
		if len(v) != 1 || !strings.Contains(v[0], tt.want) {
			t.Errorf("%s: violations = %q, want one with %q", tt.name, v, tt.want)
		}
	}
}

// TestVetWithoutCgo: every package that does not need libtpms builds and vets with
// CGO_ENABLED=0 (so it is testable on a machine without libtpms-dev).
func TestVetWithoutCgo(t *testing.T) {
	if testing.Short() {
		t.Skip("runs go vet on most of the module")
	}
	var paths []string
	for _, p := range graph(t) {
		if !slices.Contains(needLibtpms, p.ImportPath) {
			paths = append(paths, module+"/"+p.ImportPath)
		}
	}
	cmd := exec.Command("go", append([]string{"vet"}, paths...)...)
	cmd.Env = append(cmd.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("CGO_ENABLED=0 go vet %s: %v\n%s", strings.Join(paths, " "), err, out)
	}
	t.Logf("CGO_ENABLED=0 go vet: %d packages", len(paths))
}
