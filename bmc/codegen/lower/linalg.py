"""Relax lowering of linear algebra."""

from __future__ import annotations

import numpy as np
from tvm import relax

from bmc.codegen.lower import lowering


ACCUMULATE_IN_FLOAT32 = ("float16", "bfloat16")


@lowering("matmul")
def _matmul(ctx, node, args):
    dtype = node.inputs[0].type.dtype
    if dtype in ACCUMULATE_IN_FLOAT32:  # reduced-precision inputs, float32 accumulation (as tensor cores do)
        return relax.op.astype(ctx.emit(relax.op.matmul(args[0], args[1], out_dtype="float32")), dtype)
    return relax.op.matmul(args[0], args[1])


@lowering("matmul_nbits")
def _matmul_nbits(ctx, node, args):
    """On the CPU in float32 a call of the fused kernel ``bmc.cpu.matmul_nbits[_zp]`` (``bmc.runtime.kernels``);
    elsewhere the dequantized weight times A: unpack the nibbles, shift by the zero point, scale per block, then a
    matmul by its transpose."""
    from bmc.codegen.lower import const
    from bmc.ir.types import np_dtype

    a, codes, scales = args[:3]
    n, blocks, half = node.inputs[1].type.shape
    dtype = node.inputs[0].type.dtype
    if ctx.target_kind == "llvm" and dtype == "float32":  # the fused CPU kernel reads the codes directly
        from bmc.runtime.kernels import MATMUL_NBITS_KERNEL, MATMUL_NBITS_ZP_KERNEL

        kernel = MATMUL_NBITS_ZP_KERNEL if len(args) > 3 else MATMUL_NBITS_KERNEL
        ctx.kernels.add(kernel)
        return relax.call_dps_packed(kernel, list(args), out_ty=relax.TensorType(list(node.outputs[0].type.shape),
                                                                                  dtype))
    lo = ctx.emit(relax.op.bitwise_and(codes, const(np.uint8(15))))
    hi = ctx.emit(relax.op.right_shift(codes, const(np.uint8(4))))
    q = ctx.emit(relax.op.astype(ctx.emit(relax.op.reshape(ctx.emit(relax.op.stack([lo, hi], axis=3)),
                                                           [n, blocks, 2 * half])), dtype))
    zp = ctx.emit(relax.op.expand_dims(args[3], [2])) if len(args) > 3 else const(np.asarray(8, np_dtype(dtype)))
    w = ctx.emit(relax.op.multiply(ctx.emit(relax.op.subtract(q, zp)),
                                   ctx.emit(relax.op.expand_dims(scales, [2]))))
    w = ctx.emit(relax.op.permute_dims(ctx.emit(relax.op.reshape(w, [n, blocks * 2 * half])), [1, 0]))
    return _matmul(ctx, node, [a, w])


@lowering("matmul_float8")
def _matmul_float8(ctx, node, args):
    """On the CPU a call of ``bmc.cpu.matmul_float8`` (the codes decoded through a 256-entry table, a row at a time
    for a few rows of A: the weight is read a byte a value); elsewhere the decoded weight, scaled, times A."""
    from bmc.codegen.lower import const
    from bmc.codegen.lower.elementwise import emit_decode
    from bmc.ops.minifloat import decode, get_format

    a, codes, scale = args
    fmt = get_format(node.attrs["format"])
    out = node.outputs[0].type
    if ctx.target_kind == "llvm":
        from bmc.runtime.kernels import MATMUL_FLOAT8_KERNEL

        ctx.kernels.add(MATMUL_FLOAT8_KERNEL)
        table = const(decode(np.arange(256, dtype=np.uint8), fmt))
        layout = [relax.expr.prim_value(int(fmt.mantissa_bits)), relax.expr.prim_value(int(fmt.bias))]
        return relax.call_dps_packed(MATMUL_FLOAT8_KERNEL, [a, codes, table, scale] + layout,
                                     out_ty=relax.TensorType(list(out.shape), out.dtype))
    w = emit_decode(ctx, codes, fmt)
    rows = node.inputs[2].type
    s = ctx.emit(relax.op.reshape(scale, [rows.numel, 1]))
    w = ctx.emit(relax.op.permute_dims(ctx.emit(relax.op.multiply(w, s)), [1, 0]))
    return relax.op.matmul(a, w)


@lowering("matmul_integer")
def _matmul_integer(ctx, node, args):
    """On the CPU a call of the integer kernel ``bmc.cpu.matmul_integer`` (``bmc.runtime.kernels``: AVX-512 VNNI
    where the CPU has it); elsewhere the operands minus their zero points as float64 (exact: every partial sum is
    an integer below 2^53) multiplied and cast to int32."""
    a, bt, za, zb = args
    out = node.outputs[0].type
    if ctx.target_kind == "llvm":
        from bmc.runtime.kernels import MATMUL_INTEGER_KERNEL

        ctx.kernels.add(MATMUL_INTEGER_KERNEL)
        return relax.call_dps_packed(MATMUL_INTEGER_KERNEL, list(args), out_ty=relax.TensorType(list(out.shape),
                                                                                           out.dtype))

    def shifted(x, zp, zp_type):
        zp = ctx.emit(relax.op.astype(zp, "float64"))
        if zp_type.numel > 1:  # one per row
            zp = ctx.emit(relax.op.reshape(zp, [zp_type.numel, 1]))
        return ctx.emit(relax.op.subtract(ctx.emit(relax.op.astype(x, "float64")), zp))

    a64 = shifted(a, za, node.inputs[2].type)
    b64 = shifted(bt, zb, node.inputs[3].type)
    return relax.op.astype(ctx.emit(relax.op.matmul(a64, ctx.emit(relax.op.permute_dims(b64, [1, 0])))), "int32")


def _fused_cuda_attention(node) -> bool:
    """Whether the CUDA kernel computes this attention: asked for (``BMC_CUDA_ATTENTION=fused``; the default stays
    the composition until the kernel has been measured on a GPU), and a shape it has (``cpp/cuda_attention.h``):
    float16/bfloat16, head dim 16, 32, 64 or 128 for q, k and v, at most four batch dims."""
    import os

    from bmc.errors import CompileError

    choice = os.environ.get("BMC_CUDA_ATTENTION", "composition").strip().lower()
    if choice not in ("fused", "composition"):
        raise CompileError(f"BMC_CUDA_ATTENTION={choice!r}", where="environment",
                           fix="set BMC_CUDA_ATTENTION to fused or composition (the default)")
    q, v = node.inputs[0].type, node.inputs[2].type
    if choice != "fused" or q.dtype not in ("float16", "bfloat16") or q.rank > 6 or q.shape[-1] not in (16, 32, 64, 128) \
            or v.shape[-1] != q.shape[-1]:
        return False
    from bmc.runtime.cuda import fused_attention_available

    if not fused_attention_available():
        raise CompileError("BMC_CUDA_ATTENTION=fused, but this bmc's libbmc_cuda_kernels has no attention kernels "
                           "(it was built without nvcc)", where=f"node {node.source or node.op}",
                           fix="reinstall bmc with nvcc on PATH, or unset BMC_CUDA_ATTENTION")
    return True


@lowering("attention")
def _attention(ctx, node, args):
    """On the CPU a call of the fused float32 kernel ``bmc.cpu.attention[_bias]`` (no score matrix; 16-bit keys and
    values read as they are, q and the bias widened to float32 for it and the result rounded back); on CUDA in
    float16/bfloat16 (head dims 16 to 128), when ``BMC_CUDA_ATTENTION=fused``, the tensor-core kernel
    ``bmc.cuda.attention[_bias]``; elsewhere the composition the op was fused from, lowered as its ops would be
    (so the CUDA pipeline's softmax and cuBLAS rewrites see what they saw before). With ``lse`` the CPU kernel is
    ``bmc.cpu.attention[_bias]_lse``; with a softcap ``bmc.cpu.attention_softcap[_lse]`` and
    ``bmc.cuda.attention_softcap`` (the bias a scalar zero when the op has none). The composition computes the
    softmax in float32 from the row max and sum it also returns the log-sum-exp from (the CUDA kernel has no
    ``lse``). With a sink, :func:`_attention_with_sink` on the CPU; elsewhere the composition, the sink one more
    column of the softmax."""
    from bmc.codegen.lower import const
    from bmc.codegen.lower.reduce import in_float32
    from bmc.ir.types import np_dtype

    out = node.outputs[0].type
    sink = node.attrs["sink"]
    if sink and ctx.target_kind == "llvm" and out.dtype in ("float32", "float16", "bfloat16"):
        return _attention_with_sink(ctx, node, args)
    scale, lse, softcap = node.attrs["scale"], node.attrs["lse"], node.attrs["softcap"]
    batch = node.inputs[0].type.shape[:-2]
    # the kernels' scalars; a softcap kernel always takes a bias (a scalar 0 for none)
    scalars = [relax.expr.prim_value(float(scale))] + ([relax.expr.prim_value(float(softcap))] if softcap else []) \
        + [relax.expr.prim_value(int(node.attrs["transpose_k"]))]

    def kernel_args():
        return list(args) + ([const(np.zeros((), np_dtype(out.dtype)))] if softcap and len(args) == 3 else [])

    if ctx.target_kind == "cuda" and not lse and not sink and _fused_cuda_attention(node):
        from bmc.runtime import cuda as C

        kernel = C.ATTENTION_SOFTCAP_KERNEL if softcap else C.ATTENTION_BIAS_KERNEL if len(args) > 3 \
            else C.ATTENTION_KERNEL
        ctx.kernels.add(kernel)
        return relax.call_dps_packed(kernel, kernel_args() + scalars,
                                     out_ty=relax.TensorType(list(out.shape), out.dtype))
    if ctx.target_kind == "llvm" and out.dtype in ("float32", "float16", "bfloat16"):
        from bmc.runtime import kernels as K

        if softcap:
            kernel = K.ATTENTION_SOFTCAP_LSE_KERNEL if lse else K.ATTENTION_SOFTCAP_KERNEL
        else:
            kernel = ([K.ATTENTION_KERNEL, K.ATTENTION_BIAS_KERNEL], [K.ATTENTION_LSE_KERNEL,
                                                                       K.ATTENTION_BIAS_LSE_KERNEL])[lse][len(args) > 3]
        ctx.kernels.add(kernel)
        # 16-bit attention: the float32 kernel (no scores) on a widened q and bias; it reads 16-bit keys and values
        # itself, widening each head's in cache (a 16-bit cache is read from memory once, in 16 bits)
        narrow = out.dtype != "float32"
        args = [ctx.emit(relax.op.astype(a, "float32")) if narrow and i not in (1, 2) else a
                for i, a in enumerate(kernel_args())]
        k_batch, v_batch = (node.inputs[i].type.shape[:-2] for i in (1, 2))
        if k_batch != v_batch:  # the kernel takes keys and values of one batch shape (dividing q's): repeat both
            args[1:3] = [_grouped(ctx, args[i], node.inputs[i].type.shape, batch, full=True) for i in (1, 2)]
        result = relax.TensorType(list(out.shape), "float32")
        if lse:
            both = ctx.emit(relax.call_dps_packed(kernel, args + scalars, out_ty=[
                result, relax.TensorType(list(out.shape[:-1]), "float32")]))
            o, rows = (ctx.emit(relax.TupleGetItem(both, i)) for i in range(2))
            return [ctx.emit(relax.op.astype(o, out.dtype)) if narrow else o, rows]
        call = relax.call_dps_packed(kernel, args + scalars, out_ty=result)
        return relax.op.astype(ctx.emit(call), out.dtype) if narrow else call
    (m, d), (n, e) = node.inputs[0].type.shape[-2:], node.inputs[2].type.shape[-2:]
    heads = {node.inputs[i].type.shape[len(batch) - 1] for i in (1, 2)} if batch else set()
    folded = batch  # q's batch dims as the products see them
    q = args[0]
    if len(heads) == 1 and heads != {batch[-1]}:
        # the last batch dim grouped (or one key/value head): each key/value head's query heads are rows of one
        # product with it (q [.., h * g, m, d] viewed as [.., h, g * m, d]), so k and v are not repeated
        folded = batch[:-1] + (heads.pop(),)
        q = ctx.emit(relax.op.reshape(q, [*folded, batch[-1] // folded[-1] * m, d]))
    kt, v = (_grouped(ctx, args[i], node.inputs[i].type.shape, folded) for i in (1, 2))
    if node.attrs["transpose_k"]:
        rank = node.inputs[1].type.rank
        kt = ctx.emit(relax.op.permute_dims(kt, list(range(rank - 2)) + [rank - 1, rank - 2]))
    s = ctx.emit(_matmul(ctx, node, [q, kt]))
    if folded != batch:
        s = ctx.emit(relax.op.reshape(s, [*batch, m, n]))
    if scale != 1.0:
        s = ctx.emit(relax.op.multiply(s, const(np.asarray(scale, np_dtype(out.dtype)))))
    if node.attrs["softcap"]:
        cap = const(np.asarray(node.attrs["softcap"], np_dtype(out.dtype)))
        s = ctx.emit(relax.op.multiply(ctx.emit(relax.op.tanh(ctx.emit(relax.op.divide(s, cap)))), cap))
    if len(args) > 3 + sink:
        s = ctx.emit(relax.op.add(s, args[3]))
    if sink:  # the sink's logit one more column of each row's softmax, left out of the product
        s = ctx.emit(relax.op.concat([s, ctx.emit(relax.op.broadcast_to(args[-1], [*batch, m, 1]))], axis=-1))

    def times_v(p):
        if folded == batch:
            return _matmul(ctx, node, [p, v])
        p = ctx.emit(relax.op.reshape(p, [*folded, batch[-1] // folded[-1] * m, n]))
        return relax.op.reshape(ctx.emit(_matmul(ctx, node, [p, v])), [*batch, m, e])

    if lse:
        return _softmax_lse(ctx, node, s, times_v)
    p = ctx.emit(in_float32(lambda c, n, a: relax.op.nn.softmax(a[0], axis=-1))(ctx, node, [s]))
    if sink:
        p = ctx.emit(relax.op.strided_slice(p, axes=[-1], begin=[0], end=[n]))
    return times_v(p)


def _attention_with_sink(ctx, node, args):
    """Attention with a sink (GPT-OSS) on the CPU: the fused kernel without it, with each row's log-sum-exp ``l``
    (``bmc.cpu.attention*_lse``), times ``sigmoid(l - sink)``, the share of the row's denominator its keys keep
    beside ``exp(sink)``, in float32; a row with no key left (``l = -inf``) is 0, as its probabilities are. (Other
    targets run the composition with the sink's column in the softmax: TVM 0.27's CUDA codegen cannot vectorize
    this ``where``.)"""
    from bmc.codegen.lower import const
    from bmc.ir.graph import Node, Value
    from bmc.ir.types import TensorType

    out = node.outputs[0]
    rows = TensorType("float32", out.type.shape[:-1])
    plain = Node("attention", node.inputs[:-1], [out, Value(f"{out.name}.lse", rows)],
                 node.attrs | {"lse": True, "sink": False, "sink_shift": False}, node.source)
    o, lse = _attention(ctx, plain, args[:-1])
    sink = args[-1] if node.inputs[-1].type.dtype == "float32" else ctx.emit(relax.op.astype(args[-1], "float32"))
    kept = ctx.emit(relax.op.sigmoid(ctx.emit(relax.op.subtract(
        ctx.emit(relax.op.reshape(lse, [*rows.shape, 1])), sink))))
    wide = o if out.type.dtype == "float32" else ctx.emit(relax.op.astype(o, "float32"))
    zero = const(np.zeros((), np.float32))
    y = ctx.emit(relax.op.where(ctx.emit(relax.op.equal(kept, zero)), zero,
                                ctx.emit(relax.op.multiply(wide, kept))))
    return y if out.type.dtype == "float32" else relax.op.astype(y, out.type.dtype)


def _grouped(ctx, x, shape: tuple[int, ...], batch: tuple[int, ...], full: bool = False):
    """A key or value repeated along each batch dim that groups q's (neither q's size nor 1) to q's size: query index
    i reads i // group (``bmc.ops.linalg.grouped``); dims of 1 are left to broadcast unless ``full``."""
    for axis, (a, b) in enumerate(zip(batch, shape[:-2])):
        if b != a and (full or b != 1):
            x = ctx.emit(relax.op.repeat(x, a // b, axis=axis))
    return x


def _softmax_lse(ctx, node, s, times_v):
    """``[times_v(softmax(s)), logsumexp(s)]`` (``times_v``: the product with v) about each row's max (0 for a row
    of -inf, whose sum is then 0 and its log-sum-exp -inf), 16-bit scores in float32; the log-sum-exp is float32."""
    from bmc.codegen.lower import const
    from bmc.ir.types import np_dtype

    dtype = node.outputs[0].type.dtype
    wide = "float32" if dtype in ACCUMULATE_IN_FLOAT32 else dtype
    s = ctx.emit(relax.op.astype(s, wide)) if wide != dtype else s
    top = ctx.emit(relax.op.max(s, axis=-1, keepdims=True))
    top = ctx.emit(relax.op.where(ctx.emit(relax.op.isinf(top)), const(np.zeros((), np_dtype(wide))), top))
    e = ctx.emit(relax.op.exp(ctx.emit(relax.op.subtract(s, top))))
    total = ctx.emit(relax.op.sum(e, axis=-1, keepdims=True))
    p = ctx.emit(relax.op.divide(e, total))
    p = ctx.emit(relax.op.astype(p, dtype)) if wide != dtype else p
    rows = ctx.emit(relax.op.squeeze(ctx.emit(relax.op.add(ctx.emit(relax.op.log(total)), top)), axis=[-1]))
    return [ctx.emit(times_v(p)), ctx.emit(relax.op.astype(rows, "float32")) if wide != "float32" else rows]


@lowering("gather_matmul")
def _gather_matmul(ctx, node, args):
    """On the CPU a call of ``bmc.cpu.gather_matmul`` (float32 or 16-bit: the rows of each expert gathered, one GEMM
    with its weight where it lies); elsewhere one kernel whose row ``s`` reads weight ``idx[s]`` (a row with an index
    outside the weights sums zeros), accumulating 16-bit operands in float32."""
    from tvm import te, tirx

    x, w, idx = args
    out = node.outputs[0].type
    transpose = node.attrs["transpose_w"]
    if ctx.target_kind == "llvm" and out.dtype in ("float32", "float16", "bfloat16"):
        from bmc.runtime.kernels import GATHER_MATMUL_KERNEL

        ctx.kernels.add(GATHER_MATMUL_KERNEL)
        return relax.call_dps_packed(GATHER_MATMUL_KERNEL, [x, w, idx, relax.expr.prim_value(int(transpose))],
                                     out_ty=relax.TensorType(list(out.shape), out.dtype))
    acc = "float32" if out.dtype in ACCUMULATE_IN_FLOAT32 else out.dtype

    def compute(x, w, idx):
        k = te.reduce_axis((0, x.shape[1]), name="k")
        experts = tirx.const(int(w.shape[0]), idx.dtype)

        def row(s, n):
            e = idx[s]
            valid = tirx.all(e >= tirx.const(0, idx.dtype), e < experts)
            e = tirx.if_then_else(valid, e, tirx.const(0, idx.dtype))
            weight = w[e, n, k] if transpose else w[e, k, n]
            term = x[s, k].astype(acc) * weight.astype(acc)
            return te.sum(tirx.if_then_else(valid, term, tirx.const(0, acc)), axis=k)

        y = te.compute((x.shape[0], w.shape[1] if transpose else w.shape[2]), row, name="gather_matmul")
        return y if acc == out.dtype else te.compute(y.shape, lambda *i: y(*i).astype(out.dtype), name="narrow")

    return ctx.bb.emit_te(compute, x, w, idx, primfunc_name_hint="gather_matmul")
