"""CPU (``llvm``) pipeline pieces: the matmul offload to BLAS and schedule rules for TVM's own kernels.

Two things make bmc's llvm code fast, and both live here so the choices are made in one place:

1. **Matmul offload.** TVM 0.27 has no CPU matmul schedule (dlight's CPU rules cover only GEMV and reductions) and
   its default lowering runs at ~0.4 GFLOP/s, while OpenBLAS reaches 100+ GFLOP/s on the same cores. So every
   ``relax.matmul`` with a float32/float64 result is rewritten, before legalization, into a destination-passing call
   of the runtime kernel ``bmc.cpu.matmul(a, b, trans_a, trans_b, out)`` (numpy ``matmul`` semantics: batched,
   broadcast batch dims, 1-D operands promoted). A ``permute_dims`` that swaps the last two axes of an operand is
   folded into the call as a ``trans_a``/``trans_b`` flag (Gemm ``transB`` weights arrive that way), so the weight is
   not transposed on every call; a permute that does more (attention's key ``transpose(0, 2, 3, 1)``) keeps the
   rest, which moves whole rows, and folds the swap. The runtime registers the kernel (``bmc.runtime.kernels``):
   native C++ calling OpenBLAS' ``cblas_?gemm`` when ``libbmc_runtime`` is built, numpy otherwise.
   **Convolution offload.** Likewise a float32/float64 NCHW/OIHW ``relax.nn.conv2d`` becomes
   ``bmc.cpu.conv2d(x, w, stride_h, stride_w, pad_t, pad_l, pad_b, pad_r, dil_h, dil_w, groups, out)``: im2col plus
   one BLAS GEMM per image (batched over groups), chosen per op by :func:`choose_conv2d` (tiny convs and
   small groups of other dtypes stay in TVM, whose untuned conv loop nest is ~50-100x slower than BLAS on ResNet-50's
   convs); a 1-D conv arrives as a 2-D one of height 1 (``bmc/codegen/lower/nn.py``), and an NCDHW ``conv3d``
   becomes ``bmc.cpu.conv3d`` (:func:`choose_conv3d`). ``BMC_CPU_CONV=tvm`` keeps every conv in TVM (for
   before/after measurements). A float32 conv whose
   result then only goes through per-channel adds/subtracts/multiplies (a bias, an inference batch norm), a residual
   add and a ReLU becomes ``bmc.cpu.conv2d_fused``, which applies them as it stores each block of the output
   (:func:`fuse_conv_epilogues`).
2. **Schedules.** After fusion every PrimFunc gets a schedule from ordered rules (dlight style, fallback last):
   bmc's row reductions (softmax, layer/RMS norm: reductions ``rfactor``-ed into vector lanes, injective parts
   vectorized, threads only for large blocks), dlight's CPU ``Reduction`` where rows are of odd length, then
   :class:`ParallelFallback` (inline what can be inlined, parallelize the leading spatial loops over the thread
   pool, vectorize the innermost loop at the host's SIMD width). TVM's default llvm pipeline schedules nothing, so
   without these every kernel runs on one core, scalar.

``cpu_pipeline(target, record)`` returns the Relax pass pipeline; ``record`` (a dict) receives what was chosen per
op, which :func:`bmc.codegen.build.build` stores in ``Built.kernels["cpu"]`` and so in the artifact's manifest.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import tvm
from tvm import relax

from bmc.codegen.rewrite import (bound_fusion, counting_pass, owned_outputs, rewrite_functions,
                                 split_full_reductions, split_slices, static_shape, use_counts, vector_lanes)
from bmc.runtime.kernels import (CONV2D_FUSED_ACT_KERNEL, CONV2D_FUSED_KERNEL, CONV2D_KERNEL, CONV3D_KERNEL,
                                 CONV_ACTIVATIONS,
                                 MATMUL_INTEGER_KERNEL, MATMUL_INTEGER_PACKED_KERNEL, MATMUL_KERNEL, MATMUL_PACKED_KERNEL,
                                 MINMAX_KERNEL, PACK_INT8_WEIGHT_KERNEL, PACK_PANEL, PACK_WEIGHT_KERNEL, SKINNY_ROWS,
                                 pack_weights_enabled, packed_int8_shape)

#: result dtypes the BLAS kernel handles (sgemm, dgemm); anything else stays a TVM kernel
BLAS_DTYPES = ("float32", "float64")
#: (operand dtype, result dtype) pairs the matmul (and CPU conv) kernels take besides equal ones: 16-bit operands
#: with float32 accumulation (how ``bmc.codegen.lower`` writes a reduced-precision matmul or conv); the CPU kernels
#: widen them to float32 for the BLAS (TVM's own float16/bfloat16 loops were ~75x slower), cuBLAS reads them as
#: they are
HALF_MIXED = (("float16", "float32"), ("bfloat16", "float32"))
#: below this many multiply-adds a TVM loop nest beats the packed call (a few microseconds); measured on 2 cores:
#: 8x8x8 float32 is ~1 us either way, 16x16x16 already favours BLAS (see tests/codegen/test_cpu_kernels.py)
MIN_BLAS_MACS = 512
#: 2-D convolutions (float32/float64, NCHW/OIHW) go to im2col + BLAS (``bmc.cpu.conv2d``) from this many
#: multiply-adds on; below it (and for small groups of other dtypes, see :func:`choose_conv2d`) TVM's loop nest is
#: kept, as the im2col copy and the packed call (~20-40 us of Python) cost more than the GEMM saves. Measured on 2
#: cores, 3x3 convs: 18k MACs TVM 21 us vs BLAS 39 us; 147k MACs TVM 102 us vs BLAS 46 us; 2.4M MACs 855 vs 173 us
MIN_CONV_MACS = 1 << 16
#: float32 grouped convs of up to this many output channels a group go to the native kernel, which runs those of as
#: many input channels a group or fewer as a direct loop (depthwise, ResNeXt's 4 a group: 0.11x the time of a GEMM a
#: group and 0.37-0.62x onnxruntime's; ``kDirectMaxGroup`` in cpp/cpu_kernels.cc), the others as a GEMM a group
MAX_DIRECT_CONV_GROUP_M = 64
#: per-group GEMM sizes below which a grouped conv stays in TVM (other dtypes; float32 beyond the direct loop)
MIN_CONV_GROUP_M = 8
MIN_CONV_GROUP_K = 16
#: a fused loop nest with fewer iterations than this runs on one thread (a parallel launch costs ~2-5 us)
MIN_PARALLEL_ITERS = 4096
#: a block of a softmax or norm (:func:`_row_reduction_cls`) runs on the thread pool from this many iterations on:
#: measured on 2 cores, layer norm and softmax of 0.5M values were faster on one thread, of 3M+ ~1.4x on two
MIN_PARALLEL_ROW_ITERS = 1 << 20


# ------------------------------------------------------------------------------------------ matmul choice

def matmul_macs(a: tuple[int, ...], b: tuple[int, ...], out: tuple[int, ...]) -> int:
    """Multiply-adds of ``a @ b`` (numpy semantics): numel(out) x K."""
    k = a[-1] if a else 0
    return math.prod(out) * k


def choose_matmul(a: tuple[int, ...] | None, b: tuple[int, ...] | None, out: tuple[int, ...] | None,
                  dtype: str) -> str:
    """``"blas"`` or ``"tvm"`` for one matmul, by dtype and size: the single place this choice is made."""
    if dtype not in BLAS_DTYPES or a is None or b is None or out is None:
        return "tvm"
    macs = matmul_macs(a, b, out)
    return "blas" if macs >= MIN_BLAS_MACS else "tvm"


def choose_conv2d(x: tuple[int, ...] | None, w: tuple[int, ...] | None, out: tuple[int, ...] | None, groups: int,
                  dtype: str) -> str:
    """``"blas"`` or ``"tvm"`` for one NCHW/OIHW 2-D convolution, by dtype, size and per-group GEMM shape."""
    if dtype not in BLAS_DTYPES or x is None or w is None or out is None or len(w) != 4:
        return "tvm"
    macs = math.prod(out) * math.prod(w[1:])
    mg, kg = w[0] // max(groups, 1), math.prod(w[1:])
    if macs < MIN_CONV_MACS:
        return "tvm"
    if groups > 1 and (w[1] == 1 or mg <= MAX_DIRECT_CONV_GROUP_M) and dtype == "float32":
        return "blas"  # depthwise or few channels a group: the native kernel's direct loop (float32 only)
    if groups > 1 and (mg < MIN_CONV_GROUP_M or kg < MIN_CONV_GROUP_K):
        return "tvm"
    return "blas"  # one group of few weights too (a first layer of one or two channels: 2-5x faster than TVM's loops
    # on 5 of 6 shapes measured, 2x slower on a 64 x 64 image of one channel)


def choose_conv3d(x: tuple[int, ...] | None, w: tuple[int, ...] | None, out: tuple[int, ...] | None, groups: int,
                  dtype: str) -> str:
    """``"blas"`` or ``"tvm"`` for one NCDHW/OIDHW float32 3-D convolution: the native kernel's GEMM a group (TVM's
    loop nest took 60-80x onnxruntime's time) unless it is tiny or its groups are (a depthwise 3-D conv stays)."""
    if dtype != "float32" or x is None or w is None or out is None or len(w) != 5:
        return "tvm"
    mg, kg = w[0] // max(groups, 1), math.prod(w[1:])
    if math.prod(out) * kg < MIN_CONV_MACS or (groups > 1 and (mg < MIN_CONV_GROUP_M or kg < MIN_CONV_GROUP_K)):
        return "tvm"
    return "blas"


def _kernel_operands(value, kernel: str) -> list | None:
    """The operands of ``value`` when it is a ``call_dps_packed`` of ``kernel`` (a matmul's ``[a, b, trans_a,
    trans_b]``), else None."""
    if (isinstance(value, relax.Call) and value.op.same_as(tvm.ir.Op.get("relax.call_dps_packed"))
            and str(value.args[0].global_symbol) == kernel):
        return list(value.args[1].fields)
    return None


@relax.expr_functor.mutator
class _MatmulOffloader(relax.PyExprMutator):
    """Rewrites ``R.matmul`` into ``R.call_dps_packed("bmc.cpu.matmul", ...)`` where :func:`choose_matmul` says so."""

    def __init__(self, mod: tvm.IRModule | None = None, conv: bool = True, kernel: str = MATMUL_KERNEL,
                 choose=None, mixed: tuple = ()):
        super().__init__(mod)
        self.conv = conv
        self.kernel = kernel
        self.choose = choose or choose_matmul
        self.mixed = set(mixed)  # (operand dtype, result dtype) pairs the kernel takes besides equal ones
        self.choices: Counter = Counter()
        self.folded = 0
        self.shapes: Counter = Counter()
        self.conv_choices: dict[int, Counter] = {2: Counter(), 3: Counter()}  # per spatial rank
        self.conv_shapes: dict[int, Counter] = {2: Counter(), 3: Counter()}

    def _unpermuted(self, expr):
        """(operand, True) when ``expr`` is bound to a permute_dims that ends by swapping the last two axes, else
        (expr, False). The operand is the permute's source when that is all it does; else the source permuted by
        the rest, which must keep the source's last axis last (attention's ``k.transpose(0, 2, 3, 1)`` becomes
        ``k.transpose(0, 2, 1, 3)``, a copy of contiguous rows instead of a scatter of single elements)."""
        if not isinstance(expr, relax.Var):
            return expr, False
        bound = self.lookup_binding(expr)
        if not (isinstance(bound, relax.Call) and isinstance(bound.op, tvm.ir.Op)
                and bound.op.name == "relax.permute_dims"):
            return expr, False
        src = bound.args[0]
        shape = static_shape(src.ty)
        if shape is None or len(shape) < 2:
            return expr, False
        rank = len(shape)
        perm = list(range(rank))[::-1] if bound.attrs.axes is None else [int(a) % rank for a in bound.attrs.axes]
        rest = perm[:-2] + [perm[-1], perm[-2]]  # permute_dims(x, perm) == swap_last_two(permute_dims(x, rest))
        if rest == list(range(rank)):
            return src, True
        if rest[-1] == rank - 1:
            return self.builder_.emit(relax.op.permute_dims(src, rest)), True
        return expr, False

    def _narrowed(self, call: relax.Call):
        """``astype(kernel(a, b) -> float32, T)`` with ``T`` the operands' dtype (how reduced-precision matmuls are
        lowered: float32 result, then a cast) → one kernel call writing ``T`` (the float32 call is then dead)."""
        src = call.args[0]
        dtype = str(call.attrs.dtype)
        operands = _kernel_operands(self.lookup_binding(src) if isinstance(src, relax.Var) else None, self.kernel)
        if operands is None:
            return call
        if str(operands[0].ty.dtype) != dtype or (dtype, str(src.ty.dtype)) not in self.mixed:
            return call
        return relax.call_dps_packed(self.kernel, list(operands),
                                     out_ty=relax.TensorType(list(static_shape(call.ty)), dtype))

    def _conv(self, call: relax.Call, nd: int):
        """A 2-D (``nd`` 2) or 3-D convolution → ``bmc.cpu.conv2d`` / ``bmc.cpu.conv3d`` where its choice says."""
        x, w = call.args
        a = call.attrs
        out_ty = call.ty
        dtype = str(out_ty.dtype)
        x_shape, w_shape, out_shape = static_shape(x.ty), static_shape(w.ty), static_shape(out_ty)
        layouts = ("NCHW", "OIHW", "NCHW") if nd == 2 else ("NCDHW", "OIDHW", "NCDHW")
        layouts_ok = (str(a.data_layout), str(a.kernel_layout), str(a.out_layout)) == layouts
        x_dtype = str(x.ty.dtype)
        same = x_dtype == str(w.ty.dtype) and (x_dtype == dtype or (x_dtype, dtype) in self.mixed)
        choices, shapes = self.conv_choices[nd], self.conv_shapes[nd]
        if not layouts_ok or not same:  # other out_dtype casts stay in TVM
            choices["tvm"] += 1
            return call
        groups = int(a.groups)
        choice = (choose_conv2d if nd == 2 else choose_conv3d)(x_shape, w_shape, out_shape, groups, dtype)
        choices[choice] += 1
        if choice != "blas":
            return call
        strides = [int(v) for v in a.strides]
        pads = [int(v) for v in a.padding]
        if len(pads) == nd:
            pads = pads * 2
        dil = [int(v) for v in a.dilation]
        shapes[f"{x_dtype}{list(x_shape)}*{list(w_shape)} s{strides} p{pads} d{dil} g{groups}"] += 1
        prim = relax.expr.prim_value
        return relax.call_dps_packed(
            CONV2D_KERNEL if nd == 2 else CONV3D_KERNEL, [x, w, *(prim(v) for v in (*strides, *pads, *dil, groups))],
            out_ty=relax.TensorType(list(out_shape), dtype))

    def visit_call_(self, call: relax.Call):  # noqa: N802 (TVM's visitor naming)
        call = super().visit_call_(call)
        if self.conv and isinstance(call.op, tvm.ir.Op) and call.op.name in ("relax.nn.conv2d", "relax.nn.conv3d"):
            return self._conv(call, 2 if call.op.name == "relax.nn.conv2d" else 3)
        if self.mixed and isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.astype":
            return self._narrowed(call)
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.matmul"):
            return call
        a, b = call.args
        out_ty = call.ty
        a_shape, b_shape, out_shape = static_shape(a.ty), static_shape(b.ty), static_shape(out_ty)
        dtype = str(out_ty.dtype)
        same = str(a.ty.dtype) == str(b.ty.dtype) and (str(a.ty.dtype), dtype) in self.mixed
        if not same and (str(a.ty.dtype) != dtype or str(b.ty.dtype) != dtype):  # other out_dtype casts stay in TVM
            self.choices["tvm"] += 1
            return call
        choice = self.choose(a_shape, b_shape, out_shape, dtype)
        self.choices[choice] += 1
        if choice != "blas":
            return call
        a_src, trans_a = self._unpermuted(a)
        b_src, trans_b = self._unpermuted(b)
        self.folded += int(trans_a) + int(trans_b)
        self.shapes[f"{a.ty.dtype}{list(a_shape)}{'^T' if trans_a else ''}@{list(b_shape)}{'^T' if trans_b else ''}"] += 1
        return relax.call_dps_packed(
            self.kernel, [a_src, b_src, relax.expr.prim_value(int(trans_a)), relax.expr.prim_value(int(trans_b))],
            out_ty=relax.TensorType(list(out_shape), dtype))


def offload_matmul(record: dict | None = None, *, conv: bool = True, kernel: str = MATMUL_KERNEL,
                   choose=None, mixed: tuple = ()) -> tvm.transform.Pass:
    """Module pass: matmuls (and, with ``conv``, large 2-D convolutions) → library calls (see module doc); fills
    ``record`` with the choices. ``kernel``/``choose``: the packed function and the per-matmul ``"blas"``/``"tvm"``
    choice (defaults: the CPU BLAS kernel, :func:`choose_matmul`; CUDA passes cuBLAS's); ``mixed``: (operand dtype,
    result dtype) pairs the kernel computes besides equal ones (cuBLAS: bfloat16 operands, float32 result)."""

    @tvm.transform.module_pass(opt_level=0, name="BmcOffloadMatmul")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        offloader = _MatmulOffloader(mod, conv=conv, kernel=kernel, choose=choose, mixed=mixed)
        mod = rewrite_functions(offloader, mod)
        if record is not None:
            blas = offloader.choices.get("blas", 0)
            record["matmul"] = {"blas": blas, "tvm": offloader.choices.get("tvm", 0),
                                "transposes_folded": offloader.folded, "shapes": dict(offloader.shapes)}
            offloaded = {kernel} if blas else set()
            for nd, conv_kernel in ((2, CONV2D_KERNEL), (3, CONV3D_KERNEL)):
                choices = offloader.conv_choices[nd]
                if choices:
                    record[f"conv{nd}d"] = {"blas": choices.get("blas", 0), "tvm": choices.get("tvm", 0),
                                            "shapes": dict(offloader.conv_shapes[nd])}
                if choices.get("blas", 0):
                    offloaded.add(conv_kernel)
            record["requires"] = sorted(set(record.get("requires", [])) | offloaded)
        # the folded permute_dims are now dead
        return relax.transform.DeadCodeElimination()(mod)

    return _pass


# ------------------------------------------------------------------------------------------ conv epilogues

_EPILOGUE_OPS = ("relax.add", "relax.subtract", "relax.multiply")


def _scalar_constant(expr, bound: dict) -> float | None:
    """The value of a one-element float32 constant (or a var bound to one), else None."""
    expr = bound.get(expr, expr)
    if isinstance(expr, tvm.ir.expr.Constant) and str(expr.ty.dtype) == "float32" and expr.value.numpy().size == 1:
        return float(expr.value.numpy().reshape(()))
    return None


def _silu_of(var, users: dict, bound: dict, uses: dict):
    """The binding of ``var * sigmoid(var)`` when ``var`` is read by exactly that and its sigmoid (read once), else
    None: a SiLU (Swish) as exporters write it."""
    if uses[var] != 2 or len(users.get(var, [])) != 2:
        return None
    for sig, mul in (users[var], users[var][::-1]):
        s, m = bound[sig], bound[mul]
        if (isinstance(s, relax.Call) and s.op == tvm.ir.Op.get("relax.sigmoid") and s.args[0].same_as(var)
                and isinstance(m, relax.Call) and m.op == tvm.ir.Op.get("relax.multiply") and uses[sig] == 1
                and any(m.args[i].same_as(var) and m.args[1 - i].same_as(sig) for i in (0, 1))):
            return sig, mul
    return None


def _hardswish_of(var, users: dict, bound: dict, uses: dict):
    """The bindings of ``var * min(max(var * (1/6) + 0.5, 0), 1)`` (how the importer writes ONNX's HardSwish) when
    ``var`` is read by exactly its first multiply and the last, each step read once, else None."""
    if uses[var] != 2 or len(users.get(var, [])) != 2:
        return None
    expected = (("relax.multiply", 1 / 6), ("relax.add", 0.5), ("relax.maximum", 0.0), ("relax.minimum", 1.0))
    for first, last in (users[var], users[var][::-1]):
        chain, cur, nxt = [], var, first
        for op, value in expected:
            call = bound[nxt]
            if not (isinstance(call, relax.Call) and call.op == tvm.ir.Op.get(op) and call.args[0].same_as(cur)):
                break
            constant = _scalar_constant(call.args[1], bound)
            if constant is None or not np.isclose(constant, value, rtol=1e-6, atol=0):
                break
            chain.append(nxt)
            cur = nxt
            if len(chain) < len(expected):
                if uses[cur] != 1 or len(users.get(cur, [])) != 1:
                    break
                nxt = users[cur][0]
        else:
            m = bound[last]
            if (uses[cur] == 1 and isinstance(m, relax.Call) and m.op == tvm.ir.Op.get("relax.multiply")
                    and any(m.args[i].same_as(var) and m.args[1 - i].same_as(cur) for i in (0, 1))):
                return (*chain, last)
    return None


def _epilogue_chains(func: relax.Function) -> dict:
    """Per ``bmc.cpu.conv2d`` call of float32 ``func`` that feeds a chain ``(add | subtract | multiply by a value
    broadcast along the channels)* → add of a tensor of the output's shape? → activation?``, each link the only use
    of the one before (first through a reshape dropping a 1-D conv's unit height): ``{the chain's last var: (conv
    operands, [(op, operand)], residual or None, activation, the conv's own type when it went through that reshape
    else None)}``, the activation ``None``, ``("clamp", lo, hi)`` (a ReLU, or a maximum and/or a minimum with scalar
    constants: a Clip, ReLU6), ``("silu",)`` (``v * sigmoid(v)``) or ``("hardswish",)``. Where two chains meet (a
    residual block's add of two conv branches), the earlier conv's takes the add and the later one's ends before
    it."""
    bound = {b.var: b.value for block in func.body.blocks for b in block.bindings}
    uses = use_counts(func)
    users: dict = {}
    for var, value in bound.items():
        for v in relax.analysis.free_vars(value):
            users.setdefault(v, []).append(var)
    chains, claimed = {}, set()
    for var, value in bound.items():
        ops = _kernel_operands(value, CONV2D_KERNEL)
        if ops is None or str(value.ty.dtype) != "float32" or str(ops[0].ty.dtype) != "float32":
            continue
        shape = static_shape(value.ty)
        channels = shape[1]
        links, residual, clamp, cur = [], None, None, var
        squeezed = _squeezed_height(var, shape, users, bound, uses)  # a 1-D conv's [N, C, 1, L] read as [N, C, L]
        if squeezed is not None:
            cur, shape = squeezed, static_shape(squeezed.ty)
            claimed.add(cur)
        while uses[cur] == 1 and len(users.get(cur, [])) == 1:
            nxt = users[cur][0]
            call = bound[nxt]
            if nxt in claimed or not (isinstance(call, relax.Call) and isinstance(call.op, tvm.ir.Op)):
                break
            name = call.op.name
            if name in ("relax.nn.relu", "relax.maximum", "relax.minimum"):
                limit = 0.0 if name == "relax.nn.relu" else (
                    _scalar_constant(call.args[1], bound) if call.args[0].same_as(cur) else
                    _scalar_constant(call.args[0], bound))
                side = 1 if name == "relax.minimum" else 0
                bounds = [-np.inf, np.inf] if clamp is None else list(clamp)
                if limit is None or bounds[side] != (np.inf if side else -np.inf):
                    break
                bounds[side] = limit
                if bounds[0] > bounds[1]:  # min then max of crossed bounds is not the kernel's clamp
                    break
                clamp = bounds
            elif clamp is not None or name not in _EPILOGUE_OPS or residual is not None or len(call.args) != 2:
                break  # nothing but the rest of a clamp follows an activation
            else:
                a, b = call.args
                other = b if a.same_as(cur) else a if name != "relax.subtract" and b.same_as(cur) else None
                if other is None or other.same_as(cur) or str(other.ty.dtype) != "float32":
                    break
                other_shape = static_shape(other.ty)
                if other_shape is not None and len(other_shape) <= len(shape) and all(
                        d == 1 or (i == len(shape) - 2 and d == channels) for i, d in enumerate(other_shape[::-1])):
                    links.append((name, other))  # broadcast along the channels: [C, 1, 1], [1, C, 1, 1], a scalar
                elif name == "relax.add" and other_shape == shape:
                    residual = other
                else:
                    break
            cur = nxt
            claimed.add(cur)
        activation = None if clamp is None else ("clamp", *clamp)
        for name, match in (("silu", _silu_of), ("hardswish", _hardswish_of)):
            found = match(cur, users, bound, uses) if activation is None else None
            if found is not None and not claimed.intersection(found):
                activation, cur = (name,), found[-1]
                claimed.update(found)
        if links or residual is not None or activation is not None:
            chains[cur] = (ops, links, residual, activation, None if squeezed is None else value.ty)
    return chains


def _squeezed_height(var, shape, users: dict, bound: dict, uses: dict):
    """The var of ``reshape(var)`` that drops ``var``'s unit height (``[N, C, 1, L]`` → ``[N, C, L]``: how a 1-D conv
    is lowered on the CPU) when that is ``var``'s only use, else None."""
    if len(shape) != 4 or shape[2] != 1 or uses[var] != 1 or len(users.get(var, [])) != 1:
        return None
    nxt = users[var][0]
    call = bound[nxt]
    if (isinstance(call, relax.Call) and call.op == tvm.ir.Op.get("relax.reshape")
            and static_shape(nxt.ty) == (*shape[:2], shape[3])):
        return nxt
    return None


@relax.expr_functor.mutator
class _ConvEpilogues(relax.PyExprMutator):
    """The last binding of each chain of :func:`_epilogue_chains` becomes one ``bmc.cpu.conv2d_fused`` call, its
    per-channel links folded into a scale and a shift (``[C]``, computed by the program from their operands); the
    conv call and the links are then dead."""

    def __init__(self, mod=None):
        super().__init__(mod)
        self.chains: dict = {}
        self.count = 0
        self.kernels: set = set()  # the fused kernels called

    def _scale_shift(self, links, channels: int):
        """The links as ``(scale, shift)`` per channel (None: 1 or 0): numbers when every operand is a constant
        (a batch norm of constants: computing it with Relax ops would cost FoldConstant a compiled kernel each),
        else Relax ops the program runs (on parameters: a few [C] kernels a call)."""
        operands = [self.visit_expr(v) for _, v in links]
        bound = [self.lookup_binding(v) if isinstance(v, relax.Var) else v for v in operands]
        if all(isinstance(v, tvm.ir.expr.Constant) for v in bound):
            values = [np.broadcast_to(v.value.numpy().reshape(-1), (channels,)) for v in bound]
            ops = {"relax.multiply": np.multiply, "relax.add": np.add, "relax.subtract": np.subtract,
                   "negative": np.negative}
            result = lambda a: relax.const(np.ascontiguousarray(a, dtype="float32"))  # noqa: E731
        else:
            emit = self.builder_.emit
            values = [emit(relax.op.broadcast_to(emit(relax.op.reshape(v, [-1])), [channels])) for v in operands]
            ops = {name: (lambda f: lambda *a: emit(f(*a)))(f) for name, f in (
                ("relax.multiply", relax.op.multiply), ("relax.add", relax.op.add),
                ("relax.subtract", relax.op.subtract), ("negative", relax.op.negative))}
            result = lambda a: a  # noqa: E731
        scale = shift = None
        for (name, _), v in zip(links, values):
            if name == "relax.multiply":
                scale = v if scale is None else ops[name](scale, v)
                shift = None if shift is None else ops[name](shift, v)
            elif shift is None:
                shift = v if name == "relax.add" else ops["negative"](v)
            else:
                shift = ops[name](shift, v)
        return (None if scale is None else result(scale)), (None if shift is None else result(shift))

    def visit_var_binding_(self, binding):  # noqa: N802 (TVM's visitor naming)
        if binding.var not in self.chains:
            return super().visit_var_binding_(binding)
        ops, links, residual, activation, conv_ty = self.chains[binding.var]
        out_ty = conv_ty or binding.var.ty  # (a 1-D conv's 4-D result, reshaped back after the call)
        scale, shift = self._scale_shift(links, static_shape(out_ty)[1])
        empty = relax.const(np.zeros(0, "float32"))
        x, w, *conv = (self.visit_expr(a) for a in ops)
        if residual is not None:
            residual = self.visit_expr(residual)
            if conv_ty is not None:
                residual = self.builder_.emit(relax.op.reshape(residual, list(static_shape(conv_ty))))
        args = [x, w, scale if scale is not None else empty, shift if shift is not None else empty,
                residual if residual is not None else empty]
        if activation is None or activation == ("clamp", 0.0, np.inf):  # what the older kernel can do
            kernel, args = CONV2D_FUSED_KERNEL, [*args, relax.expr.prim_value(int(activation is not None))]
        else:
            lo, hi = (float(v) for v in activation[1:]) if activation[0] == "clamp" else (-np.inf, np.inf)
            kernel, args = CONV2D_FUSED_ACT_KERNEL, [*args, relax.expr.prim_value(CONV_ACTIVATIONS[activation[0]]),
                                                     relax.expr.prim_value(lo), relax.expr.prim_value(hi)]
        call = relax.call_dps_packed(kernel, [*args, *conv], out_ty=out_ty)
        if conv_ty is not None:
            call = relax.op.reshape(self.builder_.emit(call), list(static_shape(binding.var.ty)))
        self.builder_.emit_normalized(relax.VarBinding(binding.var, self.builder_.normalize(call)))
        self.kernels.add(kernel)
        self.count += 1


def fuse_conv_epilogues(record: dict | None = None) -> tvm.transform.Pass:
    """Module pass (after :func:`offload_matmul`): a float32 ``bmc.cpu.conv2d`` whose result goes through a bias or
    batch norm (per-channel adds, subtracts and multiplies), a residual add and/or an activation (ReLU, a clamp,
    SiLU, HardSwish) becomes ``bmc.cpu.conv2d_fused`` (``..._act`` for other activations than a ReLU), which applies them as
    the GEMM stores each block of the output (ResNet-50, MobileNetV2, EfficientNet: no TVM kernel rereads a conv's
    output); ``record["conv2d"]["fused"]`` counts them."""

    @tvm.transform.module_pass(opt_level=0, name="BmcFuseConvEpilogues")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        if not any(_kernel_operands(b.value, CONV2D_KERNEL) for func in mod.functions.values()
                   if isinstance(func, relax.Function) for block in func.body.blocks for b in block.bindings):
            return mod
        mod = relax.transform.FoldConstant()(mod)  # a batch norm of constants: its scale and shift become numbers
        mutator = _ConvEpilogues(mod)
        mod = rewrite_functions(mutator, mod, prepare=lambda func: setattr(mutator, "chains", _epilogue_chains(func)))
        if record is not None and mutator.count:
            conv = record.setdefault("conv2d", {})
            conv["fused"] = mutator.count
            requires = set(record.get("requires", [])) | mutator.kernels
            if mutator.count == conv.get("blas"):  # no plain conv call is left
                requires.discard(CONV2D_KERNEL)
            record["requires"] = sorted(requires)
        return relax.transform.DeadCodeElimination()(mod)

    return _pass


# ------------------------------------------------------------------------------------------ packed weights

@relax.expr_functor.mutator
class _PackedMatmuls(relax.PyExprMutator):
    """``bmc.cpu.matmul(a, w, 0, tb)`` → ``bmc.cpu.matmul_packed(a, w_packed, N)`` and ``bmc.cpu.matmul_integer(a,
    w, za, zb)`` → ``bmc.cpu.matmul_integer_packed(a, w_packed, za, zb, N)`` for the weights in ``packed``."""

    def __init__(self, packed: dict, mod=None):
        super().__init__(mod)
        self.packed = packed  # weight var → its packed var

    def visit_call_(self, call: relax.Call):  # noqa: N802 (TVM's visitor naming)
        call = super().visit_call_(call)
        for kernel, packed_kernel in ((MATMUL_KERNEL, MATMUL_PACKED_KERNEL),
                                      (MATMUL_INTEGER_KERNEL, MATMUL_INTEGER_PACKED_KERNEL)):
            ops = _kernel_operands(call, kernel)
            if ops is not None and ops[1] in self.packed:
                n = relax.expr.prim_value(int(call.ty.shape[-1]))
                args = [ops[0], self.packed[ops[1]]] + (ops[2:] if kernel == MATMUL_INTEGER_KERNEL else []) + [n]
                return relax.call_dps_packed(packed_kernel, args, out_ty=call.ty)
        return call


def _kernels_called(mod: tvm.IRModule) -> set[str]:
    """The ``call_dps_packed`` kernels anywhere in the Relax functions of ``mod``."""
    dps, found = tvm.ir.Op.get("relax.call_dps_packed"), set()

    def visit(e):
        if isinstance(e, relax.Call) and e.op.same_as(dps):
            found.add(str(e.args[0].global_symbol))

    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return found


def _required(record: dict | None, kernel: str) -> tvm.transform.Pass:
    """Module pass adding ``kernel`` to ``record["requires"]`` when the module calls it."""

    @tvm.transform.module_pass(opt_level=0, name="BmcRequired")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        if record is not None and kernel in _kernels_called(mod):
            record["requires"] = sorted(set(record.get("requires", [])) | {kernel})
        return mod

    return _pass


def _packed_use(value, w: relax.Var, weights: set):
    """How ``value`` reads the weight ``w`` if it can read it packed: ``("float32", trans_b)`` as the right operand
    of a ``bmc.cpu.matmul`` with a not transposed, float32 or (more than ``SKINNY_ROWS`` rows of a: the few-row
    kernels read a 16-bit weight where it lies, at half float32's bytes) float16/bfloat16 operands;
    ``("int8",)`` as ``bt`` of ``bmc.cpu.matmul_integer``; else None. An ``a`` that is a weight too keeps both as
    they are."""
    ops = _kernel_operands(value, MATMUL_KERNEL)
    if ops is not None and ops[1].same_as(w) and ops[0] not in weights and int(ops[2].value) == 0:
        dtype, shape = str(ops[0].ty.dtype), static_shape(ops[0].ty)
        if dtype == "float32" and str(value.ty.dtype) == "float32":
            return "float32", int(ops[3].value)
        if dtype in ("float16", "bfloat16") and shape is not None and math.prod(shape[:-1]) > SKINNY_ROWS:
            return "float32", int(ops[3].value)
    ops = _kernel_operands(value, MATMUL_INTEGER_KERNEL)
    if ops is not None and ops[1].same_as(w) and ops[0] not in weights and not any(o.same_as(w) for o in ops[2:]):
        return ("int8",)
    return None


def prepack_weights(record: dict | None = None) -> tvm.transform.Pass:
    """Module pass: a 2-D weight of ``main`` (a parameter after its ``num_input`` inputs) whose every use can read
    it packed (:func:`_packed_use`) becomes a parameter holding the packed weight and those calls the packed
    kernels: a float32 or 16-bit one in panels ``[ceil(N / 32), K, 32]`` of its dtype for ``bmc.cpu.matmul_packed``
    (the panel GEMM packs b on every call otherwise), an 8-bit ``bt [N, K]`` in ``bmc.cpu.pack_int8_weight``'s panels with its row sums for
    ``bmc.cpu.matmul_integer_packed`` (which then takes the VNNI panel tiles for every row count). The runtime packs
    each such weight once, as it loads it (``record["packed_weights"]``: name → stored transposed, ``[N, K]``;
    ``record["packed_int8_weights"]``: names). ``BMC_CPU_PACK_WEIGHTS=0`` keeps every weight as stored."""

    @tvm.transform.module_pass(opt_level=0, name="BmcPrepackWeights")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        func = mod["main"] if any(gv.name_hint == "main" for gv in mod.get_global_vars()) else None
        if not isinstance(func, relax.Function) or "num_input" not in func.attrs or not pack_weights_enabled():
            return mod
        weights = set(func.params[int(func.attrs["num_input"]):])
        uses: dict = {}  # weight → how every use reads it (_packed_use); None once one cannot read it packed
        for block in func.body.blocks:
            for binding in block.bindings:
                for w in (v for v in relax.analysis.free_vars(binding.value) if v in weights):
                    how = _packed_use(binding.value, w, weights)
                    uses[w] = how if uses.get(w, how) == how else None
        for w in relax.analysis.free_vars(func.body.body):  # a weight returned as an output stays as it is
            uses[w] = None
        packed = {}
        for w, how in uses.items():
            shape = static_shape(w.ty) if how is not None else None
            if shape is None or len(shape) != 2:
                continue
            dtype = str(w.ty.dtype)
            if how[0] == "float32" and dtype in ("float32", "float16", "bfloat16"):
                k, n = shape[::-1] if how[1] else shape
                packed[w] = relax.Var(w.name, relax.TensorType([-(-n // PACK_PANEL), k, PACK_PANEL], dtype))
            elif how[0] == "int8" and dtype in ("int8", "uint8"):
                packed[w] = relax.Var(w.name, relax.TensorType(list(packed_int8_shape(*shape)), "int8"))
        if not packed:
            return mod
        mutator = _PackedMatmuls(packed, mod)
        body = mutator.visit_expr(func).body
        params = [packed.get(p, p) for p in func.params]
        new = relax.Function(params, body, func.ret_ty, func.is_pure, func.attrs)
        mutator.builder_.update_func(mod.get_global_var("main"), new)
        mod = mutator.builder_.get()
        if record is not None:
            float32 = {w.name: bool(uses[w][1]) for w in packed if uses[w][0] == "float32"}
            int8 = sorted(w.name for w in packed if uses[w][0] == "int8")
            requires, left = set(record.get("requires", [])), _kernels_called(mod)
            for kernel, packed_kernel, pack_kernel, names in (
                    (MATMUL_KERNEL, MATMUL_PACKED_KERNEL, PACK_WEIGHT_KERNEL, float32),
                    (MATMUL_INTEGER_KERNEL, MATMUL_INTEGER_PACKED_KERNEL, PACK_INT8_WEIGHT_KERNEL, int8)):
                if names:
                    requires.add(packed_kernel)
                    requires.add(pack_kernel)
                    if kernel not in left:
                        requires.discard(kernel)
            record.update(requires=sorted(requires), **({"packed_weights": float32} if float32 else {}),
                          **({"packed_int8_weights": int8} if int8 else {}))
        return relax.transform.DeadCodeElimination()(mod)

    return _pass


# ------------------------------------------------------------------------------------------ float16 compute

#: float16 ops computed in float32 on the CPU: x86 has no float16 arithmetic, and LLVM rounds every intermediate
#: back to float16 (a conversion pair per operation), where bfloat16 gets TVM's BF16ComputeLegalize
_F16_COMPUTE = frozenset(f"relax.{n}" for n in (
    "add", "subtract", "multiply", "divide", "power", "maximum", "minimum", "negative", "abs", "exp", "log", "sqrt",
    "rsqrt", "tanh", "sigmoid", "erf", "sin", "cos", "clip", "where", "mean", "sum", "variance", "max", "min",
    "nn.gelu", "nn.gelu_tanh", "nn.silu", "nn.relu", "nn.softmax", "nn.log_softmax", "nn.layer_norm", "nn.rms_norm"))


@relax.expr_functor.mutator
class _WidenFloat16(relax.PyExprMutator):
    """``op(x: float16, ...)`` → ``astype(op(astype(x, float32), ...), float16)``; an operand that is itself the
    rounding of a float32 value is read as that value, so a chain stays float32 and its fused kernel converts only
    where it loads and stores (one rounding per stored tensor, as TVM's BF16ComputeLegalize does for bfloat16)."""

    def __init__(self, mod=None):
        super().__init__(mod)
        self.count = 0
        self.uses: Counter = Counter()

    def _wide(self, arg):
        if not (isinstance(arg.ty, relax.TensorType) and str(arg.ty.dtype) == "float16"):
            return arg
        bound = self.lookup_binding(arg) if isinstance(arg, relax.Var) else None
        if (isinstance(bound, relax.Call) and isinstance(bound.op, tvm.ir.Op) and bound.op.name == "relax.astype"
                and str(bound.args[0].ty.dtype) == "float32"):
            return bound.args[0]
        return self.builder_.emit(relax.op.astype(arg, "float32"))

    def visit_call_(self, call: relax.Call):  # noqa: N802 (TVM's visitor naming)
        call = super().visit_call_(call)
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name in _F16_COMPUTE
                and isinstance(call.ty, relax.TensorType) and str(call.ty.dtype) == "float16"):
            return call
        wide = self.builder_.emit(relax.Call(call.op, [self._wide(a) for a in call.args], call.attrs))
        self.count += 1
        return relax.op.astype(wide, "float16")


def widen_float16(record: dict | None = None) -> tvm.transform.Pass:
    """Module pass: float16 arithmetic in float32 (:class:`_WidenFloat16`); ``record["widened_float16"]`` counts
    the ops. Measured: a float16 GPT-2 block stack's elementwise kernels ~60 ms of 210 before."""
    return counting_pass("BmcWidenFloat16", _WidenFloat16, record, "widened_float16")


# ------------------------------------------------------------------------------------------ fast math

def _fast_math_te():
    """float32 TE implementations of the transcendental ops, from topi's fast_* (Cephes/Eigen polynomials).

    TVM's llvm lowering of ``exp``/``tanh``/``erf`` calls libm per element (no vector library): measured on a
    128x3072 float32 tensor, one thread: exp 0.80 → 0.09 ms, tanh 1.89 → 0.10 ms, erf 10.1 → 0.12 ms; max relative
    error vs float64 numpy 1e-7 (exp), 3e-7 (tanh, erf), i.e. float32 rounding, far inside the 1e-4 budget.
    """
    import math as _m

    from tvm import te, topi

    def gelu(x):  # 0.5 x (1 + erf(x / sqrt 2))
        c = tvm.tirx.const(1 / _m.sqrt(2), "float32")
        e = topi.fast_erf(te.compute(x.shape, lambda *i: x(*i) * c, name="gelu_scaled"))
        return te.compute(x.shape, lambda *i: x(*i) * (tvm.tirx.const(0.5, "float32")
                                                      + e(*i) * tvm.tirx.const(0.5, "float32")), name="gelu")

    def gelu_tanh(x):  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        k0, k1 = tvm.tirx.const(_m.sqrt(2 / _m.pi), "float32"), tvm.tirx.const(0.044715, "float32")
        inner = te.compute(x.shape, lambda *i: k0 * (x(*i) + k1 * x(*i) * x(*i) * x(*i)), name="gelu_inner")
        t = topi.fast_tanh(inner)
        return te.compute(x.shape, lambda *i: tvm.tirx.const(0.5, "float32") * x(*i)
                          * (tvm.tirx.const(1, "float32") + t(*i)), name="gelu_tanh")

    def sigmoid(x):
        e = topi.fast_exp(te.compute(x.shape, lambda *i: -x(*i), name="neg"))
        return te.compute(x.shape, lambda *i: tvm.tirx.const(1, "float32")
                          / (tvm.tirx.const(1, "float32") + e(*i)), name="sigmoid")

    return {"relax.exp": topi.fast_exp, "relax.tanh": topi.fast_tanh, "relax.erf": topi.fast_erf,
            "relax.sigmoid": sigmoid, "relax.nn.gelu": gelu, "relax.nn.gelu_tanh": gelu_tanh}


@relax.expr_functor.mutator
class _FastMath(relax.PyExprMutator):
    """float32 exp/tanh/erf/sigmoid/gelu/softmax → topi's fast_* TE (call_tir), dtype-checked (unlike Relax's
    FastMathTransform, which also rewrites float16/float64 and trips on calls of non-Op callees)."""

    def __init__(self, mod=None):
        super().__init__(mod)
        self.table = _fast_math_te()
        self.count: Counter = Counter()

    def visit_call_(self, call: relax.Call):  # noqa: N802
        call = super().visit_call_(call)
        if not isinstance(call.op, tvm.ir.Op) or not call.args:
            return call
        name = call.op.name
        x = call.args[0]
        if getattr(x.ty, "dtype", None) is None or str(x.ty.dtype) != "float32" or static_shape(x.ty) is None:
            return call
        if name == "relax.nn.softmax":
            from tvm import topi

            self.count[name] += 1
            return self.builder_.call_te(topi.nn.fast_softmax, x, int(call.attrs.axis))
        fn = self.table.get(name)
        if fn is None:
            return call
        self.count[name] += 1
        return self.builder_.call_te(fn, x)


def fast_math(record: dict | None = None) -> tvm.transform.Pass:
    @tvm.transform.module_pass(opt_level=0, name="BmcFastMath")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        fm = _FastMath(mod)
        mod = rewrite_functions(fm, mod)
        if record is not None:
            record["fast_math"] = {k.removeprefix("relax."): v for k, v in sorted(fm.count.items())}
        return mod

    return _pass


# ------------------------------------------------------------------------------------------ schedule rules

def _target_lanes(target, dtype_bits: int) -> int:
    from tvm.target.codegen import llvm_get_vector_width

    try:
        width = int(llvm_get_vector_width(target))
    except Exception:  # noqa: BLE001 (no llvm info for this target)
        width = 0
    return max((width if width > 0 else 128) // max(dtype_bits, 8), 1)


def _row_reduction_cls():
    from tvm import s_tir
    from tvm.s_tir.dlight.analysis import normalize_prim_func
    from tvm.s_tir.dlight.base import get_extent
    from tvm.s_tir.dlight.cpu.base import CPUScheduleRule

    class RowReduction(CPUScheduleRule):
        """Softmax, layer/RMS norm and their kin: reductions along one axis followed by injective blocks, one block
        after another. Each reduction is ``rfactor``-ed into as many partial results as a vector has lanes, which
        the vector accumulates (a scalar sum is one add per 4 cycles: a dependency chain); the injective blocks
        are vectorized; a block runs on the thread pool only from ``MIN_PARALLEL_ROW_ITERS`` iterations on.

        It comes before dlight's CPU ``Reduction`` (all blocks of a row computed under the row's parallel loop,
        the reductions scalar), which was slower on 2 cores from 1 to 2048 rows: its parallel launch costs ~10 µs
        where a row of 768 takes well under one, and its reductions are a dependency chain (layer norm
        ``[128, 768]`` 88 → 13 µs, ``[2048, 4096]`` 7.1 → 1.9 ms; softmax ``[12, 128, 128]`` 110 → 71 µs). Only
        rows whose length no vector width divides (197) are left to it, several rows at least: TVM's vectorizer
        makes scalar code of the predicated loops, and that rule's threads make up for it.
        """

        def apply(self, func, target, _tunable):
            if not isinstance(func, tvm.tirx.PrimFunc) or not self.is_target_available(target):
                return None
            try:
                return self._apply(func, target)
            except Exception:  # noqa: BLE001 (a rule that does not fit this PrimFunc: next rule)
                return None

        def _apply(self, func, target):
            sch = s_tir.Schedule(func)
            infos = normalize_prim_func(sch) or []
            reductions = [b.dom_kind() for b in infos if not b.is_injective()]
            if len(infos) < 2 or not reductions or not infos[-1].is_injective() \
                    or any(k.count("R") != 1 or not k.endswith("R") for k in reductions):
                return None  # not a row reduction (a pooling or a convolution reduces over several axes)
            last = sch.get(infos[-1].block_rv)
            lanes = max(_target_lanes(target, last.writes[0].source.dtype.bits if last.writes else 32), 2)
            rows = [b.dom() for b in infos if not b.is_injective()]  # the reductions': rows..., row length
            if any(not isinstance(n, int) for n in sum(rows, [])) or max(math.prod(d[:-1]) for d in rows) > 1 \
                    and any(d[-1] >= lanes and not width(d[-1], lanes) for d in rows):
                return None  # rows of 197 (→ :func:`_rows_in_parallel_cls`)
            for info in infos:
                block = vectorize(sch, info.block_rv, lanes) if info.is_injective() else \
                    vector_partials(sch, info.block_rv, lanes)
                loops = sch.get_loops(block)
                if len(loops) >= 2 and get_extent(sch, loops[0]) != 1 \
                        and math.prod(get_extent(sch, lp) for lp in loops) >= MIN_PARALLEL_ROW_ITERS:
                    sch.parallel(loops[0])
            return sch

    def vectorize(sch, block, lanes):
        """Vectorize the innermost loop of ``block`` (injective), split to ``width(extent)`` (else ``lanes``)."""
        inner = sch.get_loops(block)[-1]
        extent = get_extent(sch, inner)
        if extent > lanes:
            sch.vectorize(sch.split(inner, factors=[None, width(extent, lanes) or lanes])[1])
        elif extent >= 2:
            sch.vectorize(inner)
        return block

    def vector_partials(sch, block, lanes):
        """``rfactor`` the reduction loop of ``block`` into ``width(extent)`` lanes (``lanes`` with a predicate where
        none divides it), kept last in the partials' buffer so that they are a contiguous vector; returns the block
        that computes them."""
        inner = sch.get_loops(block)[-1]
        extent = get_extent(sch, inner)
        if extent < 2 * lanes:
            return block
        _, part = sch.split(inner, factors=[None, width(extent, lanes) or lanes])
        partials = sch.rfactor(part, factor_axis=len(sch.get(block).writes[0].source.shape))
        sch.vectorize(sch.get_loops(partials)[-1])
        return partials

    def width(extent, lanes):
        """The widest of ``lanes``, ``lanes/2``, ``lanes/4`` (at least 4) that divides ``extent``, if any."""
        return next((w for w in (lanes, lanes // 2, lanes // 4) if w >= 4 and extent % w == 0), None)

    return RowReduction()


def _rows_in_parallel_cls():
    from tvm import s_tir
    from tvm.s_tir.dlight.analysis import normalize_prim_func
    from tvm.s_tir.dlight.cpu import Reduction

    class RowsInParallel(Reduction):
        """dlight's CPU ``Reduction`` where every block has the same rows; other functions go to the next rule.

        TVM 0.27's rule parallelizes the last block's leading loops as the rows, but ``normalize_prim_func`` drops
        unit loops from the injective blocks and not from the reductions, so for ``[1, n]`` or ``[1, 1, d]`` (a
        classifier's softmax, every norm of a one-token decoding step) its "rows" were the ``n`` columns, each
        recomputing the row's max and sum (O(n²): a ``[1, 1, 4096]`` RMS norm took 4.5 ms, a ``[1, 50257]``
        softmax 1.4 s) while all of them wrote that max and sum at once (a race)."""

        def apply(self, func, target, tunable):
            try:
                infos = normalize_prim_func(s_tir.Schedule(func)) if isinstance(func, tvm.tirx.PrimFunc) else None
                if not infos:
                    return None
                lead = min(len(k) - len(k.lstrip("S")) for k in (b.dom_kind() for b in infos))
                if len({tuple(str(d) for d in b.dom()[:lead]) for b in infos}) != 1:
                    return None
                return super().apply(func, target, tunable)
            except Exception:  # noqa: BLE001 (a rule that does not fit this PrimFunc)
                return None

    return RowsInParallel()


def _parallel_fallback_cls():
    from tvm import s_tir
    from tvm.s_tir.dlight.analysis import normalize_prim_func
    from tvm.s_tir.dlight.base import get_extent, try_inline
    from tvm.s_tir.dlight.cpu.base import CPUScheduleRule

    class ParallelFallback(CPUScheduleRule):
        """Inline, then per remaining block: parallel over the leading spatial loops, vectorize the innermost.

        Only statically sized loops are touched; a block with fewer than ``MIN_PARALLEL_ITERS`` iterations stays
        serial (the thread-pool launch would cost more than it saves).
        """

        def apply(self, func, target, _tunable):
            if not isinstance(func, tvm.tirx.PrimFunc) or not self.is_target_available(target):
                return None
            try:
                return self._apply(func, target)
            except Exception:  # noqa: BLE001 (leave the PrimFunc unscheduled rather than fail the build)
                return None

        def _apply(self, func, target):
            sch = s_tir.Schedule(func)
            infos = normalize_prim_func(sch)
            if infos is None:
                return None
            infos = try_inline(sch, infos)
            changed = False
            for info in infos:
                block = info.block_rv
                loops = sch.get_loops(block)
                kinds = info.dom_kind()
                if not loops or len(kinds) != len(loops):
                    continue
                extents = [get_extent(sch, lp) for lp in loops]
                if not all(isinstance(e, int) for e in extents):
                    continue
                n_s = len(kinds) - len(kinds.lstrip("S"))
                if n_s == 0:
                    continue
                stmt = sch.get(block)
                bits = stmt.writes[0].source.dtype.bits if stmt.writes else 32
                lanes = vector_lanes(stmt, _target_lanes(target, bits))
                injective = n_s == len(kinds)
                vec_loop = None
                if injective and lanes > 1 and extents[-1] % lanes == 0 and extents[-1] >= lanes:
                    if extents[-1] == lanes:
                        vec_loop, n_s = loops[-1], n_s - 1
                    else:
                        outer, vec_loop = sch.split(loops[-1], factors=[None, lanes])
                        loops = loops[:-1] + [outer]
                        extents = extents[:-1] + [extents[-1] // lanes]
                if n_s > 0 and math.prod(extents[:len(kinds)]) * (lanes if vec_loop is not None else 1) \
                        >= MIN_PARALLEL_ITERS and math.prod(extents[:n_s]) >= 2:
                    # parallel over as many leading spatial loops as it takes to give every thread work
                    take = 1
                    while take < n_s and math.prod(extents[:take]) < 64:
                        take += 1
                    fused = sch.fuse(*loops[:take]) if take > 1 else loops[0]
                    sch.parallel(fused)
                    changed = True
                if vec_loop is not None:
                    sch.vectorize(vec_loop)
                    changed = True
            return sch if changed else None

    return ParallelFallback()


def schedule_rules():
    """Ordered CPU schedule rules, fallback last."""
    return [_row_reduction_cls(), _rows_in_parallel_cls(), _parallel_fallback_cls()]


# ------------------------------------------------------------------------------------------ host features

def simd_features(target) -> list[str]:
    """The SIMD features (LLVM names, see ``bmc.runtime.kernels.SIMD_FEATURES``) the code for ``target`` may use;
    recorded in the manifest so a host without them refuses the artifact instead of dying on SIGILL."""
    from tvm.target.codegen import llvm_get_cpu_features

    from bmc.runtime.kernels import SIMD_FEATURES

    try:
        have = {str(f) for f in llvm_get_cpu_features(target)}
    except Exception:  # noqa: BLE001 (no LLVM feature query for this target)
        return []
    return sorted(f for f in SIMD_FEATURES if f in have)


# ------------------------------------------------------------------------------------------ the pipeline

def cpu_pipeline(target, record: dict | None = None, *, offload: bool = True, offload_conv: bool | None = None,
                 schedule: bool = True, fast_math_ops: bool = True, tune=None):
    """The Relax pipeline for llvm: decompose, splits to slices (:func:`bmc.codegen.rewrite.split_slices`), offload
    matmuls (+ convs, with their epilogues), pack weights, fast math, legalize + fuse, [tune], schedule, lower, and
    record which outputs the program allocates (:func:`bmc.codegen.rewrite.owned_outputs`).

    ``offload_conv`` (default: ``offload``, unless ``BMC_CPU_CONV=tvm`` is set) routes large 2-D convolutions to
    ``bmc.cpu.conv2d``. ``tune`` is an optional pass (MetaSchedule, ``bmc.codegen.tune.tune_pass``) run after fusion;
    the dlight rules skip the functions it scheduled."""
    if offload_conv is None:
        import os

        offload_conv = offload and os.environ.get("BMC_CPU_CONV", "").strip().lower() != "tvm"
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic
    from tvm.s_tir import dlight as dl

    passes = [relax.transform.DecomposeOpsForInference(), split_slices(record),
              split_full_reductions(record, native=offload), _required(record, MINMAX_KERNEL)]
    if offload:
        passes += [offload_matmul(record, conv=offload_conv, mixed=HALF_MIXED), fuse_conv_epilogues(record),
                   prepack_weights(record)]
    passes.append(widen_float16(record))
    if fast_math_ops:
        passes.append(fast_math(record))
    legalize = cpu_generic.legalize_passes(target)
    fuse = next(i for i, p in enumerate(legalize) if p.info.name == "FuseOps")
    passes += (cpu_generic.library_dispatch_passes(target) + legalize[:fuse] + [bound_fusion(record)]
               + legalize[fuse:])
    if tune is not None:
        passes.append(tune)
    if schedule:
        passes.append(dl.ApplyDefaultSchedule(*schedule_rules()))
    passes += cpu_generic.dataflow_lower_passes(target) + cpu_generic.finalize_passes(target)
    passes.append(owned_outputs(record))

    @tvm.transform.module_pass(opt_level=0, name="BmcCpuPipeline")
    def _pipeline(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        with target:
            return tvm.transform.Sequential(passes)(mod)

    return _pipeline
