# Developer workflow of causal-commit. The two commands a newcomer needs:
#   make demo   install and start the stack, build, run the processor on demo traffic, verify
#   make test   install and start the stack, lint, run every test
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

CARGO ?= cargo
STACK := scripts/stack.sh
# Loads the stack's environment (ports, URLs, credentials, CA files) into the recipe's shell,
# honouring CC_*_PORT overrides, so cargo and the scripts reach the project's own services and
# the tests' `stack.sh stop|start` calls act on the same instances. The assignment makes a
# failing `env` stop the recipe (set -e), which `eval "$(...)"` alone would not.
STACK_ENV = stack_env="$$(bash $(STACK) env)"; eval "$$stack_env"

.PHONY: help up down status reset build release lint test test-fast demo bench check-deploy

help:
	@echo "make demo    - start the stack, run the processor on demo intents, print a summary"
	@echo "make test    - start the stack, lint, run every test (what CI runs)"
	@echo "make up | down | status | reset  - the project's own Kafka (PLAINTEXT + SASL_SSL), Redis"
	@echo "                  (plain + TLS) and PostgreSQL; ports from CC_*_PORT (scripts/stack.sh env)"
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
	$(STACK_ENV); \
	  $(CARGO) test --all-targets -- --nocapture 2>&1 | tee target/test.log; \
	  exit "$${PIPESTATUS[0]}"

# The binary reads its own configuration: point it at the stack through its overrides.
demo: up release
	$(STACK_ENV); \
	  export CAUSAL_COMMIT__KAFKA__BROKERS="$$CC_KAFKA_BROKERS" \
	    CAUSAL_COMMIT__REDIS__URL="$$CC_REDIS_URL" \
	    CAUSAL_COMMIT__POSTGRES__URL="$$CC_DATABASE_URL"; \
	  bash scripts/demo.sh

bench: up
	$(STACK_ENV); $(CARGO) bench

# Offline checks of deploy/: promtool/amtool, PromQL, hadolint, compose and Kubernetes schemas.
check-deploy:
	bash scripts/check-deploy.sh
