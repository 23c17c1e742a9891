# Developer workflow of causal-commit. The two commands a newcomer needs:
#   make demo   install and start the stack, build, run the processor on demo traffic, verify
#   make test   install and start the stack, lint, run every test
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

CARGO ?= cargo
STACK := scripts/stack.sh

.PHONY: help up down status reset build release lint test test-fast demo bench bench-extras kstreams-peer

help:
	@echo "make demo    - start the stack, run the processor on demo intents, print a summary"
	@echo "make test    - start the stack, lint, run every test (what CI runs)"
	@echo "make up | down | status | reset  - the local Kafka, Redis and PostgreSQL"
	@echo "make bench   - passthrough, full, fallback and Kafka Streams side by side (BENCH_ARGS=--help)"
	@echo "make bench-extras - the same, plus two instances of the group and 1,000,000 contacts"

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

# The end-to-end benchmark (benches/e2e.rs): the same preloaded input through the passthrough
# ceiling, the full product (Redis healthy, then on the PostgreSQL fallback) and the Kafka Streams
# peer, one at a time; prints a table, writes target/bench/report.json. Sizes and switches:
#   make bench BENCH_ARGS="--intents 20000 --consumers full,kafka-streams"   (--help lists them)
# The pure sequencer has its own: cargo bench --bench sequencer
BENCH_ARGS ?=
bench: up release kstreams-peer
	$(CARGO) bench --bench e2e -- $(BENCH_ARGS)

# The same, plus the full backlog with two instances of the group on the box, and the peak RSS
# of one instance that has seen 1,000,000 contacts (longer).
bench-extras: up release kstreams-peer
	$(CARGO) bench --bench e2e -- --scale-out --rss-contacts 1000000 $(BENCH_ARGS)

# The Kafka Streams peer as one runnable jar (Maven; offline once ~/.m2 holds its dependencies).
PEER_DIR := bench/peers/kafka-streams
PEER_JAR := $(PEER_DIR)/target/causal-commit-kstreams.jar
kstreams-peer: $(PEER_JAR)

$(PEER_JAR): $(PEER_DIR)/pom.xml proto/causal_commit.proto $(shell find $(PEER_DIR)/src -type f)
	mvn -q -B -Dstyle.color=never -f $(PEER_DIR)/pom.xml package
