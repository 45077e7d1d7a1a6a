"""Attention with per-head statistics, a block of queries at a time, never holding [H, T, T].

One op, `attention_with_stats`: the attention output the model needs plus, from the same
probabilities, the statistics the sinks probe reports (definitions: README, "Measures"):

- `sink_mass` (B, H): Gu et al. 2024 alpha_k = (1/(T-k)) sum_{i>=k} A[i, k] over real queries;
- `attn_entropy` (B, H): mean over real queries of -sum_j A[i, j] log A[i, j] (nats);
- `received` (B, S): sum over heads and real queries of A[i, j] (the caller divides by
  H (T - j) for `attn_received`);
- optionally ZeroTuning (Han et al., FeijiangHan/ZeroTuning) on chosen heads:
  a'_{i0} = gamma a_{i0}, every row renormalised, a'_{ij} = a_{ij} / (1 + (gamma - 1) a_{i0});
  a row with nothing left to renormalise (gamma = 0 and a_{i0} = 1) is left unchanged;
  gamma = inf moves all of the row's attention to key 0 (the "attend to the sink" ablation).

Implementations (`impl`): "reference" materialises the full masked score matrix in float64
(tests only); "torch" streams query blocks (any device, any mask, softcapping, ZeroTuning);
"flash" makes two calls of PyTorch's fused CPU flash-attention kernel, which returns each row's
log-sum-exp (CPU, causal or causal + right padding masks, no softcapping or ZeroTuning);
"triton" is the same two passes as Triton kernels (kernels/attention_triton.py: CUDA, or CPU
under TRITON_INTERPRET=1; causal + right padding, softcapping, no ZeroTuning); "auto" picks
"triton" on CUDA, "flash" on CPU past FLASH_FROM tokens, where they apply, and "torch"
elsewhere. "flash" and
"triton" run only after their first-use self-check on the device (kernels/selfcheck.py).

The "flash" path. With lse_i from the forward call, A[i, j] = exp(s_ij - lse_i), so column
sums are a second attention with the roles swapped: key j as the query, the real queries i >= j
as keys, -lse_i as an additive bias. Its log-sum-exp is log sum_{i >= j} A[i, j] (the
received mass; the sink mass is its column k), and with the queries as values its output times
that sum is sum_i A[i, j] q_i, from which sum_ij A[i, j] s_ij = scale sum_j k_j . (sum_i A[i, j]
q_i), the dot product of the mean row entropy H_i = lse_i - sum_j A[i, j] s_ij. Reversing the
sequence makes "i >= j" the kernel's causal mask, so nothing of size [T, T] is ever built.
"""
from __future__ import annotations

import math

import torch

from tokenprobe.kernels.common import check_impl, resolve_impl, tanh_cap

IMPLS = ("auto", "torch", "flash", "triton", "reference")
OP = "attention_with_stats"  # its name in the self-check (kernels/selfcheck.py)
BLOCK = 32  # block=None: queries a block (2-core CPU, interleaved with sdpa: 32 was as fast as
# 64 or faster at every T from 64 to 8192, 1.1-1.6x less time at T = 128-512; 16 was faster
# only at T = 64, 1.46x sdpa's time against 1.6x)
# "auto" on CPU: the blockwise torch path up to this many tokens (about 2x faster than two
# flash calls at T <= 2048 on 2 cores, even at 8192), flash beyond (never a block of [H, Bq, T]).
FLASH_FROM = 8192
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


@torch.no_grad()  # a measurement: never a graph (tokenprobe.attention gives a differentiable out)
def attention_with_stats(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         mask: torch.Tensor | None, lengths: torch.Tensor, *, scaling: float,
                         softcap: float | None = None, k_pos: int = 0,
                         gamma: torch.Tensor | None = None, block: int | None = None,
                         impl: str = "auto") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Causal attention output and statistics.

    Args:
        q: (B, H, T, Dh) post-RoPE queries.
        k, v: (B, KVH, S, Dh) post-RoPE keys and values, H a multiple of KVH (GQA), S == T.
        mask: (B, 1, T, S) bool, True where query i may attend to key j (causal, padding,
            sliding window as the model built it), or None for plain causal attention.
        lengths: (B,) number of real (unpadded, right-padded) tokens per row.
        scaling: multiplier of q.k (e.g. Dh ** -0.5).
        softcap: attention logit soft-capping (Gemma 2), None for none.
        k_pos: key position whose received mass is `sink_mass`.
        gamma: (H,) ZeroTuning factor per head (1 = unchanged), or None.
        block: queries per block (torch impl); None: BLOCK.
        impl: "auto", "torch", "flash", "triton" or "reference" ("flash" and "triton" raise
            where they do not apply).

    Runs without autograd (`torch.no_grad`): neither the output nor the statistics carry a
    graph, whatever q, k and v require.

    Returns:
        out (B, T, H, Dh) in q's dtype, and stats: sink_mass (B, H), attn_entropy (B, H),
        received (B, S), all float32 (float64 for the reference).
    """
    check_impl(impl, IMPLS)
    if impl in ("reference", "torch"):  # asked for: no need to check the mask (O(B T^2))
        resolve_impl(impl, q.device, allowed=IMPLS, op=OP)  # passes through; recorded
    if impl == "reference":
        return _reference(q, k, v, mask, lengths, scaling=scaling, softcap=softcap,
                          k_pos=k_pos, gamma=gamma)
    if impl == "torch":
        return _blockwise(q, k, v, mask, lengths, scaling=scaling, softcap=softcap, k_pos=k_pos,
                          gamma=gamma, block=block)
    causal = gamma is None and _is_causal(mask, lengths, q.shape[-2])
    flash_ok = (causal and softcap is None and _FLASH_CPU is not None
                and q.device.type == "cpu")
    if impl == "flash" and not flash_ok:
        raise ValueError("impl='flash' needs CPU tensors, a causal (+ right padding) mask and "
                         "no softcapping or ZeroTuning; use impl='torch' or 'auto'")
    unfit = None if causal else ("impl='triton' needs a causal (+ right padding) mask and no "
                                 "ZeroTuning; use impl='torch' or 'auto'")
    impl = resolve_impl(impl, q.device, allowed=IMPLS, unfit=unfit,
                        fallback="flash" if flash_ok and q.shape[-2] > FLASH_FROM else "torch",
                        op=OP)
    if impl == "triton":
        return _triton(q, k, v, lengths, scaling=scaling, softcap=softcap, k_pos=k_pos)
    if impl == "flash":
        return _flash(q, k, v, lengths, scaling=scaling, k_pos=k_pos)
    return _blockwise(q, k, v, mask, lengths, scaling=scaling, softcap=softcap, k_pos=k_pos,
                      gamma=gamma, block=block)


MASKED = -1e30  # finite, so that 0 * score stays 0 where p = exp(MASKED - max) underflows to 0


def _blockwise(q, k, v, mask, lengths, *, scaling, softcap, k_pos, gamma, block):
    bsz, heads, t, dh = q.shape
    block = block or BLOCK
    kvh = k.shape[1]
    groups = heads // kvh
    work = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    if mask is not None and _is_causal(mask, lengths, t):
        mask = None  # causal (+ right padding): only each block's diagonal square is masked
    qs, kw, vw = q.to(work) * scaling, k.to(work), v.to(work)  # the scale on the small operand
    out = torch.empty(bsz, t, heads, dh, dtype=q.dtype, device=q.device)
    sink = torch.zeros(bsz, heads, dtype=work, device=q.device)
    ent = torch.zeros(bsz, heads, dtype=work, device=q.device)
    received = torch.zeros(bsz, t, dtype=work, device=q.device)
    valid = (torch.arange(t, device=q.device)[None, :] < lengths[:, None]).to(work)  # (B, T)
    log_gamma = (torch.log(gamma.to(work)).clamp(MASKED, -MASKED).view(1, -1, 1)
                 if gamma is not None else None)
    # per query: its weight in the column sums (each head's row), in the sink mass (i >= k_pos)
    heads_valid = valid[:, None].expand(bsz, heads, t).contiguous()  # (B, H, T)
    past_sink = valid * (torch.arange(t, device=q.device) >= k_pos)
    diag = torch.ones(block, block, dtype=torch.bool, device=q.device).triu(1)
    # Blocks of a few dozen queries keep the scores and probabilities of a block in cache for
    # the passes below (on 2 CPU cores, 64 queries ran about twice as fast as 256 at T = 2048).
    for a in range(0, t, block):
        b = min(a + block, t)
        n, cols = b - a, b  # causal: keys after the block's last query are never allowed
        qb = qs[:, :, a:b].reshape(bsz, kvh, groups * n, dh)  # (B, KVH, G*Bq, Dh)
        s = torch.matmul(qb, kw[:, :, :cols].transpose(-1, -2))  # (B, KVH, G*Bq, cols)
        s = tanh_cap(s, softcap, inplace=True).view(bsz, heads, n, cols)
        if mask is not None:
            s.masked_fill_(~mask[:, :, a:b, :cols], MASKED)
        else:  # causal: only the block's diagonal square has keys after a query
            s[..., a:b].masked_fill_(diag[:n, :n], MASKED)
        if log_gamma is not None:  # ZeroTuning: gamma a_i0, renormalised = softmax with log(gamma)
            first = s[..., 0].clone()
            s[..., 0] += log_gamma
            dead = s.amax(-1) <= MASKED / 2  # nothing left to renormalise: row unchanged
            s[..., 0] = torch.where(dead, first, s[..., 0])
        p = torch.softmax(s, dim=-1)  # (B, H, Bq, cols)
        # Entropy H = lse - sum_j p_j s_j of the scores that made p, with lse = max_j s_j -
        # log max_j p_j (exact, and max p >= 1/cols never underflows). Fully masked rows
        # (padding queries) are uniform here and carry zero weight below.
        lse = s.amax(-1) - torch.log(p.amax(-1))
        row_entropy = lse - s.mul_(p).sum(-1)  # in place: the scores are spent
        o = torch.matmul(p.view(bsz, kvh, groups * n, cols), vw[:, :, :cols])
        out[:, a:b] = o.view(bsz, heads, n, dh).transpose(1, 2).to(q.dtype)
        ent += (row_entropy * valid[:, None, a:b]).sum(-1)
        if k_pos < cols:
            sink += (p[..., k_pos] * past_sink[:, None, a:b]).sum(-1)
        # column sums over heads and real queries: one GEMV per batch row
        received[:, :cols] += torch.bmm(heads_valid[:, :, a:b].reshape(bsz, 1, heads * n),
                                        p.reshape(bsz, heads * n, cols)).squeeze(1)
    n_real = lengths.to(work)
    stats = {"sink_mass": sink / (n_real - k_pos).clamp_min(1)[:, None],
             "attn_entropy": ent / n_real[:, None], "received": received}
    return out, stats


def _is_causal(mask: torch.Tensor | None, lengths: torch.Tensor, t: int) -> bool:
    """Whether `mask` is plain causal at every real query (None is; a sliding window shorter
    than the prompt, or left padding, is not). Padding queries may see anything: their rows
    never reach a table or a real token."""
    if mask is None:
        return True
    if mask.dim() != 4 or mask.shape[1] != 1:
        return False
    causal = torch.ones(t, t, dtype=torch.bool, device=mask.device).tril()
    return all(torch.equal(mask[b, 0, :n, :n], causal[:n, :n])
               for b, n in enumerate(lengths.tolist()))


def _finish(col: torch.Tensor, row_term: torch.Tensor, lengths: torch.Tensor,
            k_pos: int) -> dict[str, torch.Tensor]:
    """Stats from column sums col (B, H, T) and the real rows' summed entropy row_term (B, H)."""
    n_real = lengths.to(col.dtype)
    sink = col[..., k_pos] if k_pos < col.shape[-1] else torch.zeros_like(col[..., 0])
    return {"sink_mass": sink / (n_real - k_pos).clamp_min(1)[:, None],
            "attn_entropy": row_term / n_real[:, None], "received": col.sum(1)}


def _triton(q, k, v, lengths, *, scaling, softcap, k_pos, bm: int = 32, bn: int = 32):
    import triton

    from tokenprobe.kernels.attention_triton import _columns, _forward

    bsz, heads, t, dh = q.shape
    kvh = k.shape[1]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty(bsz, t, heads, dh, dtype=torch.float32, device=q.device)
    lse = torch.empty(bsz, heads, t, dtype=torch.float32, device=q.device)
    ent = torch.empty_like(lse)
    col = torch.empty_like(lse)
    lens = lengths.to(device=q.device, dtype=torch.int32).contiguous()
    cap = float(softcap) if softcap is not None else 1.0
    dhp = max(16, triton.next_power_of_2(dh))
    _forward[(bsz * heads, triton.cdiv(t, bm))](
        q, k, v, out, lse, ent, t, heads, kvh, dh, float(scaling), cap,
        HAS_CAP=softcap is not None, BM=bm, BN=bn, DH=dhp)
    _columns[(bsz * heads, triton.cdiv(t, bn))](
        q, k, lse, lens, col, t, heads, kvh, dh, float(scaling), cap,
        HAS_CAP=softcap is not None, BM=bm, BN=bn, DH=dhp)
    real = (torch.arange(t, device=q.device)[None, :] < lens[:, None])[:, None]  # (B, 1, T)
    return out.to(q.dtype), _finish(col, torch.where(real, ent, 0.0).sum(-1), lengths, k_pos)


def _flash(q, k, v, lengths, *, scaling, k_pos):
    bsz, heads, t, dh = q.shape
    groups = heads // k.shape[1]
    work = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    qw = q.to(work)
    kw = k.to(work).repeat_interleave(groups, dim=1)  # (B, H, T, Dh)
    out, lse = _FLASH_CPU(qw, kw, v.to(work).repeat_interleave(groups, dim=1), 0.0, True,
                          scale=scaling)  # (B, H, T, Dh), (B, H, T)
    real = torch.arange(t, device=q.device)[None, :] < lengths[:, None]  # (B, T)
    bias = torch.where(real[:, None, :], -lse, -math.inf)  # padding queries weigh nothing
    # Swapped roles on the reversed sequence: query j' = T-1-j attends to keys i' <= j'.
    rq = qw.flip(2)
    wq, col_lse = _FLASH_CPU(kw.flip(2), rq, rq, 0.0, True, attn_mask=bias.flip(2)[:, :, None]
                             .contiguous(), scale=scaling)  # non-contiguous masks are slow
    col_lse, wq = col_lse.flip(2), wq.flip(2)  # (B, H, T), (B, H, T, Dh): back in order
    # sum_{real i >= j} A[i, j]; a padding key's row has every key masked (its lse comes back
    # as 0 or nan, not -inf): padding keys receive nothing
    col = torch.where(real[:, None], torch.exp(col_lse), 0.0)
    weighted = torch.where(real[:, None], (wq * kw).sum(-1), 0.0) * col  # k_j . sum_i A[i, j] q_i
    row_term = torch.where(real[:, None], lse, 0.0).sum(-1) - scaling * weighted.sum(-1)
    return out.transpose(1, 2).to(q.dtype), _finish(col, row_term, lengths, k_pos)


def _reference(q, k, v, mask, lengths, *, scaling, softcap, k_pos, gamma):
    """Everything materialised in float64: explicit softmax over the full masked score matrix."""
    bsz, heads, t, dh = q.shape
    groups = heads // k.shape[1]
    q64, k64, v64 = (x.double() for x in (q, k, v))
    k64, v64 = k64.repeat_interleave(groups, dim=1), v64.repeat_interleave(groups, dim=1)
    s = tanh_cap(torch.matmul(q64, k64.transpose(-1, -2)) * scaling, softcap)
    allowed = (mask if mask is not None else
               torch.ones(t, t, dtype=torch.bool, device=q.device).tril()[None, None])
    s = s.masked_fill(~allowed, -math.inf)
    e = torch.exp(s - s.amax(-1, keepdim=True))
    p = (e / e.sum(-1, keepdim=True)).nan_to_num(0.0)  # (B, H, T, S)
    if gamma is not None:
        g = gamma.double().view(1, -1, 1, 1)
        scaled = p.clone()
        scaled[..., 0:1] = g * p[..., 0:1]
        total = scaled.sum(-1, keepdim=True)
        p = torch.where(total > 0, scaled / total.clamp_min(1e-300), p)  # explicit renormalisation
    out = torch.matmul(p, v64).transpose(1, 2).to(q.dtype)
    stats = {k_: torch.zeros(bsz, heads, dtype=torch.float64) for k_ in ("sink_mass", "attn_entropy")}
    stats["received"] = torch.zeros(bsz, t, dtype=torch.float64)
    for i in range(bsz):
        n = int(lengths[i])
        pi = p[i, :, :n, :n]  # real queries and keys only
        plogp = torch.where(pi > 0, pi * torch.log(pi), torch.zeros_like(pi))
        stats["attn_entropy"][i] = -plogp.sum(-1).mean(-1)
        if k_pos < n:  # else no query reaches key k_pos: 0, as the fast paths give
            stats["sink_mass"][i] = pi[:, k_pos:, k_pos].sum(-1) / (n - k_pos)
        stats["received"][i, :n] = pi.sum(dim=(0, 1))
    return out, stats
