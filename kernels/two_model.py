"""Two next-token distributions compared per token, streamed over the vocabulary, never (T, V).

p = softmax(z_p), z_p = softcap_p(hidden_p @ weight_p.T + bias_p), and q likewise, over one
vocabulary (definitions: README, "Measures"):

- entropies and JSD(p, q) for two-model token importance (TIP, on-policy distillation's token
  importance: student entropy H/ln V against JSD(student||teacher)/ln 2);
- log softmax((1 + beta) z_p - beta z_q)[y], the contrastive estimation of Lin et al.,
  "Critical Tokens Matter" (cDPO; s_t = exp of it, p the positive and q the negative model);
- the logit lens (nostalgebraist 2020; tuned lens, Belrose et al. 2023): p = the lens
  distribution of a layer, q = the final one, one shared unembedding, so `weight_q is weight_p`
  and each vocabulary tile costs one matmul over both token sets.

Pass 1 keeps flash-style online accumulators per token, rescaled whenever a running max grows:
s = sum e^{z-m}; u = sum e^{z-m} (z-m), so H = log s - u/s; k_p = sum e^{z_p-m_p} ((z_p-m_p) -
(z_q-m_q)), so KL(p||q) = k_p/s_p - log s_p + log s_q (the same for q); an online logsumexp of
the contrastive logits; the target logits. JSD needs both final normalisers, so it takes a
second pass that recomputes the logit tiles (pass 1's matmuls again); jsd=False skips it.

Implementations (`impl`): "reference" (full float64 logits; tests only), "torch" (tiles of
token_chunk x vocab_chunk, float32 logits even for bf16/fp16 inputs; CPU path, CUDA fallback),
"triton" (a program per block of tokens looping over vocabulary tiles; CUDA, or CPU under
TRITON_INTERPRET=1), "auto" (triton on CUDA when it imports, else torch); "triton" runs only
after its first-use self-check on the device (kernels/selfcheck.py).
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from tokenprobe.kernels.common import IMPLS, NO_FLOAT64, check_impl, resolve_impl, tanh_cap

LN2 = math.log(2.0)
NEG = -1e30  # finite "minus infinity": e^{NEG - m} = 0 and (NEG - m) * 0 = 0, never NaN
# Rows of the pass-1 accumulator tensor (12, T), shared by the torch and Triton paths.
M_P, S_P, U_P, K_P, M_Q, S_Q, U_Q, K_Q, M_C, S_C, T_P, T_Q = range(12)


@dataclass(frozen=True)
class _Problem:
    """The op's inputs, validated; `shared` selects the one-matmul-per-tile path."""
    hp: Tensor  # (T, Dp)
    wp: Tensor  # (V, Dp)
    bp: Tensor | None  # (V,)
    cp: float | None
    hq: Tensor  # (T, Dq)
    wq: Tensor  # (V, Dq)
    bq: Tensor | None
    cq: float | None
    targets: Tensor | None  # (T,) int64, negative = none
    beta: float | None
    shared: bool  # weight, bias and softcap shared: one matmul per tile for both token sets


@torch.no_grad()  # a measurement: never a graph, whatever the weights require
def two_model_divergence(hidden_p: Tensor, weight_p: Tensor, hidden_q: Tensor, weight_q: Tensor,
                         *, bias_p: Tensor | None = None, bias_q: Tensor | None = None,
                         softcap_p: float | None = None, softcap_q: float | None = None,
                         targets: Tensor | None = None, contrast_beta: float | None = None,
                         jsd: bool = True, impl: str = "auto", token_chunk: int = 512,
                         vocab_chunk: int = 4096) -> dict[str, Tensor]:
    """Per-token entropies, KL both ways, JSD and target log-probs of two models.

    Args:
        hidden_p: (T, Dp) hidden states of model p (already final-normed).
        weight_p: (V, Dp) unembedding of p.
        hidden_q: (T, Dq) hidden states of model q; Dq may differ from Dp.
        weight_q: (V, Dq) unembedding of q. Pass `weight_p` itself (with the same bias and
            softcap) for the shared-weight fast path (logit lens).
        bias_p, bias_q: (V,) logit biases, or None.
        softcap_p, softcap_q: final-logit soft-capping z = c tanh(z / c) (Gemma 2), or None.
        targets: (T,) int64 token ids in [0, V); negative ids are skipped (NaN outputs).
        contrast_beta: beta of cDPO's contrastive estimation; needs `targets`.
        jsd: compute the Jensen-Shannon divergence (a second pass over the vocabulary).
        impl: "auto", "torch", "triton" or "reference".
        token_chunk, vocab_chunk: tile of the torch path; Triton rounds them to powers of two
            and caps them at 64 tokens x 128 vocabulary entries.

    Runs without autograd (`torch.no_grad`): weights that require grad build no graph and
    keep no tile alive; the outputs never require grad.

    Returns:
        (T,) tensors, float32 (float64 for the reference or float64 inputs), in nats: lse_p,
        lse_q, entropy_p, entropy_q, kl_pq = KL(p||q), kl_qp = KL(q||p), jsd (if asked, in
        [0, ln 2]); with targets target_logprob_p, target_logprob_q, and with contrast_beta
        contrast_logprob = log softmax((1 + beta) z_p - beta z_q)[target].
    """
    check_impl(impl, IMPLS)
    _check(hidden_p, weight_p, hidden_q, weight_q, bias_p, bias_q, targets, contrast_beta)
    if min(token_chunk, vocab_chunk) < 1:
        raise ValueError(f"chunks must be >= 1, got {token_chunk}, {vocab_chunk}")
    shared = weight_q is weight_p and bias_q is bias_p and softcap_q == softcap_p
    targets = targets.to(hidden_p.device).long() if targets is not None else None
    pr = _Problem(hidden_p, weight_p, bias_p, softcap_p, hidden_q, weight_q, bias_q, softcap_q,
                  targets, contrast_beta, shared)
    f64 = any(x.dtype == torch.float64 for x in (hidden_p, weight_p, hidden_q, weight_q))
    impl = resolve_impl(impl, hidden_p.device, unfit=NO_FLOAT64 if f64 else None,
                        op="two_model_divergence")
    if impl == "reference":
        return _reference(pr, jsd)
    if impl == "triton":
        acc = _triton(pr, jsd, token_chunk, vocab_chunk)  # (13, T)
        out = _finish(acc[:12], targets, contrast_beta)
        j = 0.5 * acc[12]
    else:
        work = torch.float64 if f64 else torch.float32
        out = _finish(_torch_pass1(pr, token_chunk, vocab_chunk, work), targets, contrast_beta)
        j = _torch_jsd(pr, out["lse_p"], out["lse_q"], token_chunk, vocab_chunk) if jsd else None
    if jsd:
        out["jsd"] = j.clamp(0.0, LN2)  # rounding can step a hair outside [0, ln 2]
    order = ("lse_p", "lse_q", "entropy_p", "entropy_q", "kl_pq", "kl_qp", "jsd",
             "target_logprob_p", "target_logprob_q", "contrast_logprob")
    return {k: out[k] for k in order if k in out}


def _check(hp: Tensor, wp: Tensor, hq: Tensor, wq: Tensor, bp: Tensor | None, bq: Tensor | None,
           targets: Tensor | None, beta: float | None) -> None:
    """Raise ValueError on inconsistent shapes or targets."""
    for name, x in (("hidden_p", hp), ("weight_p", wp), ("hidden_q", hq), ("weight_q", wq)):
        if x.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(x.shape)}")
    if wp.shape[0] != wq.shape[0]:
        raise ValueError(f"vocabulary sizes differ: weight_p has V={wp.shape[0]} rows, "
                         f"weight_q has V={wq.shape[0]}")
    if hp.shape[0] != hq.shape[0]:
        raise ValueError(f"token counts differ: hidden_p has T={hp.shape[0]}, "
                         f"hidden_q has T={hq.shape[0]}")
    for side, h, w in (("p", hp, wp), ("q", hq, wq)):
        if h.shape[1] != w.shape[1]:
            raise ValueError(f"hidden_{side} width {h.shape[1]} != weight_{side} width "
                             f"{w.shape[1]}")
    v, t = wp.shape[0], hp.shape[0]
    for name, b in (("bias_p", bp), ("bias_q", bq)):
        if b is not None and tuple(b.shape) != (v,):
            raise ValueError(f"{name} must have shape ({v},), got {tuple(b.shape)}")
    if beta is not None and targets is None:
        raise ValueError("contrast_beta needs targets")
    if targets is not None:
        if tuple(targets.shape) != (t,) or targets.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"targets must be an integer tensor of shape ({t},), "
                             f"got {targets.dtype} {tuple(targets.shape)}")
        if t and int(targets.max()) >= v:
            raise ValueError(f"targets must be < V={v} (negative to skip), "
                             f"got {int(targets.max())}")


def _finish(acc: Tensor, targets: Tensor | None, beta: float | None) -> dict[str, Tensor]:
    """(12, T) pass-1 accumulators -> the per-token outputs (all but JSD)."""
    ls_p, ls_q = acc[S_P].log(), acc[S_Q].log()
    lse_p, lse_q = acc[M_P] + ls_p, acc[M_Q] + ls_q
    out = {"lse_p": lse_p, "lse_q": lse_q,
           "entropy_p": ls_p - acc[U_P] / acc[S_P], "entropy_q": ls_q - acc[U_Q] / acc[S_Q],
           "kl_pq": (acc[K_P] / acc[S_P] - ls_p + ls_q).clamp_min(0.0),
           "kl_qp": (acc[K_Q] / acc[S_Q] - ls_q + ls_p).clamp_min(0.0)}
    if targets is not None:
        skip = targets < 0
        out["target_logprob_p"] = (acc[T_P] - lse_p).masked_fill(skip, math.nan)
        out["target_logprob_q"] = (acc[T_Q] - lse_q).masked_fill(skip, math.nan)
        if beta is not None:
            t_c = (1 + beta) * acc[T_P] - beta * acc[T_Q]
            out["contrast_logprob"] = (t_c - acc[M_C] - acc[S_C].log()).masked_fill(skip, math.nan)
    return out


# ----------------------------------------------------------------------------- torch path

def _torch_tiles(pr: _Problem, sl: slice, v0: int, w_p: Tensor, w_q: Tensor,
                 work: torch.dtype) -> tuple[Tensor, Tensor]:
    """(n, Vc) logit tiles of p and q for tokens `sl`, vocabulary v0..v0+Vc, in `work`."""
    h_p, h_q = pr.hp[sl].to(work), pr.hq[sl].to(work)  # (n, Dp), (n, Dq)
    if pr.shared:
        ab = torch.cat([h_p, h_q]) @ w_p.T  # (2n, Vc): one matmul for both
        a, b = ab[: h_p.shape[0]], ab[h_p.shape[0]:]
    else:
        a, b = h_p @ w_p.T, h_q @ w_q.T
    vc = w_p.shape[0]
    for x, bias, cap in ((a, pr.bp, pr.cp), (b, pr.bq, pr.cq)):
        if bias is not None:
            x += bias[v0: v0 + vc].to(work)
        tanh_cap(x, cap, inplace=True)
    return a, b


def _vocab_chunks(pr: _Problem, vocab_chunk: int,
                  work: torch.dtype) -> Iterator[tuple[int, Tensor, Tensor]]:
    """Yield (v0, w_p, w_q): each weight chunk converted to `work` once, then reused."""
    for v0 in range(0, pr.wp.shape[0], vocab_chunk):
        w_p = pr.wp[v0: v0 + vocab_chunk].to(work)  # (Vc, Dp)
        w_q = w_p if pr.shared else pr.wq[v0: v0 + vocab_chunk].to(work)  # (Vc, Dq)
        yield v0, w_p, w_q


def _torch_pass1(pr: _Problem, token_chunk: int, vocab_chunk: int, work: torch.dtype) -> Tensor:
    """Pass 1, vocabulary chunks outside (each weight chunk cast once): (12, T) accumulators."""
    t = pr.hp.shape[0]
    acc = torch.zeros(12, t, dtype=work, device=pr.hp.device)  # (12, T)
    acc[[M_P, M_Q, M_C]] = NEG
    for v0, w_p, w_q in _vocab_chunks(pr, vocab_chunk, work):
        for t0 in range(0, t, token_chunk):
            sl = slice(t0, t0 + token_chunk)
            a, b = _torch_tiles(pr, sl, v0, w_p, w_q, work)
            _torch_update(acc[:, sl], a, b, v0, pr.targets, pr.beta, sl)
    return acc


def _torch_update(acc: Tensor, a: Tensor, b: Tensor, v0: int, targets: Tensor | None,
                  beta: float | None, sl: slice) -> None:
    """Fold one (n, Vc) tile pair into the (12, n) accumulators, in place. Overwrites a, b."""
    vc = a.shape[1]
    if targets is not None:
        idx = targets[sl] - v0  # (n,)
        inside = (idx >= 0) & (idx < vc)
        col = idx.clamp(0, vc - 1)[:, None]
        acc[T_P] += torch.where(inside, a.gather(1, col)[:, 0], 0.0)
        acc[T_Q] += torch.where(inside, b.gather(1, col)[:, 0], 0.0)
        if beta is not None:
            c = (1 + beta) * a - beta * b  # (n, Vc) contrastive logits
            m_c = torch.maximum(acc[M_C], c.amax(1))
            acc[S_C] = acc[S_C] * (acc[M_C] - m_c).exp() + (c - m_c[:, None]).exp().sum(1)
            acc[M_C] = m_c
    m_p, m_q = torch.maximum(acc[M_P], a.amax(1)), torch.maximum(acc[M_Q], b.amax(1))
    d_p, d_q = acc[M_P] - m_p, acc[M_Q] - m_q  # (n,) <= 0: how far each max moved
    x, y = a.sub_(m_p[:, None]), b.sub_(m_q[:, None])  # shifted logits, <= 0
    e_p, e_q = x.exp(), y.exp()
    diff = x - y
    for s, u, k, d, d_other, e, z, sign in ((S_P, U_P, K_P, d_p, d_q, e_p, x, 1.0),
                                            (S_Q, U_Q, K_Q, d_q, d_p, e_q, y, -1.0)):
        r, s_old = d.exp(), acc[s].clone()
        acc[u] = r * (acc[u] + d * s_old) + torch.linalg.vecdot(e, z)
        acc[k] = r * (acc[k] + (d - d_other) * s_old) + sign * torch.linalg.vecdot(e, diff)
        acc[s] = r * s_old + e.sum(1)
    acc[M_P], acc[M_Q] = m_p, m_q


def _jsd_tile(a: Tensor, b: Tensor, lse_p: Tensor, lse_q: Tensor) -> Tensor:
    """sum_v [p (log p - log m) + q (log q - log m)] of one (n, Vc) tile pair, (n,).

    With d = log q - log p: log p - log m = ln 2 - softplus(d), log q - log m = ln 2 -
    softplus(-d), and softplus(+-d) = max(+-d, 0) + log(1 + e^{-|d|}); terms with p = 0 are 0.
    """
    lp, lq = a - lse_p[:, None], b - lse_q[:, None]
    d = lq - lp
    soft = torch.log1p(torch.exp(-d.abs()))
    terms = lp.exp() * (LN2 - d.clamp_min(0) - soft) + lq.exp() * (LN2 - (-d).clamp_min(0) - soft)
    return terms.sum(1)


def _torch_jsd(pr: _Problem, lse_p: Tensor, lse_q: Tensor, token_chunk: int,
               vocab_chunk: int) -> Tensor:
    """Pass 2: recompute the tiles and sum the JSD terms with the final normalisers."""
    t, work = pr.hp.shape[0], lse_p.dtype
    total = torch.zeros(t, dtype=work, device=lse_p.device)
    for v0, w_p, w_q in _vocab_chunks(pr, vocab_chunk, work):
        for t0 in range(0, t, token_chunk):
            sl = slice(t0, t0 + token_chunk)
            a, b = _torch_tiles(pr, sl, v0, w_p, w_q, work)
            total[sl] += _jsd_tile(a, b, lse_p[sl], lse_q[sl])
    return 0.5 * total


# ----------------------------------------------------------------------------- reference

def _reference(pr: _Problem, jsd: bool) -> dict[str, Tensor]:
    """Everything materialised in float64: full logits and explicit log_softmax (tests only)."""
    def logits(h, w, bias, cap):
        z = h.double() @ w.double().T  # (T, V)
        z = z + bias.double() if bias is not None else z
        return tanh_cap(z, cap)

    zp, zq = logits(pr.hp, pr.wp, pr.bp, pr.cp), logits(pr.hq, pr.wq, pr.bq, pr.cq)
    lp, lq = torch.log_softmax(zp, -1), torch.log_softmax(zq, -1)
    p, q = lp.exp(), lq.exp()

    def plogr(w, r):  # sum_v w r, with 0 where w = 0
        return torch.where(w > 0, w * r, 0.0).sum(-1)

    out = {"lse_p": zp.logsumexp(-1), "lse_q": zq.logsumexp(-1),
           "entropy_p": -plogr(p, lp), "entropy_q": -plogr(q, lq),
           "kl_pq": plogr(p, lp - lq), "kl_qp": plogr(q, lq - lp)}
    if jsd:
        lm = torch.logaddexp(lp, lq) - LN2  # log of m = (p + q) / 2
        out["jsd"] = 0.5 * plogr(p, lp - lm) + 0.5 * plogr(q, lq - lm)
    if pr.targets is not None:
        skip, col = pr.targets < 0, pr.targets.clamp_min(0)[:, None]
        out["target_logprob_p"] = lp.gather(1, col)[:, 0].masked_fill(skip, math.nan)
        out["target_logprob_q"] = lq.gather(1, col)[:, 0].masked_fill(skip, math.nan)
        if pr.beta is not None:
            lc = torch.log_softmax((1 + pr.beta) * zp - pr.beta * zq, -1)
            out["contrast_logprob"] = lc.gather(1, col)[:, 0].masked_fill(skip, math.nan)
    return out


# ----------------------------------------------------------------------------- Triton path

def _triton(pr: _Problem, jsd: bool, token_chunk: int, vocab_chunk: int) -> Tensor:
    """(13, T) float32: the 12 pass-1 accumulator rows, then the JSD sum (2 x JSD) if asked."""
    import triton

    from tokenprobe.kernels.two_model_triton import _kernel

    t, v = pr.hp.shape[0], pr.wp.shape[0]
    hp, wp, hq, wq = (x.contiguous() for x in (pr.hp, pr.wp, pr.hq, pr.wq))
    dtypes = {hp.dtype, wp.dtype, hq.dtype, wq.dtype}
    pow2 = triton.next_power_of_2
    bt = min(64, max(16, pow2(min(token_chunk, max(t, 1)))))
    bv = min(128, max(16, pow2(min(vocab_chunk, v))))
    bd = min(64, max(16, pow2(min(hp.shape[1], hq.shape[1]))))
    bp = pr.bp.contiguous() if pr.bp is not None else wp  # a dummy pointer when absent
    bq = pr.bq.contiguous() if pr.bq is not None else wq
    acc = torch.zeros(13, t, dtype=torch.float32, device=hp.device)  # (13, T)
    tgt = pr.targets.contiguous() if pr.targets is not None else acc
    # Operands go to tl.dot in float32 when the four dtypes differ, and on CPU for bfloat16,
    # which the interpreter cannot tl.dot (triton-lang/triton#11584).
    upcast = len(dtypes) > 1 or (not hp.is_cuda and torch.bfloat16 in dtypes)
    prec = "ieee" if upcast or torch.float32 in dtypes else "tf32"  # no TF32 for float32 data
    if t:
        _kernel[(triton.cdiv(t, bt),)](
            hp, wp, bp, hq, wq, bq, t, v, hp.shape[1], hq.shape[1], pr.cp or 1.0, pr.cq or 1.0,
            tgt, acc, float(pr.beta or 0.0), HAS_TGT=pr.targets is not None,
            CONTRAST=pr.beta is not None, JSD=jsd, HAS_BP=pr.bp is not None,
            HAS_BQ=pr.bq is not None, HAS_CP=pr.cp is not None, HAS_CQ=pr.cq is not None,
            SHARED=pr.shared, UPCAST=upcast, PREC=prec, BLOCK_T=bt, BLOCK_V=bv, BLOCK_D=bd,
            num_warps=8 if bt * bv >= 8192 else 4)
    return acc
