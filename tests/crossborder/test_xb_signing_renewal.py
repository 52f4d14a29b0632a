"""VN-NSW renews its signing pair in place and TH-NSW, told the new fingerprint first, takes its forwards.

The order an operator follows across a border: the new certificate's fingerprint goes into the peer's
registry (and ours), then the files are swapped. VN's next forward to TH is signed with the new pair,
and TH verifies it, delivers it and answers with a receipt VN keeps as proof.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from gateway.crossborder_demo import client_tls, issue_form_d, post, wait_for_destination
from gateway.model import State
from gateway.runtime import Gateway
from gateway.security.parse import parse_message
from gateway.security.trust import TrustStore, fingerprint
from gateway.security.verify import Verifier
from gateway.trust_reload import TrustReloader
from tests.crossborder.conftest import CrossBorder
from tests.operator.helpers import install, new_pair, register, sha256_of


def trust_reloader(gateway: Gateway) -> TrustReloader:
    gateway.start_reloader(interval=3600)  # the test polls itself
    assert gateway.trust_reloader is not None
    return gateway.trust_reloader


async def test_th_takes_vn_forwards_signed_with_vn_renewed_pair(
    cross_border: Callable[..., Awaitable[CrossBorder]],
) -> None:
    pair = await cross_border()
    dirs = pair.dirs
    th_trust, vn_trust = trust_reloader(pair.th.gateway), trust_reloader(pair.vn.gateway)
    renewed = new_pair(dirs.vn, "next")
    register(dirs.th, renewed)  # TH is told first,
    assert th_trust.check() is True
    register(dirs.vn, renewed)  # then VN's own registry and files
    install(dirs.vn, renewed)
    assert vn_trust.check() is True
    assert pair.vn.gateway.signer.renew_if_changed() is True

    form_d = issue_form_d(dirs.signer("VN-MOIT"))
    status, answer, headers = await post(pair.vn.url, form_d, client_tls(dirs.vn, dirs.party("VN-MOIT")))
    assert status == 202, answer[:600]
    eco_id = headers["X-NSW-Message-Id"]
    # VN's receipt to the ministry and its forward to TH: both signed with the new pair
    at_vn = Verifier(TrustStore.load(dirs.vn / "trust"), dirs.registry("vn")).verify(parse_message(answer))
    assert fingerprint(at_vn.signer) == sha256_of(renewed)
    delivered = (await pair.th_agencies.wait_for("customs"))[0]
    at_th = Verifier(TrustStore.load(dirs.th / "trust"), dirs.registry("th")).verify(parse_message(delivered.body))
    assert (at_th.party, at_th.header.message_id) == ("VN-NSW", eco_id)
    assert fingerprint(at_th.signer) == sha256_of(renewed)
    to_th = await wait_for_destination(pair.vn.gateway.ledger, eco_id, "asw:TH")
    assert to_th.state is State.DELIVERED, to_th.detail
