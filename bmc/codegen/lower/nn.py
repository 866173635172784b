"""Relax lowering of convolution and pooling (1-D, 2-D and 3-D; NCW / NCHW / NCDHW)."""

from __future__ import annotations

from tvm import relax

from bmc.codegen.lower import lowering
from bmc.errors import CompileError

_R = relax.op


def _spatial(node, what):
    nd = node.inputs[0].type.rank - 2
    if nd not in (1, 2, 3):
        raise CompileError(f"{what} with {nd} spatial dims is not supported yet (1-D to 3-D are)",
                           where=f"node {node.source or node.op}")
    return nd


def _defaults(node, nd):
    a = node.attrs
    return (list(a["strides"]) or [1] * nd, list(a["pads"]) or [0] * (2 * nd), list(a["dilations"]) or [1] * nd)


@lowering("conv")
def _conv(ctx, node, args):
    nd = _spatial(node, "conv")
    strides, pads, dil = _defaults(node, nd)
    x, w = args
    out_shape = None
    if nd == 1 and ctx.target_kind == "llvm":
        # a 1-D convolution as a 2-D one of height 1 (reshapes are views): the CPU's native kernels take it (the
        # GEMM, the direct loop of small groups); TVM's conv1d loop nest took 60-100x onnxruntime's time (Whisper's
        # and wav2vec2's front ends)
        out_shape = node.outputs[0].type.shape
        x = ctx.emit(_R.reshape(x, [*node.inputs[0].type.shape[:2], 1, node.inputs[0].type.shape[2]]))
        w = ctx.emit(_R.reshape(w, [*node.inputs[1].type.shape[:2], 1, node.inputs[1].type.shape[2]]))
        nd, strides, pads, dil = 2, [1, *strides], [0, pads[0], 0, pads[1]], [1, *dil]
    fn = (_R.nn.conv1d, _R.nn.conv2d, _R.nn.conv3d)[nd - 1]
    dtype = node.inputs[0].type.dtype
    wide = dtype in ("float16", "bfloat16")  # float32 accumulation
    y = fn(x, w, strides=strides, padding=pads, dilation=dil, groups=node.attrs["group"],
           **({"out_dtype": "float32"} if wide else {}))
    if wide:
        y = _R.astype(ctx.emit(y), dtype)
    return y if out_shape is None else _R.reshape(ctx.emit(y), list(out_shape))


@lowering("max_pool", "avg_pool")
def _pool(ctx, node, args):
    nd = _spatial(node, node.op)
    strides, pads, dil = _defaults(node, nd)
    kw = dict(pool_size=list(node.attrs["kernel"]), strides=strides, padding=pads, dilation=dil,
              ceil_mode=node.attrs["ceil_mode"])
    if node.op == "max_pool":
        x, dtype = args[0], node.inputs[0].type.dtype
        # 8- and 16-bit integers (an int8 CNN's pooling) through float32, which holds them exactly: TVM's CPU loop
        # of the same schedule ran 5x slower on uint8 (822 vs 155 µs for 64 x 112 x 112, 3x3 stride 2)
        widen = ctx.target_kind == "llvm" and dtype in ("uint8", "int8", "uint16", "int16")
        if widen:
            x = ctx.emit(_R.astype(x, "float32"))
        y = (_R.nn.max_pool1d, _R.nn.max_pool2d, _R.nn.max_pool3d)[nd - 1](x, **kw)
        return _R.astype(ctx.emit(y), dtype) if widen else y
    return (_R.nn.avg_pool1d, _R.nn.avg_pool2d, _R.nn.avg_pool3d)[nd - 1](
        args[0], count_include_pad=node.attrs["count_include_pad"], **kw)
