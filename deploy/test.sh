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
# The tests that measure rates and latencies against a relay's budget (the fleet budget with
# up to eight workers, priority classes, the fleet slowing down when the relay pushes back,
# a campaign keeping its rate beside a paused one)
# run afterwards, one at a time, so that a 2-core machine is not what they measure.
measured=(the_budget_holds
  a_high_job_overtakes_a_queued_campaign_within_a_second
  low_jobs_get_their_share_while_normal_ones_wait
  a_down_relay_s_high_jobs_fail_over_first
  a_relay_that_allows_100_per_second_gets_between_70_and_100_and_more_when_it_allows_more
  a_relay_that_serves_two_sessions_gets_two_from_a_fleet_allowed_six
  a_real_postfix_limiting_two_connections_gets_two_and_every_job
  a_real_postfix_limiting_the_message_rate_gets_every_job_at_its_first_attempt
  a_real_postfix_limiting_the_message_rate_refuses_under_5_percent_once_settled
  a_worker_started_during_a_throttle_starts_throttled
  pause_stops_one_campaign_within_3_s_the_other_keeps_the_full_rate_and_resume_sends_each_held_job_once)
cargo test --workspace -- --test-threads "${SLUICE_TEST_THREADS:-4}" "${measured[@]/#/--skip=}"
cargo test -p sluice-tests --test budget --test priority --test pushback --test steering -- \
  --test-threads 1 \
  "${measured[@]}"
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
