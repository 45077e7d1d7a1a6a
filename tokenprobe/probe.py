"""The probe protocol: what a probe declares, the batch it sees inside the hooks, the registry.

A probe is one class in one file. It declares its name, the sites it hooks (`SITES`), its
settings (`Config`, a frozen dataclass whose fields are the probe's options: the CLI and the
dashboard offer every field), and the tables and columns it writes (`tables`, declared with
`tokenprobe.tables`), and it reduces inside the hooks. `register` makes it known by name;
the built-in probes (package `tokenprobe.probes`) and any other package's are found through
the `tokenprobe.probes` entry-point group, so the core never imports a probe.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import re
import typing
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping

import numpy as np
import pandas as pd
import torch

from tokenprobe.tables import Column, Table, declare, withdraw

# Sites the runner can hook.
# `resid_post`: the residual stream after block `layer`, a (B, T, D) tensor.
# `attention`: statistics computed inside the attention call of layer `layer` (see
#   tokenprobe.attention): a dict of sink_mass (B, H), attn_entropy (B, H), received (B, S),
#   the value states `value` (B, KVH, S, Dh) and the output projection `w_o` (D, H * Dh).
#   Only some backends provide it (`tokenprobe.backends`).
SITES = ("resid_post", "attention")


@dataclass(frozen=True)
class Batch:
    """One padded batch of prompts, right-padded.

    Attributes:
        prompt_ids: the run-wide id of each row.
        input_ids: (B, T) token ids; pad positions hold the pad id.
        attention_mask: (B, T) 1 at real tokens, 0 at padding.
        lengths: number of real tokens of each row.
        token_texts: readable text of each real token of each row.
        n_layers: the model's number of blocks (layers are 0 .. n_layers - 1).
    """

    prompt_ids: list[int]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    lengths: list[int]
    token_texts: list[list[str]]
    n_layers: int

    def rows(self) -> list[tuple[int, int, int]]:
        """(row, prompt_id, length) of every prompt in the batch: `tensor[row, :length]` are
        its real tokens."""
        return list(zip(range(len(self.lengths)), self.prompt_ids, self.lengths))


class LayerBuffers:
    """Per-batch arrays that a probe fills layer by layer from inside the hooks.

    What a probe keeps per layer is small (a value per token or head), but kept as many small
    allocations it lands in the holes that the forward's large temporaries leave in the heap,
    and glibc then cannot reuse those holes for the next layer's temporaries: on smollm2-135m
    at T = 2048 that raised the activations probe's peak RSS by about 200 MB. Each array here
    is allocated once, on its first write (by then only the first block's temporaries exist),
    with room for every layer: [n_layers, *shape]. Unwritten entries are NaN (floats) or 0.
    """

    def __init__(self, n_layers: int) -> None:
        self.n_layers = n_layers
        self.arrays: dict[str, np.ndarray] = {}
        self.layers: list[int] = []  # the layers written, in the order first seen

    def put(self, name: str, layer: int, index: tuple, value: torch.Tensor | np.ndarray,
            shape: tuple[int, ...]) -> None:
        """Write `value` at [layer, *index] of array `name`, creating it with `shape` (the
        shape after the layer axis) and `value`'s dtype when it does not exist yet."""
        value = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value
        if name not in self.arrays:
            dtype = np.result_type(value)
            fill = np.nan if np.issubdtype(dtype, np.floating) else 0
            self.arrays[name] = np.full((self.n_layers, *shape), fill, dtype=dtype)
        if layer not in self.layers:
            self.layers.append(layer)
        self.arrays[name][(layer, *index)] = value

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]


def nonfinite_row(probe: str, site: str, prompt_id: int, layer: int,
                  values: dict[str, np.ndarray], *, offset: int = 0) -> dict | None:
    """One `nonfinite` row when the statistics a probe reduced for one prompt at one site and
    layer hold NaN or +-inf, else None.

    A check on what the probe already reduced (a value per token or head), never a new pass
    over the activations; a NaN or inf there means the model's own numbers overflowed or were
    NaN (e.g. float16 residuals past 65504, a NaN in an embedding).

    Args:
        probe, site: who reduced the values, and where (resid_post, attention, logits, lens).
        values: statistic name -> (N,) array over the same N positions or heads.
        offset: the position (or head) of the arrays' first entry.
    """
    stacked = np.stack([np.asarray(v, dtype=float) for v in values.values()])  # (S, N)
    bad = ~np.isfinite(stacked)
    if not bad.any():
        return None
    per_item = bad.any(axis=0)
    return {"prompt_id": prompt_id, "layer": layer, "probe": probe, "site": site,
            "n_checked": int(stacked.shape[1]), "n_nonfinite": int(per_item.sum()),
            "first_index": offset + int(np.argmax(per_item)), "n_nan": int(np.isnan(stacked).sum()),
            "n_inf": int(np.isinf(stacked).sum()),
            "statistics": ",".join(n for n, b in zip(values, bad.any(axis=1)) if b)}


def nonfinite_frame(rows: list[dict | None]) -> pd.DataFrame | None:
    """The `nonfinite` table part of a batch from `nonfinite_row` results (None: all finite)."""
    rows = [r for r in rows if r is not None]
    return pd.DataFrame(rows) if rows else None


@dataclass(frozen=True)
class Option:
    """One setting a user can give a probe: a field of its `Config` (or an extra option such
    as the entropy probe's compare model), as the CLI and the dashboard offer it.

    Attributes:
        name: the field name (CLI: --PROBE-NAME with dashes, plus `aliases`).
        type: bool, int, float, str, tuple (comma-separated integers) or "model" (a model
            name, loaded by whoever builds the probe).
        default: the field's default.
        help: what it sets, from the Config docstring's Attributes section.
        choices: the allowed values, when only some are.
        aliases: further CLI flags (e.g. "--lens").
        optional: None is a value (a field typed `float | None`).
    """

    name: str
    type: Any
    default: Any
    help: str
    choices: tuple = ()
    aliases: tuple[str, ...] = ()
    optional: bool = False

    def parse(self, text: str) -> Any:
        """The value of `text` as this option's type (ValueError if it is not one)."""
        if self.type is tuple:
            return tuple(int(t) for t in text.split(",") if t.strip())
        if self.type is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(f"{self.name} must be true or false, got {text!r}")
            return text.lower() in ("true", "1", "yes")
        value = text if self.type in (str, "model") else self.type(text)
        if self.choices and value not in self.choices:
            raise ValueError(f"{self.name} must be one of {', '.join(map(str, self.choices))}, "
                             f"got {text!r}")
        return value


def config_options(config: type) -> list[Option]:
    """The options of a Config dataclass: one per field, typed from its annotation, helped
    from the docstring's `Attributes:` section, with `choices` and `aliases` from the field's
    metadata."""
    hints = typing.get_type_hints(config)
    helps = _attribute_docs(config.__doc__ or "")
    out = []
    for f in dataclasses.fields(config):
        kind, args = hints[f.name], typing.get_args(hints[f.name])
        optional = type(None) in args
        if optional:
            kind = next(a for a in args if a is not type(None))
        if typing.get_origin(kind) is tuple:
            kind = tuple
        out.append(Option(f.name, kind, f.default, helps.get(f.name, ""),
                          tuple(f.metadata.get("choices", ())),
                          tuple(f.metadata.get("aliases", ())), optional))
    return out


def _attribute_docs(doc: str) -> dict[str, str]:
    """name -> text of a Google-style `Attributes:` section (continuation lines joined)."""
    found: dict[str, str] = {}
    body = doc.split("Attributes:", 1)[1] if "Attributes:" in doc else ""
    name = None
    for line in body.splitlines():
        entry = re.match(r"\s{4,8}(\w+): (.*)", line)
        if entry and len(line) - len(line.lstrip()) <= 8:
            name, found[entry.group(1)] = entry.group(1), entry.group(2).strip()
        elif name and line.strip():
            found[name] += " " + line.strip()
        elif not line.strip() and found:
            name = None
    return found


class Probe:
    """Base class: a probe reduces hooked tensors to rows and returns tables per batch.

    A subclass sets `name`, `sites` (a subset of `SITES`), `Config` (a frozen dataclass of its
    settings) and `tables` (what it writes: a `tokenprobe.tables.Table` per new table, a
    mapping of `Column`s per table it adds columns to), and implements `observe` (called
    inside the hook; must reduce there and keep only values per token, head or entry, never
    the hooked tensor) and `collect` (turn what `observe` kept into DataFrames, then forget
    it). `register` makes it known by name. Columns that need the whole run are added after
    the last part by `statistics` (SQL over the run) and `finalize` (part by part, on the
    tables named in `finalizes`); `summary` gives run.json its figures, by SQL too, so that no
    table of a run is ever held in memory whole.
    """

    name: ClassVar[str]
    sites: ClassVar[tuple[str, ...]]
    Config: ClassVar[type]
    tables: ClassVar[Mapping[str, Table | Mapping[str, Column]]] = {}
    finalizes: ClassVar[tuple[str, ...]] = ()  # the tables `finalize` rewrites, part by part
    config: Any

    def __init__(self, config: Any = None) -> None:
        self.config = config if config is not None else self.Config()

    @classmethod
    def options(cls) -> list[Option]:
        """What a user can set: the fields of `Config` (subclasses may add options)."""
        return config_options(cls.Config)

    @classmethod
    def from_options(cls, values: Mapping[str, Any],
                     load: Callable[[str], Any] | None = None) -> "Probe":
        """The probe built from user options (option name -> value; absent: the default).
        `load(name)` loads a model for options of type "model".

        Raises:
            ValueError: a value the probe does not accept (the message names it).
        """
        return cls(cls.Config(**values))

    @property
    def passes(self) -> int:
        """Forward passes the probe needs per batch (1; the logit lens takes 2)."""
        return 1

    def attention_options(self) -> dict | None:
        """What the `attention` site computes for this probe (k_pos, impl, block), or None."""
        return None

    def bind(self, model, tokenizer) -> None:
        """Called once before the first batch with the transformers model being probed (also
        under TransformerBridge and nnsight) and its tokenizer; e.g. to find the unembedding."""

    def begin(self, batch: Batch) -> None:
        """Called before the forward passes of each batch."""
        self.batch = batch

    def begin_pass(self, index: int) -> None:
        """Called before forward pass `index` (0 .. passes - 1) of the batch."""

    def observe(self, site: str, layer: int, tensor) -> None:
        """Reduce `tensor` (hooked at `site`, block `layer`; a dict for `attention`) inside the
        hook."""
        raise NotImplementedError

    def collect(self) -> dict[str, pd.DataFrame]:
        """Tables for the batch just run, keyed by table name; resets per-batch state."""
        raise NotImplementedError

    def statistics(self, sql) -> dict:
        """Run-level figures the run-level columns need (e.g. per-run quantiles), computed once
        all parts are written, by SQL over the whole run's tables (`sql.sql(query)`, DuckDB
        views over the part files: `tokenprobe.store.PartsSQL`); none by default. JSON data."""
        return {}

    def finalize(self, tables: dict[str, pd.DataFrame], stats: dict) -> dict[str, pd.DataFrame]:
        """Run-level columns of one part: `tables` holds the part's tables named in
        `finalizes`, `stats` what `statistics` returned; returns the tables to write back
        (unchanged by default). It must give the same result when run again on its output."""
        return tables

    def summary(self, sql, stats: dict) -> dict:
        """Run-level figures for run.json, by SQL over the finished tables (`sql`, as for
        `statistics`); none by default."""
        return {}

    def diagnostics(self, sql, stats: dict, meta: dict) -> list[str]:
        """Sentences saying where this run's figures mean less than they seem (a criterion that
        does not separate tokens, a band that cannot exist for this model, too few tokens for
        a quantile), by SQL over the finished tables as for `summary`; `meta` is run.json's
        model entries (n_layers, ...). In run.json "diagnostics", printed by the CLI and shown
        by the dashboard. None by default."""
        return []

    def describe(self) -> dict:
        """The probe's name and configuration, for run metadata."""
        return {"name": self.name, **dataclasses.asdict(self.config)}


REGISTRY: dict[str, type[Probe]] = {}
ENTRY_POINTS = "tokenprobe.probes"  # the group naming modules that register probes
_plugins_loaded = False


def register(cls: type[Probe]) -> type[Probe]:
    """Make probe class `cls` known by its name and declare its tables (a class decorator)."""
    known = REGISTRY.get(cls.name)
    if known is not None and (known.__module__, known.__qualname__) != (cls.__module__,
                                                                         cls.__qualname__):
        raise ValueError(f"probe name {cls.name!r} is taken by {known.__module__}."
                         f"{known.__qualname__}")
    unknown = set(cls.sites) - set(SITES)
    if unknown:
        raise ValueError(f"probe {cls.name!r} hooks unknown sites {sorted(unknown)}; sites: "
                         f"{', '.join(SITES)}")
    declare(cls.name, cls.tables)
    REGISTRY[cls.name] = cls
    return cls


def unregister(name: str) -> None:
    """Forget probe `name` and the tables and columns it declared."""
    REGISTRY.pop(name, None)
    withdraw(name)


def registry() -> dict[str, type[Probe]]:
    """Every registered probe by name, after importing the modules of the `tokenprobe.probes`
    entry points once (the built-ins, and any installed package's)."""
    global _plugins_loaded
    if not _plugins_loaded:
        _plugins_loaded = True
        for point in importlib.metadata.entry_points(group=ENTRY_POINTS):
            point.load()
        if not REGISTRY:
            raise RuntimeError("no probe registered: tokenprobe's entry points are missing; "
                               "install the package (pip install -e .)")
    return dict(REGISTRY)


def make_probes(probes: list[str | Probe] | None, *, sites: set[str] | None = None
                ) -> list[Probe]:
    """Instances for a list of probe names or instances; None means every registered probe
    (those that hook only `sites`, when given: what the backend provides)."""
    known = registry()
    if probes is None:
        return [cls() for cls in known.values() if sites is None or set(cls.sites) <= sites]
    out = []
    for p in probes:
        if isinstance(p, Probe):
            out.append(p)
        elif p in known:
            out.append(known[p]())
        else:
            raise ValueError(f"unknown probe {p!r}; available: {', '.join(known)}")
    if len({p.name for p in out}) != len(out):
        raise ValueError("each probe may be given once")
    return out
