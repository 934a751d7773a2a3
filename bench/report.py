"""From raw request records to rates, latency percentiles and ratios; the table, the JSON and the plot."""

from __future__ import annotations

import json
from pathlib import Path

KINDS = ("floor", "many", "hot", "xml")
OK = {"health": "200", "many": "201", "hot": "201", "xml": "201", "floor": "ok"}


def measure(kind: str, batch: int, records: list, start: float, until: float) -> dict:
    """Closed-loop rates over the window [start, until]: each request counts for the share of its own
    duration that fell in the window, so a long request straddling an edge is neither lost nor doubled.
    Latencies and statuses are those of every request that overlapped the window."""
    seconds = until - start
    ok = OK[kind]
    done = 0.0
    latencies = []
    statuses: dict[str, int] = {}
    for t0, t1, status in records:
        overlap = min(t1, until) - max(t0, start)
        if overlap < 0 or (overlap == 0 and t1 > t0):
            continue
        if status == ok:
            done += overlap / (t1 - t0) if t1 > t0 else 1.0
        latencies.append((t1 - t0) * 1000)
        statuses[status] = statuses.get(status, 0) + 1
    latencies.sort()

    def percentile(p: float) -> float | None:
        if not latencies:
            return None
        return round(latencies[min(len(latencies) - 1, max(0, round(p / 100 * len(latencies) + 0.5) - 1))], 2)

    requests_per_second = done / seconds
    return {
        "requests": len(latencies),
        "statuses": statuses,
        "not_ok": sum(n for status, n in statuses.items() if status != ok),
        "requests_per_second": round(requests_per_second, 1),
        "transfers_per_second": None if kind == "health" else round(requests_per_second * batch, 1),
        "p50_ms": percentile(50),
        "p95_ms": percentile(95),
        "p99_ms": percentile(99),
    }


def add_ratios(results: list[dict]) -> None:
    """vs_floor (end-to-end over the floor), hot_vs_many, and for batch 1 vs_health, at equal concurrency."""
    by_key = {(r["kind"], r["batch"], r["concurrency"]): r for r in results}
    for r in results:
        if r["kind"] not in ("many", "hot", "xml"):
            continue
        floor = by_key.get(("floor", r["batch"], r["concurrency"]))
        if floor and floor["transfers_per_second"]:
            r["vs_floor"] = round(r["transfers_per_second"] / floor["transfers_per_second"], 3)
        many = by_key.get(("many", r["batch"], r["concurrency"]))
        if r["kind"] == "hot" and many and many["transfers_per_second"]:
            r["hot_vs_many"] = round(r["transfers_per_second"] / many["transfers_per_second"], 3)
        if r["kind"] == "xml" and many and many["transfers_per_second"]:
            r["xml_vs_json"] = round(r["transfers_per_second"] / many["transfers_per_second"], 3)
        health = by_key.get(("health", 0, r["concurrency"]))
        if r["batch"] == 1 and health and health["requests_per_second"]:
            r["vs_health"] = round(r["requests_per_second"] / health["requests_per_second"], 3)


def goals(results: list[dict]) -> dict:
    """The goals, each with every ratio it covers and whether all of them pass."""

    def check(name: str, threshold: float, key: str, rows: list[dict]) -> dict:
        ratios = {f"{r['kind']} batch {r['batch']} c{r['concurrency']}": r.get(key) for r in rows}
        known = [v for v in ratios.values() if v is not None]
        return {
            "goal": name,
            "threshold": threshold,
            "ratios": ratios,
            "min": min(known) if known else None,
            "met": bool(known) and min(known) >= threshold,
        }

    return {
        "floor": check(
            "end-to-end >= 0.5 x floor, batch >= 100, many accounts",
            0.5,
            "vs_floor",
            [r for r in results if r["kind"] == "many" and r["batch"] >= 100],
        ),
        "hot": check(
            "hot account >= 0.8 x many accounts, batch >= 100",
            0.8,
            "hot_vs_many",
            [r for r in results if r["kind"] == "hot" and r["batch"] >= 100],
        ),
        "xml": check(
            "pain.001 file >= 0.5 x the same request as JSON, batch >= 100",
            0.5,
            "xml_vs_json",
            [r for r in results if r["kind"] == "xml" and r["batch"] >= 100],
        ),
        "health": check(
            "batch 1 >= 0.5 x GET /health rate, same concurrency",
            0.5,
            "vs_health",
            [r for r in results if r["kind"] == "many" and r["batch"] == 1],
        ),
    }


def _number(value, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def table(results: list[dict]) -> str:
    """The main table, Markdown, ready for the README."""
    lines = [
        "| case | batch | conc | req/s | transfers/s | p50 ms | p95 ms | p99 ms | not ok | vs floor | hot/many "
        "| xml/json | vs health |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        cells = [
            r["kind"],
            r["batch"] or "-",
            r["concurrency"],
            _number(r["requests_per_second"], 1 if r["requests_per_second"] < 100 else 0),
            _number(r["transfers_per_second"]),
            _number(r["p50_ms"], 1),
            _number(r["p95_ms"], 1),
            _number(r["p99_ms"], 1),
            r["not_ok"],
            _number(r.get("vs_floor"), 2),
            _number(r.get("hot_vs_many"), 2),
            _number(r.get("xml_vs_json"), 2),
            _number(r.get("vs_health"), 2),
        ]
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    return "\n".join(lines)


def resources_table(results: list[dict]) -> str:
    """Where the CPU went (average cores) and what PostgreSQL's active backends waited on, per case."""
    lines = [
        "| case | batch | conc | service | pg backends | pg shared | client | other | service ms/req | pg ms/req "
        "| requests per call | active backends: waits |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in results:
        cores = r["cores"]
        waits = ", ".join(f"{w} {n}" for w, n in list(r["waits"].items())[:4]) or "-"
        lines.append(
            f"| {r['kind']} | {r['batch'] or '-'} | {r['concurrency']} | {cores['service']:.2f} | {cores['pg']:.2f} "
            f"| {cores['pg_shared']:.2f} | {cores['client']:.2f} | {cores['other']:.2f} "
            f"| {_number(r['cpu_ms_per_request']['service'], 3)} | {_number(r['cpu_ms_per_request']['pg'], 3)} "
            f"| {_number(r.get('requests_per_call'), 2)} | {waits} |"
        )
    return "\n".join(lines)


def goals_text(summary: dict) -> str:
    lines = []
    for goal in summary.values():
        verdict = "met" if goal["met"] else "NOT met"
        ratios = ", ".join(f"{k}: {_number(v, 2)}" for k, v in goal["ratios"].items())
        lines.append(f"- {goal['goal']}: min {_number(goal['min'], 2)}, {verdict} ({ratios})")
    return "\n".join(lines)


def write_json(path: Path, document: dict) -> None:
    path.write_text(json.dumps(document, indent=2) + "\n")


def plot(path: Path, results: list[dict], title: str) -> None:
    """Transfers/s and p99 latency against batch size, one line per case and concurrency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"floor": "tab:gray", "many": "tab:blue", "hot": "tab:red", "xml": "tab:green"}
    styles = ["-", "--", ":", "-."]
    concurrencies = sorted({r["concurrency"] for r in results})
    figure, (throughput, latency) = plt.subplots(1, 2, figsize=(13, 5.5))
    for kind in KINDS:
        for i, concurrency in enumerate(concurrencies):
            rows = sorted(
                (r for r in results if r["kind"] == kind and r["concurrency"] == concurrency),
                key=lambda r: r["batch"],
            )
            rows = [r for r in rows if r["transfers_per_second"]]
            if not rows:
                continue
            label = f"{kind} c{concurrency}"
            style = dict(color=colors[kind], linestyle=styles[i % len(styles)], marker="o", markersize=3)
            throughput.plot([r["batch"] for r in rows], [r["transfers_per_second"] for r in rows], label=label, **style)
            latency.plot([r["batch"] for r in rows], [r["p99_ms"] for r in rows], label=label, **style)
    for axes, ylabel in ((throughput, "transfers/s"), (latency, "p99 latency (ms)")):
        axes.set_xscale("log")
        axes.set_yscale("log")
        axes.set_xlabel("transfers per request (batch)")
        axes.set_ylabel(ylabel)
        axes.grid(True, which="both", alpha=0.3)
    throughput.set_title("throughput (floor = one INSERT...jsonb_to_recordset, no HTTP, no rules)")
    latency.set_title("p99 latency per request")
    throughput.legend(fontsize=7, ncol=3)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
