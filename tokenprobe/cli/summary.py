"""What `tokenprobe run` prints of a finished run: per prompt (the first few), its tokens,
massive activations, sink rate, sink tokens and entropy; only those prompts' rows are
read."""
from __future__ import annotations

SHOWN = 10  # prompts printed one by one after a run; the rest are in the tables


def print_summary(run) -> None:
    """Per prompt (the first SHOWN): tokens, massive activations, sink rate and secondary
    sinks (what ran); only those prompts' rows are read."""
    import pandas as pd

    from tokenprobe.analyses.massive import massive_summary
    from tokenprobe.analyses.sinks import sink_rate

    shown = run.dataset("prompts").head(SHOWN, columns=["prompt_id"]).column(0).to_pylist()
    result = run.select(shown)
    tables = result.tables
    texts = result.prompts.set_index("prompt_id").text
    massive = massive_summary(result).set_index("prompt_id") if "massive" in tables else None
    rates = sink_rate(result).set_index("prompt_id") if "heads" in tables else None
    n_prompts = run.meta.get("n_prompts", len(texts))
    print(f"model {result.meta['model']} ({result.meta['n_layers']} blocks), "
          f"{n_prompts} prompt(s)")
    for prompt_id, text in texts.items():
        n = int(result.prompts.set_index("prompt_id").n_tokens[prompt_id])
        head = (text[:48] + "...") if len(text) > 48 else text
        print(f"  [{prompt_id}] {n:4d} tokens  | {head!r}")
        if massive is not None:
            row = massive.loc[prompt_id]
            if pd.isna(row.first_massive_layer):
                print("        no massive activations")
            else:
                print(f"        massive from block {row.first_massive_layer} to "
                      f"{row.last_massive_layer}, dims [{row.massive_dims}] at positions "
                      f"[{row.massive_positions}], max |h| {row.max_massive:,.0f}")
        if rates is not None and rates.nonfinite_heads[prompt_id]:
            print(f"        sink rate n/a: sink mass is NaN or inf at "
                  f"{rates.nonfinite_heads[prompt_id]} (layer, head) pair(s)")
        elif rates is not None:
            rate = rates.loc[prompt_id]
            sinks = tables["sinks"][(tables["sinks"].prompt_id == prompt_id)]
            secondary = sinks[sinks.kind == "secondary"]
            found = ", ".join(f"{t!r}@{p} (layers {c}-{c + life - 1})" for t, p, c, life in
                              zip(secondary.token, secondary.pos, secondary.creation_layer,
                                  secondary.lifetime)) or "none"
            print(f"        sink rate {rate.sink_rate:.1f}% (eps {rate.eps}, T={int(rate['T'])}); "
                  f"secondary sinks: {found}")
            print_sink_tokens(result, prompt_id, sinks)
        if "entropy" in tables["tokens"]:
            print_entropy(result, prompt_id)
    if n_prompts > len(texts):
        print(f"  ... and {n_prompts - len(texts)} more: `tokenprobe query`, `tokenprobe report` "
              "and `tokenprobe app` read them all")


def print_sink_tokens(result, prompt_id: int, sinks, top: int = 3) -> None:
    """The prompt's primary sink token and the tokens receiving the most attention (mean of
    `attn_received` over layers)."""
    tokens = result.tokens[result.tokens.prompt_id == prompt_id].set_index("pos").token
    primary = sinks[sinks.kind == "primary"]
    named = ", ".join(f"{tokens[p]!r}@{p} (layers {c}-{c + life - 1})" for p, c, life in
                      zip(primary.pos, primary.creation_layer, primary.lifetime)) or "none"
    line = f"        primary sink: {named}"
    layers = result.tables.get("token_layers")
    if layers is not None and "attn_received" in layers:
        mine = layers[layers.prompt_id == prompt_id].groupby("pos").attn_received.mean()
        line += "; most attention received: " + ", ".join(
            f"{tokens[p]!r}@{p} {v:.2f}" for p, v in mine.nlargest(top).items())
    print(line)


def print_entropy(result, prompt_id: int, top: int = 3) -> None:
    """One prompt's mean entropy, self-certainty, perplexity and its top forking tokens."""
    import numpy as np
    import pandas as pd

    row = result.prompts.set_index("prompt_id").loc[prompt_id]
    if row.n_tokens < 2:
        print("        entropy: nothing to score (one token)")
        return
    if pd.isna(row.mean_entropy):
        scored = result.tokens[(result.tokens.prompt_id == prompt_id) & (result.tokens.pos > 0)]
        bad = int((~np.isfinite(scored.entropy.to_numpy(float))).sum())
        print(f"        entropy n/a: NaN or inf at {bad} of {len(scored)} scored positions")
        return
    tokens = result.tokens[(result.tokens.prompt_id == prompt_id) & result.tokens.forking.fillna(False)]
    forks = ", ".join(f"{t!r}@{p} (H {h:.2f})" for t, p, h in
                      tokens.nlargest(top, "entropy")[["token", "pos", "entropy"]].itertuples(
                          index=False)) or "none"
    line = (f"        entropy {row.mean_entropy:.2f} nats, self-certainty "
            f"{row.mean_self_certainty:.2f}, perplexity {row.perplexity:.1f}; forking: {forks}")
    if "jsd" in result.tokens:
        jsd = result.tokens[result.tokens.prompt_id == prompt_id].jsd.mean()
        compare = next(p["compare"]["model"] for p in result.meta["probes"] if "compare" in p)
        line += f"; mean JSD to {compare} {jsd:.3f}"
    print(line)
