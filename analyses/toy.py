"""Bigram-Backcopy toy (Guo et al.): small transformers trained on it, their extreme-token report.

Guo et al., "Active-Dormant Attention Heads" (arXiv 2410.13835). Their code is public,
GuoTianYu2000/Active-Dormant-Attention: BBM/data.py (the task: `MetaProcess`, `Dataset`, `bbm`),
BBM/model.py (`Transformer`), BBM/train_main.py (optimiser and loss), BBM/data/ (statistics).
The task and its sampler are in `toy_data`. 1- to 3-layer transformers trained on it grow an
attention sink on BOS, a small BOS value state (value-state drain) and a large BOS residual norm
(residual-state peak).

`ToyConfig.faithful()` (`--scale guo`) is their setting: tiny-Shakespeare's statistics with
their token ids (65 characters, BOS 65, delimiter 66), no smoothing, 257-token sequences of which
the model reads 256 and predicts 256; a pre-LN transformer with learned positions, bias-free
linears, a ReLU MLP of width 4d, an untied output layer and PyTorch's default initialisation
(transformers' OPT, `enable_bias=False`); AdamW lr 3e-4, weight decay 1e-4, betas (0.9, 0.99),
eps 1e-8, batch 512, 10,000 steps. Still different: draws come from torch generators, not numpy's
(one per data worker), so no run repeats theirs draw for draw; OPT scales q before q.k (theirs
divides the scores: rounding only) and keeps two unused rows atop its position table; the CPU.

The default `ToyConfig()` (and `--scale small` / `paper`) differs from it to train on a CPU:
- text: `tokenprobe/data/toy_text.txt`, original prose written for tokenprobe (56 characters,
  all kept under `max_chars`), ids `<bos>` = 0, `<delim>` = 1, then characters by falling
  frequency (triggers 2..k+1);
- smoothing 0.1 on every count: without it a character always followed by a trigger (',' then
  ' ') loops x, t, x, t, ... to the end of every sequence (tiny-Shakespeare needs none); it moves
  some transition rows of the toy text by up to 0.83 in total variation;
- GPT-2 blocks: biases in every linear, GELU MLP, output tied to the token embedding,
  transformers' N(0, 0.02) initialisation;
- `seq_len` tokens per sequence, `seq_len` - 1 predictions (theirs: seq_len + 1 and seq_len);
- batch 16, 400 steps (`--scale small`: d 64, 64 tokens, batch 32, lr 2e-3, 1000 steps).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from torch.nn import functional as F
from tqdm.auto import tqdm
from transformers import (GPT2Config, GPT2LMHeadModel, OPTConfig, OPTForCausalLM,
                          PreTrainedModel, PreTrainedTokenizerFast)

import tokenprobe
from tokenprobe.analyses.toy_data import (BOS, DELIM, BigramTask,  # noqa: F401 (toy.BOS, ...)
                                          char_tokenizer, default_text)
from tokenprobe.store import publish

TASK = "bigram-backcopy"
META = "toy.json"
EVAL_SEED_OFFSET = 1_000_003  # held-out sequences: a generator seeded seed + this
DATA = ("toy_text", "tiny_shakespeare")
ARCHS = ("gpt2", "guo")


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    """Bigram-Backcopy task and training settings (Guo et al., arXiv 2410.13835, Sec. 2; their
    code's values: BBM/scripts/dynamics.sh, BBM/train_main.py).

    Attributes:
        n_layer: transformer blocks (paper: 1 to 3).
        d_model: model width (paper: 256).
        n_head: attention heads per layer (paper: 1).
        seq_len: tokens the model reads, BOS included (paper: 256).
        n_triggers: most frequent characters that trigger a back-copy (paper: k = 3).
        max_chars: cap on the character vocabulary of "toy_text" (theirs: all 65 characters).
        smoothing: add-alpha pseudo-count on each bigram (theirs: 0; module docstring).
        lr: AdamW learning rate (paper: 3e-4).
        weight_decay: AdamW weight decay (paper's scripts: 1e-4).
        betas: AdamW betas (paper's code: (0.9, 0.99)).
        batch_size: sequences per step (paper: 512 on a GPU; smaller here for a CPU).
        steps: optimizer steps (paper: 10 000; here sized for minutes on a 2-core CPU).
        eval_sequences: held-out sequences for the final loss and trigger accuracy.
        seed: seeds the initialisation and the training sequences (held-out: `held_out`).
        data: "toy_text": `BigramTask.from_text` (of `default_text()` unless a text is given);
            "tiny_shakespeare": Guo et al.'s ids and statistics (`BigramTask.tiny_shakespeare`,
            or `BigramTask.from_text_guo` of a given text, e.g. tiny-Shakespeare's input.txt).
        arch: "gpt2": transformers' GPT-2 (pre-LN, learned positions, GELU, biases, tied
            output); "guo": BBM/model.py's `Transformer` (bias-free linears, ReLU MLP of width
            4d, untied output, PyTorch's default init) as transformers' OPT.
        extra_token: draw seq_len + 1 tokens; the model reads the first seq_len and predicts
            the last seq_len (theirs: `Dataset.gen_batch` draws seq_length + 1, x = seq[:-1],
            y = seq[1:]). False: seq_len tokens, seq_len - 1 predictions.
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
    data: str = "toy_text"
    arch: str = "gpt2"
    extra_token: bool = False

    def __post_init__(self) -> None:
        if self.data not in DATA:
            raise ValueError(f"data {self.data!r}: expected one of {DATA}")
        if self.arch not in ARCHS:
            raise ValueError(f"arch {self.arch!r}: expected one of {ARCHS}")

    @classmethod
    def faithful(cls, **overrides) -> ToyConfig:
        """Guo et al.'s setting (module docstring); `overrides` replace any field, e.g.
        `n_layer=3` or a short `steps` for a CPU."""
        return cls(**{**GUO, **overrides})

    @property
    def sample_len(self) -> int:
        """Tokens drawn per sequence: `seq_len`, plus one with `extra_token`."""
        return self.seq_len + self.extra_token


# Guo et al.'s setting where ToyConfig's defaults are not already theirs.
GUO = {"data": "tiny_shakespeare", "arch": "guo", "extra_token": True, "smoothing": 0.0,
       "batch_size": 512, "steps": 10_000}


def make_task(config: ToyConfig, text: str | None = None) -> BigramTask:
    """The task of `config`: `text` counted by `config.data`'s rule, else that data's own."""
    if config.data == "tiny_shakespeare":
        if text is None:
            return BigramTask.tiny_shakespeare(n_triggers=config.n_triggers,
                                               smoothing=config.smoothing)
        return BigramTask.from_text_guo(text, n_triggers=config.n_triggers,
                                        smoothing=config.smoothing)
    return BigramTask.from_text(text if text is not None else default_text(),
                                max_chars=config.max_chars, n_triggers=config.n_triggers,
                                smoothing=config.smoothing)


def make_model(config: ToyConfig, vocab_size: int, *, bos_id: int = 0) -> PreTrainedModel:
    """A seeded, dropout-free model of `config.arch` (`ToyConfig`) reading `config.seq_len`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        if config.arch == "gpt2":
            model = GPT2LMHeadModel(GPT2Config(
                vocab_size=vocab_size, n_positions=config.seq_len, n_embd=config.d_model,
                n_layer=config.n_layer, n_head=config.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                attn_pdrop=0.0, bos_token_id=bos_id, eos_token_id=bos_id))
            model.loss_type = "ForCausalLM"  # its class name maps to no loss: silences a warning
            return model
        # BBM/model.py `Transformer`: LayerNorm before attention, before the MLP and before the
        # output layer; q, k, v, o, w1, w2 and the output bias-free; ReLU; learned positions.
        model = OPTForCausalLM(OPTConfig(
            vocab_size=vocab_size, hidden_size=config.d_model, word_embed_proj_dim=config.d_model,
            num_hidden_layers=config.n_layer, num_attention_heads=config.n_head,
            ffn_dim=4 * config.d_model, max_position_embeddings=config.seq_len,
            do_layer_norm_before=True, enable_bias=False, activation_function="relu",
            dropout=0.0, attention_dropout=0.0, layerdrop=0.0, tie_word_embeddings=False,
            pad_token_id=None, bos_token_id=bos_id, eos_token_id=bos_id))
        for module in model.modules():  # their init is PyTorch's default, not OPT's N(0, 0.02)
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding, torch.nn.LayerNorm)):
                module.reset_parameters()
    return model


def make_optimizer(config: ToyConfig, model: torch.nn.Module) -> torch.optim.AdamW:
    """AdamW over all parameters, as BBM/train_main.py builds it (one group, eps 1e-8)."""
    return torch.optim.AdamW(model.parameters(), lr=config.lr, betas=config.betas,
                             weight_decay=config.weight_decay, eps=1e-8)


def next_token_logits(model: PreTrainedModel, seqs: torch.Tensor, *,
                      extra_token: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, L-1, V) logits and (N, L-1) targets of `seqs` (N, L): the model reads all of `seqs`,
    or with `extra_token` all but the last token (then each of its positions has a target)."""
    logits = model(input_ids=seqs[:, :-1] if extra_token else seqs).logits
    return logits[:, :seqs.shape[1] - 1], seqs[:, 1:]


def next_token_loss(model: PreTrainedModel, seqs: torch.Tensor, *,
                    extra_token: bool) -> torch.Tensor:
    """Mean next-token cross-entropy over every position (theirs: `F.cross_entropy` of the
    float logits); without `extra_token`, transformers' own shifted loss."""
    if not extra_token:
        return model(input_ids=seqs, labels=seqs).loss
    logits, targets = next_token_logits(model, seqs, extra_token=True)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


@dataclasses.dataclass
class Trained:
    """A trained toy model with its tokenizer, task and training record (`info`, saved as JSON)."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerFast
    task: BigramTask
    info: dict


def held_out(task: BigramTask, n: int, *, seed: int, length: int = 256) -> torch.Tensor:
    """(n, length) held-out sequences: drawn from a generator seeded `seed + EVAL_SEED_OFFSET`."""
    generator = torch.Generator().manual_seed(seed + EVAL_SEED_OFFSET)
    return task.sample(n, length=length, generator=generator)


@torch.no_grad()
def evaluate(model: PreTrainedModel, task: BigramTask, seqs: torch.Tensor, *,
             extra_token: bool = False) -> dict[str, float]:
    """Loss, Bayes-optimal loss and trigger accuracy (argmax after a trigger = the copied
    token) of `model` on `seqs` (N, L); `extra_token` as in `ToyConfig`."""
    logits, targets = next_token_logits(model, seqs, extra_token=extra_token)  # (N, L-1, ...)
    after = torch.isin(seqs[:, :-1], torch.tensor(task.trigger_ids))
    correct = (logits.argmax(-1) == targets)[after]
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
    return {"loss": float(loss), "oracle_loss": task.oracle_nll(seqs),
            "trigger_accuracy": float(correct.float().mean()),
            "n_trigger_positions": int(after.sum())}


def train_toy(config: ToyConfig = ToyConfig(), *, text: str | None = None,
              progress: bool = True, threads: int | None = None) -> Trained:
    """Train a toy model on Bigram-Backcopy with plain next-token cross-entropy at every position.

    Args:
        config: task, model and optimiser settings (`ToyConfig.faithful()`: Guo et al.'s).
        text: source text of the characters and bigrams, counted by `config.data`'s rule
            (default: that data's own statistics, `make_task`).
        progress: show a tqdm bar over steps.
        threads: torch intra-op threads while training (None: torch's setting). On a busy
            small machine 1 is often fastest: spinning OpenMP threads wait on each other.
    """
    task = make_task(config, text)
    tokenizer = char_tokenizer(task)
    model = make_model(config, len(task.vocab), bos_id=task.bos_id).train()
    optim = make_optimizer(config, model)
    generator = torch.Generator().manual_seed(config.seed)
    losses: list[float] = []
    start, previous_threads = time.perf_counter(), torch.get_num_threads()
    torch.set_num_threads(threads or previous_threads)
    try:
        for step in (bar := tqdm(range(config.steps), desc=f"{TASK} L{config.n_layer}",
                                 unit="step", disable=not progress)):
            batch = task.sample(config.batch_size, length=config.sample_len, generator=generator)
            loss = next_token_loss(model, batch, extra_token=config.extra_token)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            losses.append(loss.item())
            if step % 10 == 0 or step == config.steps - 1:
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
        seconds = time.perf_counter() - start
        seqs = held_out(task, config.eval_sequences, seed=config.seed, length=config.sample_len)
        scores = evaluate(model.eval(), task, seqs, extra_token=config.extra_token)
    finally:
        torch.set_num_threads(previous_threads)
    info = {"task": TASK, "paper": "Guo et al., arXiv 2410.13835",
            "config": dataclasses.asdict(config), "train_seconds": round(seconds, 1),
            "torch_threads": threads or previous_threads,
            "train_loss_last20": sum(losses[-20:]) / len(losses[-20:]) if losses else None,
            "eval": scores, "triggers": [task.vocab[i] for i in task.trigger_ids],
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
# batch 512, and at CPU budgets its 3-layer model has not formed a sink yet; "guo" is
# `ToyConfig.faithful()`, GPU-sized (train_toy trains on the CPU: shorten it with --steps).
SCALES = {"small": {"d_model": 64, "seq_len": 64, "batch_size": 32, "lr": 2e-3, "steps": 1000},
          "paper": {}, "guo": GUO}


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
                             "(the paper trains 10 000 steps of batch 512); guo: Guo et al.'s code "
                             "(tiny-Shakespeare statistics, no smoothing, bias-free ReLU "
                             "transformer, untied output, batch 512, 10 000 steps: GPU-sized)")
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
