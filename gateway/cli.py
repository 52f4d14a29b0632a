"""``nswgw``: the operator and partner command line.

nswgw serve | worker | run          the ingress, the delivery workers, or both in one process
nswgw demo                          the whole path on the embedded default, nothing to install
nswgw certs init DIR                a dev PKI and partner registry (test keys only)
nswgw certs check [--within 30d] [--crl-within 24h]
                                    certificates about to expire, CRLs about to go stale; exit 1 if
                                    one needs renewing
nswgw samples DIR                   a realistic unsigned sample envelope for every shipped type
nswgw sign FILE --key K --cert C    SystemSignature (and optionally the issuer's Body signature)
nswgw verify FILE                   offline check, the ingress's own code path
nswgw send FILE --url URL           POST; prints the receipt or rejection; exit 1 on rejection
nswgw routes explain FILE           which destinations a message goes to, and why
nswgw audit verify | trace ID       prove the audit trail is intact; a message's timeline
nswgw dlq list | show | replay      dead letters
nswgw config show                   the effective settings, secrets redacted
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from typing import Any

from gateway.config import Settings, load_settings
from gateway.errors import ConfigError, GatewayError, Rejected
from gateway.logs import configure_logging

EXIT_OK, EXIT_REJECTED, EXIT_USAGE = 0, 1, 2


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {
        "certs_dir": getattr(args, "certs", None),
        "data_dir": getattr(args, "data", None),
        "host": getattr(args, "host", None),
        "port": getattr(args, "port", None),
        "amqp_url": getattr(args, "amqp_url", None),
        "routing_file": getattr(args, "routing", None),
        "processes": getattr(args, "processes", None),
    }
    return load_settings(args.config, overrides=overrides)


# -- services ---------------------------------------------------------------------------------


async def _serve(
    settings: Settings,
    *,
    ingress: bool,
    worker: bool,
    metrics_port: int | None = None,
    metrics_host: str | None = None,
    reuse_port: bool = False,
    multiprocess_dir: Path | None = None,
) -> None:
    from aiohttp import web

    from gateway.heap import settle_startup_heap
    from gateway.ingress import create_app
    from gateway.metrics import GatewayMetrics, start_metrics_server
    from gateway.runtime import Gateway
    from gateway.server_tls import ServerTls

    metrics = GatewayMetrics(multiprocess_dir=multiprocess_dir)
    gw = await Gateway.open(settings, metrics=metrics)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner: web.AppRunner | None = None
    metrics_runner: web.AppRunner | None = None
    # --processes N: this child's breakers reach the other children's scrapes (gateway/metrics.py)
    publisher = asyncio.create_task(metrics.keep_breakers_published()) if metrics.multiprocess else None
    try:
        if worker:
            await gw.start_worker()
        # Routing hot reload (gateway/reload.py): the rules file is polled; SIGHUP reloads at once. The
        # ingress's certificate files are polled with it (gateway/server_tls.py).
        reloader = gw.start_reloader()
        loop.add_signal_handler(signal.SIGHUP, reloader.request)
        tls = ServerTls.from_settings(settings) if ingress else None
        if tls is not None:
            reloader.also_poll(tls.renew_if_changed)
        if metrics_port is not None:
            host = metrics_host or settings.host
            with _listening("metrics", host, metrics_port):
                metrics_runner = await start_metrics_server(gw.metrics, settings.operator_token, host, metrics_port)
            print(f"nswgw metrics on {host}:{metrics_port}/metrics", file=sys.stderr)
        settle_startup_heap()  # before the listener opens: its one full collection delays no request
        if ingress:
            runner = web.AppRunner(create_app(gw), handle_signals=False)
            await runner.setup()
            site = web.TCPSite(
                runner,
                settings.host,
                settings.port,
                ssl_context=tls.context if tls is not None else None,
                reuse_port=reuse_port or None,
            )
            with _listening("ingress", settings.host, settings.port):
                await site.start()
            print(f"nswgw listening on {settings.host}:{settings.port}", file=sys.stderr)
        await stop.wait()
    finally:
        if publisher is not None:
            publisher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await publisher
        if runner is not None:
            await runner.cleanup()
        if metrics_runner is not None:
            await metrics_runner.cleanup()
        await gw.close()


@contextlib.contextmanager
def _listening(what: str, host: str, port: int) -> Iterator[None]:
    """A port that cannot be bound (in use, not permitted, no such address) is a configuration error:
    exit 2, which also stops a supervisor's other children, rather than a crash a supervisor would
    restart forever with the same result."""
    try:
        yield
    except OSError as exc:
        raise ConfigError(f"cannot listen for {what} on {host}:{port}: {exc.strerror or exc}") from exc


def cmd_serve(args: argparse.Namespace) -> int:
    return _service(args, ingress=True, worker=False)


def cmd_worker(args: argparse.Namespace) -> int:
    return _service(args, ingress=False, worker=True)


def cmd_run(args: argparse.Namespace) -> int:
    return _service(args, ingress=True, worker=True)


def _service(args: argparse.Namespace, *, ingress: bool, worker: bool) -> int:
    settings = _settings(args)
    if settings.processes < 1:
        raise ConfigError(f"processes must be 1 or more, not {settings.processes}")
    if args.child is None and settings.processes > 1:
        from gateway.supervisor import Supervisor

        if ingress and settings.port == 0:
            raise ConfigError("--processes > 1 shares one listening port: give a fixed --port, not 0")
        return Supervisor(args.argv, settings.processes, data_dir=settings.data_dir).run()
    shared_metrics = None
    if args.child is not None:
        from gateway.metrics import MULTIPROC_ENV, multiprocess_dir

        shared_metrics = multiprocess_dir()
        if shared_metrics is None:
            raise ConfigError(f"--child is for the children of --processes N, whose supervisor sets {MULTIPROC_ENV}")
    metrics_port = args.metrics_port + (args.child or 0) if args.metrics_port is not None else None
    asyncio.run(
        _serve(
            settings,
            ingress=ingress,
            worker=worker,
            metrics_port=metrics_port,
            metrics_host=args.metrics_host,
            reuse_port=args.child is not None,
            multiprocess_dir=shared_metrics,
        )
    )
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from gateway.demo import run_demo

    return asyncio.run(run_demo(workdir=args.workdir, cross_border=args.cross_border))


# -- partner tools ----------------------------------------------------------------------------


def cmd_certs_init(args: argparse.Namespace) -> int:
    from gateway.security.pki import init_dev_pki

    pki = init_dev_pki(args.dir, force=args.force)
    print(f"dev PKI written to {args.dir} (test keys only)")
    print(f"partner registry: {pki.partners}")
    return EXIT_OK


def cmd_certs_check(args: argparse.Namespace) -> int:
    from gateway.partners import PartnerRegistry
    from gateway.security.expiry import parse_duration, render, report_for_settings

    windows = {}
    for option, text in (("--within", args.within), ("--crl-within", args.crl_within)):
        try:
            windows[option] = parse_duration(text)
        except ValueError as exc:
            print(f"{option}: {exc}", file=sys.stderr)
            return EXIT_USAGE
    settings = _settings(args)
    partners = PartnerRegistry.load(settings.partners_path)
    report = report_for_settings(settings, partners, windows["--within"], windows["--crl-within"])
    if args.json:
        print(json.dumps({**asdict(report), "failing": report.failing}, indent=2, default=_json_value))
    else:
        print("\n".join(render(report)))
    return EXIT_REJECTED if report.failing else EXIT_OK


def _json_value(value: object) -> object:
    """Durations as seconds (``remaining`` < 0 once expired); dates and paths as text."""
    return value.total_seconds() if isinstance(value, timedelta) else str(value)


def cmd_samples(args: argparse.Namespace) -> int:
    from gateway.samples import write_samples

    for path in write_samples(args.dir):
        print(path)
    return EXIT_OK


def cmd_sign(args: argparse.Namespace) -> int:
    from gateway.security.parse import parse_untrusted
    from gateway.security.sign import Signer, to_bytes

    root = parse_untrusted(args.file.read_bytes())
    if args.body_key is not None:
        issuer = Signer.from_files(args.body_key, args.body_cert, legacy_sha1=args.legacy_sha1)
        root = issuer.sign_content(root)
    signed = Signer.from_files(args.key, args.cert, legacy_sha1=args.legacy_sha1).sign_envelope(root)
    data = to_bytes(signed)
    if args.output is None:
        sys.stdout.buffer.write(data + b"\n")
    else:
        args.output.write_bytes(data)
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    from adapters.asw import withheld_peers
    from gateway.partners import PartnerRegistry, peer_destinations
    from gateway.pipeline import Admission
    from gateway.runtime import load_routing
    from gateway.security.trust import TrustStore
    from gateway.security.verify import Verifier
    from gateway.validation import DocumentTypeRegistry, Validator

    settings = _settings(args)
    trust = TrustStore.load(settings.trust_dir)
    partners = PartnerRegistry.load(settings.partners_path)
    routing = load_routing(settings)
    admission = Admission(
        settings=settings,
        verifier=Verifier(trust, partners),
        validator=Validator(DocumentTypeRegistry.load(settings.registry_file)),
        partners=partners,
        routing=routing,
        extra_destinations=peer_destinations(partners),
        withheld=withheld_peers(routing.destinations, partners),
    )
    try:
        routed = admission.admit(args.file.read_bytes())
    except Rejected as error:
        print(
            json.dumps(
                {
                    "ok": False,
                    "code": error.code.value,
                    "http_status": error.http_status,
                    "detail": error.detail,
                    "location": error.location,
                },
                indent=2,
            )
        )
        return EXIT_REJECTED
    verified = routed.validated.verified
    print(
        json.dumps(
            {
                "ok": True,
                "message_id": verified.header.message_id,
                "party": verified.party,
                "document_type": routed.validated.document_type,
                "signature_algorithm": verified.signature_algorithm,
                "legacy_algorithm": verified.legacy_algorithm,
                "body_signature": asdict(verified.body_signature),
                "destinations": [{"destination": r.destination, "rule": r.rule} for r in routed.routes],
            },
            indent=2,
        )
    )
    return EXIT_OK


def cmd_send(args: argparse.Namespace) -> int:
    import httpx

    from gateway.envelope import NSMAP
    from gateway.security.parse import parse_untrusted

    response = httpx.post(
        args.url, content=args.file.read_bytes(), headers={"Content-Type": "application/xml"}, timeout=args.timeout
    )
    sys.stdout.write(response.text + "\n")
    code = response.headers.get("X-NSW-Code")
    if response.status_code == 202:
        print(f"accepted: HTTP 202, receipt for {response.headers.get('X-NSW-Message-Id')}", file=sys.stderr)
        return EXIT_OK
    with contextlib.suppress(Rejected):
        answer = parse_untrusted(response.content)
        code = answer.findtext(".//{urn:nsw:receipt:1}code", namespaces=NSMAP) or code
    print(f"rejected: HTTP {response.status_code} {code}", file=sys.stderr)
    return EXIT_REJECTED


def cmd_routes_explain(args: argparse.Namespace) -> int:
    from adapters.asw import withheld_peers
    from gateway.envelope import content_document, parse_header
    from gateway.partners import PartnerRegistry, peer_destinations
    from gateway.runtime import load_routing
    from gateway.security.parse import parse_untrusted

    settings = _settings(args)
    root = parse_untrusted(args.file.read_bytes())
    routing = load_routing(settings)
    partners = PartnerRegistry.load(settings.partners_path) if settings.partners_path.exists() else None
    explanation = routing.explain(
        parse_header(root),
        content_document(root),
        extra_destinations=peer_destinations(partners) if partners else (),
        withheld=withheld_peers(routing.destinations, partners) if partners else {},
    )
    print(explanation.render())
    return EXIT_OK


# -- operators --------------------------------------------------------------------------------


async def _with_ledger(settings: Settings, action: Callable[[Any], Awaitable[int]]) -> int:
    from gateway.stores.factory import make_ledger

    ledger = make_ledger(settings.database_url, settings.data_dir, synchronous=settings.sqlite_synchronous)
    await ledger.open()
    try:
        return await action(ledger)
    finally:
        await ledger.close()


def cmd_audit_verify(args: argparse.Namespace) -> int:
    async def action(ledger: Any) -> int:
        report = await ledger.verify_audit()
        print(json.dumps(asdict(report), indent=2, default=str))
        return EXIT_OK if report.ok else EXIT_REJECTED

    return asyncio.run(_with_ledger(_settings(args), action))


def cmd_audit_trace(args: argparse.Namespace) -> int:
    async def action(ledger: Any) -> int:
        records = await ledger.trace(args.message_id)
        for record in records:
            print(json.dumps(asdict(record), default=str))
        return EXIT_OK if records else EXIT_REJECTED

    return asyncio.run(_with_ledger(_settings(args), action))


async def _with_broker(settings: Settings, action: Callable[[Any], Awaitable[int]]) -> int:
    from gateway.runtime import broker_for

    broker = broker_for(settings)
    await broker.start()
    try:
        return await action(broker)
    finally:
        await broker.close()


def _dead_letter_json(record: Any, *, with_payload: bool) -> dict[str, Any]:
    d = record.delivery
    out: dict[str, Any] = {
        "message_id": d.message_id,
        "destination": d.destination,
        "sender": d.sender,
        "document_type": d.document_type,
        "attempt": d.attempt,
        "code": record.code,
        "reason": record.reason,
        "dead_at": record.dead_at,
    }
    if with_payload:
        out["payload"] = d.payload.decode("utf-8", errors="replace")
    return out


def cmd_dlq(args: argparse.Namespace) -> int:
    settings = _settings(args)

    async def action(broker: Any) -> int:
        from gateway.dlq import replay_dead_letters
        from gateway.runtime import load_routing

        async def destinations(ledger: Any) -> list[str]:
            if args.destination is not None:
                return [args.destination]
            # RabbitMQ cannot list queues, so every place a dead letter can be is named: the routed
            # destinations, and every destination the ledger holds a DEAD copy for (a copy is recorded
            # DEAD before it is dead-lettered): ASW peers the routing file does not list, destinations
            # it no longer lists. Dead queues are read passively, never created.
            return sorted({*load_routing(settings).destinations, *await ledger.dead_destinations()})

        if args.dlq_command == "replay":
            if args.id is None and args.destination is None and not args.all:
                print("replay needs --id, --destination or --all", file=sys.stderr)
                return EXIT_USAGE

            async def replay(ledger: Any) -> int:
                moved = 0
                for name in await destinations(ledger):
                    moved += await replay_dead_letters(broker, ledger, destination=name, message_id=args.id)
                return moved

            moved = await _with_ledger(settings, replay)
            print(f"replayed {moved} dead letter(s)")
            return EXIT_OK if moved else EXIT_REJECTED

        async def listing(ledger: Any) -> int:
            for name in await destinations(ledger):
                for record in await broker.list_dead(name):
                    if args.id is None or record.delivery.message_id == args.id:
                        print(json.dumps(_dead_letter_json(record, with_payload=args.dlq_command == "show")))
            return EXIT_OK

        return await _with_ledger(settings, listing)

    return asyncio.run(_with_broker(settings, action))


def cmd_config_show(args: argparse.Namespace) -> int:
    print(json.dumps(_settings(args).redacted(), indent=2, default=str))
    return EXIT_OK


# -- argument parsing ---------------------------------------------------------------------------


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML settings file (NSW_* environment variables override it)")
    parser.add_argument("--certs", type=Path, help="certificate folder made by `nswgw certs init`")
    parser.add_argument("--data", type=Path, help="data folder (embedded broker, SQLite ledger)")
    parser.add_argument("--amqp-url", help="RabbitMQ URL; the embedded broker when absent")
    parser.add_argument("--routing", type=Path, help="routing rules file")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nswgw", description="NSW message-exchange gateway")
    sub = parser.add_subparsers(dest="command", required=True)

    for name, func, help_ in (
        ("serve", cmd_serve, "run the HTTP ingress"),
        ("worker", cmd_worker, "run the delivery workers"),
        ("run", cmd_run, "ingress and workers in one process"),
    ):
        p = sub.add_parser(name, help=help_)
        _common(p)
        p.add_argument("--host")
        p.add_argument("--port", type=int)
        p.add_argument("--metrics-port", type=int, help="also serve /metrics on this port (e.g. for a worker)")
        p.add_argument("--metrics-host", help="address for --metrics-port (default: the --host setting)")
        p.add_argument(
            "--processes",
            type=int,
            help="run this many copies sharing the port, one per core (setting `processes`; default 1); "
            "process I also serves /metrics on --metrics-port + I; every /metrics shows the whole gateway's counts",
        )
        p.add_argument("--child", type=int, help=argparse.SUPPRESS)  # set by the supervisor
        p.set_defaults(func=func)

    p = sub.add_parser("demo", help="the whole path on the embedded default")
    p.add_argument("--workdir", type=Path, help="keep the demo's files here (default: a temporary folder)")
    p.add_argument("--cross-border", action="store_true", help="two gateways (VN and TH) on loopback")
    p.set_defaults(func=cmd_demo)

    certs = sub.add_parser("certs", help="certificates").add_subparsers(dest="certs_command", required=True)
    p = certs.add_parser("init", help="write a dev PKI and partner registry (test keys only)")
    p.add_argument("dir", type=Path)
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_certs_init)
    p = certs.add_parser(
        "check", help="list certificates expiring and CRLs going stale soon; exit 1 if one needs renewing"
    )
    _common(p)
    p.add_argument("--within", default="30d", help="window for certificates: 30d, 12h, 2w (default 30d)")
    p.add_argument("--crl-within", default="24h", help="window for CRLs, which last days (default 24h)")
    p.add_argument("--json", action="store_true", help="the full report as JSON")
    p.set_defaults(func=cmd_certs_check)

    p = sub.add_parser("samples", help="write an unsigned sample envelope for every shipped type")
    p.add_argument("dir", type=Path)
    p.set_defaults(func=cmd_samples)

    p = sub.add_parser("sign", help="sign an envelope")
    p.add_argument("file", type=Path)
    p.add_argument("--key", type=Path, required=True)
    p.add_argument("--cert", type=Path, required=True)
    p.add_argument("--body-key", type=Path, help="issuing authority's key: also sign Body/Content")
    p.add_argument("--body-cert", type=Path)
    p.add_argument("--legacy-sha1", action="store_true", help="RSA-SHA1 + inclusive C14N (legacy partners)")
    p.add_argument("-o", "--output", type=Path)
    p.set_defaults(func=cmd_sign)

    p = sub.add_parser("verify", help="check a signed message offline, as the ingress would")
    _common(p)
    p.add_argument("file", type=Path)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("send", help="POST a signed message to a gateway")
    p.add_argument("file", type=Path)
    p.add_argument("--url", required=True)
    p.add_argument("--timeout", type=float, default=30.0)
    p.set_defaults(func=cmd_send)

    routes = sub.add_parser("routes", help="routing").add_subparsers(dest="routes_command", required=True)
    p = routes.add_parser("explain", help="which destinations a message goes to, and why")
    _common(p)
    p.add_argument("file", type=Path)
    p.set_defaults(func=cmd_routes_explain)

    audit = sub.add_parser("audit", help="the audit trail").add_subparsers(dest="audit_command", required=True)
    p = audit.add_parser("verify", help="check the hash chain; names the first bad record")
    _common(p)
    p.set_defaults(func=cmd_audit_verify)
    p = audit.add_parser("trace", help="a message's timeline")
    _common(p)
    p.add_argument("message_id")
    p.set_defaults(func=cmd_audit_trace)

    dlq = sub.add_parser("dlq", help="dead letters").add_subparsers(dest="dlq_command", required=True)
    for name in ("list", "show", "replay"):
        p = dlq.add_parser(name)
        _common(p)
        p.add_argument("--destination")
        p.add_argument("--id")
        if name == "replay":
            p.add_argument("--all", action="store_true", help="replay every dead letter")
        p.set_defaults(func=cmd_dlq)

    config = sub.add_parser("config", help="settings").add_subparsers(dest="config_command", required=True)
    p = config.add_parser("show", help="the effective settings, secrets redacted")
    _common(p)
    p.set_defaults(func=cmd_config_show)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # the supervisor starts its children with the same arguments
    configure_logging("console" if args.command in {"demo"} else "json", "info")
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except GatewayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_REJECTED


if __name__ == "__main__":
    sys.exit(main())
