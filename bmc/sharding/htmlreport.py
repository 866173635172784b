"""The plan as one self-contained HTML page (``bmc plan --html``, ``bmc show --html``).

Rendered from ``plan.json`` alone (the dict :func:`bmc.sharding.report.plan_json` writes, a pipeline's
``{"pipeline", "stages"}``, or a single device's), so an artifact's report needs neither the model nor the planner.
The page has no external resources: CSS, SVG charts and a few lines of script (the node table's filter) are inline,
and the plan itself is embedded as JSON (``<script type="application/json" id="bmc-plan">``) for other tools.

What it shows for a program: the mesh, strategy and solver; the estimated time split into compute and communication
and by op type; a strip of the estimated time in graph order (collectives in red); the memory per device over the
node order with the weights, the peak and the budget; every collective; the largest tensors per device with the block
each device holds (the same colour is the same block: replicas); and every node with its results' specs. A pipeline
gets its stages as a chain (nodes, ranks, what crosses) and each stage's program report.
"""

from __future__ import annotations

import colorsys
import hashlib
import html
import json
from math import prod

from bmc.errors import human_bytes as _bytes
from bmc.ir.types import TensorType
from bmc.sharding.mesh import Mesh
from bmc.sharding.spec import Spec

LARGEST = 12  # tensors shown with their per-device blocks
_PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#8cd17d")
_OTHER, _COMM = "#c8ccd4", "#d9463b"
STRIP_W, CHART_W, CHART_H = 960, 960, 220

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1200px;
color:#1d2330;padding:0 16px}
h1{font-size:22px;margin:0}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #dde}h3{font-size:15px;
margin:20px 0 6px}.sub{color:#667;margin:2px 0 16px}
.cards{display:flex;flex-wrap:wrap;gap:10px}.card{border:1px solid #dde;border-radius:6px;padding:8px 12px;
min-width:150px}.card b{display:block;font-size:16px}.card span{color:#667;font-size:12px}
table{border-collapse:collapse;margin:4px 0 8px}td,th{border-bottom:1px solid #eef;padding:2px 8px;text-align:left;
vertical-align:top}th{background:#f5f6fa;position:sticky;top:0}td.n{text-align:right;font-variant-numeric:tabular-nums}
code{font:12px ui-monospace,Menlo,Consolas,monospace}.bar{display:inline-block;height:10px;background:#4a78c2;
vertical-align:middle}.comm{background:#d9463b}.muted{color:#889}tr.coll td{color:#b3362c}
table.grid td{border:1px solid #fff;font:11px ui-monospace,Menlo,monospace;padding:3px 6px;text-align:center}
details{margin:4px 0}summary{cursor:pointer}input.filter{width:320px;padding:3px 6px;margin:4px 0}
.chain{display:flex;align-items:stretch;gap:0;flex-wrap:wrap}.stage{border:2px solid #4a78c2;border-radius:6px;
padding:8px 12px;min-width:170px}.arrow{align-self:center;padding:0 8px;color:#b3362c;font-size:12px;
text-align:center}svg text{font:11px system-ui,sans-serif;fill:#445}
"""

_SCRIPT = """
for (const box of document.querySelectorAll('input.filter')) {
  box.addEventListener('input', () => {
    const q = box.value.toLowerCase();
    for (const tr of document.getElementById(box.dataset.table).tBodies[0].rows)
      tr.style.display = tr.textContent.toLowerCase().includes(q) ? '' : 'none';
  });
}
"""


def plan_html(data: dict, title: str, subtitle: str = "") -> str:
    """The report page of ``data`` (a plan.json dict) as a string."""
    from bmc import __version__

    body = [f"<h1>{_e(title)}</h1>", f"<p class=sub>{_e(subtitle or 'sharding plan')} · bmc {_e(__version__)}</p>"]
    if "pipeline" in data:
        body += _pipeline(data)
    else:
        body += _program(data, "p")
    if data.get("stage_search"):
        body += _stage_search(data["stage_search"])
    embedded = json.dumps(data, separators=(",", ":")).replace("<", "\\u003c").replace(">", "\\u003e")
    return ("<!doctype html>\n<html lang=en><head><meta charset=utf-8>"
            f"<meta name=viewport content='width=device-width'><title>{_e(title)}</title><style>{_CSS}</style>"
            "</head><body>\n" + "\n".join(body)
            + f"\n<script type='application/json' id='bmc-plan'>{embedded}</script>\n<script>{_SCRIPT}</script>"
            "\n</body></html>\n")


# ---------------------------------------------------------------------------------------------------------------
# A pipeline: the chain of stages, then each stage's program

def _pipeline(data: dict) -> list[str]:
    pipe, plans = data["pipeline"], data["stages"]
    sub = pipe["submesh"]
    per_stage = prod(sub["shape"])
    out = [f"<h2>Pipeline: {len(pipe['stages'])} stages, {pipe['microbatches']} microbatch(es)</h2>",
           f"<p>Each stage runs on a submesh {_mesh_text(sub)} ({per_stage} device(s)); rank r belongs to stage "
           f"r // {per_stage}. Values cross from rank i of a stage to rank i of the next.</p>", "<div class=chain>"]
    for st, plan in zip(pipe["stages"], plans):
        i, (start, end) = st["index"], st["nodes"]
        cost = plan.get("cost")
        est = f"<br>estimated {_secs(cost['total_s'])} per microbatch" if cost else ""
        mem = plan.get("memory", {}).get("peak_bytes_per_device")
        peak = f"<br>peak {_bytes(mem)} a device" if mem is not None else ""
        if i:
            out.append("<div class=arrow>&rarr;</div>")
        out.append(f"<div class=stage><a href='#s{i}'><b>stage {i}</b></a><br>nodes {start}&ndash;{end - 1}<br>"
                   f"ranks {i * per_stage}&ndash;{(i + 1) * per_stage - 1}{est}{peak}</div>")
        if st["sends"]:
            out.append(f"<div class=arrow>{_bytes(st['send_bytes'])}<br>"
                       + "<br>".join(f"<code>{_e(s)}</code>" for s in st["sends"][:4])
                       + ("<br>&hellip;" if len(st["sends"]) > 4 else "") + "</div>")
    out.append("</div>")
    for st, plan in zip(pipe["stages"], plans):
        out.append(f"<h2 id='s{st['index']}'>Stage {st['index']}</h2>")
        out += _program(plan, f"s{st['index']}")
    return out


def _stage_search(rows: list[dict]) -> list[str]:
    out = ["<h2>Stage search (<code>--stages auto</code>)</h2>", "<table><tr><th>stages<th>submesh"
           "<th>estimated latency<th>peak a device<th>fits</tr>"]
    fastest = min((r["latency_s"] for r in rows if r.get("fits") and r.get("latency_s") is not None), default=None)
    for r in rows:
        lat = r.get("latency_s")
        mark = " (chosen)" if lat is not None and lat == fastest else ""
        peak = r.get("peak_bytes_per_device")
        out.append(f"<tr><td class=n>{r['stages']}{mark}<td>{'x'.join(map(str, r['submesh']))}"
                   f"<td class=n>{_secs(lat) if lat is not None else '-'}"
                   f"<td class=n>{_bytes(peak) if peak is not None else '-'}<td>{'yes' if r.get('fits') else 'no'}")
    return out + ["</table>"]


# ---------------------------------------------------------------------------------------------------------------
# One program

def _program(data: dict, key: str) -> list[str]:
    mesh = Mesh.parse("x".join(map(str, data["mesh"]["shape"])), ",".join(data["mesh"]["axes"]))
    if "cost" not in data:  # a single device's trivial plan
        counts = sorted(data.get("op_counts", {}).items(), key=lambda kv: (-kv[1], kv[0]))
        return ["<div class=cards>" + _card("one device", "no sharding, no collectives")
                + _card(_bytes(data.get("weight_bytes", 0)), "weights") + "</div>",
                "<h3>Ops</h3><table><tr><th>op<th>count</tr>"
                + "".join(f"<tr><td><code>{_e(op)}</code><td class=n>{n}" for op, n in counts) + "</table>"]
    return (_cards(data, mesh) + _time(data) + _memory(data) + _collectives(data)
            + _tensors(data, mesh) + _nodes(data, mesh, key))


def _cards(data: dict, mesh: Mesh) -> list[str]:
    cost, mem = data["cost"], data["memory"]
    total = cost["total_s"] or 1e-30
    budget = mem.get("budget_bytes")
    idle = data.get("idle_axes")
    cards = [_card(f"{mesh} ({mesh.size} devices)", "mesh: " + ", ".join(f"{n}={s}" for n, s in zip(mesh.names,
                                                                                                 mesh.shape))
                   + (f"; {', '.join(map(_e, idle))} split nothing (its devices repeat the others' work)"
                      if idle else "")),
             _card(_e(data.get("strategy", "?")), "strategy"),
             _card(_secs(cost["total_s"]), f"estimated time ({cost['compute_s'] / total:.0%} compute, "
                                           f"{cost['comm_s'] / total:.0%} communication; profile "
                                           f"{_e(cost.get('device', '?'))})"),
             _card(_bytes(mem["peak_bytes_per_device"]), "peak memory a device"
                   + (f" ({mem['peak_bytes_per_device'] / budget:.1%} of {_bytes(budget)})" if budget else "")),
             _card(_bytes(mem["weight_bytes_per_device"]), "weights a device"),
             _card(str(len(data["collectives"])), "collectives (" + _bytes(sum(c["bytes"]
                                                                             for c in data["collectives"]))
                   + " a device)")]
    for kind in ("input", "output"):
        specs = data.get(f"{kind}_specs")
        if specs:
            cards.append(_card(", ".join(f"<code>{_e(k)}</code>" for k in specs),
                               f"{kind}s as blocks (--{kind}-shard): "
                               + "; ".join(f"{_e(k)} {_e(s)}" for k, s in specs.items())))
    solver = data.get("solver")
    if solver:
        cards.append(_card(_e(str(solver.get("status", "?"))),
                           f"search: {solver.get('total_s', 0):.2f} s, gap {solver.get('gap', 0):.2%}, "
                           f"{solver.get('problem_nodes')} problem nodes of {solver.get('nodes')}; chosen: "
                           f"{_e(str(solver.get('chosen', 'ilp')))}"))
    return ["<div class=cards>" + "".join(cards) + "</div>"]


def _time(data: dict) -> list[str]:
    nodes, colls = data.get("nodes", []), data["collectives"]
    total = data["cost"]["total_s"] or 1e-30
    by_op: dict[str, list] = {}
    for n in nodes:
        row = by_op.setdefault(n["op"], [0, 0.0, 0.0])
        row[0] += 1
        row[1] += n["compute_s"]
        row[2] += n["flops"]
    by_kind: dict[str, list] = {}
    for c in colls:
        row = by_kind.setdefault(c["kind"], [0, 0.0, 0])
        row[0] += 1
        row[1] += c.get("time_s", 0.0)
        row[2] += c["bytes"]
    rows = [(t, f"<code>{_e(op)}</code>", n, _flops(fl), "") for op, (n, t, fl) in by_op.items()]
    rows += [(t, f"<code>{_e(k)}</code>", n, _bytes(b), " comm") for k, (n, t, b) in by_kind.items()]
    rows.sort(key=lambda r: -r[0])
    out = ["<h3>Estimated time</h3>", _strip(nodes, colls, total),
           "<table><tr><th>op / collective<th>count<th>time (one device)<th>share<th>work</tr>"]
    for t, name, n, work, cls in rows[:25]:
        out.append(f"<tr><td>{name}<td class=n>{n}<td class=n>{_secs(t)}<td><span class='bar{cls}' "
                   f"style='width:{200 * t / total:.1f}px'></span> {t / total:.1%}<td class=n>{work}")
    if len(rows) > 25:
        out.append(f"<tr><td colspan=5 class=muted>{len(rows) - 25} more with less time")
    return out + ["</table>"]


def _strip(nodes: list[dict], colls: list[dict], total: float) -> str:
    """The estimated time in graph order: one rectangle per node (coloured by op: the 9 ops with the most time get a
    colour each, the rest grey) and per collective (red)."""
    ops: dict[str, float] = {}
    for n in nodes:
        ops[n["op"]] = ops.get(n["op"], 0.0) + n["compute_s"]
    colour = dict(zip(sorted(ops, key=lambda o: (-ops[o], o)), _PALETTE))
    by_at: dict[int, list[dict]] = {}
    for c in colls:
        by_at.setdefault(c.get("at", -1), []).append(c)
    parts, x = [], 0.0

    def seg(t: float, fill: str, label: str):
        nonlocal x
        w = STRIP_W * t / total
        if w > 0:
            parts.append(f"<rect x='{x:.2f}' y='0' width='{max(w, 0.3):.2f}' height='24' fill='{fill}'>"
                         f"<title>{_e(label)}</title></rect>")
        x += w

    for i in range(-1, len(nodes) + 1):
        if 0 <= i < len(nodes):
            n = nodes[i]
            seg(n["compute_s"], colour.get(n["op"], _OTHER),
                f"#{i} {n['name'] or n['op']} ({n['op']}): {_secs(n['compute_s'])}")
        for c in by_at.get(i, []):
            seg(c.get("time_s", 0.0), _COMM, f"{c['kind']} of {c['value']} over {','.join(c['axes'])}: "
                f"{_bytes(c['bytes'])}, {_secs(c.get('time_s', 0.0))}")
    legend, lx = [], 0
    for label, fill in [*colour.items(), ("other ops", _OTHER), ("collectives", _COMM)]:
        legend.append(f"<rect x='{lx}' y='32' width='10' height='10' fill='{fill}'/>"
                      f"<text x='{lx + 14}' y='41'>{_e(label)}</text>")
        lx += 30 + 8 * len(label)
    return (f"<svg width='{STRIP_W}' height='64' role=img aria-label='estimated time in graph order'>"
            + "".join(parts) + "".join(legend) + "<text x='0' y='60'>graph order &rarr; (width: estimated time; "
            "hover for the node or collective)</text></svg>")


def _memory(data: dict) -> list[str]:
    mem = data["memory"]
    live = mem.get("live_bytes") or []
    weights, budget = mem["weight_bytes_per_device"], mem.get("budget_bytes")
    if not live:
        return []
    n, at = len(live), max(range(len(live)), key=lambda i: live[i])
    top = weights + live[at]
    show_budget = bool(budget) and budget <= 4 * top
    ymax = max(top, budget if show_budget else 0) * 1.08

    def x(i: int) -> float:
        return 80 + (CHART_W - 90) * (i + 0.5) / n

    def y(b: float) -> float:
        return CHART_H - 20 - (CHART_H - 30) * b / ymax

    node = (data.get("nodes") or [{}] * n)[at]
    parts = ["<polyline fill='none' stroke='#4a78c2' stroke-width='1.5' points='"
             + " ".join(f"{x(i):.1f},{y(weights + b):.1f}" for i, b in enumerate(live)) + "'/>",
             f"<line x1='80' x2='{CHART_W - 10}' y1='{y(weights):.1f}' y2='{y(weights):.1f}' stroke='#889' "
             f"stroke-dasharray='4 3'/><text x='84' y='{y(weights) - 4:.1f}'>weights {_bytes(weights)}</text>",
             f"<line x1='80' x2='{CHART_W - 10}' y1='{y(0):.1f}' y2='{y(0):.1f}' stroke='#bbc'/>",
             f"<circle cx='{x(at):.1f}' cy='{y(top):.1f}' r='4' fill='{_COMM}'><title>peak</title></circle>",
             f"<text x='{min(x(at) + 6, CHART_W - 300):.1f}' y='14'>peak {_bytes(top)} at node #{at} "
             f"{_e(node.get('name') or node.get('op', ''))}</text>",
             f"<text x='80' y='{CHART_H - 4}'>node 0</text><text x='{CHART_W - 10}' y='{CHART_H - 4}' "
             f"text-anchor='end'>node {n - 1}</text><text x='74' y='{y(ymax) + 10:.1f}' text-anchor='end'>"
             f"{_bytes(ymax)}</text><text x='74' y='{y(0) + 4:.1f}' text-anchor='end'>0</text>"]
    if show_budget:
        parts.append(f"<line x1='80' x2='{CHART_W - 10}' y1='{y(budget):.1f}' y2='{y(budget):.1f}' stroke='{_COMM}'/>"
                     f"<text x='84' y='{y(budget) - 4:.1f}'>budget {_bytes(budget)}</text>")
    note = "" if show_budget or not budget else f" The budget, {_bytes(budget)}, is far above the chart."
    return ["<h3>Memory a device</h3>", f"<p class=muted>Weights plus the activations live while each node runs "
            f"(in graph order; each value freed after its last use).{note}</p>",
            f"<svg width='{CHART_W}' height='{CHART_H}' role=img aria-label='memory per device'>" + "".join(parts)
            + "</svg>"]


def _collectives(data: dict) -> list[str]:
    colls, nodes = data["collectives"], data.get("nodes", [])
    if not colls:
        return ["<h3>Collectives</h3><p>None: every device computes its part without communicating.</p>"]
    out = [f"<h3>Collectives ({len(colls)})</h3>", "<table><tr><th>#<th>kind<th>axes<th>bytes a device"
           "<th>estimated<th>value<th>for</tr>"]
    for k, c in enumerate(colls):
        at = c.get("at", -1)
        where = "the inputs" if at < 0 else "the outputs" if at >= len(nodes) else f"#{at} {nodes[at]['name']}"
        kind = c["kind"] + (f" ({c['reduce']})" if c.get("reduce", "sum") != "sum" else "")
        out.append(f"<tr><td class=n>{k}<td>{_e(kind)}<td>{_e(','.join(c['axes']))}<td class=n>{_bytes(c['bytes'])}"
                   f"<td class=n>{_secs(c.get('time_s', 0.0))}<td><code>{_e(c['value'])}</code><td>{_e(where)}")
    return out + ["</table>"]


def _tensors(data: dict, mesh: Mesh) -> list[str]:
    rows = []
    for name, v in data["values"].items():
        spec = Spec.parse(v["spec"])
        local = spec.local_shape(tuple(v["shape"]), mesh)
        rows.append((TensorType(v["dtype"], local).nbytes, name, v, spec, local))
    rows.sort(key=lambda r: (-r[0], r[1]))
    out = ["<h3>Largest tensors a device</h3>", "<table><tr><th>tensor<th>global<th>spec<th>local shape"
           "<th>bytes a device<th>spec from</tr>"]
    for nbytes, name, v, spec, local in rows[:LARGEST]:
        out.append(f"<tr><td><code>{_e(name)}</code><td><code>{_e(v['dtype'])}{list(v['shape'])}</code>"
                   f"<td><code>{_e(str(spec))}</code><td><code>{list(local)}</code><td class=n>{_bytes(nbytes)}"
                   f"<td>{_e(v.get('origin', ''))}")
    out.append("</table>")
    if mesh.size > 1:
        out.append("<p class=muted>The block each device holds (rows: the first mesh axis; the same colour is the "
                   "same block).</p>")
        for _, name, v, spec, _ in rows[:LARGEST]:
            out.append(f"<details><summary><code>{_e(name)}</code> <code>{_e(str(spec))}</code></summary>"
                       + _blocks(tuple(v["shape"]), spec, mesh) + "</details>")
    return out


def _blocks(shape: tuple[int, ...], spec: Spec, mesh: Mesh) -> str:
    """A table of the mesh (rows: the first axis, columns: the others) with each device's block of the tensor,
    e.g. ``[0:4, :, 64:128]``; a partial value's blocks are told apart by the device's place on the partial axes."""
    two_d = len(mesh.shape) > 1
    n_rows, n_cols = (mesh.shape[0], prod(mesh.shape[1:])) if two_d else (1, mesh.size)
    rows = [f"<tr><th>{_e(mesh.names[0])} \\ {_e(','.join(mesh.names[1:]))}"
            + "".join(f"<th>{j}" for j in range(n_cols))] if two_d else []
    for r in range(n_rows):
        cells = []
        for j in range(n_cols):
            coord = mesh.coordinate(r * n_cols + j)  # ranks are row-major over the mesh
            ranges = [":" if spec.num_shards(d, mesh) == 1 else f"{s.start}:{s.stop}"
                      for d, s in enumerate(spec.block_slices(shape, mesh, coord))]
            part = ",".join(f"{a}={coord[mesh.names.index(a)]}" for a in spec.partial)
            text = "[" + ", ".join(ranges) + "]" + (f" partial sum {part}" if part else "")
            cells.append(f"<td style='background:{_block_colour(text)}' title='device {list(coord)}'>"
                         f"{_e(text)}")
        rows.append("<tr>" + (f"<th>{r}" if two_d else "") + "".join(cells))
    return "<table class=grid>" + "".join(rows) + "</table>"


def _nodes(data: dict, mesh: Mesh, key: str) -> list[str]:
    nodes, values = data.get("nodes", []), data["values"]
    by_at: dict[int, list[dict]] = {}
    for c in data["collectives"]:
        by_at.setdefault(c.get("at", -1), []).append(c)
    out = [f"<h3>Nodes ({len(nodes)})</h3>",
           f"<input class=filter data-table='{key}-nodes' placeholder='filter: node, op, tensor, spec, collective'>",
           f"<table id='{key}-nodes'><thead><tr><th>#<th>ONNX node<th>op<th>results: spec, local shape"
           "<th>estimated<th>work<th>collectives</tr></thead><tbody>"]
    for i, n in enumerate(nodes):
        results = []
        for name in n["outputs"]:
            v = values.get(name)
            if v is None:
                continue
            spec = Spec.parse(v["spec"])
            results.append(f"<code>{_e(name)}</code> <code>{_e(str(spec))}</code> "
                           f"<code>{list(spec.local_shape(tuple(v['shape']), mesh))}</code>")
        colls = "<br>".join(f"{_e(c['kind'])} of <code>{_e(c['value'])}</code> over {_e(','.join(c['axes']))} "
                            f"({_bytes(c['bytes'])})" for c in by_at.get(i, []))
        cls = " class=coll" if colls else ""
        out.append(f"<tr{cls}><td class=n>{i}<td>{_e(n['name'])}<td><code>{_e(n['op'])}</code><td>"
                   + "<br>".join(results) + f"<td class=n>{_secs(n['compute_s'])}<td class=n>"
                   f"{_flops(n['flops'])}<td>{colls}")
    return out + ["</tbody></table>"]


# ---------------------------------------------------------------------------------------------------------------
# Formatting

def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _card(big: str, small: str) -> str:
    return f"<div class=card><b>{big}</b><span>{small}</span></div>"


def _mesh_text(mesh: dict) -> str:
    return "x".join(map(str, mesh["shape"])) + " (" + ", ".join(
        f"{_e(a)}={s}" for a, s in zip(mesh["axes"], mesh["shape"])) + ")"


def _secs(s: float) -> str:
    if s >= 1:
        return f"{s:.3g} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    if s >= 1e-6:
        return f"{s * 1e6:.3g} µs"
    return f"{s * 1e9:.3g} ns"


def _flops(f: float) -> str:
    for unit in ("", "k", "M", "G", "T", "P"):
        if f < 1000 or unit == "P":
            return f"{f:.3g} {unit}FLOP" if f else "-"
        f /= 1000
    raise AssertionError


def _block_colour(key: str) -> str:
    """A light colour per block text: the same block, the same colour."""
    h = int.from_bytes(hashlib.sha1(key.encode()).digest()[:2], "big") / 65536
    r, g, b = colorsys.hls_to_rgb(h, 0.86, 0.45)
    return f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}"
