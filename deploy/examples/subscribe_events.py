"""Receive sluice's delivery events in your own queue with pika, as any service can.

Usage: python3 subscribe_events.py [BINDING_KEY] [--max N]
  BINDING_KEY  which events: '<outcome>.<campaign>' with '*' and '#' wildcards, e.g.
               'bounced.#' (every bounce), '*.spring-sale' (one campaign), '#' (all).
               Default '#'.
  --max N      stop after N events (default: run until interrupted).
Environment: AMQP_URL (default amqp://guest:guest@127.0.0.1:5672/%2f),
SLUICE_NAMESPACE (default sluice), SLUICE_QUEUE (default: a private queue that lives as
long as this process; name a durable one to keep events while you are away).

Each message is a batch: a JSON array of events that share an outcome and a campaign
(shared/event.schema.json), header x-sluice-events = 2. Events are at least once: key on
the event's "id" (a job's final outcome may come twice, never not at all). Prints one
event per line as JSON.
"""
import json
import os
import sys

import pika

args = [a for a in sys.argv[1:]]
limit = None
if "--max" in args:
    i = args.index("--max")
    limit = int(args[i + 1])
    del args[i : i + 2]
binding = args[0] if args else "#"

namespace = os.environ.get("SLUICE_NAMESPACE", "sluice")
url = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
connection = pika.BlockingConnection(pika.URLParameters(url))
channel = connection.channel()
name = os.environ.get("SLUICE_QUEUE", "")
if name:
    queue = channel.queue_declare(
        queue=name, durable=True, arguments={"x-queue-type": "quorum"}
    ).method.queue
else:
    queue = channel.queue_declare(queue="", exclusive=True).method.queue
channel.queue_bind(queue=queue, exchange=f"{namespace}.events", routing_key=binding)
channel.basic_qos(prefetch_count=100)
print(f"listening on {queue} for {binding}", file=sys.stderr, flush=True)

seen = 0
for method, properties, body in channel.consume(queue, inactivity_timeout=None):
    for event in json.loads(body):
        print(json.dumps(event), flush=True)
        seen += 1
    channel.basic_ack(method.delivery_tag)
    if limit is not None and seen >= limit:
        break
connection.close()
