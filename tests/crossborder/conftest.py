"""Two real gateways, VN-NSW and TH-NSW, on loopback: each with its own dev PKI (made once per session,
copied per test), routing, embedded broker and ledger, an aiohttp ingress with mutual TLS, workers,
and loopback agencies behind it."""

from __future__ import annotations

import dataclasses
import shutil
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.crossborder_demo import (
    Agencies,
    Node,
    home_routing,
    ingress_url,
    loopback_socket,
    open_node,
    peer_routing,
    signer_of,
)
from gateway.partners import PartnerRegistry
from gateway.security.pki import KeyPair, init_dev_pki_pair, set_peer_url
from gateway.security.sign import Signer
from routing.engine import RoutingTable
from tests.e2e.conftest import rabbit  # noqa: F401 - the RabbitMQ fixture, re-exported for tests/crossborder


@dataclasses.dataclass(frozen=True)
class PairDirs:
    """The two gateways' certs directories (the ``init_dev_pki_pair`` layout)."""

    vn: Path
    th: Path

    def party(self, identity: str) -> KeyPair:
        folder = self.th / "parties" / identity
        if not folder.is_dir():
            folder = self.vn / "parties" / identity
        return KeyPair(folder / "key.pem", folder / "cert.pem")

    def signer(self, identity: str) -> Signer:
        return signer_of(self.party(identity))

    def registry(self, side: str) -> PartnerRegistry:
        return PartnerRegistry.load(getattr(self, side) / "partners.yaml")


@pytest.fixture(scope="session")
def pair_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pki-pair")
    init_dev_pki_pair(out)
    return out


@pytest.fixture
def dirs(pair_template: Path, tmp_path: Path) -> PairDirs:
    shutil.copytree(pair_template, tmp_path / "certs")
    return PairDirs(tmp_path / "certs" / "vn", tmp_path / "certs" / "th")


@dataclasses.dataclass
class CrossBorder:
    dirs: PairDirs
    vn: Node
    th: Node
    vn_agencies: Agencies
    th_agencies: Agencies


@pytest.fixture
async def cross_border(dirs: PairDirs, tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[CrossBorder]]]:
    """``await cross_border()`` starts both gateways. ``th_serving=False`` leaves TH's port refusing
    connections until ``await pair.th.serve()``; ``vn_sees_th_at`` points VN's registry entry for TH-NSW
    elsewhere (a relay, a fake peer); ``vn_policy`` / ``th_policy`` replace the delivery policies;
    ``vn_names_th`` False leaves asw:TH out of VN's rules file (delivered with the default options, as a
    peer the registry alone makes a destination); ``before_open(dirs)`` may edit the registries last;
    ``vn_settings`` overrides VN's settings (e.g. the RabbitMQ broker)."""
    nodes: list[Node] = []
    agencies: list[Agencies] = []

    async def node(
        side: str, sock: socket.socket, routing: RoutingTable, *, serve: bool = True, **settings: Any
    ) -> Node:
        try:
            opened = await open_node(
                getattr(dirs, side),
                tmp_path / f"{side}-var",
                identity=f"{side.upper()}-NSW",
                routing=routing,
                sock=sock,
                serve=serve,
                **settings,
            )
        except BaseException:
            sock.close()
            raise
        nodes.append(opened)
        return opened

    async def start(
        *,
        th_serving: bool = True,
        vn_sees_th_at: str | None = None,
        vn_policy: dict[str, Any] | None = None,
        th_policy: dict[str, Any] | None = None,
        vn_names_th: bool = True,
        before_open: Callable[[PairDirs], None] | None = None,
        vn_settings: dict[str, Any] | None = None,
    ) -> CrossBorder:
        vn_sock, th_sock = loopback_socket(), loopback_socket()
        set_peer_url(dirs.vn / "partners.yaml", "TH-NSW", vn_sees_th_at or ingress_url(th_sock))
        set_peer_url(dirs.th / "partners.yaml", "VN-NSW", ingress_url(vn_sock))
        vn_agencies, th_agencies = await Agencies().start(), await Agencies().start()
        agencies.extend([vn_agencies, th_agencies])
        peers = ["asw:TH"] if vn_names_th else []
        vn_routing = home_routing(vn_agencies.url, tmp_path / "vn-archive", peers=peers, **_policy(vn_policy))
        th_routing = peer_routing("TH", "TH-DFT", th_agencies.url, tmp_path / "th-archive", **_policy(th_policy))
        if before_open is not None:
            before_open(dirs)
        vn = await node("vn", vn_sock, vn_routing, **(vn_settings or {}))
        th = await node("th", th_sock, th_routing, serve=th_serving)
        return CrossBorder(dirs, vn, th, vn_agencies, th_agencies)

    try:
        yield start
    finally:
        for node in reversed(nodes):
            await node.close()
        for agency in agencies:
            await agency.stop()


def _policy(policy: dict[str, Any] | None) -> dict[str, Any]:
    return {} if policy is None else {"policy": policy}
