#!/usr/bin/env python3
"""A sweep over Hugging Face decoder architectures: tiny random models exported to ONNX, then run through bmc.

Two steps, in two venvs (torch stays out of the project's):

    /work/export-venv/bin/python scripts/probe_architectures.py export DIR [MODEL_TYPE ...]
    .venv/bin/python scripts/probe_architectures.py check DIR

``export`` builds each ``model_type`` (default: ``ARCHITECTURES``) from its default config shrunk by ``SMALL``
(every key the config has), perturbs its weights, exports it with the dynamo exporter (batch and sequence dynamic)
and stores onnxruntime's outputs beside it (``DIR/<type>.onnx``, ``.npz``). ``check`` compiles each for one device
(compared with onnxruntime) and for Megatron on 1x4, dp+Megatron on 2x2 and the automatic plan on 2x2 (run on the
simulator), and prints the error, the collectives of each plan, and how many attention ops were fused. Nothing is
downloaded; models that fail to build or export are listed with the reason. Not a test (the export venv is not
CI's): a sweep to run when transformers gains architectures.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

ARCHITECTURES = [
    "qwen3", "qwen3_moe", "gemma3_text", "gpt_oss", "olmo3", "smollm3", "glm4", "glm4_moe", "cohere2", "granite",
    "granitemoe", "starcoder2", "stablelm", "mistral", "ernie4_5", "exaone4", "minimax_m2", "hunyuan_v1_dense",
    "seed_oss", "apertus", "arcee", "phimoe", "jetmoe", "nemotron", "helium", "internlm3", "bitnet", "olmoe",
    "mamba", "falcon_mamba", "jamba", "bamba", "falcon_h1", "nemotron_h", "granitemoehybrid", "recurrent_gemma",
    "rwkv", "xlstm", "lfm2", "qwen3_next", "diffllama", "doge",
]
SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=64, moe_intermediate_size=32,
             num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2,
             shared_expert_intermediate_size=64, sliding_window=8, use_cache=False, tie_word_embeddings=False,
             pad_token_id=0, bos_token_id=1, eos_token_id=2, first_k_dense_replace=1, n_group=1, topk_group=1,
             moe_num_experts=4, num_shared_experts=1, n_shared_experts=1, decoder_sparse_step=1)


ENCODERS = [
    "modernbert", "eurobert", "nomic_bert", "roberta", "xlm_roberta", "electra", "mpnet", "ernie", "funnel",
    "big_bird", "longformer", "nystromformer", "fnet", "squeezebert", "convbert", "mobilebert", "rembert",
    "roformer", "data2vec-text", "camembert", "ibert", "mra", "yoso", "xmod", "megatron-bert", "canine", "luke",
]


VISION = [
    "vit", "deit", "dinov2", "dinov2_with_registers", "dinov3_vit", "siglip_vision_model", "ijepa", "vit_msn",
    "data2vec-vision", "swinv2", "convnextv2", "dinov3_convnext", "efficientnet", "mobilevit", "mobilevitv2", "levit",
    "pvt_v2", "segformer", "hiera", "regnet", "resnet", "mobilenet_v2", "poolformer", "focalnet", "vitdet", "cvt",
]
SEQ2SEQ = ["t5", "bart", "mbart", "marian", "pegasus", "m2m_100", "mt5", "umt5", "blenderbot", "led", "plbart",
           "t5gemma", "nllb-moe", "switch_transformers"]
SEQ2SEQ_SMALL = dict(d_model=64, d_ff=128, d_kv=16, num_layers=2, num_decoder_layers=2, num_heads=4,
                     encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                     encoder_ffn_dim=128, decoder_ffn_dim=128, decoder_start_token_id=0, num_experts=4,
                     expert_capacity=64)
IMAGE = dict(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=128, num_channels=3)


def export(out: Path, names: list[str]) -> None:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import numpy as np
    import onnxruntime as ort
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    class Seq2SeqLogits(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, decoder_input_ids):
            return self.model(input_ids=input_ids, attention_mask=attention_mask,
                              decoder_input_ids=decoder_input_ids, use_cache=False).logits

    import export_fixtures as ef

    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        try:
            encoder, vision, seq2seq = name in ENCODERS, name in VISION, name in SEQ2SEQ
            defaults = AutoConfig.for_model(name).to_dict()
            small = IMAGE if vision else {**SMALL, **SEQ2SEQ_SMALL} if seq2seq else SMALL
            cfg = AutoConfig.for_model(name, **{k: v for k, v in small.items() if k in defaults},
                                       **({} if encoder or vision else {"experts_implementation": "batched_mm"}))
            torch.manual_seed(ef.SEED)
            auto = AutoModel if encoder or vision else AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
            model = auto.from_config(cfg, attn_implementation="eager")
            model = model.eval()
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p) * 0.02)
            gen = torch.Generator().manual_seed(ef.SEED)
            if seq2seq:  # source ids with the second row padded and 8 target ids: the decoder's logits
                ids = ef._token_inputs(gen)
                mask = torch.ones_like(ids)
                mask[1, ef.SEQ - 4:] = 0
                target = torch.randint(0, ef.VOCAB, (ef.BATCH, 8), generator=gen)
                wrapper, out_name = Seq2SeqLogits(model), "logits"
                inputs = {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": target}
                dyn = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
                       "decoder_input_ids": {0: "batch", 1: "target"}, out_name: {0: "batch", 1: "target"}}
            elif vision:  # 2 images of 32 x 32 (or the config's size), the last hidden state out
                size = getattr(cfg, "image_size", 32)
                size = size if isinstance(size, int) else 32
                pixels = torch.randn(2, 3, size, size, generator=gen)
                wrapper, inputs, out_name = ef.VisionHidden(model), {"pixel_values": pixels}, "last_hidden_state"
                dyn = {"pixel_values": {0: "batch"}, out_name: {0: "batch"}}
            elif encoder:  # token ids and a mask with the second row padded, the last hidden state out
                ids = ef._token_inputs(gen)
                mask = torch.ones_like(ids)
                mask[1, ef.SEQ - 4:] = 0
                wrapper, inputs, out_name = ef.EncoderHidden(model), {"input_ids": ids, "attention_mask": mask}, \
                    "last_hidden_state"
                dyn = {n: {0: "batch", 1: "seq"} for n in ("input_ids", "attention_mask", out_name)}
            else:
                wrapper, inputs, out_name, dyn = ef._causal_lm(model, gen)
            with torch.no_grad():
                ref = wrapper(*inputs.values()).numpy()
            path = out / f"{name}.onnx"
            ef.export_dynamo(wrapper, inputs, out_name, dyn, path)
            sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            feed = {i.name: inputs[i.name].numpy() for i in sess.get_inputs()}
            outs = sess.run(None, feed)
            np.savez(out / f"{name}.npz", **feed, **{f"output:{o.name}": v for o, v in zip(sess.get_outputs(), outs)})
            print(f"{name}: exported, onnxruntime vs torch {float(np.abs(outs[0] - ref).max()):.1e}", flush=True)
        except Exception as e:  # noqa: BLE001  (a sweep: report and go on)
            print(f"{name}: FAILED to build or export: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)


def check(folder: Path) -> None:
    import numpy as np
    import onnx

    import bmc
    from bmc.compiler import import_graph

    plans = [("1 device", {}), ("megatron 1x4", {"mesh": "1x4", "strategy": "megatron"}),
             ("dp+megatron 2x2", {"mesh": "2x2", "strategy": "dp+megatron"}), ("auto 2x2", {"mesh": "2x2"})]
    for path in sorted(folder.glob("*.onnx")):
        data = np.load(path.with_suffix(".npz"))
        inputs = {k: data[k] for k in data.files if not k.startswith("output:")}
        symbols = {d.dim_param for i in onnx.load(str(path), load_external_data=False).graph.input
                   for d in i.type.tensor_type.shape.dim if d.dim_param}
        shapes = {k: v for k, v in {"batch": 2, "seq": 16, "target": 8}.items() if k in symbols}  # (the exporter
        # specializes a length its loops unroll over)
        try:
            ops = import_graph(path, input_shapes=shapes).op_counts()
            print(f"{path.stem}: attention fused {ops.get('attention', 0)}, softmax left {ops.get('softmax', 0)}")
        except Exception as e:  # noqa: BLE001
            print(f"{path.stem}: FAILED to import: {str(e).splitlines()[0][:300]}")
            continue
        for tag, options in plans:
            t0 = time.perf_counter()
            try:
                with tempfile.TemporaryDirectory() as tmp:
                    bmc.compile(path, f"{tmp}/m.bmc", input_shapes=shapes, **options)
                    got = bmc.load(f"{tmp}/m.bmc", simulate=bool(options)).run(inputs)
                    plan = json.loads(Path(f"{tmp}/m.bmc/plan.json").read_text())
                err = max(float(np.abs(got[k[7:]].astype(np.float64) - data[k]).max() / max(1.0, np.abs(data[k]).max()))
                          for k in data.files if k.startswith("output:"))
                kinds: dict[str, int] = {}
                for c in plan.get("collectives", []):
                    kinds[c["kind"]] = kinds.get(c["kind"], 0) + 1
                print(f"  {tag:16} {'OK ' if err <= 1e-4 else 'BAD'} {err:.1e} {kinds} "
                      f"{time.perf_counter() - t0:.0f} s", flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"  {tag:16} FAILED {type(e).__name__}: {str(e).splitlines()[0][:300]}", flush=True)


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] not in ("export", "check"):
        sys.exit(__doc__)
    if sys.argv[1] == "export":
        export(Path(sys.argv[2]), sys.argv[3:] or ARCHITECTURES + ENCODERS + VISION + SEQ2SEQ)
    else:
        check(Path(sys.argv[2]))
