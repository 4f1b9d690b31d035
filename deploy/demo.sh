#!/usr/bin/env bash
# The demo: a campaign of 1,000 recipients from a CSV, through RabbitMQ, to a local SMTP
# server that catches mail (Postfix's smtp-sink, writing each message to a file).
# Starts (installing if missing) RabbitMQ and smtp-sink, builds sluice, starts two
# workers, sends the campaign, follows it to the end and prints the summary.
set -euo pipefail
cd "$(dirname "$0")/.."

RECIPIENTS=${RECIPIENTS:-1000}
SMTP_PORT=${SMTP_PORT:-2525}
work=$(mktemp -d /tmp/sluice-demo.XXXXXX)
mkdir -p "$work/mail"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

bash deploy/services.sh
echo "building sluice (release)..." >&2
cargo build --release --workspace --bins --quiet
bin=target/release

# A local SMTP server that catches mail: one file per message in $work/mail.
/usr/sbin/smtp-sink -u "$(id -un)" -d "$work/mail/%M." "127.0.0.1:$SMTP_PORT" 256 &
pids+=($!)

cat > "$work/sluice.toml" <<TOML
[amqp]
url = "amqp://guest:guest@127.0.0.1:5672/%2f"
namespace = "sluice-demo"

[relays.primary]
host = "127.0.0.1"
port = $SMTP_PORT
tls = "none"
max_connections = 4
max_messages_per_second = 500

[retry]
delays = ["5s", "30s"]
TOML

{
  echo "email,name"
  for i in $(seq 1 "$RECIPIENTS"); do echo "user$i@example.org,Reader $i"; done
} > "$work/recipients.csv"
printf 'Hello {{ name }},\n\nthis is the sluice demo.\n' > "$work/body.txt"
printf '<p>Hello <b>{{ name }}</b>,</p><p>this is the sluice demo.</p>\n' > "$work/body.html"

for n in 1 2; do
  "$bin/sluice-worker" --config "$work/sluice.toml" 2> "$work/worker$n.log" &
  pids+=($!)
done

campaign="demo-$(date +%Y%m%d%H%M%S)"
"$bin/sluice-producer" send --config "$work/sluice.toml" \
  --recipients "$work/recipients.csv" \
  --from "sluice demo <demo@example.com>" \
  --subject "Hello {{ name }}" \
  --text "$work/body.txt" --html "$work/body.html" \
  --header "List-Unsubscribe: <mailto:unsubscribe@example.com?subject={{ email }}>" \
  --campaign "$campaign" --wait

echo
echo "messages caught by the SMTP server: $(ls "$work/mail" | wc -l) (in $work/mail)"
echo "one of them: $work/mail/$(ls "$work/mail" | head -n 1)"
echo "worker logs: $work/worker1.log $work/worker2.log"
