"""In-process floors: signature verify (stock signxml as a naive gateway calls it, and our Verifier), the
validation fast path (our Validator), and confirmed publishes to a RabbitMQ quorum queue (one by one,
and pipelined)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import aio_pika
from cryptography import x509
from signxml.verifier import XMLVerifier

from bench.messages import sender_cert
from gateway.config import Settings
from gateway.envelope import parse_header
from gateway.model import BodySignature, ParsedMessage, VerifiedMessage
from gateway.partners import PartnerRegistry
from gateway.security.parse import parse_message
from gateway.security.trust import TrustStore
from gateway.security.verify import Verifier
from gateway.validation import DocumentTypeRegistry, Validator

QUORUM: dict[str, Any] = {"x-queue-type": "quorum"}


def per_second(action: Callable[[Any], object], items: Sequence[Any]) -> float:
    started = time.perf_counter()
    for item in items:
        action(item)
    return len(items) / (time.perf_counter() - started)


class StockVerifier:
    """What a naive gateway does, as the issue's floor describes it: stock ``signxml.XMLVerifier().verify``
    with the sender's (pre-loaded) certificate, the header read from signxml's signed tree. No trust
    chain, registry or policy checks: those are extra work the gateway does and the floor does not."""

    def __init__(self, cert: x509.Certificate, party: str) -> None:
        self.cert, self.party = cert, party

    def verify(self, parsed: ParsedMessage) -> VerifiedMessage:
        signed = XMLVerifier().verify(parsed.root, x509_cert=self.cert).signed_xml  # type: ignore[union-attr]
        assert signed is not None
        return VerifiedMessage(
            raw=parsed.raw,
            digest=parsed.digest,
            received_at=parsed.received_at,
            envelope=signed,
            header=parse_header(signed),
            party=self.party,
            signer=self.cert,
            signature_algorithm="stock",
            legacy_algorithm=False,
            body_signature=BodySignature(present=False, valid=False),
        )


def stock_verifier(pki_dir: Path) -> StockVerifier:
    return StockVerifier(*sender_cert(pki_dir))


def verify_and_validate(pki_dir: Path, messages: Sequence[bytes]) -> dict[str, float]:
    settings = Settings(certs_dir=pki_dir)
    verifier = Verifier(TrustStore.load(settings.trust_dir), PartnerRegistry.load(settings.partners_path))
    validator = Validator(DocumentTypeRegistry.load())
    validator.warm_up()
    parsed = [parse_message(m) for m in messages]
    verified: list[VerifiedMessage] = [verifier.verify(p) for p in parsed[:1]]  # warm caches
    verify_rate = per_second(lambda p: verified.append(verifier.verify(p)), parsed)
    stock = stock_verifier(pki_dir)
    return {
        "parse_per_s": per_second(parse_message, messages),
        "signxml_verify_per_s": per_second(stock.verify, parsed),
        "verify_per_s": verify_rate,
        "validate_per_s": per_second(validator.validate, verified[1:]),
    }


async def publish_confirmed(
    exchange: aio_pika.abc.AbstractExchange, queue: str, body: bytes, message_ids: Sequence[str | None], window: int
) -> None:
    """One persistent message per id (``None``: no messageId), at most ``window`` confirms awaited together."""
    for first in range(0, len(message_ids), window):
        await asyncio.gather(
            *(
                exchange.publish(
                    aio_pika.Message(body, message_id=mid, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                    routing_key=queue,
                )
                for mid in message_ids[first : first + window]
            )
        )


async def _publish(amqp_url: str, body: bytes, count: int, window: int) -> float:
    queue = f"nswbench-{uuid.uuid4().hex[:8]}"
    await declare_quorum(amqp_url, queue)
    try:
        connection = await aio_pika.connect(amqp_url)
        try:
            exchange = (await connection.channel(publisher_confirms=True)).default_exchange
            started = time.perf_counter()
            await publish_confirmed(exchange, queue, body, [None] * count, window)
            return count / (time.perf_counter() - started)
        finally:
            await connection.close()
    finally:  # on a connection of its own: the shared broker may have closed the one above
        await declare_quorum(amqp_url, queue, delete=True)


async def publish_rates(amqp_url: str, body: bytes, count: int) -> dict[str, float]:
    return {
        "publish_one_by_one_per_s": await _publish(amqp_url, body, max(200, count // 5), 1),
        "publish_pipelined_per_s": await _publish(amqp_url, body, count, 256),
    }


async def declare_quorum(amqp_url: str, queue: str, *, delete: bool = False) -> None:
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        if delete:
            await channel.queue_delete(queue)
        else:
            await channel.declare_queue(queue, durable=True, arguments=QUORUM)
    finally:
        await connection.close()


async def purge_queue(amqp_url: str, queue: str) -> None:
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        await (await channel.get_queue(queue, ensure=True)).purge()
    finally:
        await connection.close()
