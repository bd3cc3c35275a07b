"""The report of `alignkit eval`: one folder with ``report.json``, ``report.md`` and ``report.png``.

* ``report.json``: ``{"meta": {...}, "metrics": {name: result}, "headline": [...], "warnings": [...]}``;
  the full results, every number the page shows.
* ``report.md``: a headline table (value, interval, n, and the baseline's value when a previous
  report is given to compare with), the drift warnings, the figure, then one section per metric.
* ``report.png``: one figure, one panel per kind of result: rates with their intervals (accuracy,
  pass@k, multiple choice, reward accuracy, ROUGE), the win rate with its interval and p-value,
  Elo ratings with bootstrap intervals, drift against the reference model with the alarm
  thresholds, and the remaining scores (perplexity, BLEU, chrF).

Headline rows are found by a convention every metric follows: a number ``x`` with
``x_interval = [low, high]`` beside it (plus ``n``). A metric added later (``reward_accuracy``)
appears without any change here; a rate in [0, 1] reported without an interval gets a Wilson
interval computed from its ``n`` and marked so.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from alignkit.evaluate.drift import DEFAULT_THRESHOLDS
from alignkit.evaluate.stats import wilson_interval

RATE_WORDS = ("accuracy", "pass@", "rouge", "rate")
DRIFT_ROWS = (  # (label, key in the policy/reference dicts, inner key)
    ("KL to reference (nats/seq)", "kl", "kl"),
    ("entropy (nats/token)", "entropy", None),
    ("mean length (tokens)", "length", "mean"),
    ("distinct-2", "distinct_2", None),
    ("refusal rate", "refusal_rate", None),
    ("cut at the length limit", "truncated_share", None),
    ("repeated trigrams in a completion", "repetition", None),
)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _interval(value: Any) -> tuple[float, float] | None:
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(_number(v) is not None for v in value):
        return float(value[0]), float(value[1])
    return None


def _is_rate(name: str) -> bool:
    return any(word in name for word in RATE_WORDS)


def _drift_value(side: dict, key: str, inner: str | None) -> float | None:
    value = side.get(key)
    if isinstance(value, dict):
        value = value.get(inner)
    return _number(value)


def headline_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per headline number: ``metric, name, value, low, high, n, note``."""
    rows: list[dict[str, Any]] = []
    for metric, result in results.items():
        if not isinstance(result, dict):
            if _number(result) is not None:
                rows.append({"metric": metric, "name": metric, "value": float(result), "low": None, "high": None,
                             "n": None, "note": ""})
            continue
        n = result.get("n")
        if metric == "elo" and isinstance(result.get("ratings"), dict):
            for player, rating in result["ratings"].items():
                low, high = rating["interval"]
                rows.append({"metric": metric, "name": f"rating: {player}", "value": rating["rating"], "low": low,
                             "high": high, "n": n, "note": result.get("method", "")})
            continue
        if metric == "drift" and isinstance(result.get("policy"), dict):
            policy, reference = result["policy"], result.get("reference", {})
            for label, key, inner in DRIFT_ROWS:
                value = _drift_value(policy, key, inner)
                if value is None:
                    continue
                interval = _interval(policy.get(f"{key}_interval")) or (None, None)
                before = _drift_value(reference, key, inner)
                rows.append({"metric": metric, "name": label, "value": value, "low": interval[0],
                             "high": interval[1], "n": n,
                             "note": "" if before is None else f"reference {before:.4g}"})
            continue
        for key, value in result.items():
            value = _number(value)
            if value is None or key.endswith("_interval") or key in ("n", "seconds"):
                continue
            interval = _interval(result.get(f"{key}_interval"))
            note = ""
            if interval is None:
                if not (key == metric and _is_rate(key) and 0.0 <= value <= 1.0 and isinstance(n, int) and n > 0):
                    continue
                interval = wilson_interval(round(value * n), n)
                note = "Wilson interval computed by the report"
            if metric == "win_rate" and key == "win_rate":
                note = (f"p = {result.get('p_value', math.nan):.3g} (A beats B); W/T/L "
                        f"{result.get('wins')}/{result.get('ties')}/{result.get('losses')}")
            rows.append({"metric": metric, "name": key, "value": value, "low": interval[0], "high": interval[1],
                         "n": n, "note": note})
    return rows


def collect_warnings(results: dict[str, Any]) -> list[str]:
    """Every metric's warnings; drift's say whether each is a hacking alarm or a collapse warning."""
    warnings = []
    for metric, result in results.items():
        if isinstance(result, dict):
            texts = result.get("warnings", []) or []
            kinds = result.get("warning_kinds") or [None] * len(texts)
            for warning, kind in zip(texts, kinds):
                label = {"hacking": " (hacking alarm)", "collapse": " (collapse warning)"}.get(kind, "")
                warnings.append(f"{metric}{label}: {warning}")
    return warnings


# ------------------------------------------------------------------------------------------------ formatting

def _fmt(value: Any, digits: int = 4) -> str:
    number = _number(value)
    if number is None:
        return "—" if value is None else str(value)
    if math.isnan(number):
        return "nan"
    if number != 0 and (abs(number) >= 1e5 or abs(number) < 1e-3):
        return f"{number:.3g}"
    return f"{number:.{digits}g}"


def _fmt_interval(low: Any, high: Any) -> str:
    if low is None or high is None:
        return "—"
    return f"[{_fmt(low)}, {_fmt(high)}]"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    for row in rows:
        lines.append("| " + " | ".join(str(cell).replace("|", "\\|").replace("\n", " ") for cell in row) + " |")
    return lines


def _baseline_lookup(baseline: dict | None) -> dict[tuple[str, str], dict]:
    if not baseline:
        return {}
    rows = baseline.get("headline") or headline_rows(baseline.get("metrics", {}))
    return {(row["metric"], row["name"]): row for row in rows}


def render_markdown(report: dict[str, Any], image: str | None = "report.png") -> str:
    meta, results = report.get("meta", {}), report.get("metrics", {})
    baseline = _baseline_lookup(report.get("baseline"))
    confidence = meta.get("confidence", 0.95)
    lines = ["# alignkit eval report", ""]
    for key in ("model", "adapter", "data", "metrics", "seed", "device", "created", "alignkit_version", "command"):
        if meta.get(key) not in (None, "", []):
            value = meta[key]
            lines.append(f"- **{key}**: `{value}`" if key == "command" else f"- **{key}**: {value}")
    if report.get("baseline"):
        lines.append(f"- **compared with**: {report['baseline'].get('meta', {}).get('model', '?')} "
                     f"({report.get('baseline_path', 'baseline report')})")
    lines += ["", "## Headline", ""]
    header = ["metric", "value", f"{confidence:.0%} interval", "n"]
    if baseline:
        header += ["baseline", "baseline interval"]
    header.append("notes")
    table = []
    for row in report.get("headline", []):
        cells = [f"{row['metric']} / {row['name']}" if row["name"] != row["metric"] else row["metric"],
                 _fmt(row["value"]), _fmt_interval(row["low"], row["high"]), _fmt(row["n"])]
        if baseline:
            before = baseline.get((row["metric"], row["name"]))
            cells += [_fmt(before["value"]) if before else "—",
                      _fmt_interval(before["low"], before["high"]) if before else "—"]
        cells.append(row.get("note", ""))
        table.append(cells)
    lines += _table(header, table) if table else ["(no headline numbers)"]
    warnings = report.get("warnings", [])
    lines += ["", "## Warnings", ""]
    lines += [f"- **WARNING** {w}" for w in warnings] if warnings else ["No drift alarm crossed its threshold."
                                                                         if "drift" in results else "None."]
    if image:
        lines += ["", f"![report]({image})"]
    elif report.get("figure_error"):
        lines += ["", f"(no figure: {report['figure_error']})"]
    for metric, result in results.items():
        lines += ["", f"## {metric}", ""]
        lines += _details(metric, result)
    return "\n".join(lines) + "\n"


def _details(metric: str, result: Any) -> list[str]:
    if not isinstance(result, dict):
        return [f"{_fmt(result)}"]
    lines: list[str] = []
    if metric == "win_rate":
        lines += [f"Model A **{result.get('model_a')}** against model B **{result.get('model_b')}**, judged by "
                  f"**{result.get('judge')}**, each prompt asked in both orders (A first, then B first). Per order a "
                  "verdict scores +1 / 0 / -1 for A; the sum decides win / tie / loss, so a judge that only "
                  "follows position gives ties. Ties count half.", ""]
        lines += _table(["wins", "ties", "losses", "win rate", "interval", "p-value (A beats B)",
                         "position consistency", "first-position verdicts"],
                        [[result.get("wins"), result.get("ties"), result.get("losses"), _fmt(result.get("win_rate")),
                          _fmt_interval(*(result.get("win_rate_interval") or (None, None))),
                          _fmt(result.get("p_value")), _fmt(result.get("position_consistency")),
                          _fmt(result.get("first_position_rate"))]])
    elif metric == "elo":
        lines += [f"Method: {result.get('method')}; {result.get('n')} comparisons over {result.get('n_prompts')} "
                  f"prompts; judge {result.get('judge')}; {result.get('n_resamples')} bootstrap resamples.", ""]
        ratings = sorted(result.get("ratings", {}).items(), key=lambda item: -item[1]["rating"])
        lines += _table(["model", "rating", "interval"],
                        [[name, _fmt(r["rating"]), _fmt_interval(*r["interval"])] for name, r in ratings])
        if result.get("pairs"):
            lines += ["", *_table(["A", "B", "W/T/L", "win rate of A", "interval", "p-value"],
                                  [[p["a"], p["b"], f"{p['wins']}/{p['ties']}/{p['losses']}", _fmt(p["win_rate"]),
                                    _fmt_interval(*p["win_rate_interval"]), _fmt(p["p_value"])]
                                   for p in result["pairs"]])]
    elif metric == "drift":
        lines += [f"Reference: {result.get('reference_model')}; {result.get('n')} prompts sampled at temperature "
                  f"{result.get('temperature')} (max {result.get('max_new_tokens')} new tokens).", ""]
        policy, reference = result.get("policy", {}), result.get("reference", {})
        table = []
        for label, key, inner in DRIFT_ROWS:
            now = _drift_value(policy, key, inner)
            before = _drift_value(reference, key, inner)
            if now is None and before is None:
                continue
            table.append([label, _fmt(now), _fmt_interval(*(policy.get(f"{key}_interval") or (None, None))),
                          _fmt(before), _fmt_interval(*(reference.get(f"{key}_interval") or (None, None)))])
        lines += _table(["signal", "policy", "interval", "reference", "interval"], table)
        if isinstance(policy.get("kl"), dict):
            kl = policy["kl"]
            lines += ["", f"KL estimators: k1 {_fmt(kl.get('kl'))}, k3 {_fmt(kl.get('kl_k3'))} nats/sequence, "
                          f"{_fmt(kl.get('kl_per_token'))} nats/token over {kl.get('num_tokens')} tokens."]
    scalars = [[key, _fmt(value)] for key, value in result.items()
               if not isinstance(value, (dict, list)) and not key.endswith("_interval")]
    if scalars:
        lines += [*([""] if lines else []), *_table(["field", "value"], scalars)]
    examples = result.get("examples") or result.get("predictions")
    if examples:
        lines += ["", "<details><summary>examples</summary>", "", "```json",
                  json.dumps(examples[:5], indent=1, ensure_ascii=False, default=str), "```", "", "</details>"]
    return lines


# ------------------------------------------------------------------------------------------------ plots

def _panels(report: dict[str, Any]) -> list:
    results = report.get("metrics", {})
    rows = report.get("headline", [])
    baseline = _baseline_lookup(report.get("baseline"))
    panels = []
    rates = [r for r in rows if r["metric"] not in ("drift", "elo", "win_rate") and _is_rate(r["name"])
             and r["low"] is not None and 0.0 <= r["value"] <= 1.0]
    if rates:
        panels.append(lambda ax: _plot_bars(ax, rates, baseline, "Rates (95% intervals)", rate=True))
    if isinstance(results.get("win_rate"), dict):
        panels.append(lambda ax: _plot_win_rate(ax, results["win_rate"]))
    if isinstance(results.get("elo"), dict) and results["elo"].get("ratings"):
        panels.append(lambda ax: _plot_elo(ax, results["elo"]))
    if isinstance(results.get("drift"), dict) and isinstance(results["drift"].get("policy"), dict):
        panels.append(lambda ax: _plot_drift(ax, results["drift"]))
    scores = [r for r in rows if r not in rates and r["metric"] not in ("drift", "elo", "win_rate")
              and r["low"] is not None]
    by_metric: dict[str, list] = {}
    for row in scores:
        by_metric.setdefault(row["metric"], []).append(row)
    for metric, metric_rows in by_metric.items():
        panels.append(lambda ax, m=metric, rs=metric_rows: _plot_bars(ax, rs, baseline, m, rate=False))
    return panels


def _plot_bars(ax, rows, baseline, title, rate: bool) -> None:
    labels = [r["name"] if r["name"] != r["metric"] else r["metric"] for r in rows]
    if rate and len({r["metric"] for r in rows}) > 1:
        labels = [f"{r['metric']}: {label}" if r["name"] != r["metric"] else label for r, label in zip(rows, labels)]
    positions = list(range(len(rows)))
    before = [baseline.get((r["metric"], r["name"])) for r in rows]
    height = 0.38 if any(before) else 0.6
    if any(before):
        shown = [(i, b) for i, b in enumerate(before) if b]
        ax.barh([i + height for i, _ in shown], [b["value"] for _, b in shown], height=height, color="#bbbbbb",
                xerr=_errors([b for _, b in shown]), capsize=3, label="baseline")
        for i, b in shown:
            ax.text(b["high"] if b["high"] is not None else b["value"], i + height, f"  {_fmt(b['value'], 3)}",
                    va="center", fontsize=7, color="#555555")
    ax.barh(positions, [r["value"] for r in rows], height=height, color="#3b75af", xerr=_errors(rows), capsize=3,
            label="this model")
    for i, r in enumerate(rows):
        ax.text(r["high"] if r["high"] is not None else r["value"], i, f"  {_fmt(r['value'], 3)}", va="center",
                fontsize=8)
    ax.set_yticks([p + (height / 2 if any(before) else 0) for p in positions], labels, fontsize=8)
    ax.invert_yaxis()
    if rate:
        ax.set_xlim(0, 1.12)
    if any(before):
        ax.legend(fontsize=7, loc="lower right")
    ax.set_title(title, fontsize=10)


def _errors(rows):
    return [[max(0.0, r["value"] - r["low"]) for r in rows], [max(0.0, r["high"] - r["value"]) for r in rows]]


def _plot_win_rate(ax, result) -> None:
    rate, (low, high) = result["win_rate"], result["win_rate_interval"]
    n = max(1, result.get("n") or 1)
    left = 0.0
    for count, color, label in ((result["wins"], "#3b9c5a", "A wins"), (result["ties"], "#c9c9c9", "ties"),
                                (result["losses"], "#c4553f", "B wins")):
        ax.barh([1], [count / n], left=left, color=color, height=0.5, label=f"{label} ({count})")
        left += count / n
    ax.barh([0], [rate], color="#3b75af", height=0.5, xerr=[[rate - low], [high - rate]], capsize=4)
    ax.axvline(0.5, color="black", linestyle="--", linewidth=1)
    ax.text(0.02, 0, f"{rate:.3f} [{low:.3f}, {high:.3f}]", va="center", fontsize=8,
            bbox=dict(facecolor="white", alpha=0.85, edgecolor="none"))
    ax.set_yticks([0, 1], ["win rate\n(ties = 1/2)", "outcomes"], fontsize=8)
    ax.set_xlim(0, 1)
    ax.legend(fontsize=7, loc="upper right", ncol=3, bbox_to_anchor=(1.0, -0.12))
    ax.set_title(f"Win rate of {_short(result.get('model_a'))} vs {_short(result.get('model_b'))}\n"
                 f"p = {result['p_value']:.3g} (A beats B), n = {result['n']}, judge {_short(result.get('judge'))}",
                 fontsize=9)


def _short(text: Any, width: int = 28) -> str:
    text = str(text)
    return text if len(text) <= width else "…" + text[-(width - 1):]


def _plot_elo(ax, result) -> None:
    ratings = sorted(result["ratings"].items(), key=lambda item: -item[1]["rating"])
    for i, (name, r) in enumerate(ratings):
        low, high = r["interval"]
        ax.errorbar([r["rating"]], [i], xerr=[[r["rating"] - low], [high - r["rating"]]], fmt="o", capsize=4,
                    color="#3b75af")
        ax.text(r["rating"], i - 0.25, f"{r['rating']:.0f} [{low:.0f}, {high:.0f}]", ha="center", fontsize=8)
    ax.set_yticks(range(len(ratings)), [_short(name) for name, _ in ratings], fontsize=8)
    ax.set_ylim(len(ratings) - 0.5, -0.7)
    ax.axvline(1000, color="grey", linestyle=":", linewidth=1)
    ax.set_title(f"Elo ({result.get('method')}, {result.get('n')} comparisons)", fontsize=10)


def _plot_drift(ax, result) -> None:
    policy, reference = result["policy"], result["reference"]
    thresholds = {**DEFAULT_THRESHOLDS, **(result.get("thresholds") or {})}
    signals = [("entropy", "entropy", None, (thresholds["entropy_ratio"],)),
               ("length", "length", "mean", (thresholds["length_ratio_low"], thresholds["length_ratio_high"])),
               ("distinct-2", "distinct_2", None, (thresholds["distinct_2_ratio"],))]
    labels, ratios, errors = [], [], [[], []]
    for i, (label, key, inner, limits) in enumerate(signals):
        now, before = _drift_value(policy, key, inner), _drift_value(reference, key, inner)
        if now is None or not before:
            continue
        ratio = now / before
        low, high = policy.get(f"{key}_interval") or (now, now)
        labels.append(f"{label}\n{now:.3g} vs {before:.3g}")
        ratios.append(ratio)
        errors[0].append(max(0.0, ratio - low / before))
        errors[1].append(max(0.0, high / before - ratio))
        for limit in limits:
            if limit is not None:
                ax.plot([len(ratios) - 1.4, len(ratios) - 0.6], [limit, limit], color="#c4553f", linewidth=1.5)
    ax.bar(range(len(ratios)), ratios, yerr=errors, capsize=4, color="#3b75af")
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
    refusal_now, refusal_before = policy.get("refusal_rate"), reference.get("refusal_rate")
    if refusal_now is not None:
        labels.append(f"refusal rate\n{refusal_now:.2f} vs {refusal_before:.2f}")
        ax.bar([len(ratios)], [refusal_now - refusal_before], color="#8a6bb8")
        if thresholds["refusal_rate_rise"] is not None:
            x = len(ratios)
            ax.plot([x - 0.4, x + 0.4], [thresholds["refusal_rate_rise"]] * 2, color="#c4553f", linewidth=1.5)
    ax.set_xticks(range(len(labels)), labels, fontsize=7)
    kl = policy.get("kl", {})
    kl_value = kl.get("kl") if isinstance(kl, dict) else kl
    kl_interval = policy.get("kl_interval") or (math.nan, math.nan)
    status = f"{len(result.get('warnings', []))} warning(s)" if result.get("warnings") else "no alarm"
    ax.set_title(f"Drift vs reference (policy/reference; refusal: difference) — {status}\n"
                 f"KL {_fmt(kl_value, 3)} [{_fmt(kl_interval[0], 3)}, {_fmt(kl_interval[1], 3)}] nats/seq; "
                 "red: alarm thresholds", fontsize=9)


def plot_report(report: dict[str, Any], path: str | os.PathLike) -> Path | None:
    """Draw every panel into one PNG (matplotlib, Agg backend); None when nothing is plottable."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ValueError(f"the report's figure needs matplotlib: pip install 'alignkit[eval]' ({error})") from None
    panels = _panels(report)
    if not panels:
        return None
    columns = 1 if len(panels) == 1 else 2
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(6.5 * columns, 3.6 * rows), squeeze=False)
    for ax, draw in zip(axes.flat, panels):
        draw(ax)
        ax.grid(axis="x", alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    model = report.get("meta", {}).get("model", "")
    figure.suptitle(f"alignkit eval — {_short(model, 60)}", fontsize=11)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


# ------------------------------------------------------------------------------------------------ writing

def build_report(results: dict[str, Any], meta: dict[str, Any] | None = None,
                 baseline: dict[str, Any] | None = None) -> dict[str, Any]:
    report = {"meta": dict(meta or {}), "metrics": results, "headline": headline_rows(results),
              "warnings": collect_warnings(results)}
    if baseline is not None:
        report["baseline"] = {"meta": baseline.get("meta", {}),
                              "headline": baseline.get("headline") or headline_rows(baseline.get("metrics", {}))}
    return report


def write_report(results: dict[str, Any], directory: str | os.PathLike, meta: dict[str, Any] | None = None,
                 baseline: str | os.PathLike | dict | None = None) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and ``report.png`` into ``directory``; returns their paths.

    ``baseline`` is an earlier ``report.json`` (or its dict): its headline numbers appear beside
    these in the table and the rate bars (before/after a training run).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    baseline_path = None
    if baseline is not None and not isinstance(baseline, dict):
        baseline_path = Path(baseline)
        if baseline_path.is_dir():
            baseline_path = baseline_path / "report.json"
        baseline = json.loads(baseline_path.read_text())
    report = build_report(results, meta, baseline)
    if baseline_path is not None:
        report["baseline_path"] = str(baseline_path)
    paths = {"json": directory / "report.json", "markdown": directory / "report.md"}
    try:
        image = plot_report(report, directory / "report.png")
    except ValueError as error:  # matplotlib missing: the numbers still get written
        image, report["figure_error"] = None, str(error)
    if image is not None:
        paths["png"] = image
    paths["json"].write_text(json.dumps(report, indent=2, default=_json_default, allow_nan=True))
    paths["markdown"].write_text(render_markdown(report, "report.png" if image is not None else None))
    return paths


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)
