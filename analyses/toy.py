"""Bigram-Backcopy toy (Guo et al.): data, a small GPT-2 trained on it, its extreme-token report.

Guo et al., "Active-Dormant Attention Heads" (arXiv 2410.13835; GuoTianYu2000/Active-Dormant-
Attention, BBM/). Sequences start with BOS; the most frequent characters of a text are triggers;
after a trigger the next token copies the token before the trigger, otherwise it follows the
text's bigram model. 1- to 3-layer transformers trained on it grow an attention sink on BOS, a
small BOS value state (value-state drain) and a large BOS residual norm (residual-state peak).

Choices of this implementation (the paper leaves them open or its data code is not public):
- Text: `tokenprobe/data/toy_text.txt`, original prose written for tokenprobe; its `max_chars`
  most frequent characters are the vocabulary (it has 56, all kept), others are dropped.
- Token ids: `<bos>` = 0, `<delim>` = 1 (never generated: the paper's default delimiter_p = 0),
  then the characters by falling frequency, so the triggers are ids 2..k+1.
- The first token after BOS is drawn from the unigram distribution of non-trigger characters,
  so every trigger has a character before it and, by induction, no two triggers are adjacent.
- Bigram counts get add-`smoothing` pseudo-counts: without them a character always followed by
  a trigger (',' then ' ') would loop x, t, x, t, ... to the end of every sequence.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
import time
from collections import Counter
from importlib import resources
from pathlib import Path

import pandas as pd
import torch
from tokenizers import Tokenizer, decoders, models, processors
from tqdm.auto import tqdm
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

import tokenprobe
from tokenprobe.store import publish

BOS, DELIM = "<bos>", "<delim>"
TASK = "bigram-backcopy"
META = "toy.json"
EVAL_SEED_OFFSET = 1_000_003  # held-out sequences: a generator seeded seed + this


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    """Bigram-Backcopy task and training settings (Guo et al., arXiv 2410.13835, Sec. 2).

    Attributes:
        n_layer: transformer blocks (paper: 1 to 3).
        d_model: model width (paper: 256).
        n_head: attention heads per layer (paper: 1).
        seq_len: tokens per sequence, BOS included (paper: 256).
        n_triggers: most frequent characters that trigger a back-copy (paper: k = 3).
        max_chars: cap on the character vocabulary (paper: the 65 characters of its text).
        smoothing: add-alpha pseudo-count on each bigram (not in the paper; module docstring).
        lr: AdamW learning rate (paper: 3e-4).
        weight_decay: AdamW weight decay (paper's scripts: 1e-4).
        betas: AdamW betas (paper's code: (0.9, 0.99)).
        batch_size: sequences per step (paper: 512 on a GPU; smaller here for a CPU).
        steps: optimizer steps (paper: 10 000; here sized for minutes on a 2-core CPU).
        eval_sequences: held-out sequences for the final loss and trigger accuracy.
        seed: seeds the initialisation and the training sequences (held-out: `held_out`).
    """

    n_layer: int = 1
    d_model: int = 256
    n_head: int = 1
    seq_len: int = 256
    n_triggers: int = 3
    max_chars: int = 65
    smoothing: float = 0.1
    lr: float = 3e-4
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.99)
    batch_size: int = 16
    steps: int = 400
    eval_sequences: int = 64
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class BigramTask:
    """The data distribution: characters, their counts and bigram counts from one text.

    Attributes:
        chars: the character vocabulary by falling frequency (token id = index + 2).
        char_counts: occurrences of each character in the (filtered) text.
        bigrams: bigrams[i][j] = times chars[j] follows chars[i].
        n_triggers: the first `n_triggers` characters are triggers.
        smoothing: add-alpha pseudo-count on every bigram and unigram count.
    """

    chars: tuple[str, ...]
    char_counts: tuple[int, ...]
    bigrams: tuple[tuple[int, ...], ...]
    n_triggers: int = 3
    smoothing: float = 0.1

    @classmethod
    def from_text(cls, text: str, *, max_chars: int = 65, n_triggers: int = 3,
                  smoothing: float = 0.1) -> BigramTask:
        """Count the `max_chars` most frequent characters of `text` (others are dropped)."""
        ranked = sorted(Counter(text).items(), key=lambda kv: (-kv[1], kv[0]))[:max_chars]
        if len(ranked) <= n_triggers:
            raise ValueError(f"{len(ranked)} characters; need more than {n_triggers} triggers")
        index = {ch: i for i, (ch, _) in enumerate(ranked)}
        kept = [index[ch] for ch in text if ch in index]
        pairs, n = Counter(zip(kept, kept[1:])), len(ranked)
        bigrams = tuple(tuple(pairs.get((i, j), 0) for j in range(n)) for i in range(n))
        return cls(tuple(ch for ch, _ in ranked), tuple(c for _, c in ranked), bigrams,
                   n_triggers, smoothing)

    @property
    def vocab(self) -> list[str]:
        """Token strings by id: BOS, the delimiter, then the characters."""
        return [BOS, DELIM, *self.chars]

    @property
    def trigger_ids(self) -> list[int]:  # the triggers are the most frequent characters
        return list(range(2, 2 + self.n_triggers))

    def transitions(self) -> torch.Tensor:
        """(V, V) float64 next-token probabilities used by the sampler.

        Character rows are the smoothed bigram model over characters. Rows of BOS, the
        delimiter and the triggers (never sampled from: triggers copy) are the smoothed unigram
        of non-trigger characters, the distribution of the first token after BOS.
        """
        n, k = len(self.chars), self.n_triggers
        probs = torch.zeros(n + 2, n + 2, dtype=torch.float64)
        counts = torch.tensor(self.bigrams, dtype=torch.float64) + self.smoothing  # (n, n)
        probs[2:, 2:] = counts / counts.sum(-1, keepdim=True)
        start = torch.tensor(self.char_counts, dtype=torch.float64) + self.smoothing  # (n,)
        start[:k] = 0.0  # no trigger right after BOS
        probs[:2 + k, 2:] = start / start.sum()
        return probs

    def sample(self, n: int, *, length: int = 256, generator: torch.Generator) -> torch.Tensor:
        """(n, length) int64 sequences, BOS first, drawn with `generator` only."""
        probs = self.transitions()
        is_trigger = torch.isin(torch.arange(len(probs)), torch.tensor(self.trigger_ids))
        seqs = torch.zeros(n, length, dtype=torch.long)  # column 0 is BOS (id 0)
        for t in range(1, length):
            prev = seqs[:, t - 1]  # (n,)
            drawn = torch.multinomial(probs[prev], 1, generator=generator).squeeze(1)  # (n,)
            copied = seqs[:, t - 2] if t >= 2 else drawn
            seqs[:, t] = torch.where(is_trigger[prev], copied, drawn)
        return seqs

    def oracle_nll(self, seqs: torch.Tensor) -> float:
        """Mean NLL of the next token under the true distribution (0 after a trigger), the
        floor of the training loss on `seqs` (N, T)."""
        probs = self.transitions()
        prev, nxt = seqs[:, :-1], seqs[:, 1:]  # (N, T-1)
        nll = -probs[prev, nxt].log()
        nll[torch.isin(prev, torch.tensor(self.trigger_ids))] = 0.0
        return float(nll.mean())


def default_text() -> str:
    """The project's toy text, `tokenprobe/data/toy_text.txt`."""
    return resources.files("tokenprobe").joinpath("data/toy_text.txt").read_text("utf-8")


def char_tokenizer(task: BigramTask) -> PreTrainedTokenizerFast:
    """One token per character of `task`, `<bos>` prepended; unknown characters are dropped.

    A BPE model with an empty merge list and no pre-tokenizer splits the text into single
    characters, spaces and newlines included; the `Fuse` decoder joins them back unchanged.
    """
    tok = Tokenizer(models.BPE(vocab={s: i for i, s in enumerate(task.vocab)}, merges=[]))
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS,
                                   additional_special_tokens=[DELIM],
                                   clean_up_tokenization_spaces=False)


def make_model(config: ToyConfig, vocab_size: int) -> GPT2LMHeadModel:
    """GPT-2 (pre-LN, learned positions, GELU MLP of width 4d), no dropout, seeded init."""
    gpt2 = GPT2Config(vocab_size=vocab_size, n_positions=config.seq_len, n_embd=config.d_model,
                      n_layer=config.n_layer, n_head=config.n_head, resid_pdrop=0.0,
                      embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = GPT2LMHeadModel(gpt2)
    model.loss_type = "ForCausalLM"  # its class name maps to no loss: silences a warning
    return model


@dataclasses.dataclass
class Trained:
    """A trained toy model with its tokenizer, task and training record (`info`, saved as JSON)."""

    model: GPT2LMHeadModel
    tokenizer: PreTrainedTokenizerFast
    task: BigramTask
    info: dict


def held_out(task: BigramTask, n: int, *, seed: int, length: int = 256) -> torch.Tensor:
    """(n, length) held-out sequences: drawn from a generator seeded `seed + EVAL_SEED_OFFSET`."""
    generator = torch.Generator().manual_seed(seed + EVAL_SEED_OFFSET)
    return task.sample(n, length=length, generator=generator)


@torch.no_grad()
def evaluate(model: GPT2LMHeadModel, task: BigramTask, seqs: torch.Tensor) -> dict[str, float]:
    """Loss, Bayes-optimal loss and trigger accuracy (argmax after a trigger = the copied
    token) of `model` on `seqs` (N, T)."""
    out = model(input_ids=seqs, labels=seqs)
    pred = out.logits[:, :-1].argmax(-1)  # (N, T-1)
    after = torch.isin(seqs[:, :-1], torch.tensor(task.trigger_ids))
    correct = (pred == seqs[:, 1:])[after]
    return {"loss": float(out.loss), "oracle_loss": task.oracle_nll(seqs),
            "trigger_accuracy": float(correct.float().mean()),
            "n_trigger_positions": int(after.sum())}


def train_toy(config: ToyConfig = ToyConfig(), *, text: str | None = None,
              progress: bool = True, threads: int | None = None) -> Trained:
    """Train a GPT-2 on Bigram-Backcopy with plain next-token cross-entropy at every position.

    Args:
        config: task, model and optimiser settings.
        text: source text of the characters and bigrams (default: `default_text()`).
        progress: show a tqdm bar over steps.
        threads: torch intra-op threads while training (None: torch's setting). On a busy
            small machine 1 is often fastest: spinning OpenMP threads wait on each other.
    """
    task = BigramTask.from_text(text if text is not None else default_text(),
                                max_chars=config.max_chars, n_triggers=config.n_triggers,
                                smoothing=config.smoothing)
    tokenizer = char_tokenizer(task)
    model = make_model(config, len(task.vocab)).train()
    optim = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=config.betas,
                              weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    losses: list[float] = []
    start, previous_threads = time.perf_counter(), torch.get_num_threads()
    torch.set_num_threads(threads or previous_threads)
    try:
        for step in (bar := tqdm(range(config.steps), desc=f"{TASK} L{config.n_layer}",
                                 unit="step", disable=not progress)):
            batch = task.sample(config.batch_size, length=config.seq_len, generator=generator)
            loss = model(input_ids=batch, labels=batch).loss
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            losses.append(loss.item())
            if step % 10 == 0 or step == config.steps - 1:
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
        seconds = time.perf_counter() - start
        scores = evaluate(model.eval(), task, held_out(task, config.eval_sequences,
                                                       seed=config.seed, length=config.seq_len))
    finally:
        torch.set_num_threads(previous_threads)
    info = {"task": TASK, "paper": "Guo et al., arXiv 2410.13835",
            "config": dataclasses.asdict(config), "train_seconds": round(seconds, 1),
            "torch_threads": threads or previous_threads,
            "train_loss_last20": sum(losses[-20:]) / len(losses[-20:]) if losses else None,
            "eval": scores, "triggers": [task.chars[i - 2] for i in task.trigger_ids],
            "bigram_task": dataclasses.asdict(task)}
    return Trained(model, tokenizer, task, info)


def save_toy(trained: Trained, directory: str | Path) -> Path:
    """Write `trained` as a Hugging Face directory (safetensors, tokenizer, `toy.json`), via a
    staging directory beside `directory` that then replaces it: no reader sees a partial model."""
    final = Path(directory)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        trained.model.save_pretrained(staging, safe_serialization=True)
        trained.tokenizer.save_pretrained(staging)
        (staging / META).write_text(json.dumps(trained.info, indent=2))
        publish(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def load_task(model_dir: str | Path) -> tuple[BigramTask, dict]:
    """The `BigramTask` and training record saved with a toy model."""
    info = json.loads((Path(model_dir) / META).read_text())
    raw = info["bigram_task"]
    return BigramTask(**{**raw, "chars": tuple(raw["chars"]), "char_counts": tuple(
        raw["char_counts"]), "bigrams": tuple(map(tuple, raw["bigrams"]))}), info


def toy_report(model_dir: str | Path, *, n_prompts: int = 16, seed: int = 0,
               progress: bool = False) -> pd.DataFrame:
    """Extreme-token statistics per layer of a saved toy model, on held-out sequences.

    Runs `tokenprobe.run(..., ["sinks", "activations"])` on `n_prompts` held-out sequences,
    as text (the tokenizer's round trip is checked first).

    Returns:
        One row per layer: `sink_mass` (mean attention to BOS, Gu et al.'s alpha_0),
        `value_drain_sink` / `value_drain_rest` (||W_O v|| of BOS / mean of the other tokens),
        `drain_ratio` (sink / rest; < 1 is a value-state drain), `resid_norm_bos`,
        `resid_norm_other_max` (per-prompt max over the other tokens, averaged),
        `resid_norm_other_mean`, `peak_ratio` (BOS / other max; > 1 is a residual-state peak).
        All means are over prompts (and heads). `attrs` holds `uniform_sink_mass`, the sink
        mass of uniform causal attention at this length, for comparison.

    Raises:
        ValueError: the tokenizer does not reproduce the sampled token ids from their text.
    """
    task, info = load_task(model_dir)
    loaded = tokenprobe.load(str(model_dir))
    seq_len = info["config"]["seq_len"]
    seqs = held_out(task, n_prompts, seed=seed, length=seq_len)
    texts = [loaded.tokenizer.decode(row[1:].tolist()) for row in seqs]
    for i, (text, row) in enumerate(zip(texts, seqs)):
        if loaded.tokenizer(text)["input_ids"] != row.tolist():
            raise ValueError(f"sequence {i} does not survive decode/encode: {text[:40]!r}...")
    result = tokenprobe.run(loaded, texts, ["sinks", "activations"], progress=progress)
    tl, columns = result.token_layers, ["sink_mass", "value_drain_sink", "value_drain_rest"]
    per_layer = result.heads.groupby("layer")[columns].mean()
    bos = tl[tl.pos == 0].groupby("layer").resid_norm.mean().rename("resid_norm_bos")
    others = tl[tl.pos > 0].groupby(["layer", "prompt_id"]).resid_norm.agg(["max", "mean"])
    others = others.groupby("layer").mean().add_prefix("resid_norm_other_")
    report = per_layer.join(bos).join(others)
    report.insert(3, "drain_ratio", report.value_drain_sink / report.value_drain_rest)
    report["peak_ratio"] = report.resid_norm_bos / report.resid_norm_other_max
    report = report.reset_index()
    report.attrs["uniform_sink_mass"] = float(sum(1 / (i + 1) for i in range(seq_len)) / seq_len)
    return report


# Settings of `tokenprobe toy --scale`. "small" shows the BOS sink, the value drain and the
# residual peak in under a minute per model on this 2-core CPU (README: the toy's numbers);
# "paper" keeps the paper's width, length and learning rate, but not its 10 000 steps of
# batch 512, and at CPU budgets its 3-layer model has not formed a sink yet.
SCALES = {"small": {"d_model": 64, "seq_len": 64, "batch_size": 32, "lr": 2e-3, "steps": 1000},
          "paper": {}}


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `toy` subcommand (train toy models, save them, print their report)."""
    from tokenprobe.cli.args import positive_int, seed

    parser = subparsers.add_parser(
        "toy", help="train the Bigram-Backcopy toy models and report their extreme tokens",
        description="Train one GPT-2 per --layers value on the Bigram-Backcopy task (Guo et al., "
                    "arXiv 2410.13835) on the CPU, save it as the Hugging Face directory "
                    "OUT/bigram-backcopy-L<n> (replacing it; loadable with tokenprobe.load), and "
                    "print per layer the attention sink mass on BOS, BOS vs other value norms "
                    "(value-state drain) and BOS vs other residual norms (residual-state peak).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("task", choices=[TASK], help="the toy task")
    parser.add_argument("--out", default="runs/toy", metavar="DIR",
                        help="directory that receives one model directory per layer count")
    parser.add_argument("--scale", choices=list(SCALES), default="small",
                        help="small: d_model 64, 64 tokens, batch 32, lr 2e-3, 1000 steps (shows "
                             "the sink, the drain and the residual peak in under a minute per "
                             "model here); paper: the paper's d_model 256, 256 tokens and lr 3e-4, "
                             f"with batch {ToyConfig().batch_size} and {ToyConfig().steps} steps "
                             "(the paper trains 10 000 steps of batch 512)")
    parser.add_argument("--steps", type=positive_int, metavar="N",
                        help="optimizer steps per model (default: the scale's)")
    parser.add_argument("--layers", type=positive_int, nargs="+", default=[1, 3], metavar="L",
                        help="layer counts to train, one model each (paper: 1 to 3)")
    parser.add_argument("--seed", type=seed, default=ToyConfig().seed,
                        help="seed of the initialisation and of the training sequences")
    parser.add_argument("--threads", type=positive_int, default=1, metavar="N",
                        help="torch threads while training (1 measured fastest on a busy "
                             "2-core machine; on an idle one try the core count)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=cmd_toy)
    return parser


def cmd_toy(args: argparse.Namespace) -> int:
    """`tokenprobe toy`: train, save and report each model; returns 0. Bad numbers are refused
    by the parser and an --out that cannot be written by `check_writable`, before training."""
    from tokenprobe.store import check_writable

    check_writable(Path(args.out) / f"{TASK}-L{args.layers[0]}")
    for n_layer in args.layers:
        settings = {**SCALES[args.scale], **({"steps": args.steps} if args.steps else {})}
        config = ToyConfig(n_layer=n_layer, seed=args.seed, **settings)
        trained = train_toy(config, progress=not args.quiet, threads=args.threads)
        path = save_toy(trained, Path(args.out) / f"{TASK}-L{n_layer}")
        scores = trained.info["eval"]
        print(f"{path}: {trained.info['train_seconds']:.0f} s, held-out loss "
              f"{scores['loss']:.3f} (optimum {scores['oracle_loss']:.3f}), trigger accuracy "
              f"{scores['trigger_accuracy']:.3f}")
        report = toy_report(path, progress=not args.quiet)
        print(report.to_string(index=False, float_format=lambda x: f"{x:.3f}"), "\n(uniform causal "
              f"attention: sink_mass {report.attrs['uniform_sink_mass']:.3f})\n", sep="")
    return 0
