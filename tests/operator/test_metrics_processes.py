"""``--processes N`` metrics, in one test process: each "child" is a ``GatewayMetrics`` made while
prometheus_client's value class writes to that child's per-pid files, as the real children's do.

The real children (``nswgw run --processes 2``, SIGKILL, restart) are in tests/test_supervisor.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client import values
from prometheus_client.multiprocess import mark_process_dead
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import MULTIPROC_ENV, CertificateExpiryCollector, GatewayMetrics, multiprocess_dir
from tests.operator.helpers import Samples, parse_metrics, value

AsProcess = Callable[[int], AbstractContextManager[None]]
NOW = datetime(2030, 1, 1, tzinfo=UTC)


@pytest.fixture
def shared(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The supervisor's directory, as the children see it in their environment."""
    monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path))
    yield tmp_path
    values.close_all_multiprocess_files()


@pytest.fixture
def as_process(shared: Path, monkeypatch: pytest.MonkeyPatch) -> AsProcess:
    """``with as_process(pid):`` metric values created or changed inside are those of process ``pid``."""
    classes: dict[int, type] = {}

    @contextmanager
    def acting(pid: int) -> Iterator[None]:
        if pid not in classes:
            classes[pid] = values.MultiProcessValue(lambda: pid)
        monkeypatch.setattr(values, "ValueClass", classes[pid])
        try:
            yield
        finally:
            monkeypatch.setattr(values, "ValueClass", values.MutexValue)

    return acting


def child(as_process: AsProcess, shared: Path, pid: int) -> GatewayMetrics:
    with as_process(pid):
        return GatewayMetrics(multiprocess_dir=shared)


def scrape(metrics: GatewayMetrics) -> Samples:
    return parse_metrics(metrics.exposition().decode())


def test_every_child_answers_with_the_sum_and_a_dead_childs_counts_stay(as_process: AsProcess, shared: Path) -> None:
    first, second = child(as_process, shared, 1001), child(as_process, shared, 1002)
    with as_process(1001):
        for _ in range(3):
            first.accepted.inc()
        first.latency.labels(destination="moit").observe(0.2)
    with as_process(1002):
        second.accepted.inc()
        second.delivered.labels(destination="moit").inc()
        second.latency.labels(destination="moit").observe(3.0)

    for answering in (first, second):
        samples = scrape(answering)
        assert value(samples, "nsw_messages_accepted_total") == 4
        assert value(samples, "nsw_messages_delivered_total", destination="moit") == 1
        assert value(samples, "nsw_delivery_duration_seconds_count", destination="moit") == 2
        assert value(samples, "nsw_delivery_duration_seconds_bucket", destination="moit", le="0.25") == 1

    mark_process_dead(1002, str(shared))  # SIGKILLed: its counts were delivered, they stay counted
    assert value(scrape(first), "nsw_messages_accepted_total") == 4
    assert value(scrape(first), "nsw_messages_delivered_total", destination="moit") == 1


def test_in_flight_is_what_the_live_children_hold(as_process: AsProcess, shared: Path) -> None:
    first, second = child(as_process, shared, 1001), child(as_process, shared, 1002)
    with as_process(1001):
        first.in_flight.labels(destination="moit").inc(2)
    with as_process(1002):
        second.in_flight.labels(destination="moit").inc()
    assert value(scrape(first), "nsw_deliveries_in_flight", destination="moit") == 3

    mark_process_dead(1002, str(shared))  # its attempt goes back to the queue
    assert value(scrape(first), "nsw_deliveries_in_flight", destination="moit") == 2


def test_a_breaker_state_is_one_when_any_live_child_is_in_it(as_process: AsProcess, shared: Path) -> None:
    first, second = child(as_process, shared, 1001), child(as_process, shared, 1002)
    first.watch_breakers(lambda: {"moit": "closed", "mard": "closed"})
    second.watch_breakers(lambda: {"moit": "open", "mard": "closed"})
    for pid, metrics in ((1001, first), (1002, second)):
        with as_process(pid):
            metrics.publish_breakers()

    def states(samples: Samples, destination: str) -> dict[str, float | None]:
        return {
            state: value(samples, "nsw_circuit_breaker_state", destination=destination, state=state)
            for state in ("closed", "open", "half_open")
        }

    for answering in (first, second):
        assert states(scrape(answering), "moit") == {"closed": 1, "open": 1, "half_open": 0}
        assert states(scrape(answering), "mard") == {"closed": 1, "open": 0, "half_open": 0}

    mark_process_dead(1002, str(shared))  # the replacement starts closed and publishes its own
    assert states(scrape(first), "moit") == {"closed": 1, "open": 0, "half_open": 0}


def test_each_family_is_exported_once_and_custom_collectors_by_the_answering_child(
    as_process: AsProcess, shared: Path
) -> None:
    children = [child(as_process, shared, pid) for pid in (1001, 1002)]
    certificate = SimpleNamespace(
        party="VN-NSW", kind="gateway", subject="CN=gw", fingerprint="ab12", not_after=NOW + timedelta(days=2)
    )
    for pid, metrics in zip((1001, 1002), children, strict=True):
        metrics.add_collector(CertificateExpiryCollector(lambda: [certificate], clock=lambda: NOW))
        metrics.watch_breakers(lambda: {"moit": "half_open"})
        with as_process(pid):
            metrics.publish_breakers()

    text = children[0].exposition().decode()
    names = [family.name for family in text_string_to_metric_families(text)]
    assert len(names) == len(set(names))
    assert {"nsw_messages_accepted", "nsw_circuit_breaker_state", "nsw_certificate_expiry_seconds"} <= set(names)
    samples = parse_metrics(text)
    expiry = [v for (name, _), v in samples.items() if name == "nsw_certificate_expiry_seconds"]
    assert expiry == [2 * 86400]
    assert not [labels for (_, labels) in samples if "pid" in dict(labels)]


def test_the_test_process_and_a_single_gateway_keep_their_own_registry(shared: Path) -> None:
    # prometheus_client chose its value class when imported, without the variable: one process, no files
    assert multiprocess_dir() is None
    metrics = GatewayMetrics()
    assert not metrics.multiprocess
    metrics.accepted.inc()
    assert value(scrape(metrics), "nsw_messages_accepted_total") == 1
    assert not list(shared.iterdir())
    with pytest.raises(ValueError, match=MULTIPROC_ENV):
        GatewayMetrics(multiprocess_dir=shared)


def test_a_child_finds_its_directory_when_the_mode_is_on(as_process: AsProcess, shared: Path) -> None:
    with as_process(1001):
        assert multiprocess_dir() == shared
