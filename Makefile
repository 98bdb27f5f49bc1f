# mvps-provisioner. `make test` is what CI runs (.ci/run): lint, unit tests
# under -race, then the VM integration suite.

GO          ?= go
STATICCHECK ?= $(GO) run honnef.co/go/tools/cmd/staticcheck@v0.8.2
# Debian packages the host-side tests need; the VM harness installs its own.
HOST_PACKAGES := libnbd-bin

# The daemon's embedded default: the real engine when installed, otherwise
# the stand-in built here.
ENGINE ?= $(shell command -v mvps-te 2>/dev/null || echo $(CURDIR)/bin/mvps-te-dev)
VAR    := $(CURDIR)/var

.PHONY: all build test deps lint unit integration run demo clean

all: build

build:
	CGO_ENABLED=0 $(GO) build -trimpath -o bin/ ./cmd/...
	CGO_ENABLED=0 $(GO) build -trimpath -o bin/example-client ./examples/client

test: deps lint unit integration

deps:
	@missing=""; for p in $(HOST_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	$(GO) vet -tags vmtest ./...
	$(STATICCHECK) ./...
	$(STATICCHECK) -tags vmtest ./...

unit:
	$(GO) test -race -count=1 ./...

integration:
	bash vmtest/run.sh

run: build
	@if [ ! -e /sys/module/nbd ] && ! modprobe nbd 2>/dev/null; then \
		echo "this kernel has no nbd module, so nothing can be attached here: run 'make demo' to see the provisioner work in a VM"; exit 1; fi
	mkdir -p $(VAR)/images $(VAR)/buffer $(VAR)/run
	PROVISIONER_LISTEN_PATH=$${PROVISIONER_LISTEN_PATH:-$(VAR)/run/provisioner.sock} \
	IMAGE_CONFIG_DIRECTORY=$${IMAGE_CONFIG_DIRECTORY:-$(CURDIR)/examples/images} \
	PROVISIONER_ENGINE_BIN=$${PROVISIONER_ENGINE_BIN:-$(ENGINE)} \
	MVPS_TE_IMAGE_STORE=$${MVPS_TE_IMAGE_STORE:-local} \
	MVPS_TE_IMAGE_STORE_LOCAL_PATH=$${MVPS_TE_IMAGE_STORE_LOCAL_PATH:-$(VAR)/images} \
	MVPS_TE_BUFFER_STORE_PATH=$${MVPS_TE_BUFFER_STORE_PATH:-$(VAR)/buffer} \
	bin/mvps-provisioner

demo:
	bash vmtest/run.sh -run '^TestDemo$$'

clean:
	rm -rf bin var vmtest/out

# A real kube-apiserver and etcd, built from the Go module proxy into
# .cache/k8s/bin (about 10 min and 3 GB of build cache the first time on 2
# cores; nothing to do afterwards), and the tests that need them. With
# MVPS_K8S_TESTS=1 those tests fail instead of skipping when the servers are
# missing.
.PHONY: k8s-cache k8s-test
k8s-cache:
	bash kubetest/build.sh

k8s-test: k8s-cache
	MVPS_K8S_TESTS=1 $(GO) test -race -count=1 ./kubetest ./provision/configmap
