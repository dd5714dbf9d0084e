# baton: see README.md. The two set-up commands are `make demo` and `make test`.
GO      ?= go
BIN     ?= bin
BINARIES = baton restart httpd sdhttpd

.PHONY: all build demo test lint fuzz bench bench-scale generate check-generate clean

all: build

# restart is built without cgo: a static binary needs no dynamic loader
# and starts no cgo threads, and every restart's round trip pays its
# start and exit.
build:
	@mkdir -p $(BIN)
	$(GO) build -o $(BIN)/ ./cmd/baton ./examples/httpd ./examples/sdhttpd ./examples/udpecho ./internal/testkit/unmodified
	CGO_ENABLED=0 $(GO) build -o $(BIN)/ ./cmd/restart

# Runs the bundled example server under baton, drives HTTP load (and, as
# root, long-lived HTTP/3 connections) at it, restarts it several times
# and prints what happened.
demo: build
	$(GO) run ./demo -bin $(BIN)

# The whole suite: vet, unit tests (with the race detector) and the
# end-to-end tests. E2E tests need root for network namespaces; under
# CI=true they fail instead of skipping.
test: lint
	$(GO) test -race -count=1 -timeout 10m $$($(GO) list ./... | grep -v /e2e)
	$(GO) test -count=1 -timeout 20m ./e2e/

lint:
	@test -z "$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go'))" || { gofmt -l .; echo "gofmt needed"; exit 1; }
	$(GO) vet ./...
	@$(GO) mod tidy -diff || { echo "go.mod/go.sum are not tidy: run go mod tidy and commit"; exit 1; }
	@if command -v staticcheck >/dev/null 2>&1; then staticcheck ./...; \
	 elif [ -x "$$($(GO) env GOPATH)/bin/staticcheck" ]; then "$$($(GO) env GOPATH)/bin/staticcheck" ./...; \
	 elif [ "$$CI" = true ]; then echo "staticcheck not installed and CI=true: .ci/run installs it"; exit 1; \
	 else echo "staticcheck not installed (go install honnef.co/go/tools/cmd/staticcheck@v0.8.2); skipping"; fi

# BPF C -> objects and Go bindings (needs clang, llvm, libbpf-dev), then
# internal/contract's limits from the objects' BTF. The objects are
# committed so that a plain build needs no clang.
generate:
	$(GO) generate ./internal/bpf/ ./internal/contract/

# Fails if the committed BPF objects, or the limits generated from them,
# differ from a fresh build of the C.
check-generate: generate
	git diff --exit-code -- internal/bpf/ internal/contract/ || { echo "internal/bpf/, internal/contract/: committed generated files are stale: run make generate and commit"; exit 1; }

fuzz:
	$(GO) test -run=XXX -fuzz=FuzzDecodeRequest -fuzztime=60s ./internal/control/

# Figures for BENCHMARKS.md; needs root (runs in its own network namespace).
bench: build
	$(GO) run ./bench -bin $(BIN) -out BENCHMARKS.md

# Restarts at scale (not part of `make bench`, not in CI; needs root, about
# 30 minutes): 10,000 HTTP/3 and 50,000 HTTP/1.1 connections across a
# restart and a supervisor upgrade, every generation slot taken, and the
# supervisor's memory over 10,000 restarts. Smaller: add e.g.
# SCALE_FLAGS='-scale-quic 1000 -scale-tcp 5000 -scale-restarts 1000'.
bench-scale: build
	$(GO) run ./bench -bin $(BIN) -only scale -scale-steps 1000:5000,2500:10000,5000:15000 -out BENCHMARKS.md $(SCALE_FLAGS)

clean:
	rm -rf $(BIN)
