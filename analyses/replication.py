"""Replication cards: each paper's reported figure beside ours on the run's model, with its setting.

The papers' figures live in `tokenprobe/data/paper_figures.json` (citation, what exactly was
reported, where it was checked); only checked numbers are there, others are null and shown as
"not reported here". A card is built for each measure the run holds.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources

import numpy as np
import pandas as pd

from tokenprobe.store import Run

NOT_REPORTED = "not reported here"


@dataclass(frozen=True)
class Card:
    """One measure's replication card.

    Attributes:
        measure: key in paper_figures.json (sink_rate, massive_activations, ...).
        paper: citation of the paper.
        url: where to read it (None if not checked).
        setting: the paper's setting that matters (T and eps, the 100 / 1000x criterion, n).
        ours_setting: the same setting in this run.
        paper_rows: what the paper reports (model, figure, what).
        our_rows: our figures on the run's model, same columns.
        note: caveats (a different T, a different model family, definition-only cards).
    """

    measure: str
    paper: str
    url: str | None
    setting: str
    ours_setting: str
    paper_rows: pd.DataFrame
    our_rows: pd.DataFrame
    note: str = ""
    checked_against: str = field(default="")

    def frame(self) -> pd.DataFrame:
        """Paper rows then ours, with a `source` column ("paper" / "ours")."""
        return pd.concat([self.paper_rows.assign(source="paper"),
                          self.our_rows.assign(source="ours")], ignore_index=True)[
            ["source", "model", "figure", "what"]]


def paper_figures() -> dict:
    """The papers' reported figures (tokenprobe/data/paper_figures.json)."""
    text = resources.files("tokenprobe").joinpath("data/paper_figures.json").read_text("utf-8")
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


def _rows(items: list[tuple[str, str, str]]) -> pd.DataFrame:
    return pd.DataFrame(items, columns=["model", "figure", "what"])


def _probe_config(run: Run, name: str) -> dict:
    return next((p for p in run.meta.get("probes", []) if p.get("name") == name), {})


def _setting(setting: dict) -> str:
    return ", ".join(f"{k} = {v}" for k, v in setting.items())


def sink_rate_card(run: Run, entry: dict, curve: pd.DataFrame | None = None) -> Card:
    """Gu et al.'s Sink_1^eps at T = 64 against this run's, at the run's T (and at T = 64 from
    the sink-rate curve when it holds the run's model)."""
    from tokenprobe.analyses.sinks import sink_rate

    model = str(run.meta.get("model"))
    rate = sink_rate(run, by_prompt=False).iloc[0]
    t_run = (f"T = {int(rate.T_min)}" if rate.T_min == rate.T_max
             else f"T = {int(rate.T_min)} to {int(rate.T_max)}")
    ours = [(model, f"{rate.sink_rate:.2f} %", f"this run, {t_run}, eps = {rate.eps}")]
    if curve is not None and len(curve):
        at64 = curve[(curve.model == model) & (curve["T"] == entry["setting"]["T"])]
        ours += [(model, f"{r.sink_rate:.2f} %", f"sink-rate curve, T = {int(r['T'])} "
                  f"(reached {int(r.T_reached_min)}), eps = {r.eps}, {int(r.n_prompts)} texts")
                 for _, r in at64.iterrows()]
    paper = [(r["model"], f"{r['value']:.2f} %" if r["value"] is not None else NOT_REPORTED,
              entry["what"]) for r in entry["reported"]]
    note = ("" if rate.T_min == rate.T_max == entry["setting"]["T"] else
            f"The rate falls with T (Gu et al., Figure 3): compare at T = "
            f"{entry['setting']['T']} (tokenprobe run --max-tokens 64, or the sink-rate curve).")
    return Card("sink_rate", entry["paper"], entry["url"], _setting(entry["setting"]),
                f"{t_run}, eps = {rate.eps}, k_pos = {rate.k_pos}", _rows(paper), _rows(ours),
                note, entry["checked_against"])


def massive_card(run: Run, entry: dict) -> Card:
    """Sun et al.'s massive dims and tokens against ours, with the 100 / 1000x criterion."""
    model = str(run.meta.get("model"))
    config = _probe_config(run, "activations")
    m = run.massive
    paper = []
    for r in entry["reported"]:
        paper += [(r["model"], "dims " + ", ".join(map(str, r["dims"])), "massive dims"),
                  (r["model"], r["tokens"], "tokens carrying them"),
                  (r["model"], NOT_REPORTED if r["value"] is None else f"{r['value']:,.0f}",
                   "largest |h|"),
                  (r["model"], NOT_REPORTED if r["first_layer"] is None else str(r["first_layer"]),
                   "first layer")]
    if m.empty:
        ours = [(model, "none", "no entry passes the criterion")]
    else:
        tokens = run.tokens.set_index(["prompt_id", "pos"]).token
        top = m.assign(a=m.value.abs()).nlargest(1, "a").iloc[0]
        at = m[["prompt_id", "pos"]].drop_duplicates()
        words = pd.Series([tokens.get((p, q), "?") for p, q in zip(at.prompt_id, at.pos)])
        share_first = float((at.pos == 0).mean())
        ours = [(model, "dims " + ", ".join(map(str, sorted(m.dim.unique())[:8])), "massive dims"),
                (model, ", ".join(repr(w) for w in words.value_counts().index[:4])
                 + f" ({100 * share_first:.0f}% of flagged positions are position 0)",
                 "tokens carrying them"),
                (model, f"{abs(top.value):,.0f} (ratio {top.ratio_to_median:,.0f}x median)",
                 "largest |h|"),
                (model, str(int(m.layer.min())), "first layer (0-based block)")]
    ours_setting = (f"abs_threshold = {config.get('abs_threshold', 100)}, median_ratio = "
                    f"{config.get('median_ratio', 1000)}")
    return Card("massive_activations", entry["paper"], entry["url"], _setting(entry["setting"]),
                ours_setting, _rows(paper), _rows(ours), entry.get("notes", ""),
                entry["checked_against"])


def secondary_sinks_card(run: Run, entry: dict) -> Card:
    """Wong et al.'s sink kinds: counts of primary, secondary and noise sinks in this run."""
    model = str(run.meta.get("model"))
    counts = run.sinks.kind.value_counts()
    ours = [(model, str(int(counts.get(k, 0))), f"{k} sinks over {run.prompts.shape[0]} prompts")
            for k in ("primary", "secondary", "noise")]
    return Card("secondary_sinks", entry["paper"], entry["url"], _setting(entry["setting"]),
                f"L = {run.meta.get('n_layers')}", _rows([("-", NOT_REPORTED, entry["what"])]),
                _rows(ours), "", entry["checked_against"])


def critical_card(run: Run, entry: dict) -> Card:
    """Lin et al.'s rollout search setting (n = 64) against the n this run used."""
    model = str(run.meta.get("model"))
    items = run.meta["summary"]["critical"]
    n = run.meta.get("config", {}).get("n_rollouts")
    found = [i for i in items if i.get("status") == "critical"]
    cf = [i["counterfactual_success"] for i in found if i.get("counterfactual_success") is not None]
    ours = [(model, f"{len(found)} of {len(items)}", "tasks with a critical token")]
    if found:
        ours.append((model, f"{sum(i['success_at'] for i in found) / len(found):.2f}",
                     "mean success rate at the critical token"))
    if cf:
        ours.append((model, f"{sum(cf) / len(cf):.2f}", "mean counterfactual success"))
    note = "" if n == entry["setting"]["n"] else (
        f"This run used n = {n} rollouts per prefix; the paper uses {entry['setting']['n']}.")
    return Card("critical_tokens", entry["paper"], entry["url"], _setting(entry["setting"]),
                f"n = {n}, temperature = {run.meta.get('config', {}).get('temperature')}",
                _rows([("-", NOT_REPORTED, entry["what"])]), _rows(ours), note,
                entry["checked_against"])


def forking_card(run: Run, entry: dict) -> Card:
    """Wang et al.'s high-entropy minority: the entropy of the scored tokens (the response,
    where one is given) against the paper's 80th percentile, and the share flagged forking."""
    model = str(run.meta.get("model"))
    scored = run.tokens[run.tokens.forking.notna()]  # the tokens the selection ranked
    h = scored.entropy.to_numpy(float)
    rho = _probe_config(run, "entropy").get("rho", entry["setting"]["rho"])
    score = run.meta.get("summary", {}).get("entropy", {}).get("score", "all")
    if len(h):
        ours = [(model, f"{np.quantile(h, 0.8):.3f} nats", f"80th-percentile entropy of "
                 f"the {len(h)} scored tokens (score = {score})"),
                (model, f"{(h < 0.01).mean():.1%}", "share of them below 0.01 nats"),
                (model, f"{scored.forking.astype(bool).mean():.1%}", "share flagged forking")]
    else:
        ours = [(model, NOT_REPORTED, "no scored tokens")]
    paper = [(r["model"], f"{r['value']:.3f} nats" if r["value"] is not None else NOT_REPORTED,
              entry["what"]) for r in entry["reported"]]
    return Card("forking_tokens", entry["paper"], entry["url"], _setting(entry["setting"]),
                f"rho = {rho}, score = {score}", _rows(paper), _rows(ours),
                "The forking share is rho by construction (exactly ceil(rho N) tokens); the "
                "paper's entropies are of a reasoning model's own sampled responses.",
                entry["checked_against"])


def replication_cards(run: Run, *, curve: pd.DataFrame | None = None) -> list[Card]:
    """The cards for every measure `run` holds, in paper_figures.json order."""
    figures, cards = paper_figures(), []
    tables = run.tables
    if "heads" in tables and "sink_rate" in figures:
        cards.append(sink_rate_card(run, figures["sink_rate"], curve))
    if "massive" in tables and "massive_activations" in figures:
        cards.append(massive_card(run, figures["massive_activations"]))
    if "sinks" in tables and "secondary_sinks" in figures:
        cards.append(secondary_sinks_card(run, figures["secondary_sinks"]))
    if run.meta.get("summary", {}).get("critical") and "critical_tokens" in figures:
        cards.append(critical_card(run, figures["critical_tokens"]))
    if "entropy" in tables.get("tokens", pd.DataFrame()).columns and "forking_tokens" in figures:
        cards.append(forking_card(run, figures["forking_tokens"]))
    return cards
