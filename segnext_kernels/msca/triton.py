"""MSCA in Triton: tile policy and launchers (the kernels: segnext_kernels/msca/triton_kernels.py).

Entry points (called by the custom op ``segnext::msca`` in ``segnext_kernels/ops.py``):
``msca_forward(u, *16 weights) -> out`` and ``msca_backward(grad, u, *16 weights) -> 17 grads``;
the forward in two launches, the backward in five, saving nothing but u (docs/kernels.md#msca-triton).

Debugging hooks: ``SEGNEXT_POISON=1`` (segnext_kernels/_env.py) fills every output and temporary
with NaN before the kernels write them (tests use it to prove that every element is written);
``TILES`` overrides tile sizes (tests use small tiles to exercise tile seams on small images).
"""
from __future__ import annotations

import torch
import triton

from .. import _env
from .triton_kernels import (NTAP, _HALO, _NPART, _STRIP_SLOTS, msca_dw5_backward_kernel,
                             msca_dw_forward_kernel, msca_pointwise_backward_kernel,
                             msca_pointwise_kernel, msca_pointwise_wgrad_kernel,
                             msca_strip_backward_kernel)

TILES: dict = {}  # overrides, e.g. {"dw": dict(TH=8, TW=8, BC=4), "max_programs": 3} (tests)


def _interpret() -> bool:
    return _env.triton_interpret()


# ============================================================================================
# launchers
# ============================================================================================
def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _on_gpu(t: torch.Tensor) -> bool:
    return t.is_cuda and not _interpret()


def _dw_tiles(C: int, which: str, gpu: bool) -> dict:
    """Tile sizes of the depthwise kernels. GPU values are untuned first guesses
    (docs/kernels.md#msca-triton):
    TW x BC = 256 (forward) / 128 (backward) fp32 values per [TW, BC] register tile, i.e. 2 / 1
    registers per thread per tile, so that the 31 rolling tiles fit without spills."""
    if gpu:
        # strip_bwd holds [32, TW, BC] tap stacks: TW x BC = 16 (2 registers per thread per
        # stack at 8 warps; BC = 1 keeps 16 contiguous pixels per row in NCHW) keeps it without
        # spills on sm_80 and sm_90 with every supported Triton; 16 x 2 spilled with triton 3.5
        # (sm_90, 16-bit NCHW), 16 x 4 more widely (tests/compile_launches.py checks).
        cfg = {"dw": dict(TH=64, TW=64, BC=4, num_warps=8),
               "strip_bwd": dict(TH=32, TW=16, BC=1, num_warps=8),
               "dw5_bwd": dict(TH=16, TW=32, BC=4, num_warps=4)}[which]
    else:  # interpreter: few big programs (its cost is per program and per op, not per element)
        cfg = {"dw": dict(TH=64, TW=32, BC=64, num_warps=4),
               "strip_bwd": dict(TH=64, TW=32, BC=64, num_warps=4),
               "dw5_bwd": dict(TH=64, TW=32, BC=64, num_warps=4)}[which]
    cfg.update(TILES.get(which, {}))
    cfg["BC"] = min(cfg["BC"], _next_pow2(C))
    return cfg


def _dw_grid(u: torch.Tensor, which: str):
    """(tile config, its (TH, TW, BC), the tile counts along W, H and C) of a depthwise kernel."""
    _, C, H, W = u.shape
    cfg = _dw_tiles(C, which, _on_gpu(u))
    TH, TW, BC = cfg["TH"], cfg["TW"], cfg["BC"]
    return cfg, (TH, TW, BC), (triton.cdiv(W, TW), triton.cdiv(H, TH), triton.cdiv(C, BC))


def _gemm_tiles(C: int, dtype: torch.dtype, gpu: bool) -> dict:
    """Tiles of the 1x1-conv kernels (tl.dot needs every dim >= 16). float32 runs the dot on
    CUDA cores ("ieee"), where ptxas holds a thread's share of both operands in registers
    before the FMAs (BK x its rows and columns of the tile): BK = 16, no software pipelining and
    a pinned register budget (left to itself, ptxas capped some kernels at 64-80 registers and
    spilled; with 2 stages or BK = 32 they spilled at 128). Chosen so that no kernel spills on
    sm_80 or sm_90 and shared memory stays far below an A100's 163 KB (BK=64 / 3 stages did
    not)."""
    bn = max(16, min(64, _next_pow2(C)))
    if gpu and dtype == torch.float32:
        cfg = dict(BM=64, BN=bn, BK=16, num_warps=8, num_stages=1, maxnreg=128)
    elif gpu:
        cfg = dict(BM=128, BN=bn, BK=min(bn, 32), num_warps=8, num_stages=2)
    else:
        cfg = dict(BM=64, BN=bn, BK=bn, num_warps=4, num_stages=1)
    cfg.update(TILES.get("gemm", {}))
    return cfg


def _launch_options(cfg: dict) -> dict:
    """The launch options (warps, stages, register budget) of a tile configuration."""
    return {k: cfg[k] for k in ("num_warps", "num_stages", "maxnreg") if k in cfg}


def _n_programs(n_tiles: int, device: torch.device, per_sm: int = 2) -> int:
    """Grid of the persistent kernels: a few programs per SM on a GPU (2: about what the
    depthwise kernels' registers allow resident per SM), one per tile otherwise."""
    n = n_tiles
    if device.type == "cuda" and not _interpret():
        n = min(n, torch.cuda.get_device_properties(device).multi_processor_count * per_sm)
    if "max_programs" in TILES:   # tests: make programs walk several tiles
        n = min(n, TILES["max_programs"])
    return max(1, n)


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # tf32 is unused for fp16/bf16 operands


def _empty(like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    t = torch.empty_like(like, dtype=dtype)
    if _env.poison():
        t.fill_(float("nan"))
    return t


def _scratch(n: int, device: torch.device) -> torch.Tensor:
    t = torch.empty(n, device=device, dtype=torch.float32)
    if _env.poison():
        t.fill_(float("nan"))
    return t


def _pixel_stride(t: torch.Tensor):
    """Stride between consecutive pixels (h*W + w) inside one image, or None if not uniform."""
    _, _, H, W = t.shape
    if W == 1:
        return t.stride(2)
    if H == 1 or t.stride(2) == W * t.stride(3):
        return t.stride(3)
    return None


def _standard(u: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """u itself when the kernels can address it with out's strides (the contiguous and
    channels_last cases), else a contiguous copy (then results are copied into ``out``)."""
    if u.stride() == out.stride() and _pixel_stride(u) is not None:
        return u
    return u.contiguous()


def _pack_dw_weights(dw_weights, CP: int) -> torch.Tensor:
    """The 14 depthwise weights/biases as one fp32 [NTAP, CP] tensor, tap-major (see _PACK)."""
    C = dw_weights[0].shape[0]
    wp = torch.zeros(NTAP, CP, device=dw_weights[0].device, dtype=torch.float32)
    wp[:, :C] = torch.cat([w.reshape(C, -1).float() for w in dw_weights], dim=1).t()
    return wp


def _launch_dw_forward(u: torch.Tensor, s: torch.Tensor, dw_weights) -> None:
    Bn, C, H, W = u.shape
    cfg, (TH, TW, BC), (n_tw, n_th, n_cb) = _dw_grid(u, "dw")
    n_tiles = n_tw * n_th * n_cb * Bn
    grid = _n_programs(n_tiles, u.device)
    scr = _scratch(grid * 2 * (TW + 2 * _HALO) * BC, u.device)
    wp = _pack_dw_weights(dw_weights, n_cb * BC)
    msca_dw_forward_kernel[(grid,)](
        u, s, scr, wp, C, H, W, *u.stride(), n_tw, n_th, n_cb, n_tiles,
        CP=n_cb * BC, TH=TH, TW=TW, BC=BC, **_launch_options(cfg))


def _check_index_range(u: torch.Tensor) -> None:
    # Offsets within one image are int32 in the kernels (the batch offset is int64).
    if u[0].numel() >= 2 ** 31:
        raise ValueError(f"u has {u[0].numel()} elements per image (shape {tuple(u.shape)}); the Triton "
                         "MSCA kernels support fewer than 2**31 per image: split the image")


def msca_forward(u, w0, b0, w0_1, b0_1, w0_2, b0_2, w1_1, b1_1, w1_2, b1_2, w2_1, b2_1, w2_2, b2_2,
                 w3, b3):
    """out = conv3(a + B7(a) + B11(a) + B21(a)) * u with a = dw5x5(u); out is empty_like(u)."""
    _check_index_range(u)
    out = _empty(u)
    uu = _standard(u, out)
    Bn, C, H, W = uu.shape
    s = _empty(uu)
    _launch_dw_forward(uu, s, (w0, b0, w0_1, b0_1, w0_2, b0_2, w1_1, b1_1, w1_2, b1_2,
                               w2_1, b2_1, w2_2, b2_2))
    o = out if out.stride() == uu.stride() else _empty(uu)
    cfg = _gemm_tiles(C, uu.dtype, _on_gpu(uu))
    grid = (triton.cdiv(H * W, cfg["BM"]), triton.cdiv(C, cfg["BN"]), Bn)
    msca_pointwise_kernel[grid](s, uu, w3, b3, o, H * W, C, uu.stride(0), uu.stride(1),
                                _pixel_stride(uu), BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"],
                                DOT_PRECISION=_dot_precision(uu.dtype),
                                **_launch_options(cfg))
    if o is not out:
        out.copy_(o)
    return out


def msca_backward(grad, u, w0, b0, w0_1, b0_1, w0_2, b0_2, w1_1, b1_1, w1_2, b1_2, w2_1, b2_1,
                  w2_2, b2_2, w3, b3):
    """(grad_u, then the 16 weight/bias gradients in the op's argument order)."""
    _check_index_range(u)
    grad_u_out = _empty(u)
    uu = _standard(u, grad_u_out)
    g = grad if grad.stride() == uu.stride() else _to_strides_of(grad, uu)
    Bn, C, H, W = uu.shape
    dw_weights = (w0, b0, w0_1, b0_1, w0_2, b0_2, w1_1, b1_1, w1_2, b1_2, w2_1, b2_1, w2_2, b2_2)
    # 1. recompute s
    s = _empty(uu)
    _launch_dw_forward(uu, s, dw_weights)
    # 2. grad_u <- g ⊙ z,  ds = (g ⊙ u) W3
    gu = grad_u_out if grad_u_out.stride() == uu.stride() else _empty(uu)
    ds = _empty(uu, torch.float32)
    gcfg = _gemm_tiles(C, uu.dtype, _on_gpu(uu))
    sP = _pixel_stride(uu)
    prec = _dot_precision(uu.dtype)
    grid = (triton.cdiv(H * W, gcfg["BM"]), triton.cdiv(C, gcfg["BN"]), Bn)
    msca_pointwise_backward_kernel[grid](s, uu, g, w3, b3, gu, ds, H * W, C, uu.stride(0),
                                         uu.stride(1), sP, BM=gcfg["BM"], BN=gcfg["BN"],
                                         BK=gcfg["BK"], DOT_PRECISION=prec,
                                         **_launch_options(gcfg))
    # 3. dW3, db3 (split over pixel tiles; partials summed in a fixed order)
    n_nt, n_kt = triton.cdiv(C, gcfg["BN"]), triton.cdiv(C, gcfg["BK"])
    n_mt = Bn * triton.cdiv(H * W, gcfg["BM"])
    split = max(1, min(n_mt, _n_programs(n_mt, uu.device, per_sm=2) // (n_nt * n_kt)))
    if not (uu.is_cuda and not _interpret()):
        split = min(split, 2)
    pw = _scratch(split * C * C, uu.device).view(split, C, C)
    pb = _scratch(split * C, uu.device).view(split, C)
    msca_pointwise_wgrad_kernel[(n_nt, n_kt, split)](
        s, uu, g, pw, pb, H * W, C, Bn, uu.stride(0), uu.stride(1), sP,
        BM=gcfg["BM"], BN=gcfg["BN"], BK=gcfg["BK"], DOT_PRECISION=prec,
        **_launch_options(gcfg))
    gw3 = pw.sum(0).to(w3.dtype).view_as(w3)
    gb3 = pb.sum(0).to(b3.dtype)
    del s
    # 4. strips backward -> da, strip weight-grad partials
    cfg, (TH, TW, BC), (n_tw, n_th, n_cb) = _dw_grid(uu, "strip_bwd")
    n_tiles = n_tw * n_th * n_cb * Bn
    nprog = _n_programs(n_tiles, uu.device)
    scr = _scratch(nprog * 8 * (TW + 2 * _HALO) * BC, uu.device)
    da = _empty(uu, torch.float32)
    part = _scratch(Bn * n_th * n_tw * C * _NPART, uu.device).view(Bn * n_th * n_tw, C, _NPART)
    msca_strip_backward_kernel[(nprog,)](
        uu, ds, da, part, scr, _pack_dw_weights(dw_weights, n_cb * BC), C, H, W, *uu.stride(),
        n_tw, n_th, n_cb, n_tiles, CP=n_cb * BC, TH=TH, TW=TW, BC=BC, **_launch_options(cfg))
    del ds
    psum = part.sum(0)   # [C, NPART], fixed order
    sl = {name: psum[:, o:o + n] for name, o, n in _STRIP_SLOTS}
    # 5. 5x5 backward: grad_u += dw5x5ᵀ(da); dw0, db0 partials
    cfg, (TH, TW, BC), (n_tw, n_th, n_cb) = _dw_grid(uu, "dw5_bwd")
    part5 = _scratch(Bn * n_th * n_tw * C * 32, uu.device).view(Bn * n_th * n_tw, C, 32)
    msca_dw5_backward_kernel[(n_th * n_tw, n_cb, Bn)](
        uu, da, gu, _pack_dw_weights(dw_weights, n_cb * BC), part5, C, H, W, *uu.stride(), n_tw,
        CP=n_cb * BC, TH=TH, TW=TW, BC=BC, **_launch_options(cfg))
    p5 = part5.sum(0)
    if gu is not grad_u_out:
        grad_u_out.copy_(gu)

    def cast(x, like):  # a fresh tensor each: outputs of a custom op must not alias each other
        return x.to(like.dtype, copy=True).reshape(like.shape)

    return (grad_u_out,
            cast(p5[:, :25], w0), cast(p5[:, 25], b0),
            cast(sl["w0_1"], w0_1), cast(sl["b0_1"], b0_1),
            cast(sl["w0_2"], w0_2), cast(sl["b_2"], b0_2),
            cast(sl["w1_1"], w1_1), cast(sl["b1_1"], b1_1),
            cast(sl["w1_2"], w1_2), cast(sl["b_2"], b1_2),
            cast(sl["w2_1"], w2_1), cast(sl["b2_1"], b2_1),
            cast(sl["w2_2"], w2_2), cast(sl["b_2"], b2_2),
            gw3, gb3)


def _to_strides_of(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    y = torch.empty_strided(like.shape, like.stride(), dtype=x.dtype, device=x.device)
    y.copy_(x)
    return y
