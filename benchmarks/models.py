"""Benchmark models built with the ONNX helper API (no torch): random weights from a fixed seed.

    from benchmarks.models import gpt2_like, bert_like, resnet50_path, resnext50_path
    path = gpt2_like("benchmarks/.cache/gpt2.onnx")                      # GPT-2 small, ~650 MB of weights
    tiny = gpt2_like(tmp / "tiny.onnx", layers=2, hidden=64, heads=4, seq=16, vocab=128)
    bert = bert_like("benchmarks/.cache/bert.onnx")                      # BERT-base, ~420 MB of weights
    resnet = resnet50_path()   # the onnx package's light_resnet50.onnx (weights are ConstantOfShape fills)
    resnext = resnext50_path("benchmarks/.cache")  # ResNeXt-50 32x4d, grouped 3x3 convolutions, ~100 MB

Weights are stored as ONNX external data (one ``<name>.onnx.data`` file next to the model), so a model of any
size loads lazily and the ``.onnx`` file itself stays small.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bmc.errors import UsageError

OPSET = 17  # LayerNormalization is opset 17+
IR_VERSION = 8  # the IR version that goes with opset 17; old enough for every consumer
GENERATOR_VERSION = 2  # bump when the graph changes, so cached files are regenerated
MASK_VALUE = -1e9  # finite, so a fully masked row can never produce NaN


@dataclass(frozen=True)
class GPT2Config:
    """Shape of a GPT-2-like decoder; ``ffn`` defaults to ``4 * hidden``."""

    layers: int = 12
    hidden: int = 768
    heads: int = 12
    seq: int = 128
    batch: int = 1
    vocab: int = 50257
    ffn: int = 0
    seed: int = 0

    def __post_init__(self):
        if self.ffn == 0:
            object.__setattr__(self, "ffn", 4 * self.hidden)
        problems = [f"{k}={v} must be >= 1" for k, v in asdict(self).items() if k != "seed" and v < 1]
        if self.hidden % self.heads:
            problems.append(f"hidden={self.hidden} is not a multiple of heads={self.heads}")
        if problems:
            raise UsageError("; ".join(problems), where="gpt2_like", fix="pick sizes with hidden % heads == 0")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def tag(self) -> str:
        """A file-name-safe id of this config (and of the generator version), for caching."""
        return (f"gpt2_L{self.layers}_H{self.hidden}_A{self.heads}_F{self.ffn}_S{self.seq}_B{self.batch}"
                f"_V{self.vocab}_seed{self.seed}_g{GENERATOR_VERSION}")


class _Builder:
    """Collects nodes and initializers; every weight is drawn from one seeded generator, in creation order."""

    def __init__(self, cfg: GPT2Config):
        self.cfg = cfg
        self.rng = np.random.default_rng(cfg.seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self._shared: set[str] = set()

    def weight(self, name: str, shape: tuple[int, ...], std: float = 0.02) -> str:
        data = self.rng.standard_normal(shape, dtype=np.float32)
        data *= np.float32(std)
        return self.const(name, data)

    def const(self, name: str, value) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def shared(self, name: str, value) -> str:
        """A constant used by every layer (mask, scale, shapes): one initializer, created on first use."""
        if name not in self._shared:
            self._shared.add(name)
            self.const(name, value)
        return name

    def op(self, op_type: str, inputs: list[str], name: str, n_out: int = 1, **attrs) -> str | list[str]:
        outs = [name] if n_out == 1 else [f"{name}_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, **attrs))
        return outs[0] if n_out == 1 else outs

    def linear(self, x: str, n_in: int, n_out: int, name: str) -> str:
        w = self.weight(f"{name}.weight", (n_in, n_out))
        b = self.weight(f"{name}.bias", (n_out,))
        return self.op("Add", [self.op("MatMul", [x, w], f"{name}.matmul"), b], f"{name}.add")

    def layer_norm(self, x: str, name: str, epsilon: float = 1e-5) -> str:
        h = self.cfg.hidden
        g = self.const(f"{name}.weight", 1.0 + self.rng.standard_normal(h, dtype=np.float32) * np.float32(0.02))
        b = self.weight(f"{name}.bias", (h,))
        return self.op("LayerNormalization", [x, g, b], name, axis=-1, epsilon=epsilon)

    def gelu_erf(self, x: str, name: str) -> str:
        """0.5 * x * (1 + erf(x / sqrt(2))), BERT's exact GELU as exporters write it (Div, Erf, Add, Mul, Mul)."""
        c = self.shared
        e = self.op("Erf", [self.op("Div", [x, c("gelu.sqrt_2", np.float32(math.sqrt(2)))], f"{name}.div")],
                    f"{name}.erf")
        y = self.op("Mul", [x, self.op("Add", [e, c("gelu.one", np.float32(1.0))], f"{name}.1pe")], f"{name}.mul")
        return self.op("Mul", [y, c("gelu.half", np.float32(0.5))], f"{name}.out")

    def gelu_tanh(self, x: str, name: str) -> str:
        """0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3))), GPT-2's "gelu_new"."""
        c = self.shared
        x3 = self.op("Mul", [self.op("Mul", [x, x], f"{name}.x2"), x], f"{name}.x3")
        inner = self.op("Add", [x, self.op("Mul", [x3, c("gelu.k", np.float32(0.044715))], f"{name}.kx3")],
                        f"{name}.inner")
        t = self.op("Tanh", [self.op("Mul", [inner, c("gelu.sqrt_2_over_pi", np.float32(math.sqrt(2 / math.pi)))],
                                     f"{name}.scaled")], f"{name}.tanh")
        half_x = self.op("Mul", [x, c("gelu.half", np.float32(0.5))], f"{name}.halfx")
        return self.op("Mul", [half_x, self.op("Add", [t, c("gelu.one", np.float32(1.0))], f"{name}.1pt")],
                       f"{name}.out")


def _attention(b: _Builder, x: str, name: str) -> str:
    cfg = b.cfg
    h, a, d = cfg.hidden, cfg.heads, cfg.head_dim
    qkv = b.linear(x, h, 3 * h, f"{name}.qkv")
    split = b.shared("attn.split", np.array([h, h, h], np.int64))
    q, k, v = b.op("Split", [qkv, split], f"{name}.split_qkv", n_out=3, axis=-1)
    heads_shape = b.shared("attn.heads_shape", np.array([cfg.batch, cfg.seq, a, d], np.int64))

    def to_heads(t: str, tag: str, perm: list[int]) -> str:
        return b.op("Transpose", [b.op("Reshape", [t, heads_shape], f"{name}.{tag}.reshape")],
                    f"{name}.{tag}.transpose", perm=perm)

    q = to_heads(q, "q", [0, 2, 1, 3])  # [B, A, S, D]
    kt = to_heads(k, "k", [0, 2, 3, 1])  # [B, A, D, S]
    v = to_heads(v, "v", [0, 2, 1, 3])
    scores = b.op("MatMul", [q, kt], f"{name}.scores")
    scores = b.op("Mul", [scores, b.shared("attn.scale", np.float32(1 / math.sqrt(d)))], f"{name}.scaled")
    mask = np.triu(np.full((cfg.seq, cfg.seq), MASK_VALUE, np.float32), k=1)
    scores = b.op("Add", [scores, b.shared("attn.causal_mask", mask)], f"{name}.masked")
    probs = b.op("Softmax", [scores], f"{name}.softmax", axis=-1)
    ctx = b.op("Transpose", [b.op("MatMul", [probs, v], f"{name}.context")], f"{name}.merge", perm=[0, 2, 1, 3])
    merged = b.shared("attn.merged_shape", np.array([cfg.batch, cfg.seq, h], np.int64))
    return b.linear(b.op("Reshape", [ctx, merged], f"{name}.merge.reshape"), h, h, f"{name}.proj")


def _block(b: _Builder, x: str, i: int) -> str:
    name = f"h.{i}"
    x = b.op("Add", [x, _attention(b, b.layer_norm(x, f"{name}.ln_1"), f"{name}.attn")], f"{name}.residual_1")
    fc1 = b.linear(b.layer_norm(x, f"{name}.ln_2"), b.cfg.hidden, b.cfg.ffn, f"{name}.mlp.fc1")
    fc2 = b.linear(b.gelu_tanh(fc1, f"{name}.mlp.gelu"), b.cfg.ffn, b.cfg.hidden, f"{name}.mlp.fc2")
    return b.op("Add", [x, fc2], f"{name}.residual_2")


def build_gpt2_like(cfg: GPT2Config) -> onnx.ModelProto:
    """The model as an in-memory ModelProto (weights inline); ``gpt2_like`` saves it with external data."""
    b = _Builder(cfg)
    wte = b.weight("wte", (cfg.vocab, cfg.hidden))
    wpe = b.weight("wpe", (cfg.seq, cfg.hidden), std=0.01)
    x = b.op("Add", [b.op("Gather", [wte, "input_ids"], "embed.tokens", axis=0), wpe], "embed.add_positions")
    for i in range(cfg.layers):
        x = _block(b, x, i)
    x = b.layer_norm(x, "ln_f")
    # tied embedding, stored transposed as its own initializer (as exporters emit it)
    lm_head = b.const("lm_head.weight", np.ascontiguousarray(numpy_helper.to_array(b.inits[0]).T))
    b.op("MatMul", [x, lm_head], "logits")
    graph = helper.make_graph(
        b.nodes, "gpt2_like",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [cfg.batch, cfg.seq])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [cfg.batch, cfg.seq, cfg.vocab])],
        initializer=b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="bmc-benchmarks")
    model.ir_version = IR_VERSION
    model.doc_string = f"gpt2_like {asdict(cfg)}"
    return model


@dataclass(frozen=True)
class BertConfig:
    """Shape of a BERT-like encoder (post-LayerNorm, exact GELU); ``ffn`` defaults to ``4 * hidden``."""

    layers: int = 12
    hidden: int = 768
    heads: int = 12
    seq: int = 128
    batch: int = 1
    vocab: int = 30522
    ffn: int = 0
    seed: int = 0

    __post_init__ = GPT2Config.__post_init__
    head_dim = GPT2Config.head_dim

    def tag(self) -> str:
        return (f"bert_L{self.layers}_H{self.hidden}_A{self.heads}_F{self.ffn}_S{self.seq}_B{self.batch}"
                f"_V{self.vocab}_seed{self.seed}_g{GENERATOR_VERSION}")


def separate_qkv_attention(b: _Builder, x: str, name: str, *, causal: bool,
                           names: tuple[str, str, str, str] = ("query", "key", "value", "output")) -> str:
    """Multi-head attention with separate Q/K/V projections (BERT, OPT); ``names`` are the four projections'
    name suffixes; ``causal`` adds the upper-triangular mask (a decoder)."""
    cfg = b.cfg
    h, a, d = cfg.hidden, cfg.heads, cfg.head_dim
    heads_shape = b.shared("attn.heads_shape", np.array([cfg.batch, cfg.seq, a, d], np.int64))

    def heads(tag: str, perm: list[int]) -> str:
        t = b.linear(x, h, h, f"{name}.{tag}")
        return b.op("Transpose", [b.op("Reshape", [t, heads_shape], f"{name}.{tag}.reshape")],
                    f"{name}.{tag}.transpose", perm=perm)

    q, kt, v = heads(names[0], [0, 2, 1, 3]), heads(names[1], [0, 2, 3, 1]), heads(names[2], [0, 2, 1, 3])
    scores = b.op("Mul", [b.op("MatMul", [q, kt], f"{name}.scores"), b.shared("attn.scale", np.float32(d ** -0.5))],
                  f"{name}.scaled")
    if causal:
        mask = np.triu(np.full((cfg.seq, cfg.seq), MASK_VALUE, np.float32), k=1)
        scores = b.op("Add", [scores, b.shared("attn.causal_mask", mask)], f"{name}.masked")
    probs = b.op("Softmax", [scores], f"{name}.softmax", axis=-1)
    ctx = b.op("Transpose", [b.op("MatMul", [probs, v], f"{name}.context")], f"{name}.merge", perm=[0, 2, 1, 3])
    merged = b.shared("attn.merged_shape", np.array([cfg.batch, cfg.seq, h], np.int64))
    return b.linear(b.op("Reshape", [ctx, merged], f"{name}.merge.reshape"), h, h, f"{name}.{names[3]}")


def build_bert_like(cfg: BertConfig) -> onnx.ModelProto:
    """BERT-base-like encoder: word + position + token-type embeddings, LayerNorm, ``layers`` post-LN blocks
    (attention → add → LayerNorm → FFN with erf GELU → add → LayerNorm); output ``last_hidden_state``."""
    b = _Builder(cfg)
    eps = 1e-12
    words = b.weight("embeddings.word", (cfg.vocab, cfg.hidden))
    positions = b.weight("embeddings.position", (cfg.seq, cfg.hidden), std=0.01)
    token_types = b.weight("embeddings.token_type", (2, cfg.hidden))
    type_ids = b.const("embeddings.token_type_ids", np.zeros((cfg.batch, cfg.seq), np.int64))
    x = b.op("Add", [b.op("Gather", [words, "input_ids"], "embed.words", axis=0), positions], "embed.add_positions")
    x = b.op("Add", [x, b.op("Gather", [token_types, type_ids], "embed.types", axis=0)], "embed.add_types")
    x = b.layer_norm(x, "embeddings.ln", eps)
    for i in range(cfg.layers):
        name = f"layer.{i}"
        x = b.layer_norm(b.op("Add", [x, separate_qkv_attention(b, x, f"{name}.attn", causal=False)], f"{name}.residual_1"),
                         f"{name}.attn.ln", eps)
        up = b.gelu_erf(b.linear(x, cfg.hidden, cfg.ffn, f"{name}.intermediate"), f"{name}.gelu")
        x = b.layer_norm(b.op("Add", [x, b.linear(up, cfg.ffn, cfg.hidden, f"{name}.output")], f"{name}.residual_2"),
                         f"{name}.output.ln", eps)
    b.op("Identity", [x], "last_hidden_state")
    graph = helper.make_graph(
        b.nodes, "bert_like",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [cfg.batch, cfg.seq])],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, [cfg.batch, cfg.seq, cfg.hidden])],
        initializer=b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="bmc-benchmarks")
    model.ir_version = IR_VERSION
    model.doc_string = f"bert_like {asdict(cfg)}"
    return model


def bert_like(path, layers: int = 12, hidden: int = 768, heads: int = 12, seq: int = 128, batch: int = 1,
              vocab: int = 30522, *, ffn: int = 0, seed: int = 0) -> Path:
    """Write a BERT-like ONNX model to ``path`` (+ ``<name>.onnx.data``); input ``input_ids`` int64 [batch, seq],
    output ``last_hidden_state`` float32 [batch, seq, hidden]."""
    return _save(build_bert_like(BertConfig(layers, hidden, heads, seq, batch, vocab, ffn, seed)), Path(path))


def resnet50_path() -> Path:
    """The onnx package's ``light_resnet50.onnx`` (opset 9, input ``gpu_0/data_0`` float32 [1, 3, 224, 224]; its
    weights are ConstantOfShape fills, so the output is uninformative but the work is ResNet-50's)."""
    path = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / "light_resnet50.onnx"
    if not path.exists():
        raise UsageError(f"{path} is missing from this onnx installation", where="resnet50_path",
                         fix="install an onnx wheel that ships backend/test/data/light")
    return path


def build_resnext50(groups: int = 32, width: int = 4, seed: int = 0) -> onnx.ModelProto:
    """ResNeXt-50 (32x4d by default: bottlenecks of 3, 4, 6, 3 blocks whose 3x3 convolutions have ``groups`` groups
    of ``width`` x 2^stage channels) with each batch norm folded into its conv's bias, as exporters of an eval-mode
    model write it; input ``x`` float32 [1, 3, 224, 224], output ``logits`` [1, 1000]. He-scaled random weights."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def conv(x: str, cin: int, cout: int, k: int, stride: int = 1, group: int = 1, relu: bool = True) -> str:
        name = f"conv{len(inits)}"
        fan_in = cin // group * k * k
        inits.append(numpy_helper.from_array((rng.standard_normal((cout, cin // group, k, k)) *
                                              math.sqrt(2.0 / fan_in)).astype(np.float32), f"{name}.w"))
        inits.append(numpy_helper.from_array((0.1 * rng.standard_normal(cout)).astype(np.float32), f"{name}.b"))
        nodes.append(helper.make_node("Conv", [x, f"{name}.w", f"{name}.b"], [name], kernel_shape=[k, k],
                                      strides=[stride] * 2, pads=[k // 2] * 4, group=group))
        if not relu:
            return name
        nodes.append(helper.make_node("Relu", [name], [f"{name}.relu"]))
        return f"{name}.relu"

    x = conv("x", 3, 64, 7, 2)
    nodes.append(helper.make_node("MaxPool", [x], ["pool"], kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4))
    x, cin = "pool", 64
    for stage, blocks in enumerate((3, 4, 6, 3)):
        planes, mid = 64 << stage, groups * width << stage
        for i in range(blocks):
            stride = 2 if i == 0 and stage > 0 else 1
            y = conv(conv(x, cin, mid, 1), mid, mid, 3, stride, groups)
            y = conv(y, mid, planes * 4, 1, relu=False)
            shortcut = conv(x, cin, planes * 4, 1, stride, relu=False) if i == 0 else x
            out = f"block{stage}_{i}"
            nodes.append(helper.make_node("Add", [y, shortcut], [f"{out}.sum"]))
            nodes.append(helper.make_node("Relu", [f"{out}.sum"], [out]))
            x, cin = out, planes * 4
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"]))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"]))
    inits.append(numpy_helper.from_array((rng.standard_normal((cin, 1000)) / math.sqrt(cin)).astype(np.float32),
                                         "fc.w"))
    nodes.append(helper.make_node("MatMul", ["flat", "fc.w"], ["logits"]))
    graph = helper.make_graph(nodes, "resnext50", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                 [1, 3, 224, 224])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 1000])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)


def resnext50_path(cache_dir) -> Path:
    """ResNeXt-50 32x4d (:func:`build_resnext50`, seed 0) in ``cache_dir``, written on first use."""
    path = Path(cache_dir) / f"resnext50_32x4d_seed0_g{GENERATOR_VERSION}.onnx"
    if path.exists() and Path(f"{path}.data").exists():
        return path
    return _save(build_resnext50(), path)


def gpt2_like(path, layers: int = 12, hidden: int = 768, heads: int = 12, seq: int = 128, batch: int = 1,
              vocab: int = 50257, *, ffn: int = 0, seed: int = 0) -> Path:
    """Write a GPT-2-like ONNX model to ``path`` (+ ``<name>.onnx.data`` beside it) and return the path.

    Pre-LayerNorm blocks, fused QKV split into heads, causal mask added as a constant, tanh GELU, tied LM head;
    input ``input_ids`` int64 [batch, seq], output ``logits`` float32 [batch, seq, vocab]. The files are written
    under temporary names and renamed into place, so a reader never sees half a model.
    """
    return _save(build_gpt2_like(GPT2Config(layers, hidden, heads, seq, batch, vocab, ffn, seed)), Path(path))


def _save(model: onnx.ModelProto, path: Path) -> Path:
    """Save with external data under temporary names, then rename into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data_name = f"{path.name}.data"
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".tmp-") as tmp:
        tmp_model = Path(tmp) / path.name
        onnx.save(model, tmp_model, save_as_external_data=True, all_tensors_to_one_file=True,
                  location=data_name, size_threshold=1024)
        del model
        for name in (data_name, path.name):
            _chmod_like_new_file(Path(tmp) / name)
        os.replace(Path(tmp) / data_name, path.parent / data_name)
        os.replace(tmp_model, path)
    return path


def _chmod_like_new_file(path: Path) -> None:
    """onnx writes external data as 0600; give it the mode any new file gets (0666 minus the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def initializer_bytes(path) -> int:
    """Bytes of all initializers of an ONNX model, read from the proto only (external data is not loaded)."""
    model = onnx.load(str(path), load_external_data=False)
    total = 0
    for t in model.graph.initializer:
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        total += int(np.prod(t.dims, dtype=np.int64)) * itemsize
    return total
