"""Fused Triton kernels of NMF2D (Hamburger's matrix decomposition), forward and backward.

Per batch item (X is D×N, bases B is D×R, coef C is N×R; K = ``steps``)::

    U_t = Xᵀ B_t,  G_t = B_tᵀ B_t                              (N×R, R×R)
    C_0 = softmax(inv_t · U_0)
    C_{t+1} = C_t ⊙ U_t ⊘ (C_t G_t + eps)          t = 0..K   (C_{K+1} is the final coef)
    P_t = X C_t,   H_t = C_tᵀ C_t                              (D×R, R×R)
    B_t = B_{t-1} ⊙ P_t ⊘ (B_{t-1} H_t + eps)        t = 1..K
    Y = B_K C_{K+1}ᵀ

Two passes over X per step, each doing all that can be done with an X tile in registers: the
coef pass (a program owns a chunk of N columns: U = Xᵀ B, the softmax init, the coef update,
then the bases-update partials or, on the last step, Y) and the bases pass (a program owns D
rows: sums the partials, updates B). Two launch modes share the passes: *persistent*
(``nmf_forward_kernel``, one program per item, one launch per call) and *split* (two launches
per step, for batches too small to fill the GPU). The backward (``nmf_backward``) reverses
every update from the forward's saved R-column state; dX is written once at the end. All dots
accumulate in float32 (``input_precision="ieee"``); any D, N, R ≥ 1, R padded to ``BR`` =
max(16, next_pow2(R)) in registers. The design, the floor, the saved state, and the register
budget each tile is sized for: docs/nmf.md#fused-triton-kernels.

Debug switch: ``SEGNEXT_POISON=1`` (segnext_kernels/_env.py) fills every buffer the
launchers allocate with NaN first, so an unwritten element shows up in tests.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _env, _triton_compat



# --------------------------------------------------------------------------------------------
# small tile helpers
# --------------------------------------------------------------------------------------------
# Every contraction over the rank runs in K slices of KC (tl.dot's smallest K) loaded from
# memory, and every R×R result is built in KC-row slices, KR rows of N or D per dot: an ieee
# float32 dot stages both operands through shared memory and ptxas loads a thread's whole share
# into registers before the FMAs, so the slice, not R, sets the register count (module docstring).
KC = tl.constexpr(16)
KR = tl.constexpr(32)


@triton.jit
def _load_tile(ptr, row0, n_rows, n_cols, stride, BLOCK: tl.constexpr, BC: tl.constexpr):
    """(BLOCK, BC) tile of a row-major matrix, rows row0.. < n_rows, cols < n_cols, zero padded."""
    rows = row0 + tl.arange(0, BLOCK)
    cols = tl.arange(0, BC)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return tl.load(ptr + rows[:, None] * stride + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _load_block(ptr, row0, n_rows, col0, n_cols, stride, BLOCK: tl.constexpr,
                BC: tl.constexpr):
    """(BLOCK, BC) block at (row0, col0) of a row-major matrix, rows < n_rows, cols < n_cols."""
    rows = row0 + tl.arange(0, BLOCK)
    cols = col0 + tl.arange(0, BC)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return tl.load(ptr + rows[:, None] * stride + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _store_tile(ptr, val, row0, n_rows, n_cols, stride, BLOCK: tl.constexpr, BC: tl.constexpr):
    rows = row0 + tl.arange(0, BLOCK)
    cols = tl.arange(0, BC)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    tl.store(ptr + rows[:, None] * stride + cols[None, :], val, mask=mask)


@triton.jit
def _load_x(x_ptr, d0, n0, D, n_hi, N, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """(BLOCK_D, BLOCK_N) tile of a (D, N) row-major matrix, columns limited to < n_hi."""
    rows = d0 + tl.arange(0, BLOCK_D)
    cols = n0 + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < D) & (cols[None, :] < n_hi)
    return tl.load(x_ptr + rows[:, None] * N + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _store_gram(g_ptr, b_ptr, D, R, BR: tl.constexpr):
    """G = BᵀB of a (D, R) matrix into a (BR, BR) buffer, rows < R rounded up to KC."""
    for r0 in tl.range(0, R, KC, disable_licm=True):
        acc = tl.zeros((KC, BR), dtype=tl.float32)
        for d0 in tl.range(0, D, KR, disable_licm=True):
            acc += tl.dot(tl.trans(_load_block(b_ptr, d0, D, r0, R, R, KR, KC)),
                          _load_tile(b_ptr, d0, D, R, R, KR, BR), input_precision="ieee")
        _store_tile(g_ptr, acc, r0, BR, BR, BR, KC, BR)


@triton.jit
def _store_sym_sum(dst_ptr, src_ptr, count, R, BR: tl.constexpr):
    """S + Sᵀ into a (BR, BR) buffer, rows < R rounded up to KC; S = Σ of ``count`` (BR, BR)
    partials stored back to back (only their rows and columns < R are read)."""
    for r0 in tl.range(0, R, KC, disable_licm=True):
        rows = r0 + tl.arange(0, KC)
        cols = tl.arange(0, BR)
        mask = (rows[:, None] < R) & (cols[None, :] < R)
        s = tl.zeros((KC, BR), dtype=tl.float32)
        s_t = tl.zeros((KC, BR), dtype=tl.float32)
        for i in range(0, count):
            part = src_ptr + i * BR * BR
            s += tl.load(part + rows[:, None] * BR + cols[None, :], mask=mask, other=0.0)
            s_t += tl.load(part + cols[None, :] * BR + rows[:, None], mask=mask, other=0.0)
        _store_tile(dst_ptr, s + s_t, r0, BR, BR, BR, KC, BR)


@triton.jit
def _sum_row_partials(ptr, count, d0, D, BLOCK_D: tl.constexpr, BR: tl.constexpr):
    """Σ over ``count`` (D, BR) partials stored back to back, rows d0..d0+BLOCK_D."""
    acc = tl.zeros((BLOCK_D, BR), dtype=tl.float32)
    for i in range(0, count):
        acc += _load_tile(ptr + i * D * BR, d0, D, BR, BR, BLOCK_D, BR)
    return acc


# --------------------------------------------------------------------------------------------
# forward passes
# --------------------------------------------------------------------------------------------
@triton.jit
def coef_pass(x_ptr, bases_ptr, coef_in_ptr, coef_out_ptr, coef0_ptr, u_ptr, xc_part_ptr,
              cc_part_ptr, g_ptr, y_ptr, D, N, R, n_lo, n_hi, eps, inv_t, first, last,
              BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BR: tl.constexpr):
    """Coef update on columns [n_lo, n_hi) of one item (softmax init first when ``first``);
    then the bases-update partials (X C, CᵀC) of those columns, or Y = B Cᵀ when ``last``.
    ``g_ptr``: this program's (BR, BR) scratch for G = BᵀB."""
    offs_r = tl.arange(0, BR)
    rmask = offs_r < R
    _store_gram(g_ptr, bases_ptr, D, R, BR)
    tl.debug_barrier()  # G is read back in row slices by every thread
    for n0 in tl.range(n_lo, n_hi, BLOCK_N, disable_licm=True):
        nmask = (n0 + tl.arange(0, BLOCK_N)) < n_hi
        num = tl.zeros((BLOCK_N, BR), dtype=tl.float32)
        for d0 in tl.range(0, D, BLOCK_D, disable_licm=True):
            x = _load_x(x_ptr, d0, n0, D, n_hi, N, BLOCK_D, BLOCK_N)
            b = _load_tile(bases_ptr, d0, D, R, R, BLOCK_D, BR)
            num += tl.dot(tl.trans(x), b, input_precision="ieee")
        _store_tile(u_ptr, num, n0, n_hi, R, R, BLOCK_N, BR)
        if first:
            # coef init shares U_0 = Xᵀ B_0 with the first update. C_0 goes through memory (at
            # j = 0 the coef_in slot is coef0's): a register C_0 feeding the dot below would be
            # rematerialised in the dot-operand layout (the whole K row per thread).
            s = tl.where(rmask[None, :], inv_t * num, float("-inf"))
            e = tl.exp(s - tl.max(s, axis=1)[:, None])
            _store_tile(coef0_ptr, e / tl.sum(e, axis=1)[:, None], n0, n_hi, R, R, BLOCK_N, BR)
            tl.debug_barrier()  # C_0 rows are read back in column slices
        den = tl.zeros((BLOCK_N, BR), dtype=tl.float32)
        for k0 in tl.range(0, R, KC, disable_licm=True):
            den += tl.dot(_load_block(coef_in_ptr, n0, n_hi, k0, R, R, BLOCK_N, KC),
                          _load_block(g_ptr, k0, BR, 0, BR, BR, KC, BR), input_precision="ieee")
        tl.debug_barrier()  # U rows were stored by other threads
        c_prev = _load_tile(coef_in_ptr, n0, n_hi, R, R, BLOCK_N, BR)
        num = _load_tile(u_ptr, n0, n_hi, R, R, BLOCK_N, BR)
        c_new = tl.where(nmask[:, None], c_prev * num / (den + eps), 0.0)
        _store_tile(coef_out_ptr, c_new, n0, n_hi, R, R, BLOCK_N, BR)
    tl.debug_barrier()  # the new coef rows were stored by other threads of this program
    if last:
        for d0 in tl.range(0, D, BLOCK_D, disable_licm=True):
            for n0 in tl.range(n_lo, n_hi, BLOCK_N, disable_licm=True):
                y = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
                for k0 in tl.range(0, R, KC, disable_licm=True):
                    b = _load_block(bases_ptr, d0, D, k0, R, R, BLOCK_D, KC)
                    c = _load_block(coef_out_ptr, n0, n_hi, k0, R, R, BLOCK_N, KC)
                    y += tl.dot(b, tl.trans(c), input_precision="ieee")
                rows = d0 + tl.arange(0, BLOCK_D)
                cols = n0 + tl.arange(0, BLOCK_N)
                tl.store(y_ptr + rows[:, None] * N + cols[None, :], y,
                         mask=(rows[:, None] < D) & (cols[None, :] < n_hi))
    else:
        for r0 in tl.range(0, R, KC, disable_licm=True):
            cc = tl.zeros((KC, BR), dtype=tl.float32)
            for n0 in tl.range(n_lo, n_hi, KR, disable_licm=True):
                cc += tl.dot(tl.trans(_load_block(coef_out_ptr, n0, n_hi, r0, R, R, KR, KC)),
                             _load_tile(coef_out_ptr, n0, n_hi, R, R, KR, BR),
                             input_precision="ieee")
            _store_tile(cc_part_ptr, cc, r0, BR, BR, BR, KC, BR)
        for d0 in tl.range(0, D, BLOCK_D, disable_licm=True):
            xc = tl.zeros((BLOCK_D, BR), dtype=tl.float32)
            for n0 in tl.range(n_lo, n_hi, KR, disable_licm=True):
                x = _load_x(x_ptr, d0, n0, D, n_hi, N, BLOCK_D, KR)
                c = _load_tile(coef_out_ptr, n0, n_hi, R, R, KR, BR)
                xc += tl.dot(x, c, input_precision="ieee")
            _store_tile(xc_part_ptr, xc, d0, D, BR, BR, BLOCK_D, BR)


@triton.jit
def bases_pass(bases_in_ptr, bases_out_ptr, xc_part_ptr, cc_part_ptr, n_parts, p_ptr, h_ptr,
               D, R, d_lo, d_hi, eps, write_h, BLOCK_D: tl.constexpr, BR: tl.constexpr):
    """Bases update on rows [d_lo, d_hi): B ⊙ (X C) ⊘ (B CᵀC + eps) from the chunks' partials;
    saves P = X C and (when ``write_h``) H = CᵀC for the backward."""
    if write_h:
        for r0 in tl.range(0, R, KC, disable_licm=True):
            h = tl.zeros((KC, BR), dtype=tl.float32)
            for i in range(0, n_parts):
                h += _load_tile(cc_part_ptr + i * BR * BR, r0, BR, BR, BR, KC, BR)
            _store_tile(h_ptr, h, r0, R, R, R, KC, BR)
    for d0 in tl.range(d_lo, d_hi, BLOCK_D, disable_licm=True):
        den = tl.zeros((BLOCK_D, BR), dtype=tl.float32)
        for k0 in tl.range(0, R, KC, disable_licm=True):
            cc = tl.zeros((KC, BR), dtype=tl.float32)
            for i in range(0, n_parts):
                cc += _load_tile(cc_part_ptr + i * BR * BR, k0, BR, BR, BR, KC, BR)
            den += tl.dot(_load_block(bases_in_ptr, d0, d_hi, k0, R, R, BLOCK_D, KC), cc,
                          input_precision="ieee")
        xc = _sum_row_partials(xc_part_ptr, n_parts, d0, D, BLOCK_D, BR)
        b = _load_tile(bases_in_ptr, d0, d_hi, R, R, BLOCK_D, BR)
        _store_tile(bases_out_ptr, b * xc / (den + eps), d0, d_hi, R, R, BLOCK_D, BR)
        _store_tile(p_ptr, xc, d0, d_hi, R, R, BLOCK_D, BR)


@triton.jit
def _coef_step(pid_b, j, steps, n_lo, n_hi, part_index, x_ptr, bases_hist, coef_hist, u_hist,
               xc_part, cc_part, gram_part, y_ptr, D, N, R, nB, nC, nU, n_parts, eps, inv_t,
               BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BR: tl.constexpr):
    """Item pointers and ring slots of forward step ``j`` → coef_pass."""
    DN = D * N
    NR = N * R
    DR = D * R
    coef_b = coef_hist + pid_b * nC * NR
    coef_pass(x_ptr + pid_b * DN,
              bases_hist + pid_b * nB * DR + (j % nB) * DR,
              coef_b + (j % nC) * NR, coef_b + ((j + 1) % nC) * NR, coef_b,
              u_hist + pid_b * nU * NR + (j % nU) * NR,
              xc_part + (pid_b * n_parts + part_index) * D * BR,
              cc_part + (pid_b * n_parts + part_index) * BR * BR,
              gram_part + (pid_b * n_parts + part_index) * BR * BR,
              y_ptr + pid_b * DN, D, N, R, n_lo, n_hi, eps, inv_t, j == 0, j == steps,
              BLOCK_D, BLOCK_N, BR)


@triton.jit
def _bases_step(pid_b, j, d_lo, d_hi, write_h, bases_hist, xc_part, cc_part, p_hist, h_hist,
                D, R, nB, nP, n_parts, eps, BLOCK_D: tl.constexpr, BR: tl.constexpr):
    DR = D * R
    bases_b = bases_hist + pid_b * nB * DR
    bases_pass(bases_b + (j % nB) * DR, bases_b + ((j + 1) % nB) * DR,
               xc_part + pid_b * n_parts * D * BR, cc_part + pid_b * n_parts * BR * BR, n_parts,
               p_hist + pid_b * nP * DR + (j % nP) * DR,
               h_hist + pid_b * nP * R * R + (j % nP) * R * R,
               D, R, d_lo, d_hi, eps, write_h, BLOCK_D, BR)


@triton.jit(do_not_specialize=["steps"])
def nmf_forward_kernel(x_ptr, bases_hist, coef_hist, u_hist, p_hist, h_hist, xc_part, cc_part,
                       gram_part, y_ptr, D, N, R, steps, nB, nC, nU, nP, eps, inv_t,
                       BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BR: tl.constexpr):
    """Persistent forward: one program per item runs init, all steps and the reconstruction."""
    pid_b = tl.program_id(0).to(tl.int64)
    for j in tl.range(0, steps + 1, disable_licm=True):
        _coef_step(pid_b, j, steps, 0, N, 0, x_ptr, bases_hist, coef_hist, u_hist, xc_part,
                   cc_part, gram_part, y_ptr, D, N, R, nB, nC, nU, 1, eps, inv_t,
                   BLOCK_D, BLOCK_N, BR)
        if j < steps:
            tl.debug_barrier()
            _bases_step(pid_b, j, 0, D, True, bases_hist, xc_part, cc_part, p_hist, h_hist,
                        D, R, nB, nP, 1, eps, BLOCK_D, BR)
            tl.debug_barrier()


@triton.jit(do_not_specialize=["j", "steps"])
def nmf_coef_kernel(x_ptr, bases_hist, coef_hist, u_hist, xc_part, cc_part, gram_part, y_ptr,
                    j, steps, D, N, R, nB, nC, nU, chunk, eps, inv_t,
                    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BR: tl.constexpr):
    """Split forward, coef pass of step ``j``: grid (items, N chunks)."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1)
    n_lo = pid_c * chunk
    n_hi = tl.minimum(n_lo + chunk, N)
    _coef_step(pid_b, j, steps, n_lo, n_hi, pid_c, x_ptr, bases_hist, coef_hist, u_hist,
               xc_part, cc_part, gram_part, y_ptr, D, N, R, nB, nC, nU, tl.num_programs(1),
               eps, inv_t, BLOCK_D, BLOCK_N, BR)


@triton.jit(do_not_specialize=["j"])
def nmf_bases_kernel(bases_hist, xc_part, cc_part, p_hist, h_hist, j, D, R, nB, nP, n_parts,
                     eps, BLOCK_D: tl.constexpr, BR: tl.constexpr):
    """Split forward, bases pass of step ``j``: grid (items, D blocks)."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    d_lo = pid_d * BLOCK_D
    _bases_step(pid_b, j, d_lo, tl.minimum(d_lo + BLOCK_D, D), pid_d == 0, bases_hist, xc_part,
                cc_part, p_hist, h_hist, D, R, nB, nP, n_parts, eps, BLOCK_D, BR)


# --------------------------------------------------------------------------------------------
# backward passes
# --------------------------------------------------------------------------------------------
@triton.jit
def coef_grad_pass(x_ptr, dy_ptr, b_prev_ptr, c_prev_ptr, c_cur_ptr, u_prev_ptr, dc_in_ptr,
                   dc_out_ptr, dp_ptr, dh_part_ptr, n_dh, du_ptr, xdu_part_ptr, dg_part_ptr,
                   scr_ptr, D, N, R, n_lo, n_hi, eps, inv_t, first, last, need_db,
                   BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BR: tl.constexpr):
    """Reverse of coef update k (C_k = C_{k-1} ⊙ U_{k-1} ⊘ (C_{k-1} G_{k-1} + eps)) on columns
    [n_lo, n_hi). dC_k = dYᵀ B_K when ``last``, else the carried part + Xᵀ dP_k + C_k (dH + dHᵀ).
    Writes dU_{k-1} (softmax-init backward added when ``first``), the carried dC_{k-1}, and, when
    ``need_db``, the partials X dU_{k-1} (+ dY C_k when ``last``) and dG = C_{k-1}ᵀ dV.
    ``scr_ptr``: this program's 2 (BR, BR) scratch for G and dH + dHᵀ. dV goes to the dC_in
    rows once they are read (the slot is the next step's dC_out), dC ⊙ U ⊘ V to the dC_out rows
    before dC_{k-1} replaces it."""
    g_ptr = scr_ptr
    dhs_ptr = scr_ptr + BR * BR
    _store_gram(g_ptr, b_prev_ptr, D, R, BR)
    if not last:
        _store_sym_sum(dhs_ptr, dh_part_ptr, n_dh, R, BR)
    tl.debug_barrier()  # G and dH + dHᵀ are read back in row slices by every thread
    for n0 in tl.range(n_lo, n_hi, BLOCK_N, disable_licm=True):
        dc = tl.zeros((BLOCK_N, BR), dtype=tl.float32)
        if last:
            for d0 in tl.range(0, D, BLOCK_D, disable_licm=True):
                dy = _load_x(dy_ptr, d0, n0, D, n_hi, N, BLOCK_D, BLOCK_N)
                b = _load_tile(b_prev_ptr, d0, D, R, R, BLOCK_D, BR)
                dc += tl.dot(tl.trans(dy), b, input_precision="ieee")
        else:
            for d0 in tl.range(0, D, BLOCK_D, disable_licm=True):
                x = _load_x(x_ptr, d0, n0, D, n_hi, N, BLOCK_D, BLOCK_N)
                dp = _load_tile(dp_ptr, d0, D, R, R, BLOCK_D, BR)
                dc += tl.dot(tl.trans(x), dp, input_precision="ieee")
            for k0 in tl.range(0, R, KC, disable_licm=True):
                dc += tl.dot(_load_block(c_cur_ptr, n0, n_hi, k0, R, R, BLOCK_N, KC),
                             _load_block(dhs_ptr, k0, BR, 0, BR, BR, KC, BR),
                             input_precision="ieee")
            dc += _load_tile(dc_in_ptr, n0, n_hi, R, R, BLOCK_N, BR)
        v = tl.zeros((BLOCK_N, BR), dtype=tl.float32)
        for k0 in tl.range(0, R, KC, disable_licm=True):
            v += tl.dot(_load_block(c_prev_ptr, n0, n_hi, k0, R, R, BLOCK_N, KC),
                        _load_block(g_ptr, k0, BR, 0, BR, BR, KC, BR), input_precision="ieee")
        v += eps
        tl.debug_barrier()  # every thread has read its dC_in rows before dV replaces them
        _store_tile(du_ptr, dc * _load_tile(c_prev_ptr, n0, n_hi, R, R, BLOCK_N, BR) / v,
                    n0, n_hi, R, R, BLOCK_N, BR)
        _store_tile(dc_in_ptr, -dc * _load_tile(c_cur_ptr, n0, n_hi, R, R, BLOCK_N, BR) / v,
                    n0, n_hi, R, R, BLOCK_N, BR)
        _store_tile(dc_out_ptr, dc * _load_tile(u_prev_ptr, n0, n_hi, R, R, BLOCK_N, BR) / v,
                    n0, n_hi, R, R, BLOCK_N, BR)
        tl.debug_barrier()  # dU, dV and dC ⊙ U ⊘ V were stored by other threads
        # dC_{k-1} = dC ⊙ U ⊘ V + dV Gᵀ; G = BᵀB is symmetric, so its rows are its columns.
        dc_prev = _load_tile(dc_out_ptr, n0, n_hi, R, R, BLOCK_N, BR)
        for k0 in tl.range(0, R, KC, disable_licm=True):
            dc_prev += tl.dot(_load_block(dc_in_ptr, n0, n_hi, k0, R, R, BLOCK_N, KC),
                              _load_block(g_ptr, k0, BR, 0, BR, BR, KC, BR),
                              input_precision="ieee")
        if first:
            # C_0 = softmax(inv_t U_0): its backward lands on U_0 as well.
            c_prev = _load_tile(c_prev_ptr, n0, n_hi, R, R, BLOCK_N, BR)
            du = _load_tile(du_ptr, n0, n_hi, R, R, BLOCK_N, BR)
            du += inv_t * c_prev * (dc_prev - tl.sum(dc_prev * c_prev, axis=1)[:, None])
            tl.debug_barrier()  # every thread has read its dU rows
            _store_tile(du_ptr, du, n0, n_hi, R, R, BLOCK_N, BR)
        else:
            tl.debug_barrier()  # every thread has read its dC ⊙ U ⊘ V rows
            _store_tile(dc_out_ptr, dc_prev, n0, n_hi, R, R, BLOCK_N, BR)
    if need_db:
        tl.debug_barrier()  # dU and dV rows were stored by other threads of this program
        for r0 in tl.range(0, R, KC, disable_licm=True):
            dg = tl.zeros((KC, BR), dtype=tl.float32)
            for n0 in tl.range(n_lo, n_hi, KR, disable_licm=True):
                dg += tl.dot(tl.trans(_load_block(c_prev_ptr, n0, n_hi, r0, R, R, KR, KC)),
                             _load_tile(dc_in_ptr, n0, n_hi, R, R, KR, BR),
                             input_precision="ieee")
            _store_tile(dg_part_ptr, dg, r0, BR, BR, BR, KC, BR)
        for d0 in tl.range(0, D, BLOCK_D, disable_licm=True):
            xdu = tl.zeros((BLOCK_D, BR), dtype=tl.float32)
            for n0 in tl.range(n_lo, n_hi, KR, disable_licm=True):
                x = _load_x(x_ptr, d0, n0, D, n_hi, N, BLOCK_D, KR)
                xdu += tl.dot(x, _load_tile(du_ptr, n0, n_hi, R, R, KR, BR),
                              input_precision="ieee")
                if last:  # Y = B_K C_{K+1}ᵀ → dB_K += dY C_{K+1}
                    dy = _load_x(dy_ptr, d0, n0, D, n_hi, N, BLOCK_D, KR)
                    xdu += tl.dot(dy, _load_tile(c_cur_ptr, n0, n_hi, R, R, KR, BR),
                                  input_precision="ieee")
            _store_tile(xdu_part_ptr, xdu, d0, D, BR, BR, BLOCK_D, BR)


@triton.jit
def bases_grad_pass(b_prev_ptr, b_pprev_ptr, p_ptr, h_ptr, db_in_ptr, db_out_ptr, xdu_part_ptr,
                    dg_part_ptr, n_parts, dp_ptr, dh_part_ptr, dbases_ptr, scr_ptr, D, R, d_lo,
                    d_hi, eps, first, has_carry, BLOCK_D: tl.constexpr, BR: tl.constexpr):
    """Rows [d_lo, d_hi) of dB_{k-1} = carried + Σ X dU_{k-1} + B_{k-1}(dG + dGᵀ); written as the
    bases gradient when ``first`` (k = 1), else pushed through bases update k-1
    (B_{k-1} = B_{k-2} ⊙ P ⊘ (B_{k-2} H + eps)): dP_{k-1}, carried dB_{k-2}, dH partial.
    ``scr_ptr``: this program's (BR, BR) scratch for dG + dGᵀ. dW goes to the dB_in rows once
    they are read (the slot is the next step's dB_out), dB ⊙ P ⊘ W to the dB_out rows before
    dB_{k-2} replaces it."""
    _store_sym_sum(scr_ptr, dg_part_ptr, n_parts, R, BR)
    tl.debug_barrier()  # dG + dGᵀ is read back in row slices by every thread
    for d0 in tl.range(d_lo, d_hi, BLOCK_D, disable_licm=True):
        db = _sum_row_partials(xdu_part_ptr, n_parts, d0, D, BLOCK_D, BR)
        for k0 in tl.range(0, R, KC, disable_licm=True):
            db += tl.dot(_load_block(b_prev_ptr, d0, d_hi, k0, R, R, BLOCK_D, KC),
                         _load_block(scr_ptr, k0, BR, 0, BR, BR, KC, BR), input_precision="ieee")
        if has_carry:
            db += _load_tile(db_in_ptr, d0, d_hi, R, R, BLOCK_D, BR)
        if first:
            _store_tile(dbases_ptr, db, d0, d_hi, R, R, BLOCK_D, BR)
        else:
            w = tl.zeros((BLOCK_D, BR), dtype=tl.float32)
            for k0 in tl.range(0, R, KC, disable_licm=True):
                w += tl.dot(_load_block(b_pprev_ptr, d0, d_hi, k0, R, R, BLOCK_D, KC),
                            _load_block(h_ptr, k0, R, 0, R, R, KC, BR), input_precision="ieee")
            w += eps
            tl.debug_barrier()  # every thread has read its dB_in rows before dW replaces them
            _store_tile(dp_ptr, db * _load_tile(b_pprev_ptr, d0, d_hi, R, R, BLOCK_D, BR) / w,
                        d0, d_hi, R, R, BLOCK_D, BR)
            _store_tile(db_in_ptr, -db * _load_tile(b_prev_ptr, d0, d_hi, R, R, BLOCK_D, BR) / w,
                        d0, d_hi, R, R, BLOCK_D, BR)
            _store_tile(db_out_ptr, db * _load_tile(p_ptr, d0, d_hi, R, R, BLOCK_D, BR) / w,
                        d0, d_hi, R, R, BLOCK_D, BR)
            tl.debug_barrier()  # dW and dB ⊙ P ⊘ W were stored by other threads
            # dB_{k-2} = dB ⊙ P ⊘ W + dW Hᵀ; H = CᵀC is symmetric, so its rows are its columns.
            db_out = _load_tile(db_out_ptr, d0, d_hi, R, R, BLOCK_D, BR)
            for k0 in tl.range(0, R, KC, disable_licm=True):
                db_out += tl.dot(_load_block(db_in_ptr, d0, d_hi, k0, R, R, BLOCK_D, KC),
                                 _load_block(h_ptr, k0, R, 0, R, R, KC, BR),
                                 input_precision="ieee")
            tl.debug_barrier()  # every thread has read its dB ⊙ P ⊘ W rows
            _store_tile(db_out_ptr, db_out, d0, d_hi, R, R, BLOCK_D, BR)
    if not first:
        tl.debug_barrier()  # dW rows were stored by other threads of this program
        for r0 in tl.range(0, R, KC, disable_licm=True):
            dh = tl.zeros((KC, BR), dtype=tl.float32)
            for d0 in tl.range(d_lo, d_hi, KR, disable_licm=True):
                dh += tl.dot(tl.trans(_load_block(b_pprev_ptr, d0, d_hi, r0, R, R, KR, KC)),
                             _load_tile(db_in_ptr, d0, d_hi, R, R, KR, BR),
                             input_precision="ieee")
            _store_tile(dh_part_ptr, dh, r0, BR, BR, BR, KC, BR)


@triton.jit
def dx_pass(bases_b, du_b, dp_b, coef_b, dx_ptr, D, N, R, n_lo, n_hi, t_lo, k_lo, steps,
            nB, nDU, nC, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BR: tl.constexpr):
    """dX = Σ_{t ≥ t_lo} B_t dU_tᵀ + Σ_{k ≥ k_lo} dP_k C_kᵀ on columns [n_lo, n_hi), written
    once (never read-modify-written)."""
    DR = D * R
    NR = N * R
    for n0 in tl.range(n_lo, n_hi, BLOCK_N, disable_licm=True):
        for d0 in tl.range(0, D, BLOCK_D, disable_licm=True):
            acc = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
            for t in tl.range(t_lo, steps + 1, disable_licm=True):
                b = _load_tile(bases_b + (t % nB) * DR, d0, D, R, R, BLOCK_D, BR)
                du = _load_tile(du_b + (t % nDU) * NR, n0, n_hi, R, R, BLOCK_N, BR)
                acc += tl.dot(b, tl.trans(du), input_precision="ieee")
            for k in tl.range(k_lo, steps + 1, disable_licm=True):
                dp = _load_tile(dp_b + (k - 1) * DR, d0, D, R, R, BLOCK_D, BR)
                c = _load_tile(coef_b + (k % nC) * NR, n0, n_hi, R, R, BLOCK_N, BR)
                acc += tl.dot(dp, tl.trans(c), input_precision="ieee")
            rows = d0 + tl.arange(0, BLOCK_D)
            cols = n0 + tl.arange(0, BLOCK_N)
            tl.store(dx_ptr + rows[:, None] * N + cols[None, :], acc,
                     mask=(rows[:, None] < D) & (cols[None, :] < n_hi))


@triton.jit
def _coef_grad_step(pid_b, k, steps, n_lo, n_hi, part_index, x_ptr, dy_ptr,
                    bases_hist, coef_hist, u_hist, dc_carry, dp_hist, dh_part, n_dh, du_hist,
                    xdu_part, dg_part, scratch_part, D, N, R, nB, nC, nU, nDU, nS, n_parts, eps,
                    inv_t, UNROLLED: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                    BR: tl.constexpr):
    """Item pointers and ring slots of reverse step ``k`` → coef_grad_pass."""
    DN = D * N
    NR = N * R
    DR = D * R
    coef_b = coef_hist + pid_b * nC * NR
    carry_b = dc_carry + pid_b * 2 * NR
    # one_step runs only the last reverse step (k = steps + 1): said at compile time, since a
    # runtime test that is always true leaves a dead branch on which triton 3.6's coalescing
    # pass crashes
    first = (k == 1) if UNROLLED else False
    last = (k == steps + 1) if UNROLLED else True
    coef_grad_pass(x_ptr + pid_b * DN, dy_ptr + pid_b * DN,
                   bases_hist + pid_b * nB * DR + ((k - 1) % nB) * DR,
                   coef_b + ((k - 1) % nC) * NR, coef_b + (k % nC) * NR,
                   u_hist + pid_b * nU * NR + ((k - 1) % nU) * NR,
                   carry_b + (k % 2) * NR, carry_b + ((k - 1) % 2) * NR,
                   dp_hist + pid_b * nS * DR + (k - 1) * DR,
                   dh_part + pid_b * n_dh * BR * BR, n_dh,
                   du_hist + pid_b * nDU * NR + ((k - 1) % nDU) * NR,
                   xdu_part + (pid_b * n_parts + part_index) * D * BR,
                   dg_part + (pid_b * n_parts + part_index) * BR * BR,
                   scratch_part + (pid_b * n_parts + part_index) * 2 * BR * BR,
                   D, N, R, n_lo, n_hi, eps, inv_t, first, last, UNROLLED, BLOCK_D, BLOCK_N,
                   BR)


@triton.jit
def _bases_grad_step(pid_b, k, steps, d_lo, d_hi, part_index, bases_hist, p_hist, h_hist,
                     db_carry, xdu_part, dg_part, n_parts, dp_hist, dh_part, n_dh, dbases,
                     scratch_part, D, R, nB, nS, eps, BLOCK_D: tl.constexpr, BR: tl.constexpr):
    """Item pointers and ring slots of reverse step ``k`` → bases_grad_pass."""
    DR = D * R
    bases_b = bases_hist + pid_b * nB * DR
    carry_b = db_carry + pid_b * 2 * DR
    km2 = k - 2 + (k == 1)  # slot of B_{k-2}, P_{k-1}, H_{k-1}, dP_{k-1} (unused at k = 1)
    bases_grad_pass(bases_b + ((k - 1) % nB) * DR, bases_b + (km2 % nB) * DR,
                    p_hist + pid_b * nS * DR + km2 * DR,
                    h_hist + pid_b * nS * R * R + km2 * R * R,
                    carry_b + ((k - 1) % 2) * DR, carry_b + (km2 % 2) * DR,
                    xdu_part + pid_b * n_parts * D * BR, dg_part + pid_b * n_parts * BR * BR,
                    n_parts, dp_hist + pid_b * nS * DR + km2 * DR,
                    dh_part + (pid_b * n_dh + part_index) * BR * BR,
                    dbases + pid_b * DR,
                    scratch_part + (pid_b * n_dh + part_index) * 2 * BR * BR,
                    D, R, d_lo, d_hi, eps, k == 1, k <= steps, BLOCK_D, BR)


@triton.jit
def _dx_step(pid_b, n_lo, n_hi, steps, bases_hist, du_hist, dp_hist, coef_hist,
             dx_ptr, D, N, R, nB, nDU, nC, nS, UNROLLED: tl.constexpr, BLOCK_D: tl.constexpr,
             BLOCK_N: tl.constexpr, BR: tl.constexpr):
    # one_step: only the final update's numerator U_K = Xᵀ B_K carries gradient to X
    t_lo = 0 * steps if UNROLLED else steps
    k_lo = 1 + 0 * steps if UNROLLED else steps + 1
    dx_pass(bases_hist + pid_b * nB * D * R, du_hist + pid_b * nDU * N * R,
            dp_hist + pid_b * nS * D * R, coef_hist + pid_b * nC * N * R,
            dx_ptr + pid_b * D * N, D, N, R, n_lo, n_hi, t_lo, k_lo, steps, nB, nDU, nC,
            BLOCK_D, BLOCK_N, BR)


@triton.jit(do_not_specialize=["steps"])
def nmf_backward_kernel(x_ptr, dy_ptr, bases_hist, coef_hist, u_hist, p_hist, h_hist,
                        dc_carry, db_carry, dp_hist, dh_part, du_hist, xdu_part, dg_part,
                        scratch_part, dbases, dx_ptr, D, N, R, steps, nB, nC, nU, nDU, nS, eps,
                        inv_t, UNROLLED: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                        BR: tl.constexpr):
    """Persistent backward: one program per item runs every reverse step, then dX."""
    pid_b = tl.program_id(0).to(tl.int64)
    n_rev = steps + 1 if UNROLLED else 1 + 0 * steps
    for i in tl.range(0, n_rev, disable_licm=True):
        k = steps + 1 - i
        _coef_grad_step(pid_b, k, steps, 0, N, 0, x_ptr, dy_ptr, bases_hist, coef_hist,
                        u_hist, dc_carry, dp_hist, dh_part, 1, du_hist, xdu_part, dg_part,
                        scratch_part, D, N, R, nB, nC, nU, nDU, nS, 1, eps, inv_t, UNROLLED,
                        BLOCK_D, BLOCK_N, BR)
        tl.debug_barrier()
        if UNROLLED:
            _bases_grad_step(pid_b, k, steps, 0, D, 0, bases_hist, p_hist, h_hist, db_carry,
                             xdu_part, dg_part, 1, dp_hist, dh_part, 1, dbases, scratch_part,
                             D, R, nB, nS, eps, BLOCK_D, BR)
            tl.debug_barrier()
    _dx_step(pid_b, 0, N, steps, bases_hist, du_hist, dp_hist, coef_hist, dx_ptr,
             D, N, R, nB, nDU, nC, nS, UNROLLED, BLOCK_D, BLOCK_N, BR)


@triton.jit(do_not_specialize=["k", "steps"])
def nmf_coef_grad_kernel(x_ptr, dy_ptr, bases_hist, coef_hist, u_hist, dc_carry, dp_hist,
                         dh_part, n_dh, du_hist, xdu_part, dg_part, scratch_part, k, steps,
                         D, N, R, nB, nC, nU, nDU, nS, chunk, eps, inv_t,
                         UNROLLED: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                         BR: tl.constexpr):
    """Split backward, coef pass of reverse step ``k``: grid (items, N chunks)."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1)
    n_lo = pid_c * chunk
    _coef_grad_step(pid_b, k, steps, n_lo, tl.minimum(n_lo + chunk, N), pid_c, x_ptr,
                    dy_ptr, bases_hist, coef_hist, u_hist, dc_carry, dp_hist, dh_part, n_dh,
                    du_hist, xdu_part, dg_part, scratch_part, D, N, R, nB, nC, nU, nDU, nS,
                    tl.num_programs(1), eps, inv_t, UNROLLED, BLOCK_D, BLOCK_N, BR)


@triton.jit(do_not_specialize=["k", "steps"])
def nmf_bases_grad_kernel(bases_hist, p_hist, h_hist, db_carry, xdu_part, dg_part, n_parts,
                          dp_hist, dh_part, dbases, scratch_part, k, steps, D, R, nB, nS, eps,
                          BLOCK_D: tl.constexpr, BR: tl.constexpr):
    """Split backward, bases pass of reverse step ``k``: grid (items, D blocks)."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    d_lo = pid_d * BLOCK_D
    _bases_grad_step(pid_b, k, steps, d_lo, tl.minimum(d_lo + BLOCK_D, D), pid_d, bases_hist,
                     p_hist, h_hist, db_carry, xdu_part, dg_part, n_parts, dp_hist, dh_part,
                     tl.num_programs(1), dbases, scratch_part, D, R, nB, nS, eps, BLOCK_D, BR)


@triton.jit(do_not_specialize=["steps"])
def nmf_dx_kernel(bases_hist, du_hist, dp_hist, coef_hist, dx_ptr, steps, D, N, R,
                  nB, nDU, nC, nS, UNROLLED: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_N: tl.constexpr, BR: tl.constexpr):
    """Split backward, dX: grid (items, N blocks)."""
    pid_b = tl.program_id(0).to(tl.int64)
    n_lo = tl.program_id(1) * BLOCK_N
    _dx_step(pid_b, n_lo, tl.minimum(n_lo + BLOCK_N, N), steps, bases_hist, du_hist,
             dp_hist, coef_hist, dx_ptr, D, N, R, nB, nDU, nC, nS, UNROLLED,
             BLOCK_D, BLOCK_N, BR)


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------
def _new(shape, like: torch.Tensor) -> torch.Tensor:
    if _env.poison():
        return torch.full(shape, float("nan"), dtype=torch.float32, device=like.device)
    return torch.empty(shape, dtype=torch.float32, device=like.device)


def _interpret() -> bool:
    return _env.triton_interpret()


def _pow2_clamp(v: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(v, 1))))


def _launch_options(BR: int, persistent_backward: bool = False) -> dict:
    """GPU launch options, with the register budget pinned (``maxnreg``) rather than left to
    ptxas, which on its own caps some kernels at 64, 80 or 128 registers and spills a few bytes
    to fit more programs. 8 warps: at 4, the 64×64 tiles of BR = 16 spill at 128 registers. Up to
    BR = 64, 128 registers (two programs per SM) where the kernel fits them: the version-
    dependent budget of ``_triton_compat``; the persistent backward (every reverse step and dX
    in one program) takes ~150-160 on sm_80 and gets 168. BR = 128 takes ~200 and is left to
    ptxas (8 warps per SM)."""
    opts = dict(num_warps=8, num_stages=1)
    if BR <= 64:
        opts["maxnreg"] = 168 if persistent_backward else _triton_compat.nmf_max_registers()
    return opts


# Largest padded rank the kernels are tuned and checked for (sm_90: BR = 128 in ~200 registers,
# ≤ 32 KB of shared memory, no spills); larger ranks run the reference (nmf2d/functional.py).
MAX_RANK = 128


def check_sizes(D: int, N: int, R: int) -> None:
    """Refuse what the kernels' int32 offsets and grid limits cannot index."""
    if R > MAX_RANK:
        raise ValueError(f"nmf2d (triton): rank R={R} is above the kernels' limit {MAX_RANK}")
    if D * N >= 2 ** 31 or N * max(R, 16) >= 2 ** 31:
        raise ValueError(f"nmf2d (triton): D*N = {D * N} elements per item is beyond the kernels' "
                         f"32-bit offsets")
    if triton.cdiv(N, 16) > 65535:
        raise ValueError(f"nmf2d (triton): N = {N} is beyond the kernels' grid limit")


def block_sizes(D: int, N: int, R: int):
    """(BLOCK_D, BLOCK_N, BR). tl.dot needs every dim ≥ 16. The interpreter prefers big tiles
    (fewer numpy calls); on a GPU the tiles are kept register-sized (``_gpu_block_sizes``)."""
    if _interpret():
        return _pow2_clamp(D, 16, 256), _pow2_clamp(N, 16, 128), _pow2_clamp(R, 16, 1 << 30)
    return _gpu_block_sizes(D, N, R)


def _gpu_block_sizes(D: int, N: int, R: int):
    BR = _pow2_clamp(R, 16, 1 << 30)
    if BR == 16:
        return _pow2_clamp(D, 16, 64), _pow2_clamp(N, 16, 64), BR
    if BR == 32:
        # a (BLOCK_N, BR) tile of 4 registers per thread at 8 warps, as at BR = 16: with 64 N
        # columns (8 per thread) the forward and coef kernels spilled at 128 registers on sm_80
        # with triton 3.9
        return _pow2_clamp(D, 16, 64), _pow2_clamp(N, 16, 32), BR
    # BR ≥ 64: a (BLOCK_N, BR) tile is 8 registers per thread at 8 warps
    return _pow2_clamp(D, 16, 32), _pow2_clamp(N, 16, 32), BR


def default_chunks(b: int, N: int, R: int, BLOCK_N: int, device: torch.device) -> int:
    """N chunks per item: 1 (persistent kernel) under the interpreter or when the items alone
    fill the GPU; else enough programs for ~2 waves, with chunks wide enough (≥ 4 column blocks
    and ≥ 8·R columns) that the D×R partials stay small next to the X chunk."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    if b >= sms:
        return 1
    min_width = max(4 * BLOCK_N, 8 * R)
    return max(1, min(triton.cdiv(2 * sms, b), triton.cdiv(N, min_width)))


def ring_sizes(steps: int, full: bool):
    """Slots of the saved-state rings (bases, coef, U, P/H): every step when ``full``
    (unrolled backward), else only what the forward and the one_step backward need."""
    if full:
        return steps + 1, steps + 2, steps + 1, steps
    return (2 if steps else 1), 2, 1, min(steps, 1)


def _chunking(N: int, n_chunks: int, BLOCK_N: int):
    chunk = triton.cdiv(triton.cdiv(N, max(n_chunks, 1)), BLOCK_N) * BLOCK_N
    return chunk, triton.cdiv(N, chunk)


def nmf_forward(X: torch.Tensor, bases: torch.Tensor, steps: int, eps: float, inv_t: float,
                full_history: bool, n_chunks: int | None = None):
    """X (b, D, N), bases (b, D, R), contiguous float32 → (Y (b, D, N), bases_hist (b, nB, D, R),
    coef_hist (b, nC, N, R), u_hist (b, nU, N, R), p_hist (b, nP, D, R), h_hist (b, nP, R, R))."""
    b, D, N = X.shape
    R = bases.shape[2]
    check_sizes(D, N, R)
    BLOCK_D, BLOCK_N, BR = block_sizes(D, N, R)
    opts = _launch_options(BR)
    nB, nC, nU, nP = ring_sizes(steps, full_history)
    Y = _new((b, D, N), X)
    bases_hist = _new((b, nB, D, R), X)
    bases_hist[:, 0].copy_(bases)
    coef_hist = _new((b, nC, N, R), X)
    u_hist = _new((b, nU, N, R), X)
    p_hist = _new((b, nP, D, R), X)
    h_hist = _new((b, nP, R, R), X)
    # unused when steps == 0 (no bases update): any valid pointer
    p_arg = p_hist if nP else bases_hist
    h_arg = h_hist if nP else bases_hist
    nP_arg = max(nP, 1)
    if n_chunks is None:
        n_chunks = default_chunks(b, N, R, BLOCK_N, X.device)
    chunk, n_chunks = _chunking(N, n_chunks, BLOCK_N)
    xc_part = _new((b, n_chunks, D, BR), X)
    cc_part = _new((b, n_chunks, BR, BR), X)
    gram_part = _new((b, n_chunks, BR, BR), X)  # per program: G = BᵀB, read in row slices
    eps, inv_t = float(eps), float(inv_t)
    if n_chunks == 1:
        nmf_forward_kernel[(b,)](X, bases_hist, coef_hist, u_hist, p_arg, h_arg, xc_part,
                                 cc_part, gram_part, Y, D, N, R, steps, nB, nC, nU, nP_arg, eps,
                                 inv_t, BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N, BR=BR, **opts)
    else:
        n_dblocks = triton.cdiv(D, BLOCK_D)
        for j in range(steps + 1):
            nmf_coef_kernel[(b, n_chunks)](X, bases_hist, coef_hist, u_hist, xc_part, cc_part,
                                           gram_part, Y, j, steps, D, N, R, nB, nC, nU, chunk,
                                           eps, inv_t, BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N, BR=BR,
                                           **opts)
            if j < steps:
                nmf_bases_kernel[(b, n_dblocks)](bases_hist, xc_part, cc_part, p_arg, h_arg, j,
                                                 D, R, nB, nP_arg, n_chunks, eps,
                                                 BLOCK_D=BLOCK_D, BR=BR, **opts)
    return Y, bases_hist, coef_hist, u_hist, p_hist, h_hist


def nmf_backward(dY: torch.Tensor, X: torch.Tensor, bases_hist: torch.Tensor,
                 coef_hist: torch.Tensor, u_hist: torch.Tensor, p_hist: torch.Tensor,
                 h_hist: torch.Tensor, steps: int, eps: float, inv_t: float, grad: str,
                 n_chunks: int | None = None):
    """Gradients (dX (b, D, N), dbases (b, D, R) or None for ``one_step``) from the state saved
    by ``nmf_forward`` (``full_history=True`` for ``unrolled``)."""
    b, D, N = X.shape
    R = bases_hist.shape[3]
    nB, nC, nU = bases_hist.shape[1], coef_hist.shape[1], u_hist.shape[1]
    unrolled = grad == "unrolled"
    if unrolled and (nB, nC, nU) != ring_sizes(steps, True)[:3]:
        raise RuntimeError("nmf2d: the unrolled backward needs the forward's full history "
                           "(the forward ran without saving it)")
    BLOCK_D, BLOCK_N, BR = block_sizes(D, N, R)
    opts = _launch_options(BR)
    dY = dY.contiguous().float()
    nDU = steps + 1 if unrolled else 1
    nS = max(steps, 1)
    dx = _new((b, D, N), X)
    du_hist = _new((b, nDU, N, R), X)
    dp_hist = _new((b, nS, D, R), X)
    dc_carry = _new((b, 2, N, R), X)
    db_carry = _new((b, 2, D, R), X)
    dbases = _new((b, D, R), X) if unrolled else dx  # dx: never written by one_step's passes
    p_arg = p_hist if p_hist.shape[1] == steps and steps else dp_hist
    h_arg = h_hist if h_hist.shape[1] == steps and steps else dp_hist
    if n_chunks is None:
        n_chunks = default_chunks(b, N, R, BLOCK_N, X.device)
    chunk, n_chunks = _chunking(N, n_chunks, BLOCK_N)
    n_dblocks = 1 if n_chunks == 1 else triton.cdiv(D, BLOCK_D)
    xdu_part = _new((b, n_chunks, D, BR), X)
    dg_part = _new((b, n_chunks, BR, BR), X)
    dh_part = _new((b, n_dblocks, BR, BR), X)
    # per program (coef-grad pass: G, dH + dHᵀ; bases-grad pass: dG + dGᵀ), read in row slices;
    # both passes index it by their own program, in separate launches or one after the other
    scratch_part = _new((b, max(n_chunks, n_dblocks), 2, BR, BR), X)
    eps, inv_t = float(eps), float(inv_t)
    if n_chunks == 1:
        nmf_backward_kernel[(b,)](X, dY, bases_hist, coef_hist, u_hist, p_arg, h_arg,
                                  dc_carry, db_carry, dp_hist, dh_part, du_hist, xdu_part,
                                  dg_part, scratch_part, dbases, dx, D, N, R, steps, nB, nC, nU,
                                  nDU, nS, eps, inv_t, UNROLLED=unrolled, BLOCK_D=BLOCK_D,
                                  BLOCK_N=BLOCK_N, BR=BR,
                                  **_launch_options(BR, persistent_backward=True))
    else:
        for i in range(steps + 1 if unrolled else 1):
            k = steps + 1 - i
            nmf_coef_grad_kernel[(b, n_chunks)](
                X, dY, bases_hist, coef_hist, u_hist, dc_carry, dp_hist, dh_part, n_dblocks,
                du_hist, xdu_part, dg_part, scratch_part, k, steps, D, N, R, nB, nC, nU, nDU,
                nS, chunk, eps, inv_t, UNROLLED=unrolled, BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N,
                BR=BR, **opts)
            if unrolled:
                nmf_bases_grad_kernel[(b, n_dblocks)](
                    bases_hist, p_arg, h_arg, db_carry, xdu_part, dg_part, n_chunks, dp_hist,
                    dh_part, dbases, scratch_part, k, steps, D, R, nB, nS, eps, BLOCK_D=BLOCK_D,
                    BR=BR, **opts)
        nmf_dx_kernel[(b, triton.cdiv(N, BLOCK_N))](
            bases_hist, du_hist, dp_hist, coef_hist, dx, steps, D, N, R, nB, nDU, nC, nS,
            UNROLLED=unrolled, BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N, BR=BR, **opts)
    return dx, (dbases if unrolled else None)
