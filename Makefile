# HetLoRA: images, linting and the local kind cluster. Run `make help` for the targets.
#
# Image tags come from pyproject.toml's version (IMAGE:VERSION, IMAGE:VERSION-cuda) and, for MinIO,
# from scripts/setup.sh's MINIO_VERSION, so the manifests, the config default
# (KubeflowConfig.image) and the built images agree.

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

VERSION       := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
MINIO_VERSION := $(shell sed -n 's/^MINIO_VERSION="\(.*\)"/\1/p' scripts/setup.sh)
IMAGE         ?= ghcr.io/hetlora/hetlora
MINIO_IMAGE   ?= ghcr.io/hetlora/minio
DOCKER        ?= docker
VENV          ?= .venv
PYTHON        ?= $(VENV)/bin/python
HETLORA_CACHE ?= $(HOME)/.cache/hetlora
KUSTOMIZE     ?= $(HETLORA_CACHE)/bin/kustomize

CPU_TAG   := $(IMAGE):$(VERSION)
CUDA_TAG  := $(IMAGE):$(VERSION)-cuda
MINIO_TAG := $(MINIO_IMAGE):$(MINIO_VERSION)

.PHONY: help images images-kind image-cpu image-cuda image-minio image-names lock \
        lint lint-docker lint-shell lint-manifests test-deploy kind-up kind-down check-docker

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

check-docker:
	@command -v $(DOCKER) >/dev/null || { echo "make: $(DOCKER) not found: images need a Docker engine" >&2; exit 1; }

images: image-cpu image-cuda image-minio ## build all images, tagged with the package version

images-kind: image-cpu image-minio ## the images a CPU-only kind cluster needs

image-cpu: check-docker ## CPU component image (IMAGE:VERSION)
	DOCKER_BUILDKIT=1 $(DOCKER) build -f images/Dockerfile --build-arg VERSION=$(VERSION) -t $(CPU_TAG) .

image-cuda: check-docker ## CUDA component image (IMAGE:VERSION-cuda)
	DOCKER_BUILDKIT=1 $(DOCKER) build -f images/Dockerfile.cuda --build-arg VERSION=$(VERSION) -t $(CUDA_TAG) .

image-minio: check-docker ## MinIO built from its Go module (MINIO_IMAGE:MINIO_VERSION)
	DOCKER_BUILDKIT=1 $(DOCKER) build -f images/Dockerfile.minio --build-arg MINIO_VERSION=$(MINIO_VERSION) -t $(MINIO_TAG) .

image-names: ## print the image references, one per line (cpu, cuda, minio)
	@printf '%s\n' $(CPU_TAG) $(CUDA_TAG) $(MINIO_TAG)

lock: ## rewrite images/*.lock from the venv
	$(PYTHON) images/lock.py

lint: lint-docker lint-shell lint-manifests ## hadolint, shellcheck, kustomize build + schema validation

lint-docker: ## hadolint the Dockerfiles
	$(VENV)/bin/hadolint images/Dockerfile images/Dockerfile.cuda images/Dockerfile.minio

lint-shell: ## shellcheck the scripts
	$(VENV)/bin/shellcheck scripts/*.sh images/*.sh

lint-manifests: ## kustomize build every overlay and validate it strictly
	$(PYTHON) -m pytest -q tests/test_manifests.py

test-deploy: ## the deployment and monitoring tests (real Prometheus + Pushgateway)
	$(PYTHON) -m pytest -q tests/test_metrics.py tests/test_dashboard.py tests/test_manifests.py \
		tests/test_images.py tests/test_scripts.py

kind-up: ## create the kind cluster, install KFP + monitoring, deploy (needs Docker, kind, kubectl, helm)
	scripts/kind-up.sh

kind-down: ## delete the kind cluster
	scripts/kind-down.sh
