"""Ratios, targets, tables and the chart of ``compare.py`` (imported by it, not run by itself)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from harness import Run, median_round

# Cold-epoch goal against the seed recipe, by injected latency; other latencies are reported without one.
SEED_GOALS = {20.0: 8.0, 100.0: 25.0}
WARM_VS_TFDATA_GOAL = 1.5
WARM_VS_RAW_GOAL = 0.75
COLD_VS_CAPACITY_GOAL = 0.8
LRU_COST_GOAL = 0.10
PACKED_VS_LOOSE_GOAL = 10.0  # cold epoch, at 100 ms
PACKED_VS_KERAS_GOAL = 1.0  # cold epoch against Keras reading the JPEGs from local disk
PACKING_VS_CAPACITY_GOAL = 0.8
LRU_RATIOS = {"fresh": "LRU cost, entries used just now", "stale": "LRU cost, entries used an hour ago"}


@dataclass(frozen=True)
class Target:
    """One goal of the issue and whether this run met it.

    Attributes:
        name: What is compared.
        value: The measured value (a ratio, a fraction or a request count).
        goal: The goal, as text.
        holds: Whether the value meets the goal.
    """

    name: str
    value: float
    goal: str
    holds: bool

    def describe(self) -> str:
        """``PASS``/``MISS`` line for the console."""
        return f"{'PASS' if self.holds else 'MISS'}  {self.name}: {self.value:.3g} (goal {self.goal})"


def _rate(run: Run, index: int) -> float:
    return run.epochs[index].images_per_s


def _best(run: Run) -> float:
    return max(e.images_per_s for e in run.epochs)


def _warm(run: Run) -> float:
    """The median of a run's repeated warm passes (runs recorded before they were repeated: epoch 2, or the best)."""
    rates = run.extra.get("warm_passes")
    if rates:
        return float(median_round(rates, float))
    return _rate(run, 1) if run.name.startswith("s3cache") else _best(run)


def _mean(run: Run) -> float:
    return sum(e.images_per_s for e in run.epochs) / len(run.epochs)


def ratios(runs: dict[str, Run]) -> dict[str, float]:
    """The issue's ratios, for the contenders that ran (missing ones leave their ratio out)."""
    out: dict[str, float] = {}
    s3cache = runs.get("s3cache")
    capacity = [_best(runs[name]) for name in ("capacity-boto3", "capacity-aio") if name in runs]
    if s3cache and "tfdata" in runs:
        out["s3cache warm / tf.data warm"] = _rate(s3cache, 1) / _rate(runs["tfdata"], 1)
    if s3cache and "raw" in runs:
        out["s3cache warm / raw page-cache limit"] = _warm(s3cache) / _warm(runs["raw"])
    if s3cache and "seed" in runs:
        out["s3cache cold / seed recipe"] = _rate(s3cache, 0) / _mean(runs["seed"])
    if s3cache and capacity:
        out["s3cache cold / endpoint capacity"] = _rate(s3cache, 0) / max(capacity)
    packed = runs.get("s3cache-packed")
    if packed and s3cache:
        out["packed cold / per-object cold"] = _rate(packed, 0) / _rate(s3cache, 0)
    if packed and "keras-local" in runs:
        out["packed cold / keras local disk (epoch 1)"] = _rate(packed, 0) / _rate(runs["keras-local"], 0)
    numpy, packed_numpy = runs.get("s3cache-numpy"), runs.get("s3cache-packed-numpy")
    if numpy and "seed" in runs:
        out["NumPy decoder: cold / seed recipe"] = _rate(numpy, 0) / _mean(runs["seed"])
    if numpy and packed_numpy:
        out["NumPy decoder: packed cold / per-object cold"] = _rate(packed_numpy, 0) / _rate(numpy, 0)
    if packed and capacity:
        out["packing / endpoint capacity"] = packed.extra["packing"]["images_per_s"] / max(capacity)
    if "s3cache-lru-off" in runs:
        for setting, name in LRU_RATIOS.items():
            if f"s3cache-lru-{setting}" in runs:
                out[name] = 1 - _rate(runs[f"s3cache-lru-{setting}"], 0) / _rate(runs["s3cache-lru-off"], 0)
    return out


def targets(runs: dict[str, Run], found: dict[str, float], latency_ms: float) -> list[Target]:
    """Each goal of the issue that this set of runs can answer, with its verdict."""
    out: list[Target] = []

    def at_least(key: str, goal: float, text: str) -> None:
        if key in found:
            out.append(Target(key, found[key], text, found[key] >= goal))

    at_least("s3cache warm / tf.data warm", WARM_VS_TFDATA_GOAL, f">= {WARM_VS_TFDATA_GOAL}x")
    at_least("s3cache warm / raw page-cache limit", WARM_VS_RAW_GOAL, f">= {WARM_VS_RAW_GOAL:.0%}")
    if latency_ms in SEED_GOALS:
        goal = SEED_GOALS[latency_ms]
        at_least("s3cache cold / seed recipe", goal, f">= {goal:g}x at {latency_ms:g} ms")
    at_least("s3cache cold / endpoint capacity", COLD_VS_CAPACITY_GOAL, f">= {COLD_VS_CAPACITY_GOAL:.0%}")
    if "s3cache" in runs:
        warm = runs["s3cache"].epochs[1].s3_requests
        out.append(Target("S3 requests in the warm epoch", warm, "0", warm == 0))
    if "s3cache-offline" in runs:
        offline = runs["s3cache-offline"]
        total = offline.setup_s3_requests + sum(e.s3_requests for e in offline.epochs)
        out.append(Target("S3 requests in the offline rerun", total, "0", total == 0))
    if latency_ms == 100.0:
        at_least("packed cold / per-object cold", PACKED_VS_LOOSE_GOAL, f">= {PACKED_VS_LOOSE_GOAL:g}x at 100 ms")
    at_least("packed cold / keras local disk (epoch 1)", PACKED_VS_KERAS_GOAL, f">= {PACKED_VS_KERAS_GOAL:g}x")
    at_least("packing / endpoint capacity", PACKING_VS_CAPACITY_GOAL, f">= {PACKING_VS_CAPACITY_GOAL:.0%}")
    for name in LRU_RATIOS.values():
        if name in found:
            out.append(Target(name, found[name], f"< {LRU_COST_GOAL:.0%}", found[name] < LRU_COST_GOAL))
    return out


def combine_rounds(rounds: list[list[Run]]) -> list[Run]:
    """One run per contender from several rounds of all of them: each epoch's median round.

    The spread goes into the notes (each epoch's min/median/max over the rounds) and the JSON
    (``extra["rounds"]``). Repeated warm passes are pooled over the rounds, and packing takes its
    median round, so their ratios are medians too.

    Args:
        rounds: Each round's runs, the same contenders in the same order.
    """
    if len(rounds) == 1:
        return rounds[0]
    combined = []
    for runs in zip(*rounds, strict=True):
        if len({run.name for run in runs}) != 1:
            raise ValueError(f"rounds ran different contenders: {[run.name for run in runs]}")
        combined.append(_combine(list(runs)))
    return combined


def _combine(runs: list[Run]) -> Run:
    first = median_round(runs, lambda run: run.epochs[0].images_per_s)
    epochs = [median_round([run.epochs[i] for run in runs], lambda e: e.images_per_s)
              for i in range(len(first.epochs))]
    spreads = [_spread(f"epoch {e.label}", [run.epochs[i].images_per_s for run in runs])
               for i, e in enumerate(epochs)]
    extra = first.extra | {"rounds": [[e.images_per_s for e in run.epochs] for run in runs]}
    if all("warm_passes" in run.extra for run in runs):
        extra["warm_passes"] = [rate for run in runs for rate in run.extra["warm_passes"]]
    if all("packing" in run.extra for run in runs):
        extra["packing"] = median_round([run.extra["packing"] for run in runs], lambda p: p["images_per_s"])
        spreads.append(_spread("packing", [run.extra["packing"]["images_per_s"] for run in runs]))
    note = f"{len(runs)} rounds, min/median/max images/s: " + "; ".join(spreads)
    return Run(first.name, first.label, epochs, first.setup_s3_requests, "; ".join(filter(None, [first.note, note])),
               extra)


def _spread(what: str, rates: list[float]) -> str:
    return f"{what} {_min_median_max(rates)}"


def _min_median_max(rates: list[float]) -> str:
    """``min / median / max``, the median taken as :func:`~harness.median_round` takes it (so it is one of them)."""
    return f"{min(rates):,.0f} / {median_round(rates, float):,.0f} / {max(rates):,.0f}"


def summarize(latency_ms: float, runs: list[Run]) -> dict[str, Any]:
    """Runs, ratios and targets of one latency setting, JSON-ready."""
    by_name = {run.name: run for run in runs}
    found = ratios(by_name)
    return {"latency_ms": latency_ms, "runs": [run.to_json() for run in runs], "ratios": found,
            "targets": [asdict(t) for t in targets(by_name, found, latency_ms)]}


def markdown(summary: dict[str, Any]) -> str:
    """One latency setting as Markdown: the per-epoch table, then ratios and targets."""
    runs = [Run.from_json(data) for data in summary["runs"]]
    lines = [f"### {summary['latency_ms']:g} ms per S3 request", "",
             "| contender | epoch | images | seconds | images/s | S3 requests | CPU ms/image | endpoint CPU ms/image "
             "| peak RSS (MB) | notes |",
             "|---|---|--:|--:|--:|--:|--:|--:|--:|---|"]
    for run in runs:
        notes = "; ".join(filter(None, [run.note, _passes_note(run), f"+{run.setup_s3_requests} requests before "
                                        "epoch 1 (listing)" if run.setup_s3_requests else ""]))
        for number, epoch in enumerate(run.epochs):
            lines.append(f"| {run.label if number == 0 else ''} | {epoch.label} | {epoch.images} | "
                         f"{epoch.seconds:.2f} | {epoch.images_per_s:,.0f} | {epoch.s3_requests} | "
                         f"{_per_image_ms(epoch.cpu_seconds, epoch.images)} | "
                         f"{_per_image_ms(epoch.server_cpu_seconds, epoch.images)} | "
                         f"{epoch.peak_rss_mb:,.0f} | {notes if number == 0 else ''} |")
    lines += ["", "| ratio or check | value | goal | verdict |", "|---|--:|---|---|"]
    described = {t["name"]: t for t in summary["targets"]}
    for name, value in summary["ratios"].items():
        target = described.pop(name, None)
        shown = f"{value:.1%}" if name in LRU_RATIOS.values() else f"{value:.2f}x"
        lines.append(f"| {name} | {shown} | {target['goal'] if target else '-'} | "
                     f"{_verdict(target)} |")
    lines += [f"| {t['name']} | {t['value']:g} | {t['goal']} | {_verdict(t)} |" for t in described.values()]
    return "\n".join(lines) + "\n"


def _passes_note(run: Run) -> str:
    """The spread of a run's repeated warm passes (pooled over the rounds, when there were several)."""
    rates = run.extra.get("warm_passes")
    if not rates:
        return ""
    rounds = len(run.extra.get("rounds", [])) or 1
    label = run.epochs[-1].label.split(",")[0]
    pooled = f" of {rounds} rounds pooled" if rounds > 1 else ""
    return f"passes {label}{pooled}: min/median/max {_min_median_max(rates)} images/s"


def _per_image_ms(seconds: float, images: int) -> str:
    return f"{seconds / images * 1e3:.3f}" if images else "-"


def _verdict(target: dict[str, Any] | None) -> str:
    if target is None:
        return "-"
    return "holds" if target["holds"] else "**missed**"


def chart(summaries: list[dict[str, Any]], path: Path, title: str) -> None:
    """A horizontal bar chart of images/s per contender and epoch, one panel per latency (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(sum(len(r["epochs"]) for r in s["runs"]) for s in summaries)
    figure, axes = plt.subplots(1, len(summaries), figsize=(7.5 * len(summaries), 0.32 * rows + 1.6),
                                squeeze=False, sharex=True)
    for axis, summary in zip(axes[0], summaries, strict=True):
        _panel(axis, summary)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _panel(axis: Any, summary: dict[str, Any]) -> None:
    labels, values, colors = [], [], []
    for run in summary["runs"]:
        for epoch in run["epochs"]:
            labels.append(f"{run['label']} [{epoch['label']}]")
            values.append(epoch["images_per_s"])
            colors.append("tab:orange" if run["name"].startswith("s3cache")
                          else "tab:gray" if run["name"].startswith(("raw", "capacity")) else "tab:blue")
    positions = range(len(labels))[::-1]
    axis.barh(list(positions), values, color=colors)
    axis.set_yticks(list(positions), labels, fontsize=7)
    axis.set_xscale("log")
    axis.set_xlabel("images/s (log scale)")
    axis.set_title(f"{summary['latency_ms']:g} ms per S3 request")
    for position, value in zip(positions, values, strict=True):
        axis.text(value, position, f" {value:,.0f}", va="center", fontsize=7)
