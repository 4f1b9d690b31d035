#!/usr/bin/python3
"""A real TLS- and AUTH-capable SMTP server (aiosmtpd) for sluice's security tests.

Usage:
  aiosmtpd_server.py --port 0 --mode starttls|tls|plain --dump-dir DIR
                     [--cert CERT.pem --key KEY.pem] [--user USER --password PASS]

- starttls: STARTTLS offered and required before any mail command (require_starttls);
  AUTH offered only once the session is encrypted (auth_require_tls).
- tls: implicit TLS from the first byte (as on port 465).
- plain: no TLS at all; AUTH (when a user is given) is offered in clear, so that a client
  that would send credentials without TLS is caught doing it.

Every command the client sends is recorded in DIR/commands.log as
"<connection> <COMMAND> tls=<0|1>" (never with its argument), every AUTH attempt as
"<connection> AUTH-RESULT <mechanism> ok|fail tls=<0|1>", and every accepted message as
DIR/msg-<n>.json: {"mail_from", "rcpt_tos", "data", "tls", "auth_user"}. Prints
"ready <port>" on stdout once listening.
"""

import argparse
import asyncio
import itertools
import json
import os
import ssl
import sys

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

CONNECTIONS = itertools.count(1)
MESSAGES = itertools.count(1)


def write_atomically(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.rename(tmp, path)


class Recorder:
    def __init__(self, dump_dir):
        self.dump_dir = dump_dir
        self.log_path = os.path.join(dump_dir, "commands.log")

    def line(self, text):
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(text + "\n")


def is_encrypted(protocol):
    if protocol.session is not None and protocol.session.ssl is not None:
        return True
    transport = protocol.transport
    return transport is not None and transport.get_extra_info("ssl_object") is not None


class RecordingSMTP(SMTP):
    """aiosmtpd's SMTP, recording each command name and whether it came encrypted."""

    recorder = None

    def connection_made(self, transport):
        super().connection_made(transport)
        if not hasattr(self, "conn_id"):
            self.conn_id = next(CONNECTIONS)

    def _record(self, command):
        tls = 1 if is_encrypted(self) else 0
        self.recorder.line(f"{self.conn_id} {command} tls={tls}")

    async def smtp_EHLO(self, arg):
        self._record("EHLO")
        return await super().smtp_EHLO(arg)

    async def smtp_HELO(self, arg):
        self._record("HELO")
        return await super().smtp_HELO(arg)

    async def smtp_STARTTLS(self, arg):
        self._record("STARTTLS")
        return await super().smtp_STARTTLS(arg)

    async def smtp_AUTH(self, arg):
        self._record("AUTH")
        return await super().smtp_AUTH(arg)

    async def smtp_MAIL(self, arg):
        self._record("MAIL")
        return await super().smtp_MAIL(arg)

    async def smtp_RCPT(self, arg):
        self._record("RCPT")
        return await super().smtp_RCPT(arg)

    async def smtp_DATA(self, arg):
        self._record("DATA")
        return await super().smtp_DATA(arg)

    async def smtp_RSET(self, arg):
        self._record("RSET")
        return await super().smtp_RSET(arg)

    async def smtp_QUIT(self, arg):
        self._record("QUIT")
        return await super().smtp_QUIT(arg)


class Handler:
    def __init__(self, recorder):
        self.recorder = recorder

    async def handle_DATA(self, server, session, envelope):
        n = next(MESSAGES)
        record = {
            "mail_from": envelope.mail_from,
            "rcpt_tos": list(envelope.rcpt_tos),
            "data": envelope.content.decode("utf-8", errors="replace"),
            "tls": is_encrypted(server),
            "auth_user": session.auth_data if session.authenticated else None,
        }
        path = os.path.join(self.recorder.dump_dir, f"msg-{n}.json")
        write_atomically(path, json.dumps(record))
        return "250 2.0.0 OK: queued as sluice-test-%d" % n


def make_authenticator(recorder, user, password):
    def authenticator(server, session, envelope, mechanism, auth_data):
        tls = 1 if is_encrypted(server) else 0
        ok = (
            isinstance(auth_data, LoginPassword)
            and auth_data.login.decode("utf-8", "replace") == user
            and auth_data.password.decode("utf-8", "replace") == password
        )
        recorder.line(f"{server.conn_id} AUTH-RESULT {mechanism} {'ok' if ok else 'fail'} tls={tls}")
        return AuthResult(success=ok, handled=False, auth_data=user if ok else None)

    return authenticator


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--mode", choices=["starttls", "tls", "plain"], required=True)
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.add_argument("--user")
    parser.add_argument("--password")
    parser.add_argument("--dump-dir", required=True)
    args = parser.parse_args()

    recorder = Recorder(args.dump_dir)
    RecordingSMTP.recorder = recorder
    context = None
    if args.mode in ("starttls", "tls"):
        if not (args.cert and args.key):
            sys.exit("--cert and --key are required for mode " + args.mode)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.cert, args.key)

    kwargs = {"hostname": "localhost", "ident": "sluice-test-aiosmtpd"}
    if args.user is not None:
        kwargs["authenticator"] = make_authenticator(recorder, args.user, args.password or "")
        kwargs["auth_required"] = True
        # starttls: AUTH only once encrypted. tls: the session is encrypted from the first
        # byte, but aiosmtpd only knows about STARTTLS, so it must not require it. plain:
        # AUTH offered in clear on purpose, so that a client sending its credentials
        # without TLS is seen doing it.
        kwargs["auth_require_tls"] = args.mode == "starttls"
    if args.mode == "starttls":
        kwargs["tls_context"] = context
        kwargs["require_starttls"] = True

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    handler = Handler(recorder)

    def factory():
        return RecordingSMTP(handler, loop=loop, **kwargs)

    server = loop.run_until_complete(
        loop.create_server(
            factory,
            host="127.0.0.1",
            port=args.port,
            ssl=context if args.mode == "tls" else None,
        )
    )
    port = server.sockets[0].getsockname()[1]
    print(f"ready {port}", flush=True)
    try:
        loop.run_forever()
    finally:
        server.close()


if __name__ == "__main__":
    main()
