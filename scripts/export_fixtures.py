#!/usr/bin/env python3
"""Export tiny, randomly initialised HuggingFace models to ONNX test fixtures.

Run with the separate export venv (torch must NOT live in the project venv):

    /work/export-venv/bin/python scripts/export_fixtures.py [--out tests/fixtures/models]

For every model in MODELS and every exporter in EXPORTERS this writes
``<out>/<model>_<exporter>.onnx`` (single file, weights embedded),
``<out>/<model>_<exporter>.npz`` (example inputs keyed by ONNX input name and
onnxruntime outputs keyed ``output:<name>``) and finally ``<out>/MANIFEST.json``.

Everything is deterministic: fixed seeds, random weights built from configs
(never downloaded), and every parameter is perturbed with small noise so no
two initializers are identical (the dynamo exporter would otherwise
deduplicate e.g. LayerNorm ones/zeros).
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

try:
    import onnxscript  # noqa: E402

    ONNXSCRIPT_VERSION = onnxscript.__version__
except Exception:  # pragma: no cover
    ONNXSCRIPT_VERSION = None

BATCH, SEQ = 2, 16
SEED = 1234
TOL = 1e-4
LEGACY_OPSET = 17
EXPORTERS = ("legacy", "dynamo", "dynamo23")
# dynamo23: the dynamo exporter at opset 23 with PyTorch's SDPA attention, which it writes as ONNX ``Attention``
# (and RMSNorm as ``RMSNormalization``): what a current exporter emits for an LLM. One model is enough.
EXPORTER_MODELS = {"dynamo23": ("llama",), "legacy": ("gpt2", "bert", "llama", "opt", "vit", "xattn", "mixtral")}  # others: all


# --------------------------------------------------------------------------
# Wrappers: positional tensor input(s) -> ONE tensor output.
# --------------------------------------------------------------------------
class CausalLMLogits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids, use_cache=False, return_dict=True).logits


class EncoderHidden(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
        return out.last_hidden_state


class VisionHidden(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model(pixel_values=pixel_values, return_dict=True).last_hidden_state


# --------------------------------------------------------------------------
# Model builders. Each returns (wrapper, inputs dict(name->tensor),
# output name, dynamic axes dict(name->{axis: dimname})).
# --------------------------------------------------------------------------
VOCAB = 256
MAXPOS = 64


def _token_inputs(gen):
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen, dtype=torch.int64)
    return ids


def _causal_lm(model, gen):
    """A causal LM's builder result: token ids in, logits out, batch and sequence dynamic."""
    return (CausalLMLogits(model), {"input_ids": _token_inputs(gen)}, "logits",
            {"input_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}})


def build_gpt2(gen):
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=MAXPOS, n_embd=32, n_layer=2, n_head=2,
        bos_token_id=0, eos_token_id=0,
        use_cache=False, attn_implementation="eager",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    model = transformers.GPT2LMHeadModel(cfg)
    return _causal_lm(model, gen)


def build_bert(gen):
    cfg = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=MAXPOS, type_vocab_size=2,
        attn_implementation="eager", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    model = transformers.BertModel(cfg, add_pooling_layer=False)
    ids = _token_inputs(gen)
    mask = torch.ones(BATCH, SEQ, dtype=torch.int64)
    mask[1, SEQ - 4:] = 0  # second sequence padded: exercises the mask path
    return (EncoderHidden(model), {"input_ids": ids, "attention_mask": mask}, "last_hidden_state",
            {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
             "last_hidden_state": {0: "batch", 1: "seq"}})


def build_llama(gen):
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAXPOS,
        use_cache=False, attn_implementation="eager", tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(cfg)
    return _causal_lm(model, gen)


def build_mixtral(gen):
    # a sparse mixture of experts (4 experts, 2 per token). transformers' default experts loop over the experts
    # that got tokens (data-dependent shapes, which neither exporter can write statically); "batched_mm" gathers
    # each token's experts' weights and multiplies them batched, which both exporters write as Gather + MatMul
    cfg = transformers.MixtralConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAXPOS,
        num_local_experts=4, num_experts_per_tok=2, use_cache=False, attn_implementation="eager",
        tie_word_embeddings=False, experts_implementation="batched_mm",
    )
    model = transformers.MixtralForCausalLM(cfg)
    return _causal_lm(model, gen)


def build_qwenmoe(gen):
    # Qwen2-MoE's layout: routed experts plus a shared expert scaled by a per-token sigmoid gate ([1, H] weight)
    cfg = transformers.Qwen2MoeConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=64, moe_intermediate_size=32,
        shared_expert_intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=MAXPOS, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1,
        mlp_only_layers=[], use_cache=False, attn_implementation="eager", tie_word_embeddings=False,
        experts_implementation="batched_mm",
    )
    model = transformers.Qwen2MoeForCausalLM(cfg)
    return _causal_lm(model, gen)


def build_dsv3(gen):
    # DeepSeek-V3's layout: multi-head latent attention, a dense first layer, then routed experts with a sigmoid
    # router (its scores' bias picks the experts, the unbiased scores weight them) and a shared expert
    cfg = transformers.DeepseekV3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=MAXPOS, n_routed_experts=4,
        num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1,
        q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, use_cache=False,
        attn_implementation="eager", tie_word_embeddings=False, experts_implementation="batched_mm",
    )
    model = transformers.DeepseekV3ForCausalLM(cfg)
    return _causal_lm(model, gen)


# Decoders whose layers differ from Llama's in ways bmc's fusions and sharding rules must see through. Shared
# sizes (small: the fixtures travel to the GPU check too): hidden 32, 4 query heads over 2 key/value heads of 8,
# MLP 64.
_DECODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=MAXPOS, use_cache=False, attn_implementation="eager",
                tie_word_embeddings=False)


def build_gemma2(gen):
    # attention logits soft-capped (50 tanh(s / 50)) before the mask, a sliding window of 8 on the first layer,
    # norms around each sublayer, (1 + w) RMSNorm gains, GeGLU, soft-capped final logits
    cfg = transformers.Gemma2Config(head_dim=8, query_pre_attn_scalar=8, sliding_window=8,
                                    attn_logit_softcapping=50.0, final_logit_softcapping=30.0, **_DECODER)
    return _causal_lm(transformers.Gemma2ForCausalLM(cfg), gen)


def build_phi3(gen):
    # one fused qkv_proj and one fused gate_up_proj, cut into parts by slices
    cfg = transformers.Phi3Config(pad_token_id=0, **_DECODER)
    return _causal_lm(transformers.Phi3ForCausalLM(cfg), gen)


def build_neox(gen):
    # GPT-NeoX / Pythia: rotary embedding on half of each head, attention and MLP in parallel off one input
    cfg = transformers.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=MAXPOS, rotary_pct=0.5, use_parallel_residual=True, use_cache=False,
        attn_implementation="eager", tie_word_embeddings=False)
    return _causal_lm(transformers.GPTNeoXForCausalLM(cfg), gen)


def build_olmo2(gen):
    # RMSNorm over the whole query and key projections (all heads at once) before the head reshape
    cfg = transformers.Olmo2Config(**_DECODER)
    return _causal_lm(transformers.Olmo2ForCausalLM(cfg), gen)


def build_gptoss(gen):
    # GPT-OSS: a learned sink per head (one more logit in every row's softmax, its probability dropped), sliding
    # windows of 8 on every other layer, experts with biases and a clamped SwiGLU
    cfg = transformers.GptOssConfig(head_dim=8, sliding_window=8, num_local_experts=4, num_experts_per_tok=2,
                                    experts_implementation="batched_mm", **_DECODER)
    return _causal_lm(transformers.GptOssForCausalLM(cfg), gen)


def build_opt(gen):
    cfg = transformers.OPTConfig(
        vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=MAXPOS, word_embed_proj_dim=32,
        use_cache=False, attn_implementation="eager", dropout=0.0, attention_dropout=0.0,
        pad_token_id=1,
    )
    model = transformers.OPTForCausalLM(cfg)
    return _causal_lm(model, gen)


def build_vit(gen):
    cfg = transformers.ViTConfig(
        image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, attn_implementation="eager",
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    model = transformers.ViTModel(cfg, add_pooling_layer=False)
    px = torch.randn(BATCH, 3, 32, 32, generator=gen, dtype=torch.float32)
    return (VisionHidden(model), {"pixel_values": px}, "last_hidden_state",
            {"pixel_values": {0: "batch"}, "last_hidden_state": {0: "batch"}})


def build_falcon(gen):
    """Multi-query attention: one key/value head that the matmuls broadcast over the query heads."""
    cfg = transformers.FalconConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, multi_query=True,
        use_cache=False, attn_implementation="eager", hidden_dropout=0.0, attention_dropout=0.0,
    )
    model = transformers.FalconForCausalLM(cfg)
    return _causal_lm(model, gen)


def build_bloom(gen):
    """ALiBi: a per-head linear position bias added to the scores instead of position embeddings."""
    cfg = transformers.BloomConfig(
        vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4, use_cache=False, attn_implementation="eager",
        hidden_dropout=0.0, attention_dropout=0.0,
    )
    model = transformers.BloomForCausalLM(cfg)
    return _causal_lm(model, gen)


def _padded_ids(gen):
    ids = _token_inputs(gen)
    mask = torch.ones(BATCH, SEQ, dtype=torch.int64)
    mask[1, SEQ - 4:] = 0
    return {"input_ids": ids, "attention_mask": mask}


_ENCODER_DYN = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
                "last_hidden_state": {0: "batch", 1: "seq"}}


def build_t5enc(gen):
    """T5's encoder: bucketed relative position bias (a log of the distance) plus the padding mask, no scale."""
    cfg = transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, dropout_rate=0.0,
        attn_implementation="eager",
    )
    return EncoderHidden(transformers.T5EncoderModel(cfg)), _padded_ids(gen), "last_hidden_state", _ENCODER_DYN


def build_deberta(gen):
    """DeBERTa-v2: disentangled attention (content-to-position and position-to-content scores)."""
    cfg = transformers.DebertaV2Config(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=MAXPOS, relative_attention=True, position_buckets=8, pos_att_type=["p2c", "c2p"],
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return EncoderHidden(transformers.DebertaV2Model(cfg)), _padded_ids(gen), "last_hidden_state", _ENCODER_DYN


class CrossAttentionBlock(torch.nn.Module):
    """A decoder's cross-attention block (pre-norm, as in Whisper's or Perceiver's decoders): a few rows ``x`` attend
    to a long ``memory`` through PyTorch's SDPA with a key padding mask, then an MLP. The context-parallel fixture:
    the memory's sequence dim is what a mesh axis splits."""

    def __init__(self, width=32, heads=4):
        super().__init__()
        self.heads = heads
        self.ln_q, self.ln_kv, self.ln_mlp = (torch.nn.LayerNorm(width) for _ in range(3))
        self.q, self.k, self.v, self.o = (torch.nn.Linear(width, width) for _ in range(4))
        self.mlp = torch.nn.Sequential(torch.nn.Linear(width, 2 * width), torch.nn.GELU(),
                                       torch.nn.Linear(2 * width, width))

    def forward(self, x, memory, memory_mask):
        (b, m, e), n, h = x.shape, memory.shape[1], self.heads
        q = self.q(self.ln_q(x)).view(b, m, h, e // h).transpose(1, 2)
        mem = self.ln_kv(memory)
        k, v = (f(mem).view(b, n, h, e // h).transpose(1, 2) for f in (self.k, self.v))
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=memory_mask[:, None, None, :] > 0)
        x = x + self.o(a.transpose(1, 2).reshape(b, m, e))
        return x + self.mlp(self.ln_mlp(x))


MEMORY = 48


def build_xattn(gen):
    x = torch.randn(BATCH, 4, 32, generator=gen)
    memory = torch.randn(BATCH, MEMORY, 32, generator=gen)
    mask = torch.ones(BATCH, MEMORY, dtype=torch.int64)
    mask[1, MEMORY - 20:] = 0  # the second memory padded: whole blocks of keys masked on 4 devices
    return (CrossAttentionBlock(), {"x": x, "memory": memory, "memory_mask": mask}, "hidden",
            {"x": {0: "batch"}, "memory": {0: "batch", 1: "seq"}, "memory_mask": {0: "batch", 1: "seq"},
             "hidden": {0: "batch"}})


MODELS = {
    "gpt2": build_gpt2,
    "bert": build_bert,
    "llama": build_llama,
    "mixtral": build_mixtral,
    "qwenmoe": build_qwenmoe,
    "dsv3": build_dsv3,
    "gemma2": build_gemma2,
    "phi3": build_phi3,
    "neox": build_neox,
    "olmo2": build_olmo2,
    "gptoss": build_gptoss,
    "opt": build_opt,
    "vit": build_vit,
    "falcon": build_falcon,
    "bloom": build_bloom,
    "t5enc": build_t5enc,
    "deberta": build_deberta,
    "xattn": build_xattn,
}


def make_model(name):
    """Deterministically build wrapper + inputs for `name`."""
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    wrapper, inputs, out_name, dyn = MODELS[name](gen)
    wrapper.eval()
    torch.manual_seed(SEED + 1)
    with torch.no_grad():
        for p in wrapper.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        # buffers (position ids, rotary inv_freq) are left untouched
    return wrapper, inputs, out_name, dyn


# --------------------------------------------------------------------------
# Exporters
# --------------------------------------------------------------------------
class _NoPackedSequenceDetection:
    """Work around transformers>=5 + legacy (TorchScript) exporter.

    With ``attention_mask=None`` and no cache, transformers' mask code calls
    ``masking_utils.find_packed_sequence_indices(position_ids)``, which uses
    ``torch.diff`` (no ONNX symbolic -> UnsupportedOperatorError 'aten::diff')
    and, while tracing, always bakes a packed-sequence mask into the graph.
    For ordinary (unpacked) inference that function returns None, so we make
    it return None during the legacy export: the exported graph is the plain
    causal-mask graph that older transformers versions produced.
    """

    def __enter__(self):
        import transformers.masking_utils as mu

        self._mu = mu
        self._orig = getattr(mu, "find_packed_sequence_indices", None)
        if self._orig is not None:
            mu.find_packed_sequence_indices = lambda position_ids: None
        return self

    def __exit__(self, *exc):
        if self._orig is not None:
            self._mu.find_packed_sequence_indices = self._orig
        return False


def export_legacy(wrapper, inputs, out_name, dyn, path):
    names = list(inputs)
    with warnings.catch_warnings(), _NoPackedSequenceDetection():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper, tuple(inputs.values()), str(path),
            input_names=names, output_names=[out_name],
            dynamic_axes=dyn, opset_version=LEGACY_OPSET,
            do_constant_folding=True, dynamo=False,
        )
    return {"dynamic": True, "patches": ["masking_utils.find_packed_sequence_indices -> None"]}


def _dynamic_shapes(inputs, dyn):
    """dynamic_axes-style dict -> torch.export dynamic_shapes tuple (named Dims)."""
    dims = {}
    shapes = []
    for name in inputs:
        axes = dyn.get(name, {})
        spec = {}
        for ax, dname in axes.items():
            if dname not in dims:
                # seq is bounded by max_position_embeddings; batch is open.
                dims[dname] = (torch.export.Dim(dname, min=1, max=MAXPOS) if dname == "seq"
                               else torch.export.Dim(dname, min=1))
            spec[ax] = dims[dname]
        shapes.append(spec or None)
    return tuple(shapes)


def export_dynamo(wrapper, inputs, out_name, dyn, path, opset=None):
    names = list(inputs)
    args = tuple(inputs.values())
    common = dict(input_names=names, output_names=[out_name], dynamo=True,
                  external_data=False, verify=False, report=False, optimize=True)
    if opset is not None:
        common["opset_version"] = opset
    attempts = [
        ("dynamic_shapes", dict(dynamic_shapes=_dynamic_shapes(inputs, dyn))),
        ("dynamic_axes", dict(dynamic_axes=dyn)),
        ("static", {}),
    ]
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td) / "model.onnx"
        for i, (mode, kw) in enumerate(attempts):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    torch.onnx.export(wrapper, args, str(tmp), **common, **kw)
                break
            except Exception as exc:
                if i == len(attempts) - 1:
                    raise
                print(f"    dynamo export with {mode} failed ({type(exc).__name__}: "
                      f"{str(exc).splitlines()[0][:200]}); retrying with {attempts[i + 1][0]}")
        m = onnx.load(str(tmp))  # pulls in external data too, if any was written
    for node in _all_nodes(m.graph):  # the FX provenance and stack traces: half the file, read by nothing
        del node.metadata_props[:]
    onnx.save(m, str(path), save_as_external_data=False)
    return {"dynamic": mode != "static", "dynamic_mode": mode, "node_metadata": "dropped"}


def export_dynamo23(wrapper, inputs, out_name, dyn, path):
    wrapper.model.set_attn_implementation("sdpa")
    return export_dynamo(wrapper, inputs, out_name, dyn, path, opset=23)


EXPORT_FNS = {"legacy": export_legacy, "dynamo": export_dynamo, "dynamo23": export_dynamo23}


# --------------------------------------------------------------------------
# Manifest helpers
# --------------------------------------------------------------------------
def _dims(vi):
    t = vi.type.tensor_type
    out = []
    for d in t.shape.dim:
        if d.HasField("dim_value"):
            out.append(d.dim_value)
        elif d.HasField("dim_param"):
            out.append(d.dim_param)
        else:
            out.append("?")
    return out


def _vi_info(vi):
    return {
        "name": vi.name,
        "dtype": onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type).name,
        "shape": _dims(vi),
    }


def _all_nodes(graph):
    """Yield nodes of graph and, recursively, of subgraphs (If/Loop/Scan)."""
    for n in graph.node:
        yield n
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield from _all_nodes(g)


def op_key(node):
    dom = node.domain or "ai.onnx"
    return f"{dom}::{node.op_type}" if dom != "ai.onnx" else node.op_type


def describe(path, model_name, exporter, extra):
    m = onnx.load(str(path))
    hist = collections.Counter(op_key(n) for n in _all_nodes(m.graph))
    local_funcs = [f"{f.domain}::{f.name}" for f in m.functions]
    opsets = {(o.domain or "ai.onnx"): o.version for o in m.opset_import}
    init_names = {i.name for i in m.graph.initializer}
    data = path.read_bytes()
    return {
        "file": path.name,
        "model": model_name,
        "exporter": exporter,
        "opset": opsets.get("ai.onnx"),
        "opset_imports": opsets,
        "ir_version": m.ir_version,
        "producer": f"{m.producer_name} {m.producer_version}".strip(),
        "dynamic_shapes": extra.get("dynamic"),
        "dynamic_mode": extra.get("dynamic_mode", "dynamic_axes"),
        "export_patches": extra.get("patches", []),
        **({"node_metadata": extra["node_metadata"]} if "node_metadata" in extra else {}),
        "inputs": [_vi_info(v) for v in m.graph.input if v.name not in init_names],
        "outputs": [_vi_info(v) for v in m.graph.output],
        "node_count": sum(hist.values()),
        "initializer_count": len(m.graph.initializer),
        "op_histogram": dict(sorted(hist.items())),
        "non_default_domains": sorted({k.split("::")[0] for k in hist if "::" in k}),
        "local_functions": local_funcs,
        "file_size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "onnxscript": ONNXSCRIPT_VERSION,
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
        },
    }


# --------------------------------------------------------------------------
def run_one(model_name, exporter, out_dir):
    wrapper, inputs, out_name, dyn = make_model(model_name)
    with torch.no_grad():
        ref = wrapper(*inputs.values()).detach().numpy()
    stem = f"{model_name}_{exporter}"
    onnx_path = out_dir / f"{stem}.onnx"
    extra = EXPORT_FNS[exporter](wrapper, inputs, out_name, dyn, onnx_path)
    onnx.checker.check_model(str(onnx_path))

    graph_inputs = [i.name for i in onnx.load(str(onnx_path)).graph.input]
    feed = {name: inputs[name].numpy() for name in graph_inputs if name in inputs}
    missing = set(inputs) - set(feed)
    if missing:
        print(f"    note: inputs not in graph (unused/folded): {sorted(missing)}")
    runtime, ort_error = "onnxruntime", None
    try:
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
        outs = sess.run(None, feed)
        out_names = [o.name for o in sess.get_outputs()]
    except Exception as exc:  # onnxruntime lags the newest ops: ONNX's own reference implementation instead
        from onnx.reference import ReferenceEvaluator

        runtime, ort_error = "onnx.reference", f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        print(f"    onnxruntime cannot run it ({ort_error}); using onnx.reference")
        evaluator = ReferenceEvaluator(str(onnx_path))
        outs = evaluator.run(None, feed)
        out_names = list(evaluator.output_names)
    diff = float(np.max(np.abs(outs[0].astype(np.float64) - ref.astype(np.float64))))
    print(f"    {runtime} vs torch max abs diff: {diff:.3e}  (output {out_names[0]} {outs[0].shape})")
    if not diff <= TOL:
        raise RuntimeError(f"{runtime} output differs from torch: max abs diff {diff}")

    npz = {k: v for k, v in feed.items()}
    npz.update({f"output:{n}": o for n, o in zip(out_names, outs)})
    np.savez(out_dir / f"{stem}.npz", **npz)

    info = describe(onnx_path, model_name, exporter, extra)
    info["reference"] = f"{stem}.npz"
    info["reference_runtime"] = runtime
    if ort_error:
        info["onnxruntime_error"] = ort_error
    info["ort_vs_torch_max_abs_diff"] = diff
    return info


def main(argv=None):
    repo = Path(__file__).resolve().parent.parent
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(repo / "tests" / "fixtures" / "models"))
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("--exporters", nargs="*", default=list(EXPORTERS))
    args = ap.parse_args(argv)

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    manifest_path = out_dir / "MANIFEST.json"
    fixtures, failures = {}, {}
    if manifest_path.exists():  # keep entries for combos not re-run this time
        old = json.loads(manifest_path.read_text())
        fixtures = {f["file"]: f for f in old.get("fixtures", [])}
        failures = dict(old.get("failures", {}))

    for model_name in args.models:
        for exporter in args.exporters:
            if model_name not in EXPORTER_MODELS.get(exporter, (model_name,)):
                continue
            stem = f"{model_name}_{exporter}"
            print(f"== {stem}", flush=True)
            failures.pop(stem, None)
            fixtures.pop(f"{stem}.onnx", None)
            try:
                info = run_one(model_name, exporter, out_dir)
                fixtures[info["file"]] = info
                print(f"    ok: {info['node_count']} nodes, opset {info['opset']}, "
                      f"{info['file_size']} bytes", flush=True)
            except Exception as exc:
                msg = f"{type(exc).__name__}: {exc}"
                failures[stem] = msg.splitlines()[0][:500] if msg else repr(exc)
                print(f"    FAILED: {failures[stem]}", flush=True)
                traceback.print_exc(limit=3)
                for ext in (".onnx", ".npz", ".onnx.data"):
                    p = out_dir / f"{stem}{ext}"
                    if p.exists():
                        p.unlink()

    union = collections.Counter()
    for f in fixtures.values():
        union.update(f["op_histogram"])
    manifest = {
        "generator": "scripts/export_fixtures.py",
        "batch": BATCH,
        "seq": SEQ,
        "seed": SEED,
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "onnxscript": ONNXSCRIPT_VERSION,
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
        },
        "fixtures": [fixtures[k] for k in sorted(fixtures)],
        "op_union": dict(sorted(union.items())),
        "failures": dict(sorted(failures.items())),
    }
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"wrote {manifest_path}: {len(fixtures)} fixtures, {len(failures)} failures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
