"""The Triton kernel of `linear_entropy` (kernels/linear_entropy.py launches it; CUDA, or CPU
tensors under TRITON_INTERPRET=1): one program per block of tokens, looping over vocabulary tiles."""
import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from tokenprobe.kernels.target_rank import _resolved, _target_estimate, _target_outputs
from tokenprobe.kernels.triton_common import tanh_cap


@triton.jit
def _insert(v0, v1, v2, v3, i0, i1, i2, i3, cv, ci):
    """Insert candidate (cv, ci) into the sorted slots v0 >= v1 >= v2 >= v3, shifting the
    slots below it down. Strict '>' puts it after equal values, which came first."""
    g0, g1, g2, g3 = cv > v0, cv > v1, cv > v2, cv > v3  # g_j implies g_{j+1}
    return (tl.where(g0, cv, v0), tl.where(g0, v0, tl.where(g1, cv, v1)),
            tl.where(g1, v1, tl.where(g2, cv, v2)), tl.where(g2, v2, tl.where(g3, cv, v3)),
            tl.where(g0, ci, i0), tl.where(g0, i0, tl.where(g1, ci, i1)),
            tl.where(g1, i1, tl.where(g2, ci, i2)), tl.where(g2, i2, tl.where(g3, ci, i3)))

@triton.jit
def _kernel(h_ptr, w_ptr, b_ptr, tgt_ptr, ref_ptr, stats_ptr, count_ptr, top_p_ptr, top_i_ptr,
            T, V, D, softcap, log_v, HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr,
            HAS_TGT: tl.constexpr, K: tl.constexpr, UPCAST: tl.constexpr,
            BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """One block of tokens: online accumulators over all vocabulary tiles -> stats (6, T),
    count (T,), top_p and top_i (T, K)."""
    rows = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)  # (BT,)
    rmask = rows < T
    m = tl.full((BLOCK_T,), -1e30, tl.float32)
    s = tl.zeros((BLOCK_T,), tl.float32)
    u = tl.zeros((BLOCK_T,), tl.float32)
    total = tl.zeros((BLOCK_T,), tl.float32)
    hit = tl.zeros((BLOCK_T,), tl.float32)
    count = tl.zeros((BLOCK_T,), tl.int32)
    above = tl.full((BLOCK_T,), float("inf"), tl.float32)
    below = tl.full((BLOCK_T,), float("-inf"), tl.float32)
    v0 = tl.full((BLOCK_T,), float("-inf"), tl.float32)
    v1, v2, v3 = v0, v0, v0
    i0 = tl.zeros((BLOCK_T,), tl.int64)
    i1, i2, i3 = i0, i0, i0
    tgt = tl.load(tgt_ptr + rows, mask=rmask, other=-1).to(tl.int64)
    ref = tl.load(ref_ptr + rows, mask=rmask, other=0.0)
    for c0 in range(0, V, BLOCK_V):
        cols = (c0 + tl.arange(0, BLOCK_V)).to(tl.int64)  # (BV,)
        cmask = cols < V
        acc = tl.zeros((BLOCK_T, BLOCK_V), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            hb = tl.load(h_ptr + rows[:, None] * D + dd[None, :],
                         mask=rmask[:, None] & (dd[None, :] < D), other=0.0)  # (BT, BD)
            wb = tl.load(w_ptr + cols[:, None] * D + dd[None, :],
                         mask=cmask[:, None] & (dd[None, :] < D), other=0.0)  # (BV, BD)
            if UPCAST:
                hb, wb = hb.to(tl.float32), wb.to(tl.float32)
            acc = tl.dot(hb, tl.trans(wb), acc, input_precision="ieee")
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        if HAS_CAP:
            acc = tanh_cap(acc, softcap)
        logits = tl.where(cmask[None, :], acc, float("-inf"))  # (BT, BV)
        m_new = tl.maximum(m, tl.max(logits, 1))
        alpha = tl.exp(m - m_new)
        dl = acc - m_new[:, None]
        e = tl.where(cmask[None, :], tl.exp(dl), 0.0)  # (BT, BV), 0 outside the vocabulary
        u = alpha * (u + s * (m - m_new)) + tl.sum(e * dl, 1)
        s = alpha * s + tl.sum(e, 1)
        m = m_new
        total += tl.sum(tl.where(cmask[None, :], acc, 0.0), 1)
        work = logits
        for _ in tl.static_range(K):  # the tile's top K, (value desc, id asc)
            mx = tl.max(work, 1)
            idx = tl.min(tl.where(work == mx[:, None], cols[None, :], V), 1)
            work = tl.where(cols[None, :] == idx[:, None], float("-inf"), work)
            v0, v1, v2, v3, i0, i1, i2, i3 = _insert(v0, v1, v2, v3, i0, i1, i2, i3, mx, idx)
        if HAS_TGT:
            hit += tl.sum(tl.where(cols[None, :] == tgt[:, None], acc, 0.0), 1)
            other = cmask[None, :] & (cols[None, :] != tgt[:, None])
            gt = other & (acc > ref[:, None])
            count += tl.sum(gt.to(tl.int32), 1)
            above = tl.minimum(above, tl.min(tl.where(gt, acc, float("inf")), 1))
            below = tl.maximum(below, tl.max(tl.where(other & ~gt, acc, float("-inf")), 1))
    log_s = tl.log(s)
    lse = m + log_s
    tl.store(stats_ptr + rows, lse, mask=rmask)
    tl.store(stats_ptr + T + rows, log_s - u / s, mask=rmask)
    tl.store(stats_ptr + 2 * T + rows, lse - total / V - log_v, mask=rmask)
    tl.store(top_p_ptr + rows * K, tl.exp(v0 - lse), mask=rmask)
    tl.store(top_i_ptr + rows * K, i0.to(tl.int32), mask=rmask)
    if K > 1:
        tl.store(top_p_ptr + rows * K + 1, tl.exp(v1 - lse), mask=rmask)
        tl.store(top_i_ptr + rows * K + 1, i1.to(tl.int32), mask=rmask)
    if K > 2:
        tl.store(top_p_ptr + rows * K + 2, tl.exp(v2 - lse), mask=rmask)
        tl.store(top_i_ptr + rows * K + 2, i2.to(tl.int32), mask=rmask)
    if K > 3:
        tl.store(top_p_ptr + rows * K + 3, tl.exp(v3 - lse), mask=rmask)
        tl.store(top_i_ptr + rows * K + 3, i3.to(tl.int32), mask=rmask)
    if HAS_TGT:
        tl.store(stats_ptr + 3 * T + rows, hit, mask=rmask)
        tl.store(stats_ptr + 4 * T + rows, above, mask=rmask)
        tl.store(stats_ptr + 5 * T + rows, below, mask=rmask)
        tl.store(count_ptr + rows, count, mask=rmask)


def launch(hidden, weight, bias, softcap, targets, k, token_chunk, vocab_chunk):
    """linear_entropy's "triton" path: launch `_kernel` (twice in the rare case of a near-tie
    with the target's logit)."""
    (t, d), v, dev = hidden.shape, weight.shape[0], hidden.device
    h, w = hidden.contiguous(), weight.contiguous()
    f32 = {"dtype": torch.float32, "device": dev}
    stats = torch.empty(6, t, **f32)  # (6, T): lse, entropy, self_certainty, hit, above, below
    count = torch.zeros(t, dtype=torch.int32, device=dev)
    top_p, top_i = torch.empty(t, k, **f32), torch.empty(t, k, dtype=torch.int32, device=dev)
    if targets is not None:
        tgt = targets.contiguous()
        estimate = _target_estimate(hidden, weight, bias, softcap, tgt, torch.float32, 1024)
    else:
        tgt, estimate = count, stats[0]  # dummy pointers, never read
    pow2 = triton.next_power_of_2
    bt = min(64, max(16, pow2(min(token_chunk, max(t, 1)))))
    bv = min(128, max(16, pow2(min(vocab_chunk, v))))
    bd = min(64, max(16, pow2(d)))
    # The interpreter cannot tl.dot bfloat16 (triton-lang/triton#11584): upcast there only.
    upcast = (not h.is_cuda and h.dtype != torch.float32) or h.dtype != w.dtype

    def run_kernel(ref: Tensor) -> None:
        if t:
            _kernel[(triton.cdiv(t, bt),)](
                h, w, bias.contiguous() if bias is not None else w, tgt, ref, stats, count,
                top_p, top_i, t, v, d, float(softcap or 1.0), math.log(v),
                HAS_BIAS=bias is not None, HAS_CAP=softcap is not None,
                HAS_TGT=targets is not None, K=k, UPCAST=upcast, BLOCK_T=bt, BLOCK_V=bv,
                BLOCK_D=bd, num_warps=8 if bt * bv >= 8192 else 4)

    run_kernel(estimate)
    out = {"lse": stats[0].clone(), "entropy": stats[1].clone(),
           "self_certainty": stats[2].clone(), "topk_ids": top_i.long(), "topk_probs": top_p}
    if targets is not None:
        hit, above, below = stats[3].clone(), stats[4], stats[5]
        if not bool((_resolved(estimate, hit, above, below) | (tgt < 0)).all()):
            run_kernel(torch.where(tgt >= 0, hit, estimate))  # recount against the tile values
        out |= _target_outputs(tgt, hit, count, out["lse"])
    return out
