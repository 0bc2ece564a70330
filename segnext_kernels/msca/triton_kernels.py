"""MSCA in Triton: the kernels (launched by segnext_kernels/msca/triton.py).

    out = (W3 · s + b3) ⊙ u,   s = a + B7(a) + B11(a) + B21(a),   a = dw5x5(u),
    Bk = dw(k×1) ∘ dw(1×k) (horizontal first); every depthwise conv has a bias and zero 'same' padding.

Forward: ``msca_dw_forward_kernel`` (the depthwise part over large tiles, walking rows so that
vertical taps reuse registers, writing only s), then ``msca_pointwise_kernel`` (the 1x1 conv on
``tl.dot`` with the bias and ⊙u in its epilogue). Backward: recompute s;
``msca_pointwise_backward_kernel``; ``msca_pointwise_wgrad_kernel``;
``msca_strip_backward_kernel`` (recomputing a and h); ``msca_dw5_backward_kernel``. Weight gradients are per-program partial sums in the slots below,
reduced in a fixed order by the launchers (deterministic, no atomics). The reasoning, the floor
and the design estimates: docs/kernels.md#msca-triton.
"""
from __future__ import annotations

import math

import triton
import triton.language as tl

from .reference import MSCAWeights, weight_shapes

_HALO = 10       # the 21-tap strips reach 10 pixels each way
_NPART = 128     # partial-gradient slots per channel of the strip backward (see _STRIP_SLOTS)
HALO = tl.constexpr(_HALO)
HB = tl.constexpr(32)        # halo block: 2*HALO = 20 halo columns, padded to a power of two
NPART = tl.constexpr(_NPART)
# (name, taps) of the 14 depthwise weights and biases, from the reference's contract
_PACK = tuple((name, math.prod(shape[1:]) if len(shape) > 1 else 1)
              for name, shape in zip(MSCAWeights._fields[:14], weight_shapes(1)[:14]))

# Slots of the strip backward partials, per channel: (grad name, first slot, taps). Each strip
# weight takes a power-of-two block (the kernel stores a whole [8|16|32, BC] register tile);
# "b_2" is the summed bias gradient of the three vertical strips.
_TAPS = dict(_PACK)
_STRIP_GRADS = tuple((n, _TAPS[n]) for n in ("w0_1", "w1_1", "w2_1", "w0_2", "w1_2", "w2_2")) + (
    ("b0_1", 1), ("b1_1", 1), ("b2_1", 1), ("b_2", 1))
_STRIP_SLOTS, _slot = [], 0
for _name, _taps in _STRIP_GRADS:
    _STRIP_SLOTS.append((_name, _slot, _taps))
    _slot += triton.next_power_of_2(_taps)
assert _slot <= _NPART
_SLOT = {name: tl.constexpr(first) for name, first, _ in _STRIP_SLOTS}
S7H, S11H, S21H = _SLOT["w0_1"], _SLOT["w1_1"], _SLOT["w2_1"]
S7V, S11V, S21V = _SLOT["w0_2"], _SLOT["w1_2"], _SLOT["w2_2"]
SB7H, SB11H, SB21H, SBV = _SLOT["b0_1"], _SLOT["b1_1"], _SLOT["b2_1"], _SLOT["b_2"]


# ============================================================================================
# packed depthwise weights: one fp32 [NTAP, CP] tensor, tap-major (a tap's weights for a channel
# block are one contiguous vector), channels zero-padded to CP = a multiple of BC (no masks)
# ============================================================================================
_OFF = {}
_o = 0
for _name, _n in _PACK:
    _OFF[_name] = _o
    _o += _n
NTAP = _o                                       # 110
W0 = tl.constexpr(_OFF["w0"])                   # 5x5: tap 5*i + j
B0 = tl.constexpr(_OFF["b0"])
W7H = tl.constexpr(_OFF["w0_1"])                # 1x7 (horizontal)
B7H = tl.constexpr(_OFF["b0_1"])
W7V = tl.constexpr(_OFF["w0_2"])                # 7x1 (vertical)
B7V = tl.constexpr(_OFF["b0_2"])
W11H = tl.constexpr(_OFF["w1_1"])
B11H = tl.constexpr(_OFF["b1_1"])
W11V = tl.constexpr(_OFF["w1_2"])
B11V = tl.constexpr(_OFF["b1_2"])
W21H = tl.constexpr(_OFF["w2_1"])
B21H = tl.constexpr(_OFF["b2_1"])
W21V = tl.constexpr(_OFF["w2_2"])
B21V = tl.constexpr(_OFF["b2_2"])


# ============================================================================================
# small jit helpers
# ============================================================================================
@triton.jit
def _wstack(wt, off: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, CP: tl.constexpr):
    """All K taps of one depthwise weight as a [KP, 1, BC] stack (slots >= K are 0);
    ``wt`` = packed weights + channel block, shaped [1, BC]."""
    i = tl.arange(0, KP)
    return tl.load(wt + (i + off)[:, None] * CP, mask=(i < K)[:, None], other=0.0)[:, None, :]


@triton.jit
def _load_stack(base, rows, rows_ok, cols, cols_ok, sH, sW, ch_off, ch_ok):
    """[K, N, BC] fp32 stack: slot k holds image row rows[k] at columns ``cols``; 0 outside."""
    ptr = base + rows[:, None, None] * sH + cols[None, :, None] * sW + ch_off[None, None, :]
    m = rows_ok[:, None, None] & cols_ok[None, :, None] & ch_ok[None, None, :]
    return tl.load(ptr, mask=m, other=0.0).to(tl.float32)


@triton.jit
def _scratch_stack(row_ptr, x, off, off_ok, BC: tl.constexpr):
    """[K, N, BC] stack of shifted reads of a scratch row: slot k reads positions x + off[k]."""
    c = tl.arange(0, BC)
    ptr = row_ptr + (x[None, :, None] + off[:, None, None]) * BC + c[None, None, :]
    return tl.load(ptr, mask=off_ok[:, None, None], other=0.0)


@triton.jit
def _store_scratch_row(row_ptr, xm, main, h_pos, h_lane, halo, BC: tl.constexpr):
    """Write a row (main columns at positions xm+10, halo lanes at h_pos) to a scratch row."""
    c = tl.arange(0, BC)
    tl.store(row_ptr + (xm + HALO)[:, None] * BC + c[None, :], main)
    tl.store(row_ptr + h_pos[:, None] * BC + c[None, :], halo, mask=h_lane[:, None])


@triton.jit
def _dw5_feed(A0, A1, A2, A3, A4, AH0, AH1, AH2, AH3, AH4, u_row, u_ok, cols_m, cols_h, h_lane,
              W, sW, ch_off, ch_ok, wt, CP: tl.constexpr, dx: tl.constexpr):
    """Load u row yu at column shift dx-2 (tile columns and halo lanes) and add it into the
    rolling 5x5 accumulators of a rows yu-2 (A0, kernel row 4) .. yu+2 (A4, kernel row 0)."""
    cm = cols_m + (dx - 2)
    chh = cols_h + (dx - 2)
    # `!= 0`: the interpreter splats the scalar i1 u_ok to int32, which tl.load refuses as mask
    mm = ((u_ok & (cm >= 0) & (cm < W))[:, None] & ch_ok[None, :]) != 0
    mh = ((u_ok & h_lane & (chh >= 0) & (chh < W))[:, None] & ch_ok[None, :]) != 0
    um = tl.load(u_row + cm[:, None] * sW + ch_off[None, :], mask=mm, other=0.0).to(tl.float32)
    uh = tl.load(u_row + chh[:, None] * sW + ch_off[None, :], mask=mh, other=0.0).to(tl.float32)
    w = tl.load(wt + (W0 + 20 + dx) * CP)
    A0 += w * um
    AH0 += w * uh
    w = tl.load(wt + (W0 + 15 + dx) * CP)
    A1 += w * um
    AH1 += w * uh
    w = tl.load(wt + (W0 + 10 + dx) * CP)
    A2 += w * um
    AH2 += w * uh
    w = tl.load(wt + (W0 + 5 + dx) * CP)
    A3 += w * um
    AH3 += w * uh
    w = tl.load(wt + (W0 + dx) * CP)
    A4 += w * um
    AH4 += w * uh
    return A0, A1, A2, A3, A4, AH0, AH1, AH2, AH3, AH4


@triton.jit
def _dw5_row(A0, A1, A2, A3, A4, AH0, AH1, AH2, AH3, AH4, y, y_lo, H, u_b, sH, cols_m, cols_h,
             h_lane, colok_m, colok_h, W, sW, ch_off, ch_ok, wt, bias_a, zm, zh,
             CP: tl.constexpr):
    """Feed u row y+2 into the rolling 5x5 and complete a row y (tile columns a_m, halo lanes
    a_h; zero outside the image, since it is the padded input of the strips). Returns the a row
    and the accumulators rolled by one row (shared by the forward and the strip backward)."""
    yu = y + 2
    u_row = u_b + yu * sH
    u_ok = (yu >= 0) & (yu < H)
    for dx in tl.static_range(5):
        A0, A1, A2, A3, A4, AH0, AH1, AH2, AH3, AH4 = _dw5_feed(
            A0, A1, A2, A3, A4, AH0, AH1, AH2, AH3, AH4, u_row, u_ok, cols_m, cols_h,
            h_lane, W, sW, ch_off, ch_ok, wt, CP, dx)
    y_ok = (y >= y_lo) & (y < H)
    a_m = tl.where((y_ok & colok_m)[:, None], A0 + bias_a, 0.0)
    a_h = tl.where((y_ok & colok_h)[:, None], AH0 + bias_a, 0.0)
    return a_m, a_h, A1, A2, A3, A4, zm, AH1, AH2, AH3, AH4, zh


@triton.jit
def _vcontrib(m: tl.constexpr, a, h7, h11, h21, wt, CP: tl.constexpr):
    """What a row y and the h rows y add to s row y - 10 + m (the vertical taps, seen from h):
    tap j of a k-tap strip maps h row y to s row y - j + k//2."""
    c = tl.load(wt + (W21V + 20 - m) * CP) * h21
    if m >= 5:
        if m <= 15:
            c += tl.load(wt + (W11V + 15 - m) * CP) * h11
    if m >= 7:
        if m <= 13:
            c += tl.load(wt + (W7V + 13 - m) * CP) * h7
    if m == 10:
        c += a
    return c


@triton.jit
def _tile_coords(tile, n_tw, n_th, n_cb):
    """Persistent tile index -> (batch, channel block, row tile, column tile); columns fastest."""
    tc = tile % n_tw
    t = tile // n_tw
    tr = t % n_th
    t = t // n_th
    return t // n_cb, t % n_cb, tr, tc


# ============================================================================================
# forward 1: depthwise part, writes s only
# ============================================================================================
@triton.jit
def msca_dw_forward_kernel(
        u_ptr, s_ptr, scr_ptr, wp, C, H, W, sB, sC, sH, sW, n_tw, n_th, n_cb, n_tiles,
        CP: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr, BC: tl.constexpr):
    pid = tl.program_id(0)
    scr = scr_ptr + pid * (2 * (TW + 2 * HALO) * BC)   # two ping-pong scratch rows
    xm = tl.arange(0, TW)
    xh = tl.arange(0, HB)
    cb = tl.arange(0, BC)
    h_lane = xh < 2 * HALO                               # halo lanes in use
    h_pos = tl.where(xh < HALO, xh, xh + TW)             # their scratch positions
    zm = tl.zeros([TW, BC], dtype=tl.float32)
    zh = tl.zeros([HB, BC], dtype=tl.float32)
    for tile in range(pid, n_tiles, tl.num_programs(0)):
        b, cblk, tr, tc = _tile_coords(tile, n_tw, n_th, n_cb)
        r0 = tr * TH
        c0 = tc * TW
        ch = cblk * BC + cb
        ch_ok = ch < C
        ch_off = ch * sC
        wt = wp + ch[None, :]                            # this block's packed weights
        cols_m = c0 + xm
        cols_h = tl.where(xh < HALO, c0 - HALO + xh, c0 + TW - HALO + xh)
        colok_m = cols_m < W
        colok_h = h_lane & (cols_h >= 0) & (cols_h < W)
        u_b = u_ptr + b.to(tl.int64) * sB
        s_b = s_ptr + b.to(tl.int64) * sB
        bias_a = tl.load(wt + B0 * CP)
        bias_h7 = tl.load(wt + B7H * CP)
        bias_h11 = tl.load(wt + B11H * CP)
        bias_h21 = tl.load(wt + B21H * CP)
        bias_s = tl.load(wt + B7V * CP) + tl.load(wt + B11V * CP) + tl.load(wt + B21V * CP)
        # rolling 5x5 accumulators: A_i (tile columns) / AH_i (halo lanes) = a row y-2+i
        A0 = zm
        A1 = zm
        A2 = zm
        A3 = zm
        A4 = zm
        AH0 = zh
        AH1 = zh
        AH2 = zh
        AH3 = zh
        AH4 = zh
        # rolling vertical accumulators: S_m = s row y-10+m
        S0 = zm
        S1 = zm
        S2 = zm
        S3 = zm
        S4 = zm
        S5 = zm
        S6 = zm
        S7 = zm
        S8 = zm
        S9 = zm
        S10 = zm
        S11 = zm
        S12 = zm
        S13 = zm
        S14 = zm
        S15 = zm
        S16 = zm
        S17 = zm
        S18 = zm
        S19 = zm
        S20 = zm
        y_lo = tl.maximum(r0 - HALO, 0)      # first a/h row that matters (earlier ones are 0)
        r_end = tl.minimum(r0 + TH, H)
        tl.debug_barrier()                   # scratch of the previous tile fully read
        # y = the a/h row completed in this iteration; the first 4 only fill the 5x5 pipeline
        for y in range(y_lo - 4, r_end + HALO):
            a_m, a_h, A0, A1, A2, A3, A4, AH0, AH1, AH2, AH3, AH4 = _dw5_row(
                A0, A1, A2, A3, A4, AH0, AH1, AH2, AH3, AH4, y, y_lo, H, u_b, sH, cols_m,
                cols_h, h_lane, colok_m, colok_h, W, sW, ch_off, ch_ok, wt, bias_a, zm, zh, CP)
            y_ok = (y >= y_lo) & (y < H)  # the h rows of y are zero outside the image too
            row = scr + ((y - y_lo) & 1) * ((TW + 2 * HALO) * BC)
            _store_scratch_row(row, xm, a_m, h_pos, h_lane, a_h, BC)
            tl.debug_barrier()               # the row is visible to every thread of the program
            # horizontal strips: scratch position x + j holds a(y, x + j - 10); one load feeds
            # the taps of all three strips that reach that far
            rp = row + xm[:, None] * BC + cb[None, :]
            h7 = zm
            h11 = zm
            h21 = zm
            for j in tl.static_range(2 * HALO + 1):
                aj = tl.load(rp + j * BC)
                h21 += tl.load(wt + (W21H + j) * CP) * aj
                if j >= 5:
                    if j < 16:
                        h11 += tl.load(wt + (W11H + j - 5) * CP) * aj
                if j >= 7:
                    if j < 14:
                        h7 += tl.load(wt + (W7H + j - 7) * CP) * aj
            # h rows outside the image are the zero padding of the vertical strips
            h7 = tl.where(y_ok, h7 + bias_h7, 0.0)
            h11 = tl.where(y_ok, h11 + bias_h11, 0.0)
            h21 = tl.where(y_ok, h21 + bias_h21, 0.0)
            # vertical strips: h row y feeds s rows y-10 .. y+10; s row y-10 is complete
            s_row = S0 + _vcontrib(0, a_m, h7, h11, h21, wt, CP) + bias_s
            S0 = S1 + _vcontrib(1, a_m, h7, h11, h21, wt, CP)
            S1 = S2 + _vcontrib(2, a_m, h7, h11, h21, wt, CP)
            S2 = S3 + _vcontrib(3, a_m, h7, h11, h21, wt, CP)
            S3 = S4 + _vcontrib(4, a_m, h7, h11, h21, wt, CP)
            S4 = S5 + _vcontrib(5, a_m, h7, h11, h21, wt, CP)
            S5 = S6 + _vcontrib(6, a_m, h7, h11, h21, wt, CP)
            S6 = S7 + _vcontrib(7, a_m, h7, h11, h21, wt, CP)
            S7 = S8 + _vcontrib(8, a_m, h7, h11, h21, wt, CP)
            S8 = S9 + _vcontrib(9, a_m, h7, h11, h21, wt, CP)
            S9 = S10 + _vcontrib(10, a_m, h7, h11, h21, wt, CP)
            S10 = S11 + _vcontrib(11, a_m, h7, h11, h21, wt, CP)
            S11 = S12 + _vcontrib(12, a_m, h7, h11, h21, wt, CP)
            S12 = S13 + _vcontrib(13, a_m, h7, h11, h21, wt, CP)
            S13 = S14 + _vcontrib(14, a_m, h7, h11, h21, wt, CP)
            S14 = S15 + _vcontrib(15, a_m, h7, h11, h21, wt, CP)
            S15 = S16 + _vcontrib(16, a_m, h7, h11, h21, wt, CP)
            S16 = S17 + _vcontrib(17, a_m, h7, h11, h21, wt, CP)
            S17 = S18 + _vcontrib(18, a_m, h7, h11, h21, wt, CP)
            S18 = S19 + _vcontrib(19, a_m, h7, h11, h21, wt, CP)
            S19 = S20 + _vcontrib(20, a_m, h7, h11, h21, wt, CP)
            S20 = zm
            yo = y - HALO
            o_ok = (yo >= r0) & (yo < r_end)
            tl.store(s_b + yo * sH + cols_m[:, None] * sW + ch_off[None, :],
                     s_row.to(s_ptr.dtype.element_ty),
                     mask=((o_ok & colok_m)[:, None] & ch_ok[None, :]) != 0)


# ============================================================================================
# forward 2: 1x1 conv on tensor cores, bias and ⊙u in the epilogue
# ============================================================================================
@triton.jit
def msca_pointwise_kernel(s_ptr, u_ptr, w_ptr, b_ptr, out_ptr, HW, C, sB, sC, sP,
                          BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                          DOT_PRECISION: tl.constexpr):
    """out[b, n, p] = (Σ_k W[n, k] s[b, k, p] + bias[n]) · u[b, n, p]; p = pixel (stride sP)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    base = tl.program_id(2).to(tl.int64) * sB
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    m_ok = offs_m < HW
    n_ok = offs_n < C
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, C, BK):
        offs_k = k0 + tl.arange(0, BK)
        k_ok = offs_k < C
        s_t = tl.load(s_ptr + base + offs_m[:, None] * sP + offs_k[None, :] * sC,
                      mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w_t = tl.load(w_ptr + offs_n[None, :] * C + offs_k[:, None],   # W3ᵀ tile [BK, BN]
                      mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(s_t, w_t, acc, input_precision=DOT_PRECISION)
    bias = tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    off = base + offs_m[:, None] * sP + offs_n[None, :] * sC
    mask = m_ok[:, None] & n_ok[None, :]
    u_t = tl.load(u_ptr + off, mask=mask, other=0.0).to(tl.float32)
    out = (acc + bias[None, :]) * u_t
    tl.store(out_ptr + off, out.to(out_ptr.dtype.element_ty), mask=mask)


# ============================================================================================
# backward 2: 1x1 conv backward for the activations
# ============================================================================================
@triton.jit
def msca_pointwise_backward_kernel(s_ptr, u_ptr, g_ptr, w_ptr, b_ptr, gu_ptr, ds_ptr,
                                   HW, C, sB, sC, sP,
                                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                                   DOT_PRECISION: tl.constexpr):
    """grad_u[:, n] = g ⊙ (s W3ᵀ + b3)[:, n]  and  ds[:, n] = Σ_k (g ⊙ u)[:, k] W3[k, n].
    Two loops one after the other, so that only one accumulator tile is live at a time."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    base = tl.program_id(2).to(tl.int64) * sB
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    m_ok = offs_m < HW
    n_ok = offs_n < C
    off = base + offs_m[:, None] * sP + offs_n[None, :] * sC
    mask = m_ok[:, None] & n_ok[None, :]
    z = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, C, BK):
        offs_k = k0 + tl.arange(0, BK)
        k_ok = offs_k < C
        s_t = tl.load(s_ptr + base + offs_m[:, None] * sP + offs_k[None, :] * sC,
                      mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(w_ptr + offs_n[None, :] * C + offs_k[:, None],     # W3[n, k] as [BK, BN]
                     mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        z = tl.dot(s_t, wt, z, input_precision=DOT_PRECISION)
    bias = tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    g_t = tl.load(g_ptr + off, mask=mask, other=0.0).to(tl.float32)
    tl.store(gu_ptr + off, (g_t * (z + bias[None, :])).to(gu_ptr.dtype.element_ty), mask=mask)
    ds = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, C, BK):
        offs_k = k0 + tl.arange(0, BK)
        k_ok = offs_k < C
        mk = m_ok[:, None] & k_ok[None, :]
        off_k = base + offs_m[:, None] * sP + offs_k[None, :] * sC
        dz = (tl.load(g_ptr + off_k, mask=mk, other=0.0).to(tl.float32)
              * tl.load(u_ptr + off_k, mask=mk, other=0.0).to(tl.float32))
        w_kn = tl.load(w_ptr + offs_k[:, None] * C + offs_n[None, :],   # W3[k, n] as [BK, BN]
                       mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        ds = tl.dot(dz.to(w_kn.dtype), w_kn, ds, input_precision=DOT_PRECISION)
    tl.store(ds_ptr + off, ds, mask=mask)


# ============================================================================================
# backward 3: 1x1 conv weight gradient, split over pixels (deterministic partials)
# ============================================================================================
@triton.jit
def msca_pointwise_wgrad_kernel(s_ptr, u_ptr, g_ptr, pw_ptr, pb_ptr, HW, C, B, sB, sC, sP,
                                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                                DOT_PRECISION: tl.constexpr):
    """Partial dW3[n, k] = Σ_p (g ⊙ u)[p, n] s[p, k] and db3[n] over this program's pixel tiles."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_s = tl.program_id(2)
    n_split = tl.num_programs(2)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = pid_k * BK + tl.arange(0, BK)
    n_ok = offs_n < C
    k_ok = offs_k < C
    acc = tl.zeros([BN, BK], dtype=tl.float32)
    acc_b = tl.zeros([BN], dtype=tl.float32)
    n_mt = tl.cdiv(HW, BM)
    for t in range(pid_s, B * n_mt, n_split):
        base = (t // n_mt).to(tl.int64) * sB
        offs_m = (t % n_mt) * BM + tl.arange(0, BM)
        m_ok = offs_m < HW
        mn = m_ok[:, None] & n_ok[None, :]
        off_n = base + offs_m[:, None] * sP + offs_n[None, :] * sC
        dz = (tl.load(g_ptr + off_n, mask=mn, other=0.0).to(tl.float32)
              * tl.load(u_ptr + off_n, mask=mn, other=0.0).to(tl.float32))
        s_t = tl.load(s_ptr + base + offs_m[:, None] * sP + offs_k[None, :] * sC,
                      mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(tl.trans(dz.to(s_t.dtype)), s_t, acc, input_precision=DOT_PRECISION)
        acc_b += tl.sum(dz, axis=0)
    pw = pw_ptr + pid_s.to(tl.int64) * C * C
    tl.store(pw + offs_n[:, None] * C + offs_k[None, :], acc, mask=n_ok[:, None] & k_ok[None, :])
    if pid_k == 0:
        tl.store(pb_ptr + pid_s.to(tl.int64) * C + offs_n, acc_b, mask=n_ok)


# ============================================================================================
# backward 4: the strips backward (dh, da, strip weight-grad products), rolling rows
# ============================================================================================
@triton.jit
def msca_strip_backward_kernel(
        u_ptr, ds_ptr, da_ptr, part_ptr, scr_ptr, wp, C, H, W, sB, sC, sH, sW,
        n_tw, n_th, n_cb, n_tiles,
        CP: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr, BC: tl.constexpr):
    """Per tile (TH x TW owned pixels x BC channels), with r_k = k // 2:
    dh_k(y, x) = Σ_j w_k2[j] ds(y - j + r_k, x)         da = ds + Σ_k Σ_j w_k1[j] dh_k(y, x - j + r_k)
    dw_k2[j] += Σ h_k(y, x) ds(y - j + r_k, x)  (ds owned)   dw_k1[j] += Σ dh_k(y, x) a(y, x + j - r_k)
    db_k1 += Σ dh_k,  db_2 += Σ ds  (owned pixels).  ds rows come from memory as [taps, TW, BC]
    stacks; a and dh rows go through per-program scratch rows for their horizontal shifts."""
    pid = tl.program_id(0)
    SROW: tl.constexpr = (TW + 2 * HALO) * BC
    scr_a = scr_ptr + pid * (8 * SROW)     # 2 slots for a, then 2 slots x 3 strips for dh
    scr_dh = scr_a + 2 * SROW
    xm = tl.arange(0, TW)
    xh = tl.arange(0, HB)
    cb = tl.arange(0, BC)
    i8 = tl.arange(0, 8)
    i16 = tl.arange(0, 16)
    i32 = tl.arange(0, 32)
    h_lane = xh < 2 * HALO
    h_pos = tl.where(xh < HALO, xh, xh + TW)
    zm = tl.zeros([TW, BC], dtype=tl.float32)
    zh = tl.zeros([HB, BC], dtype=tl.float32)
    for tile in range(pid, n_tiles, tl.num_programs(0)):
        b, cblk, tr, tc = _tile_coords(tile, n_tw, n_th, n_cb)
        r0 = tr * TH
        c0 = tc * TW
        ch = cblk * BC + cb
        ch_ok = ch < C
        ch_off = ch * sC
        wt = wp + ch[None, :]
        cols_m = c0 + xm
        cols_h = tl.where(xh < HALO, c0 - HALO + xh, c0 + TW - HALO + xh)
        colok_m = cols_m < W
        colok_h = h_lane & (cols_h >= 0) & (cols_h < W)
        u_b = u_ptr + b.to(tl.int64) * sB
        ds_b = ds_ptr + b.to(tl.int64) * sB
        da_b = da_ptr + b.to(tl.int64) * sB
        bias_a = tl.load(wt + B0 * CP)
        bias_h7 = tl.load(wt + B7H * CP)
        bias_h11 = tl.load(wt + B11H * CP)
        bias_h21 = tl.load(wt + B21H * CP)
        wh7 = _wstack(wt, W7H, 7, 8, CP)
        wh11 = _wstack(wt, W11H, 11, 16, CP)
        wh21 = _wstack(wt, W21H, 21, 32, CP)
        wv7 = _wstack(wt, W7V, 7, 8, CP)
        wv11 = _wstack(wt, W11V, 11, 16, CP)
        wv21 = _wstack(wt, W21V, 21, 32, CP)
        g7_1 = tl.zeros([8, BC], dtype=tl.float32)
        g11_1 = tl.zeros([16, BC], dtype=tl.float32)
        g21_1 = tl.zeros([32, BC], dtype=tl.float32)
        g7_2 = tl.zeros([8, BC], dtype=tl.float32)
        g11_2 = tl.zeros([16, BC], dtype=tl.float32)
        g21_2 = tl.zeros([32, BC], dtype=tl.float32)
        gb7_1 = tl.zeros([BC], dtype=tl.float32)
        gb11_1 = tl.zeros([BC], dtype=tl.float32)
        gb21_1 = tl.zeros([BC], dtype=tl.float32)
        gb_2 = tl.zeros([BC], dtype=tl.float32)
        A0 = zm
        A1 = zm
        A2 = zm
        A3 = zm
        A4 = zm
        AH0 = zh
        AH1 = zh
        AH2 = zh
        AH3 = zh
        AH4 = zh
        y_lo = tl.maximum(r0 - HALO, 0)
        r_end = tl.minimum(r0 + TH, H)
        y_hi = tl.minimum(r_end + HALO, H)   # h rows up to 10 below the tile meet owned ds rows
        tl.debug_barrier()
        for y in range(y_lo - 4, y_hi):
            par = (y - y_lo) & 1
            # ---- recompute a row y (rolling 5x5, as in the forward) -> scratch
            a_m, a_h, A0, A1, A2, A3, A4, AH0, AH1, AH2, AH3, AH4 = _dw5_row(
                A0, A1, A2, A3, A4, AH0, AH1, AH2, AH3, AH4, y, y_lo, H, u_b, sH, cols_m,
                cols_h, h_lane, colok_m, colok_h, W, sW, ch_off, ch_ok, wt, bias_a, zm, zh, CP)
            y_ok = (y >= y_lo) & (y < H)  # the h rows of y are zero outside the image too
            arow = scr_a + par * SROW
            _store_scratch_row(arow, xm, a_m, h_pos, h_lane, a_h, BC)
            tl.debug_barrier()
            # ---- h rows: stack slot j holds a(y, x + j - r_k) (scratch position x + 10 + j - r_k)
            as7 = _scratch_stack(arow, xm, i8 + (HALO - 3), i8 < 7, BC)
            as11 = _scratch_stack(arow, xm, i16 + (HALO - 5), i16 < 11, BC)
            as21 = _scratch_stack(arow, xm, i32, i32 < 21, BC)
            h7 = tl.where(y_ok, tl.sum(wh7 * as7, axis=0) + bias_h7, 0.0)
            h11 = tl.where(y_ok, tl.sum(wh11 * as11, axis=0) + bias_h11, 0.0)
            h21 = tl.where(y_ok, tl.sum(wh21 * as21, axis=0) + bias_h21, 0.0)
            # ---- ds stacks: slot j holds ds(y - j + r_k) on the tile's columns
            rows7 = y - i8 + 3
            rows11 = y - i16 + 5
            rows21 = y - i32 + HALO
            rok7 = (i8 < 7) & (rows7 >= 0) & (rows7 < H)
            rok11 = (i16 < 11) & (rows11 >= 0) & (rows11 < H)
            rok21 = (i32 < 21) & (rows21 >= 0) & (rows21 < H)
            ds7 = _load_stack(ds_b, rows7, rok7, cols_m, colok_m, sH, sW, ch_off, ch_ok)
            ds11 = _load_stack(ds_b, rows11, rok11, cols_m, colok_m, sH, sW, ch_off, ch_ok)
            ds21 = _load_stack(ds_b, rows21, rok21, cols_m, colok_m, sH, sW, ch_off, ch_ok)
            # vertical weight grads: only ds rows owned by this tile count
            own7 = (rows7 >= r0) & (rows7 < r_end)
            own11 = (rows11 >= r0) & (rows11 < r_end)
            own21 = (rows21 >= r0) & (rows21 < r_end)
            g7_2 += tl.sum(h7[None, :, :] * tl.where(own7[:, None, None], ds7, 0.0), axis=1)
            g11_2 += tl.sum(h11[None, :, :] * tl.where(own11[:, None, None], ds11, 0.0), axis=1)
            g21_2 += tl.sum(h21[None, :, :] * tl.where(own21[:, None, None], ds21, 0.0), axis=1)
            if (y >= r0) & (y < r_end):
                # ---- owned row: dh (tile columns + halo), horizontal weight grads, da
                dmask = (colok_m[:, None] & ch_ok[None, :]) != 0
                ds_y = tl.load(ds_b + y * sH + cols_m[:, None] * sW + ch_off[None, :], mask=dmask,
                               other=0.0)
                gb_2 += tl.sum(ds_y, axis=0)
                dh7 = tl.sum(wv7 * ds7, axis=0)
                dh11 = tl.sum(wv11 * ds11, axis=0)
                dh21 = tl.sum(wv21 * ds21, axis=0)
                g7_1 += tl.sum(dh7[None, :, :] * as7, axis=1)
                g11_1 += tl.sum(dh11[None, :, :] * as11, axis=1)
                g21_1 += tl.sum(dh21[None, :, :] * as21, axis=1)
                gb7_1 += tl.sum(dh7, axis=0)
                gb11_1 += tl.sum(dh11, axis=0)
                gb21_1 += tl.sum(dh21, axis=0)
                dh7_h = tl.sum(wv7 * _load_stack(ds_b, rows7, rok7, cols_h, colok_h, sH, sW,
                                                 ch_off, ch_ok), axis=0)
                dh11_h = tl.sum(wv11 * _load_stack(ds_b, rows11, rok11, cols_h, colok_h, sH, sW,
                                                   ch_off, ch_ok), axis=0)
                dh21_h = tl.sum(wv21 * _load_stack(ds_b, rows21, rok21, cols_h, colok_h, sH, sW,
                                                   ch_off, ch_ok), axis=0)
                drow = scr_dh + par * (3 * SROW)
                _store_scratch_row(drow, xm, dh7, h_pos, h_lane, dh7_h, BC)
                _store_scratch_row(drow + SROW, xm, dh11, h_pos, h_lane, dh11_h, BC)
                _store_scratch_row(drow + 2 * SROW, xm, dh21, h_pos, h_lane, dh21_h, BC)
                tl.debug_barrier()
                # slot j holds dh_k(y, x - j + r_k): scratch position x + 10 - j + r_k
                dh7s = _scratch_stack(drow, xm, -i8 + (HALO + 3), i8 < 7, BC)
                dh11s = _scratch_stack(drow + SROW, xm, -i16 + (HALO + 5), i16 < 11, BC)
                dh21s = _scratch_stack(drow + 2 * SROW, xm, -i32 + 2 * HALO, i32 < 21, BC)
                da = (ds_y + tl.sum(wh7 * dh7s, axis=0) + tl.sum(wh11 * dh11s, axis=0)
                      + tl.sum(wh21 * dh21s, axis=0))
                tl.store(da_b + y * sH + cols_m[:, None] * sW + ch_off[None, :], da, mask=dmask)
        # ---- this tile's partial sums: one slot per (channel, tap), summed over tiles later
        pbase = part_ptr + ((b * n_th + tr) * n_tw + tc).to(tl.int64) * C * NPART
        pc = pbase + ch[None, :] * NPART
        cm2 = ch_ok[None, :]
        tl.store(pc + S7H + i8[:, None], g7_1, mask=(i8 < 7)[:, None] & cm2)
        tl.store(pc + S11H + i16[:, None], g11_1, mask=(i16 < 11)[:, None] & cm2)
        tl.store(pc + S21H + i32[:, None], g21_1, mask=(i32 < 21)[:, None] & cm2)
        tl.store(pc + S7V + i8[:, None], g7_2, mask=(i8 < 7)[:, None] & cm2)
        tl.store(pc + S11V + i16[:, None], g11_2, mask=(i16 < 11)[:, None] & cm2)
        tl.store(pc + S21V + i32[:, None], g21_2, mask=(i32 < 21)[:, None] & cm2)
        pb = pbase + ch * NPART
        tl.store(pb + SB7H, gb7_1, mask=ch_ok)
        tl.store(pb + SB11H, gb11_1, mask=ch_ok)
        tl.store(pb + SB21H, gb21_1, mask=ch_ok)
        tl.store(pb + SBV, gb_2, mask=ch_ok)


# ============================================================================================
# backward 5: 5x5 backward: grad_u += dw5x5ᵀ(da), dw0 / db0 products
# ============================================================================================
@triton.jit
def msca_dw5_backward_kernel(u_ptr, da_ptr, gu_ptr, wp, part_ptr, C, H, W, sB, sC, sH, sW, n_tw,
                             CP: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr,
                             BC: tl.constexpr):
    """grad_u(y, x) += Σ_t w0[t] da(y - i_t + 2, x - j_t + 2);  dw0[t] += Σ da(y, x) u(y + i_t - 2,
    x + j_t - 2);  db0 += Σ da, over the owned pixels; taps t = 5 i + j stacked in 32 slots."""
    sp = tl.program_id(0)
    cblk = tl.program_id(1)
    b = tl.program_id(2)
    n_th = tl.cdiv(H, TH)
    tr = sp // n_tw
    tc = sp % n_tw
    r0 = tr * TH
    c0 = tc * TW
    ch = cblk * BC + tl.arange(0, BC)
    ch_ok = ch < C
    ch_off = ch * sC
    cols = c0 + tl.arange(0, TW)
    col_ok = cols < W
    t = tl.arange(0, 32)
    t_ok = t < 25
    ti = t // 5
    tj = t % 5
    w_st = _wstack(wp + ch[None, :], W0, 25, 32, CP)
    u_b = u_ptr + b.to(tl.int64) * sB
    da_b = da_ptr + b.to(tl.int64) * sB
    gu_b = gu_ptr + b.to(tl.int64) * sB
    # column offsets of the taps, [32, TW]
    cols_t = cols[None, :] - tj[:, None] + 2
    colt_ok = t_ok[:, None] & (cols_t >= 0) & (cols_t < W)
    colu = cols[None, :] + tj[:, None] - 2
    colu_ok = t_ok[:, None] & (colu >= 0) & (colu < W)
    cm3 = ch_ok[None, None, :]
    mo = col_ok[:, None] & ch_ok[None, :]
    acc_w = tl.zeros([32, BC], dtype=tl.float32)
    acc_b = tl.zeros([BC], dtype=tl.float32)
    for y in range(r0, tl.minimum(r0 + TH, H)):
        rows = y - ti + 2
        m = (colt_ok & ((rows >= 0) & (rows < H))[:, None])[:, :, None] & cm3
        da_st = tl.load(da_b + rows[:, None, None] * sH + cols_t[:, :, None] * sW
                        + ch_off[None, None, :], mask=m, other=0.0)
        off = y * sH + cols[:, None] * sW + ch_off[None, :]
        gu = tl.load(gu_b + off, mask=mo, other=0.0).to(tl.float32) + tl.sum(w_st * da_st, axis=0)
        tl.store(gu_b + off, gu.to(gu_ptr.dtype.element_ty), mask=mo)
        da_y = tl.load(da_b + off, mask=mo, other=0.0)
        rows_u = y + ti - 2
        mu = (colu_ok & ((rows_u >= 0) & (rows_u < H))[:, None])[:, :, None] & cm3
        u_st = tl.load(u_b + rows_u[:, None, None] * sH + colu[:, :, None] * sW
                       + ch_off[None, None, :], mask=mu, other=0.0).to(tl.float32)
        acc_w += tl.sum(da_y[None, :, :] * u_st, axis=1)
        acc_b += tl.sum(da_y, axis=0)
    pbase = part_ptr + ((b * n_th + tr) * n_tw + tc).to(tl.int64) * C * 32
    tl.store(pbase + ch[None, :] * 32 + t[:, None], acc_w, mask=t_ok[:, None] & ch_ok[None, :])
    tl.store(pbase + ch * 32 + 25, acc_b, mask=ch_ok)
