"""The printed table: each gateway figure next to the floor it is bounded by, with the ratio."""

from __future__ import annotations

import statistics
from typing import Any


def _f(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _ratio(value: float | None, floor: float | None) -> str:
    return "-" if not value or not floor else f"{value / floor:.2f}"


def _mb(kb: int | None) -> str:
    return "-" if kb is None else f"{kb / 1024:.0f}"


def _cpu_line(cpu: dict[str, Any], processes: int, what: str = "message at saturation", who: str = "gateway") -> str:
    """Where the machine's CPU went, in ms per accepted (or delivered) message; ``who``: the measured processes."""
    per = cpu["ms_per_message"]
    parts = [f"{who} {_f(per['gateway'], 2)} ({processes} processes)"]
    parts += [f"{name} {_f(per[name], 2)}" for name in ("broker", "load generator", "agency") if per.get(name)]
    parts.append(f"whole machine {_f(per['machine'], 2)}")
    busy = f"{_f(cpu['busy_cores'], 2)} of {cpu['cpus']} cores busy"
    return f"     CPU ms per {what}: {', '.join(parts)}; {busy}"


def _stage_line(phase: dict[str, Any]) -> str | None:
    """Where an accepted message's time went, stage by stage (the gateway's nsw_ingress_stage_seconds)."""
    stages = phase.get("stages")
    if not stages:
        return None
    parts = [f"{name} {_f(s['mean_ms'], 2)} ({_f(s['p99_under_ms'], 2)})" for name, s in stages.items()]
    return f"       stages, mean ms (99% under): {', '.join(parts)}"


def _combined(ingress: float | None, delivery: float | None) -> float | None:
    """Messages/s of a process set that both accepts and delivers each message, from the rates of each alone
    on the same cores: every message costs the time of one of each (1 / (1/a + 1/b))."""
    return 1 / (1 / ingress + 1 / delivery) if ingress and delivery else None


def _split_lines(
    split: dict[str, Any], naive_n: float | None, naive_delivery: float | None, processes: int, row: str
) -> list[str]:
    """Ingress alone (`serve`, nothing consuming) against the naive pipeline, then delivery alone (`worker`)
    against the ingress (does it keep up?) and against the naive delivery floor."""
    ingress, delivery = split["ingress"], split["delivery"]
    accepted = ingress["accepted_per_s"]
    naive = (f"naive x{processes}", naive_n) if naive_n else ("", None)
    lines = [
        row.format(
            "  ingress alone (`serve`), accepted/s", _f(accepted), _f(naive[1]), _ratio(accepted, naive[1]), naive[0]
        )
    ]
    lines.append(_cpu_line(ingress["cpu"], processes, "accepted message"))
    done = delivery["delivered_per_s"]
    lines.append(
        row.format(
            "  delivery alone (`worker`), delivered/s", _f(done), _f(accepted), _ratio(done, accepted), "ingress alone"
        )
    )
    lines.append(_cpu_line(delivery["cpu"], processes, "delivery"))
    if naive_delivery:
        label = f"naive delivery x{processes}"
        ratio = _ratio(done, naive_delivery)
        lines.append(row.format("  delivery alone vs naive delivery", _f(done), _f(naive_delivery), ratio, label))
    if ingress.get("delivered_meanwhile"):
        lines.append(f"     ! {ingress['delivered_meanwhile']} deliveries reached the agency while only `serve` ran")
    if not delivery["all_delivered"]:
        lines.append(f"     ! only {delivery['delivered']} of the accepted messages were delivered")
    return lines


def paired_lines(paired: dict[str, Any], processes: int, row: str) -> list[str]:
    """The issue's ratio from alternating phases (bench/paired.py): its median, and every phase."""
    ratios = paired["ratios"]
    label = f"  `{paired['command']}` vs naive x{processes}, alternating"
    gateway, naive = statistics.median(paired["gateway_per_s"]), statistics.median(paired["naive_per_s"])
    against = f"median of {len(ratios)} ratios"
    lines = [row.format(label, _f(gateway), _f(naive), f"{paired['median_ratio']:.2f}", against)]
    phases = [f"naive {_f(paired['naive_per_s'][0])}"]
    for done, after in zip(paired["gateway_per_s"], paired["naive_per_s"][1:], strict=True):
        phases += [f"gateway {_f(done)}", f"naive {_f(after)}"]
    each = ", ".join(f"{r:.2f}" for r in ratios)
    lines.append(f"     {paired['duration_s']:g} s phases, in turn: {' | '.join(phases)}; ratios {each}")
    if paired["all_delivered"] is False or any(paired["other_answers"]):
        lines.append(f"     ! other answers {paired['other_answers']}, all delivered: {paired['all_delivered']}")
    return lines


def naive_bracketed(floor: dict[str, Any]) -> float | None:
    """The naive pipeline in N processes during the gateway's runs: the mean of its measurements before and
    after them (just the one before when there is no second)."""
    rates = [floor[k]["accepted_per_s"] for k in ("naive_pipeline_n", "naive_pipeline_n_after") if k in floor]
    return sum(rates) / len(rates) if rates else None


def _floor_lines(floor: dict[str, Any], processes: int, row: str) -> list[str]:
    """The floors of one message size, each measured alone in this run."""
    lines: list[str] = []
    lines.append(
        row.format("  aiohttp no-op POST -> 202 (req/s)", _f(floor["noop_http"]["accepted_per_s"]), "", "", "")
    )
    lines.append(row.format("  parse (msg/s)", _f(floor["parse_per_s"]), "", "", ""))
    stock = _f(floor["signxml_verify_per_s"])
    lines.append(row.format("  signature verify, stock signxml (msg/s)", stock, "", "", ""))
    lines.append(row.format("  signature verify, our Verifier (msg/s)", _f(floor["verify_per_s"]), "", "", ""))
    lines.append(row.format("  validate, our Validator (msg/s)", _f(floor["validate_per_s"]), "", "", ""))
    if "publish_pipelined_per_s" in floor:
        lines.append(
            row.format("  confirmed publish one by one (msg/s)", _f(floor["publish_one_by_one_per_s"]), "", "", "")
        )
        lines.append(
            row.format("  confirmed publish pipelined (msg/s)", _f(floor["publish_pipelined_per_s"]), "", "", "")
        )
        naive = floor["naive_pipeline"]
        lines.append(row.format("  naive pipeline, 1 process (req/s)", _f(naive["accepted_per_s"]), "", "", ""))
        if "naive_pipeline_n" in floor:
            label = f"  naive pipeline, {processes} processes (req/s)"
            before = floor["naive_pipeline_n"]["accepted_per_s"]
            lines.append(row.format(label, _f(before), "", "", ""))
            if "naive_pipeline_n_after" in floor:
                after = floor["naive_pipeline_n_after"]["accepted_per_s"]
                label = "    the same after the gateway's runs (req/s)"
                ratio = _ratio(after, before)
                lines.append(row.format(label, _f(after), _f(before), ratio, "before; x N ratios: mean"))
    if "naive_delivery_n" in floor:
        drained = floor["naive_delivery_n"]
        label = f"  naive delivery, {processes} processes (deliveries/s)"
        lines.append(row.format(label, _f(drained["delivered_per_s"]), "", "", ""))
        lines.append(_cpu_line(drained["cpu"], processes, "delivery", who="floor"))
    return lines


def table(result: dict[str, Any]) -> str:
    processes = result["plan"]["processes"]
    lines = [
        f"NSW gateway bench ({'quick' if result['quick'] else 'full'}, {result['cpus']} CPUs, "
        f"`nswgw run --processes {processes}`)",
        "",
    ]
    row = "{:<44} {:>12} {:>12} {:>8}  {}"
    lines.append(row.format("measure", "value", "floor", "ratio", "floor is"))
    for size, floor in result["floors"].items():
        kb = f"{int(size) // 1000} KB"
        lines.append(f"-- floors, {kb}")
        lines += _floor_lines(floor, processes, row)
        for key, run in result["gateway"].items():
            backend, run_size = key.split("/")
            if run_size != size:
                continue
            sat, fixed = run["saturation"], run["fixed_rate"]
            naive_rate = floor.get("naive_pipeline", {}).get("accepted_per_s")
            bound, bound_name = (naive_rate, "naive pipeline") if naive_rate else (floor["verify_per_s"], "verify")
            lines.append(f"-- gateway, {backend}, {kb}")
            naive_n = naive_bracketed(floor)
            naive_delivery = floor.get("naive_delivery_n", {}).get("delivered_per_s")
            both = _combined(naive_n, naive_delivery)
            n = result["plan"]["processes"]
            same = [("accepted/s vs naive, same processes", sat["accepted_per_s"], naive_n, f"naive x{n}")]
            if both:  # `run` also delivers what it accepts, on the same cores: the like-for-like floor
                label = f"naive x{n}, delivering too"
                same.append(("accepted/s vs naive that also delivers", sat["accepted_per_s"], both, label))
            for label, value, against, against_name in (
                ("accepted/s at saturation", sat["accepted_per_s"], bound, bound_name),
                *(same if naive_n else []),
                ("accepted/s vs verify", sat["accepted_per_s"], floor["verify_per_s"], "verify"),
                ("delivered/s to the agency", sat["delivered_per_s"], sat["accepted_per_s"], "accepted/s"),
            ):
                lines.append(row.format(f"  {label}", _f(value), _f(against), _ratio(value, against), against_name))
            for alternating in result.get("paired", {}).get(key, []):
                lines += paired_lines(alternating, processes, row)
            offered = {float(rate): phase for rate, phase in run.get("curve", {}).items()}
            offered[result["plan"]["offered_rate"]] = fixed
            for rate, phase in sorted(offered.items()):
                lines.append(
                    row.format(
                        f"  p50 / p99 ms at {rate:.0f} msg/s offered",
                        f"{_f(phase['p50_ms'], 1)} / {_f(phase['p99_ms'], 1)}",
                        "",
                        "",
                        f"achieved {_f(phase['accepted_per_s'])}/s",
                    )
                )
                if "cpu" in phase:  # per message, partial load costs more than saturation: smaller batches
                    lines.append(_cpu_line(phase["cpu"], processes, f"message at {rate:.0f}/s"))
                lines += filter(None, [_stage_line(phase)])
            if "cpu" in sat:
                lines.append(_cpu_line(sat["cpu"], processes))
            lines += filter(None, [_stage_line(sat)])
            if key in result.get("split", {}):
                lines += _split_lines(result["split"][key], naive_n, naive_delivery, processes, row)
            statuses = {**sat["statuses"]}
            statuses.pop("202", None)
            if statuses or not sat["all_delivered"] or not fixed["all_delivered"]:
                lines.append(
                    f"     ! other answers {statuses}, all delivered: {sat['all_delivered']}/{fixed['all_delivered']}"
                )
            rss = ", ".join(f"{name} {_mb(kb)} MB" for name, kb in run["peak_rss_kb"].items())
            lines.append(f"     peak RSS: {rss}")
    for key, big in result["large"].items():
        backend = key.split("/")[0]
        what = "ePhyto with one attachment" if big.get("kind") == "attachment" else "licence, ~70,000 goods lines"
        lines.append(f"-- {big['bytes'] / 1e6:.1f} MB signed {what}, {backend}")
        lines.append(
            f"     accepted {big['accepted']} in {big['accept_s']:.2f}s, "
            f"delivered {big['delivered']} after {big['deliver_s']:.2f}s"
        )
        growth = ", ".join(
            f"{name} +{_mb(kb)} MB (peak {_mb(big['peak_rss_kb_after'][name])} MB)"
            for name, kb in big["peak_rss_growth_kb"].items()
        )
        lines.append(f"     peak RSS growth: {growth}")
    return "\n".join(lines)
