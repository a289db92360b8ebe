"""Rows -> the printed table and the JSON file.

The JSON file is a list of rows. Each row:
  metric (str), unit (str), higher_is_better (bool),
  ours: number, or a string saying why there is none ("unavailable: ...", "failed: ...", "skipped: ...");
  peers: {peer name: number in the same unit, measured in the same invocation, or such a string};
  spread: {"ours": spread | null, "peers": {name: spread | null}}, spread = {n, median, min, max, iqr, rel_range};
  ratio: {peer name: how many times better ours is (ours/peer, or peer/ours for lower-is-better units)};
  goal (str | null), settings (dict: shapes, dtype, repeats, ...), suite, date, machine, versions, caveats.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

from benchmarks.timing import Stat

NOT_A_NUMBER_PREFIXES = ("unavailable:", "failed:", "skipped:", "not installed:", "not run:", "not measured:")
ROW_KEYS = {"metric": str, "unit": str, "higher_is_better": bool, "peers": dict, "spread": dict, "ratio": dict,
            "settings": dict, "suite": str, "date": str, "machine": dict, "versions": dict, "caveats": list}

Figure = Stat | str | None


def _value(x: Figure) -> float | str:
    if isinstance(x, Stat):
        return x.median
    if x is None:
        return "unavailable: not measured"
    return str(x)


def _spread(x: Figure) -> dict | None:
    return x.spread() if isinstance(x, Stat) else None


def make_row(metric: str, unit: str, ours: Figure, peers: Mapping[str, Figure], *, meta: Mapping[str, Any],
             settings: Mapping[str, Any] | None = None, goal: str | None = None,
             higher_is_better: bool = True) -> dict:
    o = _value(ours)
    ps = {k: _value(v) for k, v in peers.items()}
    ratio = {}
    for k, v in ps.items():
        if isinstance(o, float) and isinstance(v, float) and o > 0 and v > 0:
            ratio[k] = o / v if higher_is_better else v / o
    return {"metric": metric, "unit": unit, "higher_is_better": higher_is_better, "ours": o, "peers": ps,
            "spread": {"ours": _spread(ours), "peers": {k: _spread(v) for k, v in peers.items()}},
            "ratio": ratio, "goal": goal, "settings": dict(settings or {}), **dict(meta)}


def validate_rows(rows: Any) -> None:
    """Raise ValueError unless `rows` follows the schema above (JSON-serialisable, numbers finite)."""
    if not isinstance(rows, list) or not rows:
        raise ValueError("report: expected a non-empty list of rows")
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise ValueError(f"row {i}: not an object")
        for key, typ in ROW_KEYS.items():
            if not isinstance(r.get(key), typ):
                raise ValueError(f"row {i} ({r.get('metric')}): {key!r} missing or not {typ.__name__}")
        figures = {"ours": r.get("ours"), **{f"peers[{k}]": v for k, v in r["peers"].items()}}
        for name, v in figures.items():
            if isinstance(v, bool) or not isinstance(v, (int, float, str)):
                raise ValueError(f"row {i} ({r['metric']}): {name} must be a number or a reason string")
            if isinstance(v, (int, float)) and not math.isfinite(v):
                raise ValueError(f"row {i} ({r['metric']}): {name} is not finite")
            if isinstance(v, str) and not v.startswith(NOT_A_NUMBER_PREFIXES):
                raise ValueError(f"row {i} ({r['metric']}): {name} string must start with one of "
                                 f"{NOT_A_NUMBER_PREFIXES}, got {v[:40]!r}")
        if set(r["spread"]) != {"ours", "peers"} or set(r["spread"]["peers"]) != set(r["peers"]):
            raise ValueError(f"row {i} ({r['metric']}): spread must have 'ours' and one entry per peer")
        for name, v in figures.items():
            sp = r["spread"]["ours"] if name == "ours" else r["spread"]["peers"][name[6:-1]]
            if isinstance(v, (int, float)) and not (isinstance(sp, dict) and sp.get("n", 0) >= 1):
                raise ValueError(f"row {i} ({r['metric']}): {name} has a number but no spread")
    json.dumps(rows, allow_nan=False)


def write_json(rows: list[dict], path: Path) -> None:
    validate_rows(rows)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(rows, indent=1, allow_nan=False) + "\n")
    tmp.replace(path)


def fmt(v: float | str, unit: str) -> str:
    if isinstance(v, str):
        return v
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.3g}"


def _cell(v: float | str, sp: dict | None, unit: str, width: int = 60) -> str:
    if isinstance(v, str):
        return v if len(v) <= width else v[:width - 3] + "..."
    s = fmt(v, unit)
    if sp and sp["n"] > 1:
        s += f" [{fmt(sp['min'], unit)}-{fmt(sp['max'], unit)}]"
    return s


def table(rows: list[dict]) -> str:
    """A plain-text table: metric | unit | ours [min-max] | each peer [min-max] and ours' ratio to it."""
    lines = []
    head = ("metric", "unit", "ours [min-max over runs]", "peers (same invocation)")
    w0 = max(len(head[0]), *(len(r["metric"]) for r in rows))
    w1 = max(len(head[1]), *(len(r["unit"]) for r in rows))
    ours_cells = [_cell(r["ours"], r["spread"]["ours"], r["unit"]) for r in rows]
    w2 = max(len(head[2]), *(len(c) for c in ours_cells))
    lines.append(f"{head[0]:<{w0}}  {head[1]:<{w1}}  {head[2]:<{w2}}  {head[3]}")
    lines.append("-" * (w0 + w1 + w2 + 30))
    for r, oc in zip(rows, ours_cells):
        peers = []
        for k, v in r["peers"].items():
            c = f"{k}: {_cell(v, r['spread']['peers'].get(k), r['unit'])}"
            if k in r["ratio"]:
                c += f" (ours x{r['ratio'][k]:.2f})"
            peers.append(c)
        lines.append(f"{r['metric']:<{w0}}  {r['unit']:<{w1}}  {oc:<{w2}}  {'; '.join(peers) or '-'}")
    return "\n".join(lines)


def markdown_table(rows: list[dict]) -> str:
    out = ["| metric | unit | ours (median [min-max]) | peers, same invocation (median [min-max]; ours x ratio) |",
           "|---|---|---|---|"]
    for r in rows:
        peers = []
        for k, v in r["peers"].items():
            c = f"{k}: {_cell(v, r['spread']['peers'].get(k), r['unit'], width=200)}"
            if k in r["ratio"]:
                c += f" (ours x{r['ratio'][k]:.2f})"
            peers.append(c)
        out.append(f"| {r['metric']} | {r['unit']} | {_cell(r['ours'], r['spread']['ours'], r['unit'], 200)} | "
                   f"{'<br>'.join(peers) or '-'} |")
    return "\n".join(out)
