"""File names and captions of static figures: which model, run, prompt and measure each shows.

A report names its figures `r<i>_p<prompt>_<kind>` (run i of the report); `describe_figures`
maps them to `FigureInfo`, whose `stem` names the model and run in the file name
(`<run>_<model>_p<prompt>_<kind>`, sanitised) and whose `caption` is one sentence naming
model, run, prompt, measure and units.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# figure kind -> (the measure, its units); kinds are the suffixes of the report's names
MEASURES = {
    "sink_mass": ("Sink mass per layer and head",
                  "the mean attention the head's queries put on key 0, a fraction of 1"),
    "resid_norm": ("Residual norm ||h|| per layer and position",
                   "the L2 norm of the residual stream after each block, log colour scale"),
    "massive": ("Massive activations by layer, position and dim (Sun et al.)",
                "marker size grows with log10 |h|, |h| in residual-stream activation units"),
    "sinks": ("Sink-token lifetimes (bar: creation layer, length: lifetime)", "layers"),
    "critical": ("Rollout success rate per prefix, critical tokens starred",
                 "the fraction of rollouts that succeed"),
    "tip": ("TIP plane: student entropy against the two models' JSD, by quadrant",
            "H / ln V and JSD / ln 2, fractions of 1"),
    "attribution": ("Attribution of the target to prompt units (95% error bars where "
                    "sampled)", "nats, positive: the unit raises the target"),
    "compression": ("Target value with the top, bottom or random k% of units kept",
                    "nats"),
    "spans_scatter": ("Surprisal per character span of the two models", "nats"),
    "sink_rate_curve": ("Sink rate against context length T (Gu et al.)",
                        "% of layer x head pairs with sink mass above eps"),
    "compare_sink_mass": ("Sink mass per layer (mean and max over heads)",
                          "the attention the queries put on key 0, a fraction of 1"),
    "compare_massive": ("Largest activation |h| per layer (max over positions and dims)",
                        "residual-stream activation units, log axis"),
    "compare_attn_received": ("Attention received per position (mean over layers)",
                              "the mean attention a key receives per query, a fraction of 1, "
                              "log axis"),
}
_NAME = re.compile(r"r(?P<run>\d+)(?:_p(?P<prompt>\d+))?_(?P<kind>[a-z_]+)")


def sanitise(text: str, max_chars: int = 48) -> str:
    """`text` safe as part of a file name on any system: runs of other characters than
    letters, digits, `.`, `+` and `-` become `-`; at most `max_chars` characters."""
    out = re.sub(r"[^A-Za-z0-9.+-]+", "-", str(text)).strip("-.")
    return (out[:max_chars].rstrip("-.") or "x")


def run_name(label: str) -> str:
    """A run's short name: the last part of its directory (`runs/demo/` -> `demo`)."""
    return Path(str(label).rstrip("/\\")).name or str(label)


@dataclass(frozen=True)
class FigureInfo:
    """What one static figure shows.

    Attributes:
        runs: (run, model) of each run shown, in panel order (two or more: side by side).
        kind: the figure kind (a key of `MEASURES`).
        prompt: the prompt id (of the first run), or None.
        text: the prompt's text, or None.
    """

    runs: tuple[tuple[str, str], ...]
    kind: str
    prompt: int | None = None
    text: str | None = None

    @property
    def stem(self) -> str:
        """The file name without suffix: `<run>_<model>[_p<prompt>]_<kind>` (`<run>` alone
        when the run is named after its model), or for runs side by side
        `compare_<run>_<model>_vs_<run>_<model>..._p<prompt>_<measure>`."""
        who = "_vs_".join(sanitise(r, 32) if sanitise(r, 32) == sanitise(m, 40)
                          else f"{sanitise(r, 32)}_{sanitise(m, 40)}" for r, m in self.runs)
        kind = self.kind.removeprefix("compare_")
        prompt = f"_p{self.prompt}" if self.prompt is not None else ""
        if not self.runs:
            return sanitise(self.kind, 80)
        return ("compare_" if len(self.runs) > 1 else "") + f"{who}{prompt}_{kind}"

    @property
    def caption(self) -> str:
        """One sentence: measure, model(s) and run(s), prompt, units."""
        measure, units = MEASURES.get(self.kind, (self.kind.replace("_", " ").capitalize(),
                                                  "the units of the run's table"))
        models = " and ".join(f"{m} (run {r})" for r, m in self.runs)
        models = f" of {models}" if models else " of the models measured"
        where = ""
        if self.prompt is not None:
            text = " ".join(str(self.text or "").split())
            text = text if len(text) <= 60 else text[:57] + "..."
            where = f" on prompt {self.prompt}" + (f' ("{text}")' if text else "")
        side = " side by side" if len(self.runs) > 1 else ""
        return f"{measure}{models}{side}{where}; {units}."


def describe_figures(names: list[str], runs: list[tuple[str, str, dict[int, str]]]
                     ) -> dict[str, FigureInfo]:
    """`FigureInfo` of each report figure name `r<i>[_p<prompt>]_<kind>` (others: no run),
    where `runs[i]` is (label, model, prompt id -> text); file stems are made unique."""
    out: dict[str, FigureInfo] = {}
    for name in names:
        found = _NAME.fullmatch(name)
        if found and int(found["run"]) < len(runs):
            label, model, texts = runs[int(found["run"])]
            prompt = int(found["prompt"]) if found["prompt"] is not None else None
            out[name] = FigureInfo(((run_name(label), model),), found["kind"], prompt,
                                   texts.get(prompt) if prompt is not None else None)
        else:
            out[name] = FigureInfo((), name)
    return unique(out)


def unique(info: dict[str, FigureInfo]) -> dict[str, FigureInfo]:
    """`info` with a figure whose stem is taken by an earlier one given a `-<n>` run suffix."""
    seen: set[str] = set()
    out = {}
    for name, item in info.items():
        n, fixed = 1, item
        while fixed.stem in seen:
            n += 1
            fixed = FigureInfo(tuple((f"{r}-{n}", m) for r, m in item.runs), item.kind
                               if item.runs else f"{item.kind}-{n}", item.prompt, item.text)
        seen.add(fixed.stem)
        out[name] = fixed
    return out
