# Developer workflow of causal-commit. The two commands a newcomer needs:
#   make demo   install and start the stack, build, run the processor on demo traffic, verify
#   make test   install and start the stack, lint, run every test
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

CARGO ?= cargo
STACK := scripts/stack.sh

.PHONY: help up down status reset build release lint test test-fast demo bench check-deploy

help:
	@echo "make demo    - start the stack, run the processor on demo intents, print a summary"
	@echo "make test    - start the stack, lint, run every test (what CI runs)"
	@echo "make up | down | status | reset  - the local Kafka, Redis and PostgreSQL"
	@echo "make bench   - benchmarks that print figures"
	@echo "make check-deploy - offline checks of deploy/ (alerts, dashboard, image, compose, Kubernetes)"

up:
	bash $(STACK) up

down:
	bash $(STACK) down

status:
	bash $(STACK) status

reset:
	bash $(STACK) reset

build:
	$(CARGO) build --all-targets

release:
	$(CARGO) build --release

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings

# Every test against the real services; lint first so warnings fail the run.
test: up lint
	$(CARGO) test --all-targets -- --nocapture 2>&1 | tee target/test.log; \
	  exit "$${PIPESTATUS[0]}"

demo: up release
	bash scripts/demo.sh

bench: up
	$(CARGO) bench

# Offline checks of deploy/: promtool/amtool, PromQL, hadolint, compose and Kubernetes schemas.
check-deploy:
	bash scripts/check-deploy.sh
