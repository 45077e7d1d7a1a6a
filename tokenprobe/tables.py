"""Table schemas: one grain per table, declared column order, dtype, unit and source.

prompts (grain: prompt)
    prompt_id  int64   0-based index of the prompt in the run
    text       string  the prompt as given
    n_tokens   int64   tokens after tokenisation (and truncation)
    truncated  bool    True if the prompt was cut to the model's context
    first_is_special bool  whether position 0 is a special token (e.g. Gemma's <bos>;
                       SmolLM2 adds none)

tokens (grain: prompt x position)
    prompt_id, pos  int64   keys; pos is 0-based over real tokens (padding never appears)
    token_id  int64   vocabulary id
    token     string  the token's text; undecodable byte pieces are shown as \\xNN escapes
    is_special bool   the id is one of the tokenizer's special ids

token_layers (grain: prompt x layer x position; residual after block `layer`, 0-based)
    resid_norm   float64  ||h_l[t]||_2                               (Sun et al. 2024)
    max_abs      float64  max_d |h_l[t, d]|
    max_abs_dim  int64    argmax_d |h_l[t, d]|
    median_abs   float64  lower median_d |h_l[t, d]| (torch.median convention)
    cos_to_first float64  cos(h_l[t], h_l[0]); 1 at pos 0

massive (grain: prompt x layer x position x dim; only entries meeting the criterion)
    value            float64  signed h_l[t, d]
    ratio_to_median  float64  |h_l[t, d]| / lower median of |h_l| over the sequence's layer tensor
"""
from __future__ import annotations

import pandas as pd

SCHEMAS: dict[str, dict[str, str]] = {
    "prompts": {"prompt_id": "int64", "text": "string", "n_tokens": "int64",
                "truncated": "bool", "first_is_special": "bool"},
    "tokens": {"prompt_id": "int64", "pos": "int64", "token_id": "int64", "token": "string",
               "is_special": "bool"},
    "token_layers": {"prompt_id": "int64", "layer": "int64", "pos": "int64",
                     "resid_norm": "float64", "max_abs": "float64", "max_abs_dim": "int64",
                     "median_abs": "float64", "cos_to_first": "float64"},
    "massive": {"prompt_id": "int64", "layer": "int64", "pos": "int64", "dim": "int64",
                "value": "float64", "ratio_to_median": "float64"},
}

KEYS: dict[str, list[str]] = {
    "prompts": ["prompt_id"],
    "tokens": ["prompt_id", "pos"],
    "token_layers": ["prompt_id", "layer", "pos"],
    "massive": ["prompt_id", "layer", "pos", "dim"],
}


def conform(name: str, frame: pd.DataFrame | None) -> pd.DataFrame:
    """Return `frame` with the declared columns of table `name`, in order, with their dtypes.

    None gives an empty table with the schema. Missing or extra columns raise ValueError:
    a probe that writes a table must write all of it.
    """
    schema = SCHEMAS[name]
    if frame is None:
        return pd.DataFrame({c: pd.Series(dtype=t) for c, t in schema.items()})
    if set(frame.columns) != set(schema):
        raise ValueError(f"table {name!r}: columns {sorted(frame.columns)} do not match the "
                         f"schema {list(schema)}")
    return frame[list(schema)].astype(schema)


def merge_parts(name: str, parts: list[pd.DataFrame]) -> pd.DataFrame:
    """Concatenate per-batch parts of table `name`, sorted by its keys."""
    frames = [p for p in parts if p is not None and len(p)]
    if not frames:
        return conform(name, None)
    out = pd.concat(frames, ignore_index=True)
    return conform(name, out).sort_values(KEYS[name], kind="stable", ignore_index=True)
