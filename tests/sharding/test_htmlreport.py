"""The one-file HTML plan report (``bmc plan --html``): what it shows is checked against plan.json and against the
layout semantics (``bmc.sharding.layout``), and the page is well-formed, escaped and self-contained."""

from __future__ import annotations

import copy
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bmc.compiler import plan_model, plan_pipeline_model
from bmc.sharding.htmlreport import _blocks, plan_html
from bmc.sharding.layout import coordinates, shard
from bmc.sharding.mesh import Mesh
from bmc.sharding.spec import Spec

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "models"
SHAPES = {"batch": 2, "seq": 16}
VOID = {"meta", "br", "input", "img", "hr", "link", "col", "wbr", "source"}
# elements whose end tag HTML lets one leave out (the page leaves out those of table rows and cells)
IMPLIED = {"tr", "td", "th", "p", "li"}


class Page(HTMLParser):
    """Parses the report: checks that elements nest, collects each table's body rows (as text cells) by id, the
    embedded plan and every external reference."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.tables: dict[str, list[list[str]]] = {}
        self.table_ids: list[str | None] = []
        self.scripts: dict[str, str] = {}
        self.refs: list[str] = []
        self._script: str | None = None
        self._cell: list[str] | None = None
        self.feed(text)
        self.close()
        assert [t for t in self.stack if t not in IMPLIED] == [], f"unclosed elements: {self.stack}"

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag in ("td", "th", "tr"):  # a new cell or row ends the open one
            stop = ("tr",) if tag != "tr" else ("table", "thead", "tbody")
            while self.stack and self.stack[-1] in IMPLIED and self.stack[-1] not in stop:
                self._end(self.stack.pop())
        self.refs += [v for k, v in attrs if k in ("src", "href") and v and not v.startswith("#")]
        if tag == "table":
            self.table_ids.append(a.get("id"))
            if a.get("id"):
                self.tables[a["id"]] = []
        elif tag == "tr" and self.table_ids and self.table_ids[-1]:
            self.tables[self.table_ids[-1]].append([])
        elif tag in ("td", "th") and self.table_ids and self.table_ids[-1]:
            self._cell = []
        if tag == "script":
            self._script = a.get("id", "")
            self.scripts[self._script] = ""
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        while self.stack and self.stack[-1] != tag and self.stack[-1] in IMPLIED:
            self._end(self.stack.pop())
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1] if self.stack else None}>"
        self._end(self.stack.pop())

    def _end(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            rows = self.tables[self.table_ids[-1]]
            rows[-1].append("".join(self._cell).strip())
            self._cell = None
        if tag == "table":
            self.table_ids.pop()
        if tag == "script":
            self._script = None

    def handle_data(self, data):
        if self._script is not None:
            self.scripts[self._script] += data
        if self._cell is not None:
            self._cell.append(data)

    def body_rows(self, table_id: str) -> list[list[str]]:
        return [r for r in self.tables[table_id] if r and not all(c == "" for c in r)][1:]  # less the header


@pytest.fixture(scope="module")
def megatron_gpt2():
    _, prog, data = plan_model(FIXTURES / "gpt2_dynamo.onnx", mesh="2x2", strategy="dp+megatron",
                               input_shapes=SHAPES)
    return prog, data


def test_plan_json_accounts_every_node_collective_and_step(megatron_gpt2):
    """The keys the report reads add up to the plan's own totals."""
    prog, data = megatron_gpt2
    nodes, colls, mem, cost = data["nodes"], data["collectives"], data["memory"], data["cost"]
    assert [n["op"] for n in nodes] == [n.op for n in prog.global_graph.nodes]
    assert sum(n["compute_s"] for n in nodes) == pytest.approx(cost["compute_s"], rel=1e-12)
    assert sum(c["time_s"] for c in colls) == pytest.approx(cost["comm_s"], rel=1e-12)
    assert len(mem["live_bytes"]) == len(nodes)
    assert mem["weight_bytes_per_device"] + max(mem["live_bytes"]) == mem["peak_bytes_per_device"]
    assert all(-1 <= c["at"] <= len(nodes) for c in colls)
    # dp+megatron on GPT-2: each layer's two row-parallel matmuls end in an all-reduce over y, run for the add
    # that takes the partial sum
    for c in colls:
        if c["kind"] == "all_reduce":
            consumer = nodes[c["at"]]
            assert c["value"] in consumer["inputs"] and c["axes"] == ["y"]
    assert sum(n["flops"] for n in nodes if n["op"] == "matmul") > 0


def test_report_lists_every_node_and_collective_and_embeds_the_plan(megatron_gpt2):
    _, data = megatron_gpt2
    page = Page(plan_html(data, "gpt2_dynamo.onnx"))
    rows = page.body_rows("p-nodes")
    assert len(rows) == len(data["nodes"])
    for row, node in zip(rows, data["nodes"]):
        assert row[0] == str(data["nodes"].index(node)) and row[2] == node["op"]
    # every collective shows on its node's row, and the collectives' own table lists them all
    marked = [i for i, r in enumerate(rows) if r[-1]]
    assert marked == sorted({c["at"] for c in data["collectives"] if 0 <= c["at"] < len(rows)})
    assert f"Collectives ({len(data['collectives'])})" in plan_html(data, "x")
    assert json.loads(page.scripts["bmc-plan"]) == data  # the plan travels with the page
    assert page.refs == []  # nothing is loaded from elsewhere


def test_block_maps_agree_with_the_layout(megatron_gpt2):
    """The per-device blocks the report draws are what ``layout.shard`` gives each device."""
    _, data = megatron_gpt2
    mesh = Mesh.parse("2x2")
    split = [(n, v) for n, v in data["values"].items() if Spec.parse(v["spec"]).axes()]
    assert split
    for name, v in split[:20]:
        _check_blocks(tuple(v["shape"]), Spec.parse(v["spec"]), mesh)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_block_maps_agree_with_the_layout_for_any_spec(data):
    mesh = Mesh.parse(data.draw(st.sampled_from(["4", "2x2", "2x3", "2x2x2"])))
    rank = data.draw(st.integers(1, 3))
    axes = list(mesh.names)
    dims: list[list[str]] = [[] for _ in range(rank)]
    partial = []
    for a in data.draw(st.permutations(axes)):
        where = data.draw(st.integers(-2, rank - 1))  # -2: unused, -1: partial
        if where == -1:
            partial.append(a)
        elif where >= 0:
            dims[where].append(a)
    spec = Spec(tuple(tuple(d) for d in dims), tuple(partial))
    shape = tuple(data.draw(st.integers(1, 3)) * spec.num_shards(d, mesh) for d in range(rank))
    _check_blocks(shape, spec, mesh)


def _check_blocks(shape, spec: Spec, mesh: Mesh) -> None:
    table = _blocks(shape, spec, mesh)
    cells = re.findall(r"title='device \[([\d, ]*)\]'>([^<]*)", table)
    assert len(cells) == mesh.size
    whole = np.arange(int(np.prod(shape))).reshape(shape)
    blocks = Spec(spec.dims)  # the region a device holds (a partial value's device holds a summand of it)
    seen = {}
    for coord_text, text in cells:
        coord = tuple(int(c) for c in coord_text.split(","))
        m = re.fullmatch(r"\[(.*)\](?: partial sum (.*))?", text)
        index = tuple(slice(None) if r == ":" else slice(*map(int, r.split(":"))) for r in m.group(1).split(", "))
        np.testing.assert_array_equal(whole[index], shard(whole, blocks, mesh, coord))
        part = tuple(coord[mesh.names.index(a)] for a in spec.partial)
        assert (m.group(2) or "") == ",".join(f"{a}={c}" for a, c in zip(spec.partial, part))
        seen[coord] = text
    assert sorted(seen) == sorted(coordinates(mesh))
    # devices that hold the same data (replicas) and only those share a block text
    for a in seen:
        for b in seen:
            same = np.array_equal(shard(whole, blocks, mesh, a), shard(whole, blocks, mesh, b)) and all(
                a[mesh.names.index(x)] == b[mesh.names.index(x)] for x in spec.partial)
            assert (seen[a] == seen[b]) == same


def test_names_are_escaped_everywhere(megatron_gpt2):
    _, data = megatron_gpt2
    data = copy.deepcopy(data)
    evil = "</script><img src=x onerror=alert(1)>&"
    old = data["nodes"][3]["outputs"][0]
    data["values"][evil] = data["values"].pop(old)
    data["nodes"][3]["outputs"][0] = evil
    data["nodes"][3]["name"] = evil
    page_text = plan_html(data, evil)
    assert "<img" not in page_text and "onerror=alert(1)>" not in page_text
    page = Page(page_text)
    assert page.refs == []
    assert json.loads(page.scripts["bmc-plan"])["nodes"][3]["name"] == evil
    assert page.body_rows("p-nodes")[3][1] == evil


def test_pipeline_report_shows_the_chain_and_each_stage():
    data, _ = plan_pipeline_model(FIXTURES / "gpt2_dynamo.onnx", mesh="2x2", stages=2, microbatches=2,
                                  input_shapes=SHAPES)
    page_text = plan_html(data, "gpt2 in stages")
    page = Page(page_text)
    assert "Pipeline: 2 stages, 2 microbatch(es)" in page_text
    assert "ranks 0&ndash;1" in page_text and "ranks 2&ndash;3" in page_text
    for i, (cut, plan) in enumerate(zip(data["pipeline"]["stages"], data["stages"])):
        rows = page.body_rows(f"s{i}-nodes")
        copied = [r for r in rows[:len(rows) - (cut["nodes"][1] - cut["nodes"][0])]]  # constants a stage copies
        assert len(rows) == len(plan["nodes"]) and all(r[2] == "constant" for r in copied)
    sends = data["pipeline"]["stages"][0]["sends"]
    assert sends and all(f"<code>{s}</code>" in page_text for s in sends)


def test_stage_search_and_single_device_plans_render():
    data, _ = plan_pipeline_model(FIXTURES / "gpt2_dynamo.onnx", mesh="2", stages="auto", input_shapes=SHAPES)
    page_text = plan_html(data, "auto")
    Page(page_text)
    assert "Stage search" in page_text and page_text.count("(chosen)") == 1
    from bmc.compiler import import_graph, single_device_plan

    one = single_device_plan(import_graph(FIXTURES / "gpt2_dynamo.onnx", SHAPES))
    page_text = plan_html(one, "one device")
    Page(page_text)
    assert "one device" in page_text and "<code>matmul</code>" in page_text
