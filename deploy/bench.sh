#!/usr/bin/env bash
# The benchmark: one command, one table of medians, every figure beside its target and the
# ceilings it is judged against measured in the same run.
#
#   bash deploy/bench.sh [--size small|full] [--reps N]
#
# It builds the release binaries, starts RabbitMQ (deploy/services.sh) and Postfix's
# smtp-sink on a free loopback port (no dumping: it only accepts), then for each repetition:
#   1. SMTP alone     smtp-source -> smtp-sink, 8 sessions (= the relay's max_connections),
#                     messages of 2 KB, sessions reused (-d); wall time. No broker work.
#      Colocated      the ceiling P the drain and end to end are judged against: RabbitMQ
#      ceiling P      and SMTP sharing this machine's cores. N jobs are queued first
#                     (sluice-bench-load queue, in a namespace of its own that no worker
#                     consumes; its jobs queue is a quorum queue), then, started together:
#                     a lean reference consumer drains them (sluice-bench-load consume: one
#                     channel, prefetch 1000, a `multiple` ack every 100) while smtp-source
#                     sends N messages to smtp-sink as above. Each one's rate is its count
#                     over its own wall time, from their common start to its own end (the
#                     consumer's N-th delivery; smtp-source's exit). P is the lower of the
#                     two rates: what this machine can drain and relay at once, with no
#                     sluice code in the path.
#   2. Drain          N jobs of about 2 KB queued first (sluice-bench-load queue), then two
#                     sluice-worker processes, no rate limit; from the workers' start to
#                     the last acceptance (the sum of sluice_jobs_delivered_total over both
#                     workers' /metrics reaching N, polled every 50 ms).
#   3. End to end     two idle workers running, then `sluice-producer send` of an N-row CSV;
#                     from the producer's start (it validates the file, connects, publishes)
#                     to the last acceptance.
#   4. Producer alone `sluice-producer send` of a large CSV with confirms, no workers;
#                     rows / wall time, and its peak RSS (/usr/bin/time -v). Its ceiling:
#                     what the broker takes from a lean publisher (sluice-bench-load queue,
#                     the same jobs, 64 publishes handed to lapin at once, 2000 unconfirmed).
#   5. Worker memory  peak RSS (VmHWM) of each worker just before it is stopped after the
#                     drain, and idle RSS (VmRSS) of the idle workers before phase 3.
# Targets for 2 and 3 are fractions of P (drain >= 0.6 P, end to end >= 0.45 P), judged on
# the medians (median / median P); the runs column of a "/ P" row shows each repetition's
# own ratio.
# During the drain it also reads the CPU time (utime + stime) that RabbitMQ, the workers and
# smtp-sink spent, per job: on a machine with few cores their sum bounds the drain rate.
# Sizes: full = 20,000 jobs for 1 (each side of P), 2 and 3, 1,000,000 producer rows
#        (200,000 jobs for the broker ceiling), 3 reps by default;
#        small = 2,000 jobs (P too), 20,000 producer rows and broker jobs, 1 rep (a smoke test).
#
# Every repetition and phase uses a namespace of its own (bench-<run>-<rep>-<phase>),
# deleted afterwards; every process started here is stopped on exit; every wait is
# bounded (a drain that does not finish in 120 s is reported as failed, not waited for).
# Only 127.0.0.1 is ever targeted.
#
# Output: progress on stderr, the table on stdout. SLUICE_BENCH_KEEP=1 keeps the worker
# logs and inputs (the directory is named at the end).
# Exit: 0 when every measurement ran (PASS or MISS), 1 when one failed, 2 on bad usage.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

SIZE=full
REPS=""
while [ $# -gt 0 ]; do
  case "$1" in
    --size) SIZE="${2:-}"; shift 2 || usage ;;
    --reps) REPS="${2:-}"; shift 2 || usage ;;
    -h|--help) usage ;;
    *) echo "bench.sh: unknown argument $1" >&2; usage ;;
  esac
done
case "$SIZE" in
  full)  JOBS=20000; PRODUCER_ROWS=1000000; CEILING_MSGS=20000; BROKER_JOBS=200000; DEFAULT_REPS=3 ;;
  small) JOBS=2000;  PRODUCER_ROWS=20000;   CEILING_MSGS=2000;  BROKER_JOBS=20000;  DEFAULT_REPS=1 ;;
  *) echo "bench.sh: --size must be small or full" >&2; usage ;;
esac
REPS="${REPS:-$DEFAULT_REPS}"
[[ "$REPS" =~ ^[1-9][0-9]?$ ]] || { echo "bench.sh: --reps must be 1..99" >&2; usage; }

# The relay as the benchmark configures it.
SESSIONS=8                 # relays.bench.max_connections, and smtp-source's -s
BODY_BYTES=2048            # message text, smtp-source's -l
WORKERS=2
# Bounds (seconds).
CEILING_TIMEOUT=120
DRAIN_TIMEOUT=120
PRODUCER_TIMEOUT=300
READY_TIMEOUT=30
STOP_TIMEOUT=15
# Targets.
TARGET_DRAIN_OF_P=0.6      # drain, at least this fraction of the colocated ceiling P
TARGET_E2E_OF_P=0.45       # end to end, at least this fraction of P
TARGET_PRODUCER=20000      # jobs/s, at least
TARGET_PRODUCER_RSS=64     # MiB, at most
TARGET_WORKER_RSS=64       # MiB, at most
TARGET_WORKER_IDLE=16      # MiB, at most

AMQP_URL="amqp://guest:guest@127.0.0.1:5672/%2f"
BIN="$PWD/target/release"
RUN_ID="$(date +%H%M%S)-$$"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/sluice-bench.XXXXXX")"
PIDS=()          # every background process started here
NAMESPACES=()    # "namespace campaign" pairs to delete at the end
FAILED=0

say() { echo "bench: $*" >&2; }

stop_pid() {     # SIGTERM, bounded wait, then SIGKILL; only our own processes
  local pid="$1"
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 $((STOP_TIMEOUT * 10))); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

cleanup_namespace() {   # namespace [campaign]
  local args=(cleanup --url "$AMQP_URL" --namespace "$1" --relay bench)
  [ -n "${2:-}" ] && args+=(--campaign "$2")
  timeout 120 "$BIN/sluice-bench-load" "${args[@]}" >/dev/null 2>&1 \
    || say "could not delete every queue of namespace $1"
}

on_exit() {
  local status=$?
  for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
  if [ -x "$BIN/sluice-bench-load" ]; then
    for entry in "${NAMESPACES[@]}"; do
      # shellcheck disable=SC2086
      cleanup_namespace $entry
    done
  fi
  if [ "${SLUICE_BENCH_KEEP:-0}" = 1 ]; then say "logs and inputs kept in $WORK"; else rm -rf "$WORK"; fi
  exit "$status"
}
trap on_exit EXIT
trap 'exit 130' INT TERM

free_port() {
  /usr/bin/python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
now_ns() { date +%s%N; }
rate() { awk -v n="$1" -v a="$2" -v b="$3" 'BEGIN { d = (b - a) / 1e9; if (d <= 0) print 0; else printf "%.0f", n / d }'; }
kib_of() { awk '$1 == "'"$1"':" { print $2 }' "/proc/$2/status" 2>/dev/null || true; }   # field pid
record() { echo "$2" >>"$WORK/fig.$1"; }   # figure value
ratio_of() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "NA" || b == "NA") print "NA"; else if (b <= 0) print 0; else printf "%.2f", a / b }'; }
TICK="$(getconf CLK_TCK)"
cpu_ticks() {   # pid... -> utime + stime summed, in clock ticks
  local pid total=0 t
  for pid in "$@"; do
    t="$(awk '{ print $14 + $15 }' "/proc/$pid/stat" 2>/dev/null || true)"
    total=$((total + ${t:-0}))
  done
  echo "$total"
}
per_job_us() { awk -v t="$1" -v hz="$TICK" -v n="$JOBS" 'BEGIN { printf "%.0f", t / hz / n * 1e6 }'; }   # ticks

# --- Build and services --------------------------------------------------------------
say "building (cargo build --release --workspace --bins)"
cargo build --release --workspace --bins --quiet
for b in sluice-worker sluice-producer sluice-bench-load; do
  [ -x "$BIN/$b" ] || { say "missing $BIN/$b after the build"; exit 1; }
done
bash deploy/services.sh
if [ ! -x /usr/bin/time ]; then
  say "installing GNU time (for the producer's peak RSS)"
  if [ "$(id -u)" -eq 0 ]; then apt-get install -y -qq time >/dev/null; else sudo apt-get install -y -qq time >/dev/null; fi
fi
SMTP_SINK=/usr/sbin/smtp-sink; SMTP_SOURCE=/usr/sbin/smtp-source
[ -x "$SMTP_SINK" ] || SMTP_SINK="$(command -v smtp-sink)"
[ -x "$SMTP_SOURCE" ] || SMTP_SOURCE="$(command -v smtp-source)"

SINK_PORT="$(free_port)"
sink_user=(); [ "$(id -u)" -eq 0 ] && sink_user=(-u root)
# No -d: smtp-sink accepts and forgets, so disk I/O is not part of any figure.
"$SMTP_SINK" "${sink_user[@]}" "127.0.0.1:$SINK_PORT" 1024 >"$WORK/smtp-sink.log" 2>&1 &
SINK_PID=$!; PIDS+=("$SINK_PID")
mapfile -t BROKER_PIDS < <(pgrep -x beam.smp || true)   # RabbitMQ's Erlang VM, for the CPU figures
for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$SINK_PORT") 2>/dev/null && break; sleep 0.05; done
(exec 3<>"/dev/tcp/127.0.0.1/$SINK_PORT") 2>/dev/null || { say "smtp-sink did not start"; exit 1; }
# CEILING_MSGS messages over SESSIONS reused sessions: the SMTP side of both ceilings.
SMTP_SOURCE_CMD=("$SMTP_SOURCE" -s "$SESSIONS" -m "$CEILING_MSGS" -l "$BODY_BYTES" -d
  -f bench@example.com -t rcpt@example.org -M bench.example.com "127.0.0.1:$SINK_PORT")

# --- Inputs ----------------------------------------------------------------------------
LOREM="Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusm"
awk -v line="$LOREM" -v bytes="$BODY_BYTES" 'BEGIN {
  text = "Hello {{ name }},\n\n"
  while (length(text) + length(line) + 1 <= bytes) text = text line "\n"
  printf "%s", text }' >"$WORK/body.txt"
make_csv() { awk -v n="$1" 'BEGIN { print "email,name"; for (i = 1; i <= n; i++) printf "user%d@example.org,User %d\n", i, i }' >"$2"; }
make_csv "$JOBS" "$WORK/e2e.csv"
make_csv "$PRODUCER_ROWS" "$WORK/producer.csv"

write_config() {   # namespace -> path
  local path="$WORK/$1.toml"
  cat >"$path" <<EOF
[amqp]
url = "$AMQP_URL"
namespace = "$1"

[relays.bench]
host = "127.0.0.1"
port = $SINK_PORT
max_connections = $SESSIONS
max_messages_per_second = 0
max_messages_per_connection = 100000
EOF
  echo "$path"
}

WORKER_PIDS=(); WORKER_PORTS=()
start_workers() {   # config tag
  WORKER_PIDS=(); WORKER_PORTS=()
  local i port
  for i in $(seq 1 "$WORKERS"); do
    port="$(free_port)"
    RUST_LOG=warn "$BIN/sluice-worker" --config "$1" --listen "127.0.0.1:$port" \
      >"$WORK/$2-worker$i.log" 2>&1 &
    PIDS+=($!); WORKER_PIDS+=($!); WORKER_PORTS+=("$port")
  done
}
metrics_list() { local IFS=,; local a=(); for p in "${WORKER_PORTS[@]}"; do a+=("127.0.0.1:$p"); done; echo "${a[*]}"; }
stop_workers() { for pid in "${WORKER_PIDS[@]}"; do stop_pid "$pid"; done; }
wait_ready() {
  local port deadline=$((SECONDS + READY_TIMEOUT))
  for port in "${WORKER_PORTS[@]}"; do
    until curl -fs "http://127.0.0.1:$port/readyz" >/dev/null 2>&1; do
      [ $SECONDS -lt $deadline ] || return 1
      sleep 0.1
    done
  done
}
max_kib() {   # field -> the largest value over the workers, in KiB
  local pid v best=0
  for pid in "${WORKER_PIDS[@]}"; do
    v="$(kib_of "$1" "$pid")"; [ -n "$v" ] && [ "$v" -gt "$best" ] && best="$v"
  done
  echo "$best"
}

# Deliveries counted beyond the jobs published are redeliveries that reached the relay again
# (a worker dropped a job in flight): they count as acceptances in the figures (so the N-th
# acceptance may come before the last job's), and are reported here.
check_duplicates() {   # phase -- one second after the last acceptance, count again
  local delivered
  sleep 1
  delivered="$("$BIN/sluice-bench-load" wait --metrics "$(metrics_list)" --count 1 --timeout-secs 5 \
    2>/dev/null | sed -n 's/^delivered=//p')"
  if [ -n "$delivered" ] && [ "$delivered" -gt "$JOBS" ]; then
    say "$1: $((delivered - JOBS)) deliveries beyond the $JOBS jobs (redelivered duplicates)"
  fi
}

# --- One repetition of each phase ------------------------------------------------------
smtp_alone() {   # rep
  local t0 t1
  t0="$(now_ns)"
  if timeout "$CEILING_TIMEOUT" "${SMTP_SOURCE_CMD[@]}" >"$WORK/smtp-source-alone-$1.log" 2>&1; then
    t1="$(now_ns)"
    record smtp_alone "$(rate "$CEILING_MSGS" "$t0" "$t1")"
  else
    say "smtp-source failed or took over ${CEILING_TIMEOUT}s: $(tail -n 3 "$WORK/smtp-source-alone-$1.log")"
    record smtp_alone 0; FAILED=1
  fi
}

colocated_ceiling() {   # rep -- P: the reference consumer and smtp-source, both at once
  local ns="bench-$RUN_ID-$1-ceiling" campaign="ceiling$1" queue t0 consume_pid source_pid
  local r_broker=0 r_smtp=0 last=0 smtp_end=0
  NAMESPACES+=("$ns $campaign")
  if ! timeout "$DRAIN_TIMEOUT" "$BIN/sluice-bench-load" queue --url "$AMQP_URL" --namespace "$ns" \
       --relay bench --campaign "$campaign" --count "$JOBS" --body-bytes "$BODY_BYTES" \
       >"$WORK/ceiling-queue-$1.out" 2>&1; then
    say "queueing the reference queue's jobs failed: $(tail -n 3 "$WORK/ceiling-queue-$1.out")"
    record p 0; record p_broker 0; record p_smtp 0; FAILED=1
    cleanup_namespace "$ns" "$campaign"; NAMESPACES=(); return
  fi
  queue="$(sed -n 's/^jobs_queue=//p' "$WORK/ceiling-queue-$1.out")"
  t0="$(now_ns)"
  timeout $((CEILING_TIMEOUT + 10)) "$BIN/sluice-bench-load" consume --url "$AMQP_URL" \
    --queue "$queue" --count "$JOBS" --prefetch 1000 --ack-every 100 \
    --timeout-secs "$CEILING_TIMEOUT" >"$WORK/consume-$1.out" 2>"$WORK/consume-$1.err" &
  consume_pid=$!; PIDS+=("$consume_pid")
  timeout "$CEILING_TIMEOUT" "${SMTP_SOURCE_CMD[@]}" >"$WORK/smtp-source-colocated-$1.log" 2>&1 &
  source_pid=$!; PIDS+=("$source_pid")
  # smtp-source's end is when `wait` returns; the consumer prints its own N-th delivery time.
  if wait "$source_pid"; then
    smtp_end="$(now_ns)"
    r_smtp="$(rate "$CEILING_MSGS" "$t0" "$smtp_end")"
  else
    say "colocated smtp-source failed or took over ${CEILING_TIMEOUT}s: $(tail -n 3 "$WORK/smtp-source-colocated-$1.log")"
    FAILED=1
  fi
  if wait "$consume_pid"; then
    last="$(sed -n 's/^last_ns=//p' "$WORK/consume-$1.out")"; last="${last:-0}"
    r_broker="$(rate "$JOBS" "$t0" "$last")"
  else
    say "the reference consumer failed: $(tail -n 3 "$WORK/consume-$1.err")"
    FAILED=1
  fi
  record p_broker "$r_broker"; record p_smtp "$r_smtp"
  record p "$(( r_broker < r_smtp ? r_broker : r_smtp ))"
  # How much of the slower side's run the faster one shared: the two contend for the cores
  # only while both run.
  if [ "$last" -gt 0 ] && [ "$smtp_end" -gt 0 ]; then
    say "rep $1: colocated wall times: consumer $(( (last - t0) / 1000000 )) ms," \
      "smtp-source $(( (smtp_end - t0) / 1000000 )) ms"
  fi
  cleanup_namespace "$ns" "$campaign"; NAMESPACES=()
}

drain() {   # rep
  local ns="bench-$RUN_ID-$1-drain" campaign="drain$1" cfg t0 out
  NAMESPACES+=("$ns $campaign")
  cfg="$(write_config "$ns")"
  if ! timeout "$DRAIN_TIMEOUT" "$BIN/sluice-bench-load" queue --url "$AMQP_URL" --namespace "$ns" \
       --relay bench --campaign "$campaign" --count "$JOBS" --body-bytes "$BODY_BYTES" \
       >"$WORK/queue-$1.out" 2>&1; then
    say "queueing the drain's jobs failed: $(tail -n 3 "$WORK/queue-$1.out")"
    record drain 0; record ratio 0; record drain_p 0; FAILED=1; return
  fi
  local broker0 sink0
  broker0="$(cpu_ticks "${BROKER_PIDS[@]}")"; sink0="$(cpu_ticks "$SINK_PID")"
  t0="$(now_ns)"
  start_workers "$cfg" "drain$1"
  if out="$("$BIN/sluice-bench-load" wait --metrics "$(metrics_list)" --count "$JOBS" \
         --timeout-secs "$DRAIN_TIMEOUT" --interval-ms 50 2>"$WORK/wait-drain-$1.err")"; then
    local last r
    last="$(sed -n 's/^last_accepted_ns=//p' <<<"$out")"
    r="$(rate "$JOBS" "$t0" "$last")"
    record drain "$r"
    record ratio "$(ratio_of "$r" "$(tail -n 1 "$WORK/fig.smtp_alone")")"
    record drain_p "$(ratio_of "$r" "$(tail -n 1 "$WORK/fig.p")")"
    # CPU spent up to the end of the drain (polled every 50 ms, so a little idle time too).
    if [ "${#BROKER_PIDS[@]}" -gt 0 ]; then
      record cpu_broker "$(per_job_us $(( $(cpu_ticks "${BROKER_PIDS[@]}") - broker0 )))"
    fi
    record cpu_workers "$(per_job_us "$(cpu_ticks "${WORKER_PIDS[@]}")")"
    record cpu_sink "$(per_job_us $(( $(cpu_ticks "$SINK_PID") - sink0 )))"
  else
    say "drain $1 failed: $(cat "$WORK/wait-drain-$1.err") $out"
    record drain 0; record ratio 0; record drain_p 0; FAILED=1
  fi
  record worker_peak "$(max_kib VmHWM)"
  check_duplicates "drain $1"
  stop_workers
  cleanup_namespace "$ns" "$campaign"; NAMESPACES=()
}

end_to_end() {   # rep
  local ns="bench-$RUN_ID-$1-e2e" campaign="e2e$1" cfg t0 out producer_pid
  NAMESPACES+=("$ns $campaign")
  cfg="$(write_config "$ns")"
  start_workers "$cfg" "e2e$1"
  if ! wait_ready; then
    say "workers not ready within ${READY_TIMEOUT}s"; record e2e 0; record e2e_p 0; FAILED=1; stop_workers; return
  fi
  sleep 1   # idle: connected, consuming nothing
  record worker_idle "$(max_kib VmRSS)"
  t0="$(now_ns)"
  timeout "$DRAIN_TIMEOUT" "$BIN/sluice-producer" send --config "$cfg" --recipients "$WORK/e2e.csv" \
    --from "Bench <bench@example.com>" --subject "Hello {{ name }}" --text "$WORK/body.txt" \
    --relay bench --campaign "$campaign" --json >"$WORK/e2e-producer-$1.out" 2>&1 &
  producer_pid=$!; PIDS+=("$producer_pid")
  if out="$("$BIN/sluice-bench-load" wait --metrics "$(metrics_list)" --count "$JOBS" \
         --timeout-secs "$DRAIN_TIMEOUT" --interval-ms 50 2>"$WORK/wait-e2e-$1.err")"; then
    local r; r="$(rate "$JOBS" "$t0" "$(sed -n 's/^last_accepted_ns=//p' <<<"$out")")"
    record e2e "$r"
    record e2e_p "$(ratio_of "$r" "$(tail -n 1 "$WORK/fig.p")")"
  else
    say "end to end $1 failed: $(cat "$WORK/wait-e2e-$1.err") $(tail -n 3 "$WORK/e2e-producer-$1.out")"
    record e2e 0; record e2e_p 0; FAILED=1
  fi
  if ! wait "$producer_pid"; then
    say "the producer failed: $(tail -n 3 "$WORK/e2e-producer-$1.out")"; FAILED=1
  fi
  record worker_peak_e2e "$(max_kib VmHWM)"
  check_duplicates "end to end $1"
  stop_workers
  cleanup_namespace "$ns" "$campaign"; NAMESPACES=()
}

broker_ceiling() {   # rep
  local ns="bench-$RUN_ID-$1-broker" campaign="broker$1" t0 t1
  NAMESPACES+=("$ns $campaign")
  t0="$(now_ns)"
  if timeout "$PRODUCER_TIMEOUT" "$BIN/sluice-bench-load" queue --url "$AMQP_URL" --namespace "$ns" \
       --relay bench --campaign "$campaign" --count "$BROKER_JOBS" --body-bytes "$BODY_BYTES" \
       --batch 64 --window 2000 >"$WORK/broker-$1.out" 2>&1; then
    t1="$(now_ns)"
    record broker "$(rate "$BROKER_JOBS" "$t0" "$t1")"
  else
    say "broker ceiling $1 failed: $(tail -n 3 "$WORK/broker-$1.out")"
    record broker 0; FAILED=1
  fi
  cleanup_namespace "$ns" "$campaign"; NAMESPACES=()
}

producer_alone() {   # rep
  local ns="bench-$RUN_ID-$1-producer" campaign="producer$1" cfg t0 t1 kib
  NAMESPACES+=("$ns $campaign")
  cfg="$(write_config "$ns")"
  t0="$(now_ns)"
  if timeout "$PRODUCER_TIMEOUT" /usr/bin/time -v -o "$WORK/producer-time-$1.txt" \
       "$BIN/sluice-producer" send --config "$cfg" --recipients "$WORK/producer.csv" \
       --from "Bench <bench@example.com>" --subject "Hello {{ name }}" --text "$WORK/body.txt" \
       --relay bench --campaign "$campaign" --json >"$WORK/producer-$1.out" 2>&1; then
    t1="$(now_ns)"
    local r; r="$(rate "$PRODUCER_ROWS" "$t0" "$t1")"
    record producer "$r"
    record producer_ratio "$(ratio_of "$r" "$(tail -n 1 "$WORK/fig.broker")")"
    kib="$(awk -F': ' '/Maximum resident set size/ { print $2 }' "$WORK/producer-time-$1.txt")"
    record producer_rss "${kib:-0}"
  else
    say "producer alone $1 failed or took over ${PRODUCER_TIMEOUT}s: $(tail -n 3 "$WORK/producer-$1.out")"
    record producer 0; record producer_ratio 0; FAILED=1
  fi
  cleanup_namespace "$ns" "$campaign"; NAMESPACES=()
}

say "run $RUN_ID: size $SIZE, $REPS rep(s); $JOBS jobs, $PRODUCER_ROWS producer rows; smtp-sink on 127.0.0.1:$SINK_PORT"
LOAD_START="$(cut -d' ' -f1-3 /proc/loadavg)"
for rep in $(seq 1 "$REPS"); do
  smtp_alone "$rep";  say "rep $rep/$REPS: SMTP alone $(tail -n 1 "$WORK/fig.smtp_alone") msg/s"
  colocated_ceiling "$rep"
  say "rep $rep/$REPS: colocated ceiling P $(tail -n 1 "$WORK/fig.p") msg/s" \
    "(RabbitMQ drain $(tail -n 1 "$WORK/fig.p_broker"), SMTP $(tail -n 1 "$WORK/fig.p_smtp"))"
  drain "$rep";       say "rep $rep/$REPS: drain $(tail -n 1 "$WORK/fig.drain") msg/s"
  end_to_end "$rep";  say "rep $rep/$REPS: end to end $(tail -n 1 "$WORK/fig.e2e") msg/s"
  broker_ceiling "$rep"; say "rep $rep/$REPS: broker ceiling $(tail -n 1 "$WORK/fig.broker") jobs/s"
  producer_alone "$rep"; say "rep $rep/$REPS: producer $(tail -n 1 "$WORK/fig.producer") jobs/s"
done

# --- The table -----------------------------------------------------------------------
median() {   # figure -> median of the recorded values ("NA" if none)
  [ -s "$WORK/fig.$1" ] || { echo NA; return; }
  sort -g "$WORK/fig.$1" | awk '{ a[NR] = $1 } END { if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'
}
runs() { [ -s "$WORK/fig.$1" ] && paste -sd/ "$WORK/fig.$1" || echo -; }
mib() { awk -v k="$1" 'BEGIN { if (k == "NA") print "NA"; else printf "%.1f", k / 1024 }'; }
runs_mib() { [ -s "$WORK/fig.$1" ] && awk '{ printf "%s%.1f", (NR > 1 ? "/" : ""), $1 / 1024 } END { print "" }' "$WORK/fig.$1" || echo -; }
verdict() {   # value op target
  awk -v v="$1" -v op="$2" -v t="$3" 'BEGIN {
    if (v == "NA") { print "MISS"; exit }
    ok = (op == ">=") ? (v + 0 >= t + 0) : (v + 0 <= t + 0); print (ok ? "PASS" : "MISS") }'
}
row() { printf '%-44s %12s %-9s %-26s %-12s %s\n' "$@"; }

commit="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
git diff --quiet HEAD 2>/dev/null || commit="$commit+changes"
echo
echo "sluice benchmark: size $SIZE, medians of $REPS rep(s); commit $commit; $(nproc) CPUs; load average at start $LOAD_START"
row "figure" "median" "unit" "runs" "target" "result"
ceiling_p="$(median p)"
row "1. Colocated ceiling P (lower of the two)" "$ceiling_p" "msg/s" "$(runs p)" "-" "-"
row "   RabbitMQ drain, lean consumer, concurrent" "$(median p_broker)" "msg/s" "$(runs p_broker)" "-" "-"
row "   smtp-source -> smtp-sink, concurrent" "$(median p_smtp)" "msg/s" "$(runs p_smtp)" "-" "-"
row "   SMTP-alone ceiling ($SESSIONS sessions)" "$(median smtp_alone)" "msg/s" "$(runs smtp_alone)" "-" "-"
of_p() { awk -v f="$1" -v p="$ceiling_p" 'BEGIN { if (p == "NA") print "NA"; else printf "%.0f", f * p }'; }   # fraction
d="$(median drain)"; dp="$(ratio_of "$d" "$ceiling_p")"
row "2. Drain, $WORKERS workers, $JOBS jobs" "$d" "msg/s" "$(runs drain)" \
  ">= $TARGET_DRAIN_OF_P P = $(of_p $TARGET_DRAIN_OF_P)" "$(verdict "$dp" '>=' $TARGET_DRAIN_OF_P)"
row "   drain / P" "$dp" "" "$(runs drain_p)" ">= $TARGET_DRAIN_OF_P" "$(verdict "$dp" '>=' $TARGET_DRAIN_OF_P)"
row "   drain / SMTP-alone ceiling" "$(median ratio)" "" "$(runs ratio)" "-" "-"
row "   CPU per job: RabbitMQ / workers / smtp-sink" "$(median cpu_broker)/$(median cpu_workers)/$(median cpu_sink)" "us" "-" "-" "-"
cpu_bound="$(awk -v c="$(nproc)" -v a="$(median cpu_broker)" -v b="$(median cpu_workers)" -v d="$(median cpu_sink)" \
  'BEGIN { t = a + b + d; if (a == "NA" || t <= 0) print "NA"; else printf "%.0f", c * 1e6 / t }')"
row "   CPU bound: $(nproc) cores / CPU per job" "$cpu_bound" "msg/s" "-" "-" "-"
e="$(median e2e)"; ep="$(ratio_of "$e" "$ceiling_p")"
row "3. End to end, $JOBS rows" "$e" "msg/s" "$(runs e2e)" \
  ">= $TARGET_E2E_OF_P P = $(of_p $TARGET_E2E_OF_P)" "$(verdict "$ep" '>=' $TARGET_E2E_OF_P)"
row "   end to end / P" "$ep" "" "$(runs e2e_p)" ">= $TARGET_E2E_OF_P" "$(verdict "$ep" '>=' $TARGET_E2E_OF_P)"
p="$(median producer)"
row "4. Producer alone, $PRODUCER_ROWS rows" "$p" "jobs/s" "$(runs producer)" ">= $TARGET_PRODUCER" "$(verdict "$p" '>=' $TARGET_PRODUCER)"
row "   broker ceiling (lean publisher, $BROKER_JOBS)" "$(median broker)" "jobs/s" "$(runs broker)" "-" "-"
row "   producer / broker ceiling" "$(median producer_ratio)" "" "$(runs producer_ratio)" "-" "-"
pr="$(mib "$(median producer_rss)")"
row "   producer peak RSS" "$pr" "MiB" "$(runs_mib producer_rss)" "<= $TARGET_PRODUCER_RSS" "$(verdict "$pr" '<=' $TARGET_PRODUCER_RSS)"
wp="$(mib "$(median worker_peak)")"
row "5. Worker peak RSS (drain, larger of $WORKERS)" "$wp" "MiB" "$(runs_mib worker_peak)" "<= $TARGET_WORKER_RSS" "$(verdict "$wp" '<=' $TARGET_WORKER_RSS)"
wi="$(mib "$(median worker_idle)")"
row "   worker idle RSS (larger of $WORKERS)" "$wi" "MiB" "$(runs_mib worker_idle)" "<= $TARGET_WORKER_IDLE" "$(verdict "$wi" '<=' $TARGET_WORKER_IDLE)"
row "   worker peak RSS (end to end)" "$(mib "$(median worker_peak_e2e)")" "MiB" "$(runs_mib worker_peak_e2e)" "-" "-"
if [ "$FAILED" -ne 0 ]; then
  echo "some measurements failed (recorded as 0); see the messages above"
  exit 1
fi
