# mvps-provisioner. `make test` is what CI runs (.ci/run): lint, unit tests
# under -race, then the VM integration suite.

GO          ?= go
STATICCHECK ?= $(GO) run honnef.co/go/tools/cmd/staticcheck@v0.8.2
# Debian packages the host-side tests need (libnbd's tools; promtool, from
# prometheus, lints the metrics and tests the alert rules; podman, runc and
# skopeo load, run and inspect the image in make image-test); the VM harness
# installs its own.
HOST_PACKAGES := libnbd-bin prometheus podman runc skopeo

# The daemon's embedded default: the real engine when installed, otherwise
# the stand-in built here.
ENGINE ?= $(shell command -v mvps-te 2>/dev/null || echo $(CURDIR)/bin/mvps-te-dev)
VAR    := $(CURDIR)/var

.PHONY: fuzz all build install help test check deps lint unit rules integration run demo bench clean image image-lock image-test

all: build

# Every binary says what it is (--version, status, build_info): the release
# from git describe and the commit, stamped by the linker. Without git (a
# tarball) they fall back to what Go records, which may be nothing. OUT is
# where the binaries go.
VERSION  ?= $(shell git describe --tags --always --dirty 2>/dev/null)
REVISION ?= $(shell git rev-parse HEAD 2>/dev/null)$(shell git diff --quiet HEAD 2>/dev/null || echo -dirty)
OUT      ?= bin
LDFLAGS  := -X github.com/mvps-provisioner/mvps-provisioner/internal/version.version=$(VERSION) \
	-X github.com/mvps-provisioner/mvps-provisioner/internal/version.revision=$(REVISION)

build:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags "$(LDFLAGS)" -o $(OUT)/ ./cmd/...
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags "$(LDFLAGS)" -o $(OUT)/example-client ./examples/client

# The OCI image (docs/image.md): the binaries of IMAGE_CMDS that exist under
# cmd/, as make build stamps them, plus mke2fs, blkid and modprobe from the
# Debian packages pinned in deploy/image/debs.lock (fetched into
# .cache/debs), built from scratch by deploy/image into an oci-archive:
# podman load -i $(IMAGE). Every file's time and the image's created time
# are SOURCE_DATE_EPOCH, the commit's time by default: the same commit and
# packages give the same image digest.
IMAGE_CMDS        := mvps-provisioner mvps-sidecar mvps-csi mvps-te-dev
IMAGE_BINARIES     = $(foreach c,$(IMAGE_CMDS),$(if $(wildcard cmd/$(c)/*.go),$(c)))
IMAGE             ?= $(OUT)/mvps-provisioner-image.tar
IMAGE_REF         ?= localhost/mvps-provisioner:$(or $(VERSION),devel)
IMAGE_SOURCE      ?= https://github.com/mvps-provisioner/mvps-provisioner
SOURCE_DATE_EPOCH ?= $(shell git log -1 --format=%ct 2>/dev/null)

image: build
	bash deploy/image/debs.sh fetch .cache/debs
	$(GO) run ./deploy/image -o $(IMAGE) -bin-dir $(OUT) -binaries "$(IMAGE_BINARIES)" \
		-lock deploy/image/debs.lock -deb-dir .cache/debs -ref "$(IMAGE_REF)" \
		-version "$(VERSION)" -revision "$(REVISION)" -source "$(IMAGE_SOURCE)" -created "$(SOURCE_DATE_EPOCH)"

image-lock:
	bash deploy/image/debs.sh lock

image-test:
	MAKE="$(MAKE)" IMAGE_BINARIES="$(IMAGE_BINARIES)" bash deploy/image/test.sh

# make install [PREFIX=/usr/local] [DESTDIR=]: binaries in $(PREFIX)/bin, the
# unit, the modules-load.d and modprobe.d entries under $(PREFIX)/lib
# (systemd and kmod search /usr/local/lib and /usr/lib alike), the sample settings in /etc, kept if
# present. The installed unit's ExecStart points at $(PREFIX)/bin.
PREFIX  ?= /usr/local
DESTDIR ?=
BINDIR         = $(PREFIX)/bin
UNITDIR        = $(PREFIX)/lib/systemd/system
MODULESLOADDIR = $(PREFIX)/lib/modules-load.d
MODPROBEDIR    = $(PREFIX)/lib/modprobe.d
CONFDIR        = /etc/mvps-provisioner

install: build
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(UNITDIR) $(DESTDIR)$(MODULESLOADDIR) $(DESTDIR)$(MODPROBEDIR) $(DESTDIR)$(CONFDIR)/images
	install -m 0755 bin/mvps-provisioner bin/mvps-te-dev bin/mvps-sidecar $(DESTDIR)$(BINDIR)/
	sed 's|/usr/local/bin/|$(BINDIR)/|g' deploy/systemd/mvps-provisioner.service >$(DESTDIR)$(UNITDIR)/mvps-provisioner.service.tmp
	chmod 0644 $(DESTDIR)$(UNITDIR)/mvps-provisioner.service.tmp
	mv $(DESTDIR)$(UNITDIR)/mvps-provisioner.service.tmp $(DESTDIR)$(UNITDIR)/mvps-provisioner.service
	install -m 0644 deploy/modules-load.d/mvps-provisioner.conf $(DESTDIR)$(MODULESLOADDIR)/mvps-provisioner.conf
	install -m 0644 deploy/modprobe.d/mvps-provisioner.conf $(DESTDIR)$(MODPROBEDIR)/mvps-provisioner.conf
	@env=$(DESTDIR)$(CONFDIR)/mvps-provisioner.env; \
	if [ -e "$$env" ]; then echo "kept $$env (the sample is deploy/systemd/mvps-provisioner.env)"; \
	else sed 's|/usr/local/bin/|$(BINDIR)/|g' deploy/systemd/mvps-provisioner.env >"$$env.tmp" && chmod 0600 "$$env.tmp" && mv "$$env.tmp" "$$env" && echo "installed $$env"; fi

help:
	@echo "make targets:"
	@echo "  build        static binaries in bin/ (mvps-provisioner, mvps-te-dev, mvps-sidecar, example-client)"
	@echo "  install      build, then install binaries, systemd unit and sample settings (PREFIX=$(PREFIX), DESTDIR=)"
	@echo "  image        the OCI image, reproducibly, as an oci-archive: $(IMAGE) ($(IMAGE_REF)); docs/image.md"
	@echo "  image-lock   move deploy/image/debs.lock to Debian's current versions of its packages"
	@echo "  image-test   build the image twice (same digest?), then run its programs in podman"
	@echo "  help         this list"
	@echo "  test         what CI runs: deps, check, image-test, fuzz, integration, k8s-test"
	@echo "  check        lint, unit and rules: the fast first stage"
	@echo "  deps         install the Debian packages the host tests need ($(HOST_PACKAGES))"
	@echo "  lint         gofmt, go vet and staticcheck, with and without the vmtest tag"
	@echo "  unit         go test -race ./... on the host, and the systemd unit check"
	@echo "  rules        promtool check and test of the alert rules in deploy/prometheus"
	@echo "  fuzz         every fuzz target for FUZZTIME ($(FUZZTIME)) each"
	@echo "  integration  the VM integration suite (vmtest/vmrun) on each kernel of VM_KERNELS ($(VM_KERNELS))"
	@echo "  run          build and run the daemon here on the default engine (needs the nbd module)"
	@echo "  demo         the whole story (attach, write, detach, reattach, verify) in a VM"
	@echo "  k8s-test     tests against a real kube-apiserver (built once into ~/.cache/mvps-provisioner/k8s)"
	@echo "  bench        Go benchmarks, then the VM benchmark against nbd-client (BENCH_N=200); JSON in .cache/bench/"
	@echo "  clean        remove bin/, var/ and the VM output (rm -rf .cache drops the checkout's caches, ~1 GB; ~/.cache/mvps-provisioner holds the kernels and kube-apiserver)"

# The lint comes first, so that a lint error fails in seconds. The unit
# tests, the alert rules, the image's test, fuzzing and the tests against a
# real API server then run side by side (a good part of each is waiting, on
# timers or on other processes), each target's output shown whole once it
# is done; then the VM suites. The same as check, and the rest.
test: deps lint
	@$(MAKE) --no-print-directory -j4 --output-sync=target unit rules image-test fuzz k8s-test
	@$(MAKE) --no-print-directory integration

check: lint unit rules

# The alert rules of deploy/prometheus, checked and unit-tested (each alert
# firing and not firing) by promtool, which make deps installs (Debian's
# prometheus package).
rules:
	@command -v promtool >/dev/null || { echo "promtool is missing: run 'make deps' (Debian package prometheus)"; exit 1; }
	promtool check rules deploy/prometheus/mvps-provisioner.rules.yml
	cd deploy/prometheus && promtool test rules mvps-provisioner.rules.test.yml

deps:
	@missing=""; for p in $(HOST_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) mod tidy -diff
	# With the vmtest tag every file is checked: no file is left out by it.
	$(GO) vet -tags vmtest ./...
	# The Linux code keeps a small stub for other systems: keep it building.
	GOOS=darwin $(GO) vet ./...
	$(STATICCHECK) -tags vmtest ./...

unit:
	$(GO) test -race -count=1 ./...
	MAKE="$(MAKE)" bash deploy/systemd/check.sh

# Every fuzz target, briefly (FUZZTIME each), on top of its committed seed
# corpus, so that a regression a short fuzz finds fails CI. A count, not a
# duration: with a duration, Go before 1.27 can fail a target with "context
# deadline exceeded" when the time runs out mid-run (go.dev/issue/75804).
# 20000 runs take 1 to 8 s per target here.
FUZZTIME ?= 20000x
FUZZ_TARGETS := ./provision/protocol:FuzzParseRequest ./provision/imageconfig:FuzzParseImageConfig \
	./handshake:FuzzNegotiate ./internal/devengine:FuzzTransmission ./internal/devengine:FuzzHandshake \
	./internal/devengine:FuzzVerifyToken ./internal/devengine:FuzzClaims ./provision/lease:FuzzName
fuzz:
	@logs=$$(mktemp -d); trap 'rm -rf "$$logs"' EXIT; \
	for t in $(FUZZ_TARGETS); do pkg=$${t%%:*}; name=$${t##*:}; \
		echo "fuzz $$name ($$pkg, $(FUZZTIME))"; \
		$(GO) test -run '^$$' -fuzz "^$$name$$" -fuzztime $(FUZZTIME) $$pkg >"$$logs/$$name.log" 2>&1 || { cat "$$logs/$$name.log"; exit 1; }; \
	done

# The VM suite once per kernel, in turn: Debian 12's (what the CI machines run) and the newest
# Debian ships (trixie-backports, 7.x), whose NBD, netlink and mount code users run too. Each
# run ends with its own "vmtest: N passed, N failed" line; the target fails if any run failed.
# VM_KERNELS=bookworm (or VM_KERNEL_SUITE=...) runs one. promtool, when installed, goes into
# the guest to lint the daemon's metrics.
VM_KERNELS ?= $(or $(VM_KERNEL_SUITE),bookworm trixie-backports)
# The Lease test runs a real etcd and kube-apiserver inside the VM, next
# to the devices: kubetest/build.sh makes them; they want 2 CPUs and about
# 1 GiB, and half a minute to start under TCG, so that test runs once,
# apart from the rest: on the first kernel of VM_KERNELS, right after that
# kernel's suite (the shorter one), with its cache, while the other suite
# still runs. The kernels' suites run side by side (each VM uses one CPU
# under TCG), each with a cache of its own (.cache/vm/<suite>: binaries the
# other run cannot overwrite under it; the kernels are in the machine's
# kernel cache, see vmrun -h), their output shown in turn.
K8S_BIN := $(shell bash kubetest/build.sh --bin-dir)
LEASE_VM_TESTS := ^TestVMLease
VM_TEST_TIMEOUT ?= 900s
# What the kernels' suites build alike (the test binaries, the binaries in
# the guest) is compiled once first, so that the suites, started together,
# do not both compile it.
VM_TEST_PACKAGES = $(sort $(dir $(shell grep -rl --include='*_test.go' '^//go:build vmtest' . | grep -v '^./vmtest/bench/')))
integration: k8s-cache
	$(GO) build -o .cache/vmrun ./vmtest/vmrun
	CGO_ENABLED=0 $(GO) test -tags vmtest -count=1 -run '^$$' -exec /bin/true $(VM_TEST_PACKAGES) >/dev/null
	CGO_ENABLED=0 GOOS=linux GOARCH=amd64 $(GO) build -trimpath ./cmd/... ./examples/client ./vmtest/chaoscaller
	@mkdir -p .cache/integration; rm -f .cache/integration/leases.failed .cache/integration/leases.log; failed=""; pids=""; lk=$(firstword $(VM_KERNELS)); \
	for k in $(VM_KERNELS); do \
		( VM_KERNEL_SUITE=$$k VM_CACHE=$(CURDIR)/.cache/vm/$$k VM_TEST_SKIP='$(LEASE_VM_TESTS)' VM_TEST_TIMEOUT=$(VM_TEST_TIMEOUT) \
		VM_EXTRA_BINS="$(strip $(VM_EXTRA_BINS) $(shell command -v promtool 2>/dev/null))" \
			.cache/vmrun > .cache/integration/$$k.log 2>&1; rc=$$?; \
		if [ "$$k" = "$$lk" ]; then \
			VM_KERNEL_SUITE=$$k VM_CACHE=$(CURDIR)/.cache/vm/$$k VM_SMP=2 VM_MEM=3072 VM_TEST_TIMEOUT=$(VM_TEST_TIMEOUT) \
			VM_EXTRA_BINS="$(K8S_BIN)/etcd=/opt/k8s/bin/etcd $(K8S_BIN)/kube-apiserver=/opt/k8s/bin/kube-apiserver" \
				.cache/vmrun -run '$(LEASE_VM_TESTS)' ./vmtest > .cache/integration/leases.log 2>&1 || echo "$$k" > .cache/integration/leases.failed; \
		fi; exit $$rc ) & pids="$$pids $$!"; \
	done; \
	set -- $$pids; for k in $(VM_KERNELS); do \
		wait $$1 || failed="$$failed $$k"; shift; \
		echo "==== make integration: kernel suite $$k"; cat .cache/integration/$$k.log; \
	done; \
	echo "==== make integration: the Lease test, a real API server in the VM, kernel suite $$lk"; \
	cat .cache/integration/leases.log; \
	if [ -e .cache/integration/leases.failed ]; then failed="$$failed $$lk(leases)"; fi; \
	if [ -n "$$failed" ]; then \
		echo "==== make integration: what failed, again (the whole output is above)"; \
		for k in $(VM_KERNELS) leases; do grep -h -e 'vmrun: FAILED' -e 'vmrun:     |' -e 'failed without a failing test' -e 'vmrun: ERROR' \
			.cache/integration/$$k.log | sed "s/^/[$$k] /"; done; \
		echo "==== make integration: FAILED on kernel suite(s):$$failed"; exit 1; fi

run: build
	@if [ ! -e /sys/module/nbd ] && ! modprobe nbd 2>/dev/null; then \
		echo "this kernel has no nbd module, so nothing can be attached here: run 'make demo' to see the provisioner work in a VM"; exit 1; fi
	mkdir -p $(VAR)/images $(VAR)/buffer $(VAR)/run
	PROVISIONER_LISTEN_PATH=$${PROVISIONER_LISTEN_PATH:-$(VAR)/run/provisioner.sock} \
	IMAGE_CONFIG_DIRECTORY=$${IMAGE_CONFIG_DIRECTORY:-$(CURDIR)/examples/images} \
	PROVISIONER_ENGINE_BIN=$${PROVISIONER_ENGINE_BIN:-$(ENGINE)} \
	PROVISIONER_STATE_DIR=$${PROVISIONER_STATE_DIR:-$(VAR)/run/state} \
	MVPS_TE_IMAGE_STORE=$${MVPS_TE_IMAGE_STORE:-local} \
	MVPS_TE_IMAGE_STORE_LOCAL_PATH=$${MVPS_TE_IMAGE_STORE_LOCAL_PATH:-$(VAR)/images} \
	MVPS_TE_BUFFER_STORE_PATH=$${MVPS_TE_BUFFER_STORE_PATH:-$(VAR)/buffer} \
	bin/mvps-provisioner

demo:
	$(GO) build -o .cache/vmrun ./vmtest/vmrun
	.cache/vmrun -run '^TestDemo$$'

# Not part of make test: about 5 minutes of VM time (vmtest/bench.sh lists the knobs).
bench:
	GO="$(GO)" bash vmtest/bench.sh

clean:
	rm -rf bin var .cache/vmrun .cache/vm/out

# A real kube-apiserver and etcd, built from the Go module proxy into
# ~/.cache/mvps-provisioner/k8s/bin, which every checkout on the machine
# shares (about 10 min and 3 GB of build cache the first time on 2 cores;
# nothing to do afterwards), and the tests that need them. With
# MVPS_K8S_TESTS=1 those tests fail instead of skipping when the servers are
# missing.
.PHONY: k8s-cache k8s-test
k8s-cache:
	bash kubetest/build.sh

k8s-test: k8s-cache
	MVPS_K8S_BIN=$(K8S_BIN) MVPS_K8S_TESTS=1 $(GO) test -race -count=1 ./kubetest ./provision/configmap
