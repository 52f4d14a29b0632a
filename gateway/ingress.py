"""HTTP ingress (aiohttp): ``POST /v1/messages``, message status, health.

The handler only enforces transport limits (size, content type) and hands the bytes to the
pipeline; everything about the message itself is decided there.
"""

from __future__ import annotations

import json
from dataclasses import asdict, is_dataclass
from typing import TYPE_CHECKING, Final

from aiohttp import web

from gateway.access import Denied, StatusAccess
from gateway.errors import ErrorCode, Rejected
from gateway.metrics import metrics_response
from gateway.pipeline import IngressResult

if TYPE_CHECKING:
    from gateway.runtime import Gateway

XML_TYPES: Final = frozenset({"application/xml", "text/xml"})
GATEWAY_KEY: Final = web.AppKey("gateway", object)
ACCESS_KEY: Final = web.AppKey("status_access", StatusAccess)
CHUNK: Final = 256 * 1024


def _is_xml(content_type: str) -> bool:
    return content_type in XML_TYPES or (content_type.startswith("application/") and content_type.endswith("+xml"))


def _xml_response(result: IngressResult) -> web.Response:
    headers = {"X-NSW-Message-Id": result.message_id or ""}
    if result.code:
        headers["X-NSW-Code"] = result.code
    if result.replayed:
        headers["X-NSW-Replayed"] = "true"
    if result.status == 503:
        headers["Retry-After"] = "5"
    return web.Response(status=result.status, body=result.body, content_type="application/xml", headers=headers)


def _gateway(request: web.Request) -> Gateway:
    return request.app[GATEWAY_KEY]  # type: ignore[return-value]


async def post_message(request: web.Request) -> web.Response:
    gw = _gateway(request)
    limit = gw.settings.max_body_bytes
    if not _is_xml(request.content_type):
        error = Rejected(
            ErrorCode.UNSUPPORTED_MEDIA_TYPE,
            f"Content-Type {request.content_type or '(none)'} is not XML; send application/xml",
            "Content-Type",
        )
        return _xml_response(await gw.pipeline.reject_early(error))
    too_large = Rejected(ErrorCode.TOO_LARGE, f"the body is larger than the {limit} byte limit", "Content-Length")
    if request.content_length is not None and request.content_length > limit:
        return _xml_response(await gw.pipeline.reject_early(too_large))
    body = bytearray()
    async for chunk in request.content.iter_chunked(CHUNK):
        body += chunk
        if len(body) > limit:
            return _xml_response(await gw.pipeline.reject_early(too_large))
    return _xml_response(await gw.pipeline.submit(bytes(body)))


async def get_message(request: web.Request) -> web.Response:
    """Only the sender or an operator may read a status (gateway/access.py); nobody else learns it exists."""
    gw = _gateway(request)
    access = request.app[ACCESS_KEY]
    message_id = request.match_info["message_id"]
    try:
        caller = access.identify(request, message_id)
    except Denied as denied:
        return denied.response()
    status = await gw.ledger.status(message_id)
    verdict = access.decide(caller, status)
    if verdict == 403:
        return web.json_response({"error": "not a message you sent"}, status=403)
    if status is None:
        return web.json_response({"error": "unknown messageId"}, status=404)
    return web.json_response(status_document(status), dumps=lambda o: json.dumps(o, default=str))


async def metrics(request: web.Request) -> web.Response:
    if not request.app[ACCESS_KEY].metrics_allowed(request):
        return web.json_response({"error": "operator token required"}, status=401)
    return metrics_response(_gateway(request).metrics)


def status_document(status: object) -> dict[str, object]:
    if is_dataclass(status) and not isinstance(status, type):
        return asdict(status)
    raise TypeError(f"not a status record: {status!r}")


async def livez(_request: web.Request) -> web.Response:
    return web.json_response({"status": "alive"})


async def readyz(request: web.Request) -> web.Response:
    gw = _gateway(request)
    checks = {"broker": await gw.broker.ready(), "ledger": await gw.ledger.ready()}
    ready = all(checks.values())
    return web.json_response({"ready": ready, **checks}, status=200 if ready else 503)


def create_app(gateway: Gateway) -> web.Application:
    # aiohttp's own limit is set just above ours so that *we* answer 413 with a signed rejection.
    app = web.Application(client_max_size=gateway.settings.max_body_bytes + CHUNK)
    app[GATEWAY_KEY] = gateway
    app[ACCESS_KEY] = StatusAccess(
        operator_token=gateway.settings.operator_token, partners=gateway.partners, trust=gateway.trust
    )
    app.router.add_post("/v1/messages", post_message)
    app.router.add_get("/v1/messages/{message_id}", get_message)
    app.router.add_get("/livez", livez)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app
