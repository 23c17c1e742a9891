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

.PHONY: help up down status reset build release lint test test-fast demo bench bench-extras \
	kstreams-peer check-deploy chaos

help:
	@echo "make demo    - start the stack, run the processor on demo intents, print a summary"
	@echo "make test    - start the stack, lint, run every test (what CI runs)"
	@echo "make up | down | status | reset  - the project's own Kafka (PLAINTEXT + SASL_SSL), Redis"
	@echo "                  (plain + TLS) and PostgreSQL; ports from CC_*_PORT (scripts/stack.sh env)"
	@echo "make bench   - passthrough, full, fallback and Kafka Streams side by side (BENCH_ARGS=--help)"
	@echo "make bench-extras - the same, plus two instances of the group and 1,000,000 contacts"
	@echo "make chaos   - faults combined at random for CC_CHAOS_SECS (600) against two instances, then verify"
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
	$(CARGO) clippy --all-targets --features failpoints -- -D warnings

# Every test against the real services; lint and the offline deploy checks first (promtool
# test rules, amtool routing, the dashboard's PromQL, manifests; seconds when warm), so a
# warning or a broken alert fails the run before the long part.
test: up lint check-deploy
	bash scripts/stack.sh prune-tests
	$(STACK_ENV); \
	  $(CARGO) test --all-targets --features failpoints -- --nocapture 2>&1 | tee target/test.log; \
	  exit "$${PIPESTATUS[0]}"

# The binary reads its own configuration: point it at the stack through its overrides.
demo: up release
	$(STACK_ENV); \
	  export CAUSAL_COMMIT__KAFKA__BROKERS="$$CC_KAFKA_BROKERS" \
	    CAUSAL_COMMIT__REDIS__URL="$$CC_REDIS_URL" \
	    CAUSAL_COMMIT__POSTGRES__URL="$$CC_DATABASE_URL"; \
	  bash scripts/demo.sh

# The end-to-end benchmark (benches/e2e.rs): the same preloaded input through the passthrough
# ceiling, the full product (Redis healthy, then on the PostgreSQL fallback) and the Kafka Streams
# peer, one at a time; prints a table, writes target/bench/report.json. Sizes and switches:
#   make bench BENCH_ARGS="--intents 20000 --consumers full,kafka-streams"   (--help lists them)
# The pure sequencer has its own: cargo bench --bench sequencer
BENCH_ARGS ?=
bench: up release kstreams-peer
	$(STACK_ENV); $(CARGO) bench --bench e2e -- $(BENCH_ARGS)

# The same, plus the full backlog with two instances of the group on the box, and the peak RSS
# of one instance that has seen 1,000,000 contacts (longer).
bench-extras: up release kstreams-peer
	$(STACK_ENV); $(CARGO) bench --bench e2e -- --scale-out --rss-contacts 1000000 $(BENCH_ARGS)

# The randomized failure test (tests/integration/chaos.rs) for longer than its 40-s profile in
# `make test`: CC_CHAOS_SECS (default 600), CC_CHAOS_SEED to replay a schedule, and the broker
# stopped and started among the faults (CC_CHAOS_BROKER=0 leaves it alone; the 40-s profile in
# `make test` does, a broker restart test of its own runs there).
CC_CHAOS_SECS ?= 600
CC_CHAOS_BROKER ?= 1
chaos: up
	$(STACK_ENV); CC_CHAOS_SECS=$(CC_CHAOS_SECS) CC_CHAOS_BROKER=$(CC_CHAOS_BROKER) \
	  $(CARGO) test --features failpoints --test integration chaos:: -- --nocapture

# The Kafka Streams peer as one runnable jar (Maven; offline once ~/.m2 holds its dependencies).
PEER_DIR := bench/peers/kafka-streams
PEER_JAR := $(PEER_DIR)/target/causal-commit-kstreams.jar
kstreams-peer: $(PEER_JAR)

$(PEER_JAR): $(PEER_DIR)/pom.xml proto/causal_commit.proto $(shell find $(PEER_DIR)/src -type f)
	mvn -q -B -Dstyle.color=never -f $(PEER_DIR)/pom.xml package

# Offline checks of deploy/: promtool/amtool, PromQL, hadolint, compose and Kubernetes schemas.
check-deploy:
	bash scripts/check-deploy.sh
