"""Table schemas: one grain per table, declared column order, dtype, unit and source.

prompts (grain: prompt)
    prompt_id  int64   0-based index of the prompt in the run
    text       string  the prompt as given
    n_tokens   int64   tokens after tokenisation (and truncation)
    truncated  bool    True if the prompt was cut (to max_tokens / --max-tokens, or to the
                       model's context with truncate / --truncate)
    first_is_special bool  whether position 0 is a special token (e.g. Gemma's <bos>;
                       SmolLM2 adds none)
    mean_entropy, mean_self_certainty  float64  means over the prompt's scored tokens (nats;
                       entropy probe; self-certainty is Kang et al.'s sequence score)
    perplexity   float64  exp(-mean logprob) over the scored tokens
    forking_share float64 share of the scored tokens flagged `forking`

tokens (grain: prompt x position)
    prompt_id, pos  int64   keys; pos is 0-based over real tokens (padding never appears)
    token_id  int64   vocabulary id
    token     string  the token's readable text, safe to print: control and format characters
                      escaped (\\n, \\t, \\r, \\xNN, \\uNNNN); a piece that is not whole
                      UTF-8 characters reads as its bytes (\\xNN)
    token_raw string  the token's exact text (the same \\xNN bytes for partial UTF-8 pieces)
    is_special bool   the id is one of the tokenizer's special ids
    -- entropy probe: of p_pos, the next-token distribution computed at pos - 1 (NA at pos 0)
    entropy    float64  -sum_v p log p (nats)
    logprob    float64  log p_pos[token_id]
    rank       Int64    1 + number of vocab entries with strictly larger probability
    top1_id    Int64    most likely token id
    top1_prob, margin  float64  p(top1), p(top1) - p(top2)
    self_certainty float64  KL(U || p_pos) (Kang et al.)
    window_entropy float64  ARES window mean of entropy (w = 4, t+1..t+w by default)
    band       string   low / mid / high by entropy quantiles (0.5, 0.8; per run or prompt)
    forking    boolean  entropy >= its (1 - rho) quantile, rho = 0.2 (Wang et al.)
    -- entropy probe with a compare model (teacher / negative model q; the probed model is p)
    teacher_entropy, teacher_logprob  float64  entropy of q, log q[token_id]
    kl_student_teacher, kl_teacher_student  float64  KL(p || q), KL(q || p) (nats)
    jsd        float64  Jensen-Shannon divergence of p and q (nats, <= ln 2)
    tip_quadrant string TIP quadrant: {high,low}_H_{high,low}_D (H / ln V, JSD / ln 2 vs 0.5)
    critical_ce float64 cDPO contrastive score softmax((1+beta) z_p - beta z_q)[token_id]
    -- critical-token search (tokenprobe critical; Lin et al., cDPO); prompt + trajectory rows
    critical_success float64 share of the n continuations of the prefix ending at pos that
                       the verifier accepts (NA: prefixes the search skipped, and prompt
                       tokens but the last, sampled when the critical token is the first)
    critical   boolean  the critical token (the search rule in README, "Measures"); at most one
                       per prompt; NA on prompt tokens

token_layers (grain: prompt x layer x position; residual after block `layer`, 0-based)
    resid_norm   float64  ||h_l[t]||_2                               (Sun et al. 2024)
    max_abs      float64  max_d |h_l[t, d]|
    max_abs_dim  int64    argmax_d |h_l[t, d]|
    median_abs   float64  lower median_d |h_l[t, d]| (torch.median convention)
    cos_to_first float64  cos(h_l[t], h_l[0]); 1 at pos 0
    attn_received float64 mean over heads and queries i >= pos of A[l, h, i, pos]  (sinks probe)
    lens_entropy  float64 entropy of the logit lens softmax(W_U LN_f(h_l[pos - 1])) (nats;
                          entropy probe with lens=True; NA at pos 0)
    lens_kl_to_final float64 KL(lens distribution || final distribution) at the same position

heads (grain: prompt x layer x head; sinks probe)
    sink_mass        float64  Gu et al. alpha_k = (1/(T-k)) sum_{i>=k} A[i, k], k = SinksConfig.k_pos
    attn_entropy     float64  mean over queries of -sum_j A[i, j] log A[i, j] (nats)
    value_drain_sink float64  ||W_O^(h) v_k^(h)|| at the sink position k          (Guo et al.)
    value_drain_rest float64  mean over the other tokens of ||W_O^(h) v_t^(h)||

sinks (grain: prompt x position, flagged tokens only; sinks probe, Wong et al.)
    token          string  the token's text
    kind           string  primary / secondary / noise
    creation_layer int64   first layer where |cos(h_l[t], h_l[primary])| > 0.9
    lifetime       int64   number of such layers
    max_cos        float64 max |cos| to the primary over the searched layers (1 for the primary)

massive (grain: prompt x layer x position x dim; only entries meeting the criterion)
    value            float64  signed h_l[t, d]
    ratio_to_median  float64  |h_l[t, d]| / lower median of |h_l| over the sequence's layer tensor

nonfinite (grain: prompt x layer x probe x site; only where a reduced statistic is NaN or
        +-inf: the model's numbers overflowed (float16) or were NaN; none in a healthy run)
    prompt_id, layer  int64  keys (layer: the block whose output or attention was reduced;
                       site logits: the last block)
    probe          string  the probe that found it (activations, sinks, entropy)
    site           string  resid_post (residual after the block), attention (that block's
                           attention statistics), logits (the next-token distribution), lens
                           (the logit lens at that layer)
    n_checked      int64   positions (heads, for site attention) whose statistics were checked
    n_nonfinite    int64   of them, those with a NaN or +-inf statistic
    first_index    int64   the first such position (or head)
    n_nan, n_inf   int64   NaN and +-inf values among the statistics
    statistics     string  the statistics that were non-finite, comma-separated

rollouts (grain: prompt x position x kind x rollout; tokenprobe critical, Lin et al.)
    prompt_id, pos  int64  keys; pos is the last token of the prefix continued (kind prefix),
                   the resampled token (counterfactual), or the last prompt token (trajectory)
    kind           string  prefix / counterfactual / trajectory (a sampled trajectory attempt)
    rollout        int64   0-based index of the continuation among its prefix's
    seed           int64   the seed of its draws (tokenprobe.sampling)
    first_token_id Int64   its first sampled token (counterfactual: the replacement; NA if none)
    n_tokens       int64   sampled tokens
    finish         string  eos / stop (the verifier's answer is complete) / length
    text           string  the continuation's text
    correct        bool    the verifier's verdict on the response (trajectory prefix + text)

attributions (grain: prompt x position x method x layer set; tokenprobe attribute,
        analyses/attribution.py; the target is in meta["summary"]["attribution"])
    prompt_id, pos  int64  keys; pos is the ablated input position (0-based)
    token_id, token        the ablated token
    method         string  removal (token deleted, sequence re-run) / knockout (its key
                           masked for all heads of the layers in layer_range; Geva et al.)
    layer_range    string  knocked-out layers, 0-based, as '0-8' or '0-2,5'; '' for removal
    base_logprob   float64 the target's total log-prob without ablation (nats)
    ablated_logprob float64 the same under the ablation (nats)
    delta_logprob  float64 ablated - base (nats; negative: the token supported the target)

counterfactuals (grain: generation x step; tokenprobe counterfactual, Gumbel-max SCM of
        Chatzi et al., analyses/counterfactual.py)
    generation_id  int64   key; one factual/counterfactual pair per intervention
    step           int64   key; 0-based generation step (prompt tokens excluded)
    factual_token_id, factual_token  Int64, string  the factual sample (NA past its end)
    counterfactual_token_id, counterfactual_token  Int64, string  the counterfactual one,
                           decoded with the factual Gumbel noise of the same step
    intervened     bool    this step's counterfactual token was set by the intervention
    differs        bool    the two tokens differ (or only one generation reaches the step)

generations (grain: generation; tokenprobe counterfactual)
    generation_id  int64   key
    seed           int64   seed of the Gumbel noise (the same for factual and counterfactual)
    temperature    float64 sampling temperature T of argmax(z / T + g)
    intervention_step, intervention_token_id  Int64  the token intervention (NA: none)
    prompt, counterfactual_prompt  string  the factual prompt; the intervened prompt (NA: none)
    factual_text, counterfactual_text  string  the generated texts (prompt excluded)
    first_difference Int64  first step whose tokens differ (NA: identical)
"""
from __future__ import annotations

import pandas as pd

SCHEMAS: dict[str, dict[str, str]] = {
    "prompts": {"prompt_id": "int64", "text": "string", "n_tokens": "int64",
                "truncated": "bool", "first_is_special": "bool", "mean_entropy": "float64",
                "mean_self_certainty": "float64", "perplexity": "float64",
                "forking_share": "float64"},
    "tokens": {"prompt_id": "int64", "pos": "int64", "token_id": "int64", "token": "string",
               "token_raw": "string", "is_special": "bool", "entropy": "float64", "logprob": "float64",
               "rank": "Int64", "top1_id": "Int64", "top1_prob": "float64", "margin": "float64",
               "self_certainty": "float64", "window_entropy": "float64", "band": "string",
               "forking": "boolean", "teacher_entropy": "float64", "teacher_logprob": "float64",
               "kl_student_teacher": "float64", "kl_teacher_student": "float64",
               "jsd": "float64", "tip_quadrant": "string", "critical_ce": "float64",
               "critical_success": "float64", "critical": "boolean"},
    "token_layers": {"prompt_id": "int64", "layer": "int64", "pos": "int64",
                     "resid_norm": "float64", "max_abs": "float64", "max_abs_dim": "int64",
                     "median_abs": "float64", "cos_to_first": "float64",
                     "attn_received": "float64", "lens_entropy": "float64",
                     "lens_kl_to_final": "float64"},
    "heads": {"prompt_id": "int64", "layer": "int64", "head": "int64", "sink_mass": "float64",
              "attn_entropy": "float64", "value_drain_sink": "float64",
              "value_drain_rest": "float64"},
    "sinks": {"prompt_id": "int64", "pos": "int64", "token": "string", "kind": "string",
              "creation_layer": "int64", "lifetime": "int64", "max_cos": "float64"},
    "massive": {"prompt_id": "int64", "layer": "int64", "pos": "int64", "dim": "int64",
                "value": "float64", "ratio_to_median": "float64"},
    "nonfinite": {"prompt_id": "int64", "layer": "int64", "probe": "string", "site": "string",
                  "n_checked": "int64", "n_nonfinite": "int64", "first_index": "int64",
                  "n_nan": "int64", "n_inf": "int64", "statistics": "string"},
    "rollouts": {"prompt_id": "int64", "pos": "int64", "kind": "string", "rollout": "int64",
                 "seed": "int64", "first_token_id": "Int64", "n_tokens": "int64",
                 "finish": "string", "text": "string", "correct": "bool"},
    "attributions": {"prompt_id": "int64", "pos": "int64", "token_id": "int64",
                     "token": "string", "method": "string", "layer_range": "string",
                     "base_logprob": "float64", "ablated_logprob": "float64",
                     "delta_logprob": "float64"},
    "counterfactuals": {"generation_id": "int64", "step": "int64",
                        "factual_token_id": "Int64", "factual_token": "string",
                        "counterfactual_token_id": "Int64", "counterfactual_token": "string",
                        "intervened": "bool", "differs": "bool"},
    "generations": {"generation_id": "int64", "seed": "int64", "temperature": "float64",
                    "intervention_step": "Int64", "intervention_token_id": "Int64",
                    "prompt": "string", "counterfactual_prompt": "string",
                    "factual_text": "string", "counterfactual_text": "string",
                    "first_difference": "Int64"},
}

KEYS: dict[str, list[str]] = {
    "prompts": ["prompt_id"],
    "tokens": ["prompt_id", "pos"],
    "token_layers": ["prompt_id", "layer", "pos"],
    "massive": ["prompt_id", "layer", "pos", "dim"],
    "nonfinite": ["prompt_id", "layer", "probe", "site"],
    "rollouts": ["prompt_id", "pos", "kind", "rollout"],
    "heads": ["prompt_id", "layer", "head"],
    "sinks": ["prompt_id", "pos"],
    "attributions": ["prompt_id", "pos", "method", "layer_range"],
    "counterfactuals": ["generation_id", "step"],
    "generations": ["generation_id"],
}


def conform(name: str, frame: pd.DataFrame | None) -> pd.DataFrame:
    """Return `frame` with declared columns of table `name`, in declared order and dtypes.

    A table may hold a subset of its schema's columns (tables such as `token_layers` gain
    columns from several probes) but always all of its keys. None gives an empty table with
    every column. Undeclared columns or missing keys raise ValueError.
    """
    schema = SCHEMAS[name]
    if frame is None:
        return pd.DataFrame({c: pd.Series(dtype=t) for c, t in schema.items()})
    extra = set(frame.columns) - set(schema)
    missing = set(KEYS[name]) - set(frame.columns)
    if extra or missing:
        raise ValueError(f"table {name!r}: undeclared columns {sorted(extra)}, missing keys "
                         f"{sorted(missing)} (schema: {list(schema)})")
    columns = [c for c in schema if c in frame.columns]
    return frame[columns].astype({c: schema[c] for c in columns})


def join(name: str, left: pd.DataFrame | None, right: pd.DataFrame) -> pd.DataFrame:
    """Combine two probes' parts of the same table on its keys (outer join)."""
    if left is None:
        return right
    if "probe" in KEYS[name]:  # each probe writes its own rows (nonfinite): stack them
        return conform(name, pd.concat([left, right], ignore_index=True))
    shared = (set(left.columns) & set(right.columns)) - set(KEYS[name])
    if shared:
        raise ValueError(f"table {name!r}: columns {sorted(shared)} written by two probes")
    if not len(left) or not len(right):  # e.g. an empty `massive`
        return conform(name, pd.concat([left, right], ignore_index=True))
    return conform(name, left.merge(right, on=KEYS[name], how="outer"))


def merge_parts(name: str, parts: list[pd.DataFrame]) -> pd.DataFrame:
    """Concatenate per-batch parts of table `name`, sorted by its keys."""
    frames = [p for p in parts if p is not None and len(p)]
    if not frames:
        return conform(name, None)
    out = pd.concat(frames, ignore_index=True)
    return conform(name, out).sort_values(KEYS[name], kind="stable", ignore_index=True)
