"""latest.json (everything measured) and latest.md (one table per operation and thread count).

Markdown cells read `ratio (IQR)`: the median over rounds of time / copy-floor time, and
the interquartile range of those per-round ratios. batchnorm ratios above their target
are bold; the worst of them are listed first, since they say where kernel work is left.
"""
from __future__ import annotations

import json
import math
import pathlib
import re

from . import machine

OURS = "batchnorm"
FLOOR = "copy floor"  # the latency table's name for np.copyto
WORST_LISTED = 12


def write_json(results: dict, path: pathlib.Path) -> None:
    path.write_text(json.dumps(results, indent=1) + "\n")


def available_impls(results: dict) -> list[str]:
    return [n for n, info in results["implementations"].items() if not info["unavailable"]]


def op_thread_groups(results: dict) -> list[tuple[str, int]]:
    """(op, threads) in run order, each once."""
    seen = []
    for cell in results["cells"]:
        key = (cell["op"], cell["threads"])
        if key not in seen:
            seen.append(key)
    return sorted(seen, key=lambda k: (list(results["ops"]).index(k[0]), k[1]))


def _ratio_text(result: dict, name: str, target: float) -> str:
    if result is None:
        return ""
    status = result["status"]
    if status in ("n/a", "error"):
        return status
    ratio = result["ratio"]
    text = f"{ratio['median']:.2f} ({ratio['q3'] - ratio['q1']:.2f})"
    if name == OURS and ratio["median"] > target:
        text = f"**{text}**"
    return text + (" WRONG" if status == "wrong" else "")


def _others_text(cell: dict) -> str:
    """CPU share other processes took during the cell; bold where it disturbs the ratios."""
    share = cell.get("others_cpu")
    if share is None:
        return "?"
    return f"**{share:.0%}**" if share > machine.QUIET_BUSY else f"{share:.0%}"


def _geomean(values: list[float]) -> str:
    return f"{math.exp(sum(map(math.log, values)) / len(values)):.2f}" if values else ""


def _table(results: dict, op: str, threads: int) -> list[str]:
    names = available_impls(results)
    spec = results["ops"][op]
    cells = [c for c in results["cells"] if c["op"] == op and c["threads"] == threads]
    lines = [
        f"### {spec['title']}, {threads} thread{'s' if threads > 1 else ''}",
        "",
        f"Floor: {spec['floor']}. Target for batchnorm: {spec['target']}.",
        "",
        "| shape | layout | copy floor µs | " + " | ".join(names) + " | target | others' CPU |",
        "|---|---|---:|" + "---:|" * len(names) + "---:|---:|",
    ]
    problems = []
    for cell in cells:
        row = [cell["label"], cell["layout"], f"{cell['floor']['median_us']:.1f}"]
        for name in names:
            result = cell["results"].get(name)
            row.append(_ratio_text(result, name, cell["target"]))
            if result and result["status"] in ("error", "wrong"):
                problems.append(f"- {name}, {cell['label']} {cell['layout']}: {result['note']}")
        lines.append("| " + " | ".join(row) + f" | {cell['target']:.2f} | "
                     f"{_others_text(cell)} |")
    lines += geomean_rows(cells, names) + [""]
    return lines + problems + ([""] if problems else [])


def geomean_rows(cells: list[dict], names: list[str]) -> list[str]:
    """Geometric means of the ratios, every figure of a row over the same cells: all cells
    (blank for an implementation that did not run them all), then, when that leaves some
    out, the cells every implementation ran."""
    def ran(cell: dict, name: str) -> bool:
        return cell["results"].get(name, {}).get("status") == "ok"

    def row(label: str, subset: list[dict]) -> str:
        means = [_geomean([c["results"][n]["ratio"]["median"] for c in subset])
                 if all(ran(c, n) for c in subset) else "" for n in names]
        return f"| {label} | | | " + " | ".join(means) + " | | |"

    rows = [row(f"geomean, all {len(cells)} cells", cells)]
    common = [c for c in cells if all(ran(c, n) for n in names)]
    if common and len(common) < len(cells):
        rows.append(row(f"geomean, the {len(common)} cells all ran", common))
    return rows


def _not_applicable(results: dict) -> list[str]:
    reasons = sorted({(name, r["note"]) for c in results["cells"]
                      for name, r in c["results"].items() if r["status"] == "n/a"})
    return [f"- {name}: n/a where {note}." for name, note in reasons]


def _worst_offenders(results: dict) -> list[str]:
    """Per thread count: broken cells first, then the largest ratio / target.

    Cells whose floor is a microsecond or less rank high on call overhead alone; the µs
    columns tell them apart from kernels that lose bandwidth.
    """
    if OURS not in available_impls(results):
        return [f"batchnorm not measured: {results['implementations'][OURS]['unavailable']}", ""]
    lines = []
    for threads in results["config"]["threads"]:
        broken, scored, disturbed = [], [], []
        for c in results["cells"]:
            r = c["results"].get(OURS)
            if r is None or c["threads"] != threads:
                continue
            where = f"{c['op']} {c['label']} {c['layout']}"
            if r["status"] in ("error", "wrong"):
                broken.append(f"- {where}: **{r['status']}**: {r['note']}")
            elif (c.get("others_cpu") or 0) > machine.QUIET_BUSY:
                disturbed.append(f"{where} ({r['ratio']['median']:.2f}, others "
                                 f"{c['others_cpu']:.0%})")
            elif r["status"] == "ok":
                ratio = r["ratio"]["median"]
                scored.append((ratio / c["target"], where, ratio, c["target"],
                               c["floor"]["median_us"], r["median_us"]))
        scored.sort(reverse=True)
        over = sum(score > 1.0 for score, *_ in scored)
        lines += [f"### {threads} thread{'s' if threads > 1 else ''}: {over} of {len(scored)} "
                  "undisturbed cells over target", ""] + broken + ([""] if broken else [])
        lines += ["| cell | ratio | target | ratio / target | floor µs | batchnorm µs |",
                  "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {where} | {ratio:.2f} | {target:.2f} | {score:.2f} | {floor:.1f} | "
                  f"{ours:.1f} |" for score, where, ratio, target, floor, ours in
                  scored[:WORST_LISTED]]
        lines.append("")
        if disturbed:
            lines += ["Not ranked, other processes took the CPUs: " + "; ".join(disturbed), ""]
    return lines


def _us_text(row: dict) -> str:
    return f"{row['median_us']:.2f} ({row['q3_us'] - row['q1_us']:.2f})"


def _latency(results: dict) -> list[str]:
    """Rows: call kinds; columns: implementations; µs per call (IQR)."""
    latency = results.get("latency")
    if not latency:
        return []
    shape = "x".join(map(str, latency["shape"]))
    floor = [row for row in latency["calls"] if row["impl"] == FLOOR]
    table = {(row["impl"], row["call"]): row for row in latency["calls"] if row["impl"] != FLOOR}
    impls = list(dict.fromkeys(impl for impl, _ in table))
    calls = list(dict.fromkeys(call for _, call in table))
    lines = [f"## Per-call latency, {shape} {latency['dtype']}, 1 thread", "",
             "µs per call (IQR); torch modules run under `no_grad`. Copy floor (`np.copyto` of "
             f"the same bytes): {' '.join(_us_text(row) for row in floor)} µs.", "",
             "| call | " + " | ".join(impls) + " |", "|---|" + "---:|" * len(impls)]
    for call in calls:
        cells = [_us_text(table[i, call]) if (i, call) in table else "" for i in impls]
        lines.append(f"| {call} | " + " | ".join(cells) + " |")
    lines += [""] + [f"- {m['impl']} {m['call']}: not measured: {m['why']}"
                     for m in latency["missing"]]
    return lines + [""]


def _family(m: dict) -> str:
    """', vendor, family F model M' where the run recorded them (older results did not)."""
    parts = [f"{k.replace('cpu_', '')} {m[k]}" for k in ("cpu_family", "cpu_model") if m.get(k)]
    return "".join(f", {p}" for p in ([m["vendor"]] if m.get("vendor") else []) + parts)


def _header(results: dict, chart_name: str | None) -> list[str]:
    m, cfg = results["machine"], results["config"]
    caches = ", ".join(f"L{c['level']} {c['bytes'] >> 10} KiB" for c in m["caches"])
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
    lines = [
        "# batchnorm benchmark results",
        "",
        f"- Date: {m['date']}; repository commit {m['repository_commit']}",
        f"- CPU: {m['cpu']} ({m['arch']}{_family(m)}), {m['usable_cores']} usable cores; "
        f"ISA flags: {' '.join(m['isa_flags'])}; caches (per core where private): {caches}",
        f"- batchnorm backend: {m['batchnorm']}",
        f"- Versions: Python {m['python']}, {versions}",
        f"- Parallel throughput of 2 busy processes: {m['parallel_speedup_2_processes']}x one "
        f"process, measured while others used {results['conditions']['before']['cpu_busy']:.0%}"
        f" of the CPUs (2.0 = two free cores; near 1.0 = only one core is free, and "
        f"2-thread figures measure contention, not scaling)",
        f"- Run: dtype {cfg['dtype']}, threads {cfg['threads']}, {cfg['rounds']} rounds, "
        f"samples of ~{cfg['target_ms']:g} ms, pool waiting: {cfg['wait_policy']}"
        f"{' (quick mode)' if cfg['quick'] else ''}",
        *([f"- **Busy neighbour**: a process spun on CPU {cfg['busy_neighbour_cpu']} for the whole "
           "run (`--busy-neighbour`); compare the 2-thread figures with the 1-thread ones"]
          if cfg.get("busy_neighbour_cpu") is not None else []),
        "",
        "Each figure is `time / copy-floor time`, both measured in the same cell on the same "
        "arrays with the implementations interleaved round by round; shown as "
        "`median (IQR)` of the per-round ratios. The copy floor is single-threaded "
        "`np.copyto` at every thread count. **Bold**: batchnorm above its target.",
        "",
    ]
    when = results["conditions"]
    busy = sorted({p for c in when.values() for p in c["busy_processes"]})
    noisy = [c for c in results["cells"] if (c.get("others_cpu") or 0) > machine.QUIET_BUSY]
    if noisy or any(machine.disturbed(c) for c in when.values()):
        lines += [f"- **Disturbed run**: other processes took more than "
                  f"{machine.QUIET_BUSY:.0%} of the CPUs during {len(noisy)} of "
                  f"{len(results['cells'])} cells (column `others' CPU`); CPU busy before/after:"
                  f" {when['before']['cpu_busy']}/{when['after']['cpu_busy']}; busy processes: "
                  f"{', '.join(busy) or 'none'}", ""]
    skipped = [f"- {n} skipped: {i['unavailable']}"
               for n, i in results["implementations"].items() if i["unavailable"]]
    lines += skipped + _not_applicable(results) + results.get("notes", []) + [""]
    if chart_name:
        lines += [f"![ratio to copy floor]({chart_name})", ""]
    return lines


def markdown(results: dict, chart_path: str | None) -> str:
    lines = _header(results, chart_path)
    lines += ["## Worst batchnorm cells", ""] + _worst_offenders(results)
    lines += ["## Ratio to copy floor", ""]
    for op, threads in op_thread_groups(results):
        lines += _table(results, op, threads)
    lines += _latency(results)
    return "\n".join(lines).rstrip() + "\n"


README_START = "<!-- results:start (written by python -m bench --readme) -->"
README_END = "<!-- results:end -->"


def update_readme(readme: pathlib.Path, results: dict, chart_path: str | None) -> None:
    """Replace the results section of the README, keeping everything around it."""
    text = readme.read_text()
    head, start, rest = text.partition(README_START)
    _, end, tail = rest.partition(README_END)
    if not start or not end:
        raise ValueError(f"{readme} lacks the markers {README_START!r} ... {README_END!r}")
    body = markdown(results, chart_path).replace("# batchnorm benchmark results\n", "", 1)
    body = re.sub(r"^(#+) ", r"#\1 ", body.strip(), flags=re.MULTILINE)  # under README's ##
    readme.write_text(f"{head}{README_START}\n{body}\n{README_END}{tail}")
