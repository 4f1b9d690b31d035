"""Publish one sluice job straight to RabbitMQ with pika, as any service can.

Usage: python3 publish_job.py [TO_ADDRESS]
Environment: AMQP_URL (default amqp://guest:guest@127.0.0.1:5672/%2f),
SLUICE_NAMESPACE (default sluice), SLUICE_RELAY (default primary),
SLUICE_CAMPAIGN (default welcome), SLUICE_PRIORITY (high, normal or low; default
normal: the routing key is the relay name, <relay>.high or <relay>.low).

The namespace's exchanges and queues exist once a sluice worker has started (or
`sluice-producer send` has run); before that the publish fails as unroutable.
Follow the campaign with `sluice-producer status --campaign welcome`.
"""
import json
import os
import sys
import uuid

import pika

namespace = os.environ.get("SLUICE_NAMESPACE", "sluice")
relay = os.environ.get("SLUICE_RELAY", "primary")
campaign = os.environ.get("SLUICE_CAMPAIGN", "welcome")
priority = os.environ.get("SLUICE_PRIORITY", "normal")
to = sys.argv[1] if len(sys.argv) > 1 else "ann@example.org"

job = {
    "id": str(uuid.uuid4()),
    "campaign": campaign,
    "from": "Acme <news@example.com>",
    "to": to,
    "subject": "Welcome, Ann",
    "text": "Hello Ann,\nthanks for signing up.",
    "html": "<p>Hello Ann,<br>thanks for signing up.</p>",
    "headers": {"List-Unsubscribe": "<mailto:unsubscribe@example.com>"},
    "priority": priority,  # must agree with the routing key
}

url = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
connection = pika.BlockingConnection(pika.URLParameters(url))
channel = connection.channel()
channel.confirm_delivery()  # basic_publish raises if the broker does not take the job
channel.basic_publish(
    exchange=f"{namespace}.jobs",  # direct exchange; routing key = relay name (+ class)
    routing_key=relay if priority == "normal" else f"{relay}.{priority}",
    body=json.dumps(job),
    properties=pika.BasicProperties(
        content_type="application/json",
        delivery_mode=2,  # persistent
        message_id=job["id"],
        # The campaign again, so that even a job whose body is unreadable reports under it.
        headers={"x-sluice-campaign": campaign},
    ),
    mandatory=True,  # an unknown relay is an error, not a silent drop
)
connection.close()
print(job["id"])
