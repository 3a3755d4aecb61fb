# SpeedMimi's Makefile: thin wrappers over cargo and `cargo xtask`, for operators who expect `make`.
# `make help` lists the targets. The xtask commands install what the eBPF build needs when missing.

CARGO   ?= cargo
PREFIX  ?= /usr/local
DESTDIR ?=
ENGINE  ?= $(shell command -v podman 2>/dev/null || command -v docker 2>/dev/null)
IMAGE   ?= speedmimi:latest
PROD    := target/prod/speedmimi

.PHONY: help build build-prod test bench test-million install install-dry-run tune-system docker-build docker-run

help:
	@echo "build          eBPF object and the daemon (release profile)"
	@echo "build-prod     the same with the prod profile (fat LTO, one codegen unit): $(PROD)"
	@echo "test           the whole test suite (cargo xtask test; eBPF tests need root)"
	@echo "bench          cargo xtask bench http: SpeedMimi beside HAProxy and nginx (root)"
	@echo "test-million   cargo xtask bench scale: idle WebSocket flows ramped through SpeedMimi, HAProxy, nginx (root)"
	@echo "install        build-prod, then deploy/install.sh into $(DESTDIR)$(PREFIX) and /etc (root)"
	@echo "install-dry-run  what install would do, changing nothing"
	@echo "tune-system    speedmimi tune --apply: kernel settings for a busy load balancer (root)"
	@echo "docker-build   the container image $(IMAGE) with $(notdir $(ENGINE)) (deploy/Containerfile)"
	@echo "docker-run     run that image with the host network and the capabilities eBPF needs"

build:
	$(CARGO) xtask build-ebpf
	$(CARGO) build --release -p speedmimi

build-prod:
	$(CARGO) xtask build-ebpf
	$(CARGO) build --profile prod -p speedmimi

test:
	$(CARGO) xtask test

bench:
	$(CARGO) xtask bench http

# The name the original project used; what one process here holds is ~9,900 flows (20,000 open files).
test-million:
	$(CARGO) xtask bench scale

install: build-prod
	deploy/install.sh --binary $(PROD) --prefix $(PREFIX) $(if $(DESTDIR),--destdir $(DESTDIR))

install-dry-run: build-prod
	deploy/install.sh --binary $(PROD) --prefix $(PREFIX) $(if $(DESTDIR),--destdir $(DESTDIR)) --dry-run

tune-system: build
	target/release/speedmimi tune --apply

docker-build:
	@test -n "$(ENGINE)" || { echo "neither podman nor docker is installed (apt-get install podman)"; exit 2; }
	$(ENGINE) build -t $(IMAGE) -f deploy/Containerfile .

docker-run:
	@test -n "$(ENGINE)" || { echo "neither podman nor docker is installed (apt-get install podman)"; exit 2; }
	$(ENGINE) run --rm --name speedmimi --network host \
		--cap-drop all --cap-add BPF --cap-add NET_ADMIN --cap-add PERFMON --cap-add NET_BIND_SERVICE \
		-v $(CURDIR)/configs/config.yaml:/etc/speedmimi/config.yaml:ro $(IMAGE)
