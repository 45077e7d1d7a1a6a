"""The Triton kernels of `attention_with_stats` (kernels/attention.py launches them; CUDA, or CPU
tensors under TRITON_INTERPRET=1): a flash-attention forward that also returns each row's
log-sum-exp and entropy, then a pass over key blocks that sums A[i, j] = exp(s_ij - lse_i)
down each column. Causal attention over right-padded rows, GQA and logit soft-capping."""
import triton
import triton.language as tl

from tokenprobe.kernels.triton_common import tanh_cap


@triton.jit
def _scores(q, k, scale, softcap, HAS_CAP: tl.constexpr):
    """(BM, DH) x (BN, DH) -> (BM, BN) scaled, soft-capped scores in float32."""
    s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
    if HAS_CAP:
        s = tanh_cap(s, softcap)
    return s


@triton.jit
def _forward(q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, ent_ptr, T, H, KVH, DHEAD, scale, softcap,
             HAS_CAP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, DH: tl.constexpr):
    """One (batch row, head, query block): online softmax over the causal key blocks.
    q (B, H, T, Dh), k and v (B, KVH, T, Dh), out (B, T, H, Dh), lse and ent (B, H, T)."""
    bh = tl.program_id(0)
    b, h = bh // H, bh % H
    kvh = h // (H // KVH)
    rows = tl.program_id(1) * BM + tl.arange(0, BM)  # (BM,)
    dd = tl.arange(0, DH)
    rmask = rows < T
    dmask = dd < DHEAD
    q_base = q_ptr + (b * H + h).to(tl.int64) * T * DHEAD
    kv_base = (b * KVH + kvh).to(tl.int64) * T * DHEAD
    q = tl.load(q_base + rows[:, None] * DHEAD + dd[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    m = tl.full((BM,), -1e30, tl.float32)
    l = tl.zeros((BM,), tl.float32)
    u = tl.zeros((BM,), tl.float32)  # sum_j e^(s_j - m) s_j, for the entropy
    acc = tl.zeros((BM, DH), tl.float32)
    for n0 in range(0, tl.minimum((tl.program_id(1) + 1) * BM, T), BN):
        cols = n0 + tl.arange(0, BN)
        kvmask = (cols[:, None] < T) & dmask[None, :]
        k = tl.load(k_ptr + kv_base + cols[:, None] * DHEAD + dd[None, :], mask=kvmask,
                    other=0.0).to(tl.float32)
        v = tl.load(v_ptr + kv_base + cols[:, None] * DHEAD + dd[None, :], mask=kvmask,
                    other=0.0).to(tl.float32)
        s = _scores(q, k, scale, softcap, HAS_CAP)
        allowed = (cols[None, :] <= rows[:, None]) & (cols[None, :] < T)
        s = tl.where(allowed, s, -1e30)
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp(m - m_new)
        p = tl.where(allowed, tl.exp(s - m_new[:, None]), 0.0)
        l = alpha * l + tl.sum(p, 1)
        u = alpha * u + tl.sum(p * tl.where(allowed, s, 0.0), 1)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        m = m_new
    lse = m + tl.log(l)
    out_rows = out_ptr + ((b.to(tl.int64) * T + rows[:, None]) * H + h) * DHEAD + dd[None, :]
    tl.store(out_rows, acc / l[:, None], mask=rmask[:, None] & dmask[None, :])
    stat = (b * H + h).to(tl.int64) * T + rows
    tl.store(lse_ptr + stat, lse, mask=rmask)
    tl.store(ent_ptr + stat, lse - u / l, mask=rmask)


@triton.jit
def _columns(q_ptr, k_ptr, lse_ptr, len_ptr, col_ptr, T, H, KVH, DHEAD, scale, softcap,
             HAS_CAP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, DH: tl.constexpr):
    """One (batch row, head, key block): col[j] = sum over real queries i >= j of A[i, j]."""
    bh = tl.program_id(0)
    b, h = bh // H, bh % H
    kvh = h // (H // KVH)
    n = tl.load(len_ptr + b)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    dd = tl.arange(0, DH)
    dmask = dd < DHEAD
    k = tl.load(k_ptr + (b * KVH + kvh).to(tl.int64) * T * DHEAD + cols[:, None] * DHEAD
                + dd[None, :], mask=(cols[:, None] < T) & dmask[None, :], other=0.0).to(tl.float32)
    q_base = q_ptr + (b * H + h).to(tl.int64) * T * DHEAD
    stat = (b * H + h).to(tl.int64) * T
    col = tl.zeros((BN,), tl.float32)
    for m0 in range((tl.program_id(1) * BN // BM) * BM, n, BM):
        rows = m0 + tl.arange(0, BM)
        real = rows < n
        q = tl.load(q_base + rows[:, None] * DHEAD + dd[None, :],
                    mask=real[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        lse = tl.load(lse_ptr + stat + rows, mask=real, other=0.0)
        s = _scores(q, k, scale, softcap, HAS_CAP)
        allowed = real[:, None] & (cols[None, :] <= rows[:, None])
        p = tl.where(allowed, tl.exp(tl.where(allowed, s - lse[:, None], 0.0)), 0.0)
        col += tl.sum(p, 0)
    tl.store(col_ptr + stat + cols, col, mask=cols < T)
