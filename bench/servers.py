"""Floor servers, each run as its own process: ``python -m bench.servers noop|naive --port P``.

* ``noop``: aiohttp reads the body and answers 202 (the HTTP floor).
* ``naive``: one process doing what the gateway must at least do, the naive way: parse + stock signxml
  verify (``bench.floors.StockVerifier``) + validate (lxml, our Validator) + one confirmed publish to a
  RabbitMQ quorum queue, then 202. No receipt, no audit, no status.
  ``--queue`` must already exist (the caller declares and deletes it).
* ``deliver``: the delivery floor, no HTTP server: consume ``--queue`` (prefetch 64), POST each body to
  ``--agency`` with aiohttp carrying its messageId as the Idempotency-Key, ack on a 2xx (requeue
  otherwise). No ledger, no audit, no metrics, no retry tiers.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import aio_pika
import aiohttp
from aiohttp import web

from bench.floors import stock_verifier
from gateway.security.parse import parse_message
from gateway.validation import DocumentTypeRegistry, Validator


def noop_app() -> web.Application:
    async def accept(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=202, text="accepted")

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/messages", accept)
    return app


def naive_app(pki_dir: Path, amqp_url: str, queue: str) -> web.Application:
    verifier = stock_verifier(pki_dir)
    validator = Validator(DocumentTypeRegistry.load())
    app = web.Application(client_max_size=64 * 1024 * 1024)

    async def connect(app: web.Application) -> None:
        app["connection"] = await aio_pika.connect_robust(amqp_url)
        app["channel"] = await app["connection"].channel(publisher_confirms=True)

    async def close(app: web.Application) -> None:
        await app["connection"].close()

    async def accept(request: web.Request) -> web.Response:
        raw = await request.read()
        validated = validator.validate(verifier.verify(parse_message(raw)))
        message = aio_pika.Message(raw, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
        await request.app["channel"].default_exchange.publish(message, routing_key=queue)
        return web.Response(status=202, text=validated.verified.header.message_id)

    app.on_startup.append(connect)
    app.on_cleanup.append(close)
    app.router.add_post("/v1/messages", accept)
    return app


async def deliver_until_killed(amqp_url: str, queue: str, agency: str, prefetch: int) -> None:
    """Until killed: each message of ``queue`` POSTed to ``agency``, then acked (requeued on a non-2xx)."""
    in_flight: set[asyncio.Task[None]] = set()
    connector = aiohttp.TCPConnector(limit=prefetch)
    async with aiohttp.ClientSession(connector=connector) as session:
        connection = await aio_pika.connect_robust(amqp_url)
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=prefetch)

        async def deliver(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            headers = {"Content-Type": "application/xml", "Idempotency-Key": message.message_id or ""}
            async with session.post(agency, data=message.body, headers=headers) as answer:
                await answer.read()
                ok = 200 <= answer.status < 300
            await (message.ack() if ok else message.nack(requeue=True))

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            task = asyncio.create_task(deliver(message))  # as the gateway does: the consumer never waits
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)

        await (await channel.get_queue(queue)).consume(on_message)
        await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.servers")
    parser.add_argument("kind", choices=["noop", "naive", "deliver"])
    parser.add_argument("--port", type=int, help="noop, naive: the port to listen on")
    parser.add_argument("--certs", type=Path)
    parser.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--queue")
    parser.add_argument("--agency", help="deliver: the agency's URL")
    parser.add_argument("--prefetch", type=int, default=64, help="deliver: unacked messages at most")
    parser.add_argument("--reuse-port", action="store_true", help="SO_REUSEPORT: several copies share the port")
    args = parser.parse_args()
    if args.kind == "deliver":
        asyncio.run(deliver_until_killed(args.amqp_url, args.queue, args.agency, args.prefetch))
        return
    if args.port is None:
        parser.error(f"{args.kind} needs --port")
    app = noop_app() if args.kind == "noop" else naive_app(args.certs, args.amqp_url, args.queue)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None, reuse_port=args.reuse_port or None)


if __name__ == "__main__":
    main()
