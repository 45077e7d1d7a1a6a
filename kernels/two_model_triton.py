"""The Triton kernel of `two_model_divergence` (kernels/two_model.py launches it; CUDA, or CPU
tensors under TRITON_INTERPRET=1): one program per block of tokens, looping over vocabulary
tiles; accumulator rows as in two_model.py (M_P ... T_Q, then the JSD sum)."""
import triton
import triton.language as tl

from tokenprobe.kernels.triton_common import tanh_cap


@triton.jit
def _load_rows(ptr, idx, n, dd, d, UPCAST: tl.constexpr):
    """(len(idx), len(dd)) block of a row-major (n, d) matrix, zero outside it."""
    x = tl.load(ptr + idx[:, None] * d + dd[None, :],
                mask=(idx[:, None] < n) & (dd[None, :] < d), other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x

@triton.jit
def _logit_tiles(hp, wp, bp, hq, wq, bq, T, V, Dp, Dq, cap_p, cap_q, rows, cols,
                 HAS_BP: tl.constexpr, HAS_BQ: tl.constexpr, HAS_CP: tl.constexpr,
                 HAS_CQ: tl.constexpr, SHARED: tl.constexpr, UPCAST: tl.constexpr,
                 PREC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    """(BLOCK_T, BLOCK_V) float32 logit tiles of p and q; NEG outside the vocabulary."""
    a = tl.zeros((BLOCK_T, BLOCK_V), dtype=tl.float32)
    b = tl.zeros((BLOCK_T, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, Dp, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        w = tl.trans(_load_rows(wp, cols, V, dd, Dp, UPCAST))  # (BLOCK_D, BLOCK_V)
        a = tl.dot(_load_rows(hp, rows, T, dd, Dp, UPCAST), w, a, input_precision=PREC)
        if SHARED:  # logit lens: the same weight tile serves both token sets
            b = tl.dot(_load_rows(hq, rows, T, dd, Dp, UPCAST), w, b, input_precision=PREC)
    if not SHARED:
        for d0 in range(0, Dq, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            w = tl.trans(_load_rows(wq, cols, V, dd, Dq, UPCAST))
            b = tl.dot(_load_rows(hq, rows, T, dd, Dq, UPCAST), w, b, input_precision=PREC)
    if HAS_BP:
        a += tl.load(bp + cols, mask=cols < V, other=0.0).to(tl.float32)[None, :]
    if HAS_BQ:
        b += tl.load(bq + cols, mask=cols < V, other=0.0).to(tl.float32)[None, :]
    if HAS_CP:
        a = tanh_cap(a, cap_p)
    if HAS_CQ:
        b = tanh_cap(b, cap_q)
    ok = cols[None, :] < V
    return tl.where(ok, a, -1e30), tl.where(ok, b, -1e30)

@triton.jit
def _kernel(hp, wp, bp, hq, wq, bq, T, V, Dp, Dq, cap_p, cap_q, tgt, acc, beta,
            HAS_TGT: tl.constexpr, CONTRAST: tl.constexpr, JSD: tl.constexpr,
            HAS_BP: tl.constexpr, HAS_BQ: tl.constexpr, HAS_CP: tl.constexpr,
            HAS_CQ: tl.constexpr, SHARED: tl.constexpr, UPCAST: tl.constexpr,
            PREC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr,
            BLOCK_D: tl.constexpr):
    """One block of tokens: pass 1 over all vocabulary tiles (online accumulators), then
    if JSD a second loop that recomputes the tiles with the final normalisers -> acc (13, T)."""
    rows = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    m_p = tl.full((BLOCK_T,), -1e30, tl.float32)
    m_q, m_c = m_p, m_p
    s_p = tl.zeros((BLOCK_T,), tl.float32)
    u_p, k_p, s_q, u_q, k_q, s_c, t_p, t_q, j = s_p, s_p, s_p, s_p, s_p, s_p, s_p, s_p, s_p
    target = rows  # unused without targets
    if HAS_TGT:
        target = tl.load(tgt + rows, mask=rows < T, other=-1).to(tl.int64)
    for v0 in range(0, V, BLOCK_V):
        cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        a, b = _logit_tiles(hp, wp, bp, hq, wq, bq, T, V, Dp, Dq, cap_p, cap_q, rows, cols,
                            HAS_BP, HAS_BQ, HAS_CP, HAS_CQ, SHARED, UPCAST, PREC,
                            BLOCK_T, BLOCK_V, BLOCK_D)
        if HAS_TGT:
            hit = cols[None, :] == target[:, None]
            t_p += tl.sum(tl.where(hit, a, 0.0), 1)
            t_q += tl.sum(tl.where(hit, b, 0.0), 1)
        if CONTRAST:
            c = tl.where(cols[None, :] < V, (1.0 + beta) * a - beta * b, -float("inf"))
            mc_new = tl.maximum(m_c, tl.max(c, 1))
            s_c = s_c * tl.exp(m_c - mc_new) + tl.sum(tl.exp(c - mc_new[:, None]), 1)
            m_c = mc_new
        mp_new, mq_new = tl.maximum(m_p, tl.max(a, 1)), tl.maximum(m_q, tl.max(b, 1))
        d_p, d_q = m_p - mp_new, m_q - mq_new
        x, y = a - mp_new[:, None], b - mq_new[:, None]
        e_p, e_q = tl.exp(x), tl.exp(y)
        r_p, r_q = tl.exp(d_p), tl.exp(d_q)
        u_p = r_p * (u_p + d_p * s_p) + tl.sum(e_p * x, 1)
        u_q = r_q * (u_q + d_q * s_q) + tl.sum(e_q * y, 1)
        k_p = r_p * (k_p + (d_p - d_q) * s_p) + tl.sum(e_p * (x - y), 1)
        k_q = r_q * (k_q + (d_q - d_p) * s_q) + tl.sum(e_q * (y - x), 1)
        s_p, s_q = r_p * s_p + tl.sum(e_p, 1), r_q * s_q + tl.sum(e_q, 1)
        m_p, m_q = mp_new, mq_new
    if JSD:  # see _jsd_tile for the terms
        lse_p, lse_q = m_p + tl.log(s_p), m_q + tl.log(s_q)
        for v0 in range(0, V, BLOCK_V):
            cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
            a, b = _logit_tiles(hp, wp, bp, hq, wq, bq, T, V, Dp, Dq, cap_p, cap_q, rows,
                                cols, HAS_BP, HAS_BQ, HAS_CP, HAS_CQ, SHARED, UPCAST, PREC,
                                BLOCK_T, BLOCK_V, BLOCK_D)
            lp, lq = a - lse_p[:, None], b - lse_q[:, None]
            d = lq - lp
            soft = tl.log(1.0 + tl.exp(-tl.abs(d)))
            ln2 = 0.6931471805599453
            j += tl.sum(tl.exp(lp) * (ln2 - tl.maximum(d, 0.0) - soft)
                        + tl.exp(lq) * (ln2 - tl.maximum(-d, 0.0) - soft), 1)
    keep = rows < T
    tl.store(acc + 0 * T + rows, m_p, mask=keep)  # M_P
    tl.store(acc + 1 * T + rows, s_p, mask=keep)  # S_P
    tl.store(acc + 2 * T + rows, u_p, mask=keep)  # U_P
    tl.store(acc + 3 * T + rows, k_p, mask=keep)  # K_P
    tl.store(acc + 4 * T + rows, m_q, mask=keep)  # M_Q
    tl.store(acc + 5 * T + rows, s_q, mask=keep)  # S_Q
    tl.store(acc + 6 * T + rows, u_q, mask=keep)  # U_Q
    tl.store(acc + 7 * T + rows, k_q, mask=keep)  # K_Q
    tl.store(acc + 8 * T + rows, m_c, mask=keep)  # M_C
    tl.store(acc + 9 * T + rows, s_c, mask=keep)  # S_C
    tl.store(acc + 10 * T + rows, t_p, mask=keep)  # T_P
    tl.store(acc + 11 * T + rows, t_q, mask=keep)  # T_Q
    tl.store(acc + 12 * T + rows, j, mask=keep)  # J
