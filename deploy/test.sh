#!/usr/bin/env bash
# The test command: start every service the tests need, then run the whole suite
# (unit tests, integration tests against the real RabbitMQ and real SMTP servers, and the
# static checks of deploy/). This is what .ci/run calls.
set -euo pipefail
cd "$(dirname "$0")/.."

bash deploy/services.sh
# The integration tests spawn the real binaries: build them first.
cargo build --workspace --bins --quiet
cargo test --workspace -- --test-threads "${SLUICE_TEST_THREADS:-4}"
if [ -f deploy/validate.sh ]; then
  bash deploy/validate.sh
fi
