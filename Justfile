# vtpmd — `just demo` runs a VM with a vTPM; `just test` runs every test. Both install what they need.
set shell := ["bash", "-euo", "pipefail", "-c"]

staticcheck := "honnef.co/go/tools/cmd/staticcheck@v0.8.2"

# urfave/cli without its man/markdown generators: their package init (blackfriday) costs
# about 1.5 ms of every vtpmd start. Sub-processes (go build in tests and bench) inherit it.
export GOFLAGS := "-tags=urfave_cli_no_docs"

default: build

# install Debian packages (libtpms-dev, swtpm, qemu, ovmf, tpm2-tools, libvirt ...), idempotent
deps:
    scripts/deps.sh

# build the one binary: bin/vtpmd
build: deps
    go build -o bin/vtpmd ./cmd/vtpmd

# gofmt, go vet, staticcheck
lint: deps
    test -z "$(gofmt -l $(git ls-files '*.go'))" || { gofmt -l $(git ls-files '*.go'); exit 1; }
    go vet ./...
    go vet -tags integration ./integration/...
    go run {{staticcheck}} ./...

# unit tests (no VMs)
unit: deps
    go test ./...

# every fuzz target briefly (just fuzz 60s for the long run)
fuzz time="60s": deps
    scripts/fuzz.sh {{time}}

# QEMU, swtpm, tpm2-tools, libvirt and crash tests (real parts)
integration: deps
    go test -tags integration -p 1 -timeout 80m -v ./integration/...

# everything CI runs
test: lint unit
    scripts/fuzz.sh 5s
    go test -tags integration -p 1 -timeout 80m ./integration/...

# vtpmd vs Debian swtpm side by side; writes docs/benchmarks.md
bench: deps
    go run ./bench -out docs/benchmarks.md -readme README.md

# only the density section (1, 10, 100 instances side by side with swtpm); prints it
bench-density: deps
    go run ./bench -only density

# 1,000 idle vtpmd instances (then 1,000 swtpm if memory allows): their total memory; prints it
bench-1000: deps
    go run ./bench -only density-1000

# boot a small Linux VM under QEMU with a vTPM served by vtpmd and show what it saw
demo: build
    scripts/demo.sh
