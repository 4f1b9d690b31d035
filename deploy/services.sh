#!/usr/bin/env bash
# Start (installing when missing) what sluice's tests, demo and benchmark need on this
# machine: RabbitMQ on 127.0.0.1:5672, Postfix's smtp-sink/smtp-source, aiosmtpd and pika,
# and promtool (for deploy/validate.sh).
# Debian only; needs root (or sudo) the first time, to install packages. Idempotent.
set -euo pipefail

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
command -v rabbitmq-server >/dev/null 2>&1 || [ -x /usr/sbin/rabbitmq-server ] || missing+=(rabbitmq-server)
[ -x /usr/sbin/smtp-sink ] || missing+=(postfix)
/usr/bin/python3 -c 'import aiosmtpd' 2>/dev/null || missing+=(python3-aiosmtpd)
/usr/bin/python3 -c 'import pika' 2>/dev/null || missing+=(python3-pika)
# promtool, for deploy/validate.sh's alert-rule checks.
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}" >&2
  as_root apt-get update -qq
  # postfix asks questions on install; we only use its smtp-sink/smtp-source tools and
  # never start the postfix daemon.
  echo "postfix postfix/main_mailer_type select No configuration" | as_root debconf-set-selections
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  # Only promtool is wanted: a Prometheus server the package started would hold
  # :9090, the port the worker's examples listen on.
  if [[ " ${missing[*]} " == *" prometheus "* ]] && command -v systemctl >/dev/null 2>&1; then
    as_root systemctl disable --now prometheus >/dev/null 2>&1 || true
  fi
fi

rabbit_up() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }
if ! rabbit_up; then
  echo "starting RabbitMQ" >&2
  as_root rabbitmq-server -detached
fi
as_root rabbitmqctl await_startup --timeout 120 >/dev/null
for _ in $(seq 1 60); do rabbit_up && break; sleep 1; done
rabbit_up || { echo "RabbitMQ did not come up on 127.0.0.1:5672" >&2; exit 1; }
echo "services ready: RabbitMQ 127.0.0.1:5672, smtp-sink, aiosmtpd, pika" >&2
