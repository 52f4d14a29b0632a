"""The audit store down: the ingress answers 503 (signed UNAVAILABLE) and enqueues nothing.

The failure is real: the gateway's own ledger is closed underneath the running ingress, so every
claim and every audit record is refused by the store itself (``BrokerUnavailable``).
"""

from __future__ import annotations

from collections.abc import Callable

from gateway.envelope import NSMAP
from gateway.security.parse import parse_untrusted
from tests.conftest import RunningGateway
from tests.operator.helpers import scrape, value


async def test_audit_store_unavailable_means_503_and_nothing_enqueued(
    running: RunningGateway, signed: Callable[..., bytes]
) -> None:
    await running.gateway.ledger.close()

    response = await running.post(signed("licence.import"))
    body = await response.read()
    assert response.status == 503, body[:400]
    assert response.headers["X-NSW-Code"] == "UNAVAILABLE"
    assert response.headers["Retry-After"]
    answer = parse_untrusted(body)
    assert answer.findtext("e:Header/e:Subject/e:function", namespaces=NSMAP) == "21"
    assert answer.findtext(".//{urn:nsw:receipt:1}code") == "UNAVAILABLE"
    assert running.broker.published == [], "nothing may be enqueued without its audit record"

    ready = await running.client.get("/readyz")
    assert ready.status == 503
    assert (await ready.json())["ledger"] is False

    m = await scrape(running.client)
    assert value(m, "nsw_messages_rejected_total", code="UNAVAILABLE") == 1
    assert value(m, "nsw_messages_accepted_total") == 0
