#!/usr/bin/env bash
# The test command: start every service the tests need, then run the whole suite (unit
# tests, integration tests against the real RabbitMQ and real SMTP servers, the tests that
# restart the broker, and the static checks of deploy/). This is what .ci/run calls.
set -euo pipefail
cd "$(dirname "$0")/.."

bash deploy/services.sh
# The integration tests spawn the real binaries: build them first.
cargo build --workspace --bins --quiet
# Everything that can share the machine, in parallel (each test has its own namespace).
cargo test --workspace -- --test-threads "${SLUICE_TEST_THREADS:-4}" --skip the_budget_holds
# The fleet-budget tests measure throughput against the relay's budget with up to eight
# workers each: one at a time, so that a 2-core machine is not what they measure.
cargo test -p sluice-tests --test budget -- --test-threads 1 the_budget_holds
# These stop and restart the shared broker, so they run alone, after everything else.
cargo test -p sluice-tests --test broker_restart -- --ignored --test-threads 1
# A three-node cluster of private nodes (other ports, other data directories) loses a node
# mid-campaign: alone too, since three more Erlang VMs fill a 2-core machine.
cargo test -p sluice-tests --test cluster -- --ignored --test-threads 1
# Once more against the release binaries, as users run them: overflow checks are off there,
# so the arithmetic on relay replies, headers, sizes and the budget must be right in both
# builds. The suites that feed the binaries hostile, faulty and retried input, end to end.
cargo build --release --workspace --bins --quiet
SLUICE_TEST_BINARIES=release cargo test -p sluice-tests \
  --test hostile_relay_input --test security --test faults --test retries --test foundation \
  --test producer_send --test producer_dead --test no_loss --test memory \
  -- --test-threads "${SLUICE_TEST_THREADS:-4}"
bash deploy/validate.sh
