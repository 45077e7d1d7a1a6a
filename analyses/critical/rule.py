"""Critical tokens by rollout search: the search rule, pass@k, seeds and the prefix schedule.

Definitions (README, "Measures"; Lin et al., "Critical Tokens Matter", cDPO,
chenzhiling9954/Critical-Tokens-Matter): for an incorrect trajectory, sample n continuations of
every prefix ending at token t (at the rollout temperature, which their
`src/configs/data_config.py::get_model_sampling_config` sets per dataset and model: GSM8K 0.5
for Llama-3-8B) and score them with a verifier. The critical token is the first t whose prefix
gives 0/n correct continuations, where the search resets if a later prefix gets more than 3
correct; when the scan ends with no candidate, the one the last reset cleared is the answer
(their `analyse_all_token`). The full trajectory is never a prefix (its continuation is empty).
The per-prefix success rate is `critical_success` = c_t / n; pass@k uses the unbiased estimator
1 - C(n-c, k) / C(n, k). Counterfactual check (their `generate_with_and_without_for_sampling`,
`without_sampling_n = 1`): draw 64 replacements of the token at t from the temperature-1 softmax
with the original token's probability set to 0 (torch.multinomial with replacement, which
renormalises), roll each out once at the rollout temperature, and report the success rate (their
pass@k, `get_pass_at_k`, is of these rollouts).

The rule's answer is the earliest zero of the last run of prefixes holding a zero that no prefix
with more than 3 correct interrupts, so the default schedule scans backwards from the end of
the trajectory and stops at the first prefix with more than 3 correct once it has seen a zero:
the prefixes before it cannot change the answer and are never sampled (`scan="all"` samples
every prefix, for a full success curve). The sampling itself is in
`tokenprobe.analyses.critical.sampling`; the run over a task set in
`tokenprobe.analyses.critical.search`.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass

SCANS = ("backward", "all")


@dataclass(frozen=True, kw_only=True)
class CriticalConfig:
    """Settings of a critical-token search (Lin et al.; defaults from the paper unless noted).

    Attributes:
        n_rollouts: continuations per prefix. The paper uses 64; 16 here is a CPU default.
        temperature: rollout sampling temperature. The authors' code (`src/configs/data_config.py`,
            `TEMPERATURE_BY_DATASET_AND_MODEL` through `get_model_sampling_config`) picks it per
            dataset and model (to get about 10 wrong answers per question among their 64
            samples) and uses it for their trajectories, the prefix rollouts and the
            counterfactual rollouts alike: GSM8K 0.5 (Llama-3-8B, the default here), 0.85
            (Llama-3-70B), 1.0 (deepseek-math-7b-base), 0.9 (Qwen2.5-7B), 1.1 (Qwen2.5-32B);
            MATH 0.1, 0.15, 0.3, 0.5, 0.7. Their vLLM sampling also has top_p = 0.95, which
            tokenprobe does not apply.
        reset_above: a prefix with more than this many correct continuations resets the
            search (paper 3).
        max_new_tokens: length limit of each continuation (ours).
        batch_size: continuations decoded together (ours); a batch may hold rows of
            several prefixes of the window.
        window: prefixes sampled together (ours): the scan's next `window` positions share
            one forward of the trajectory and fill decode batches together. The backward scan
            may then sample up to `window` - 1 positions past the one that ends it; they do
            not change the critical token (see `next_prefixes`).
        scan: "backward" (skip prefixes the rule no longer needs) or "all".
        counterfactual: run the counterfactual resampling check at the critical token.
        counterfactual_draws: replacement tokens drawn there, each rolled out once (the
            code: 64, `num_samples=64`).
        counterfactual_temperature: temperature of the replacement draw (the code: 1, a plain
            softmax); its rollout continues at `temperature`.
        trajectory_temperature: temperature of the sampled trajectories searched (ours: 0.7;
            the authors sample theirs at the rollout temperature).
        trajectory_attempts: trajectories sampled per task until one is incorrect.
        max_trajectory_tokens: length limit of a sampled trajectory.
        pass_k: the k of the pass@k figures in the summary.
        seed: base seed; every rollout's seed is derived from it (`rollout_seed`).
    """

    n_rollouts: int = 16
    temperature: float = 0.5
    reset_above: int = 3
    max_new_tokens: int = 96
    batch_size: int = 64
    window: int = 4
    scan: str = "backward"
    counterfactual: bool = True
    counterfactual_draws: int = 64
    counterfactual_temperature: float = 1.0
    trajectory_temperature: float = 0.7
    trajectory_attempts: int = 8
    max_trajectory_tokens: int = 160
    pass_k: tuple[int, ...] = (1, 4)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.scan not in SCANS:
            raise ValueError(f"scan must be one of {SCANS}, got {self.scan!r}")
        if min(self.n_rollouts, self.batch_size, self.window, self.trajectory_attempts,
               self.counterfactual_draws) < 1:
            raise ValueError("n_rollouts, batch_size, window, trajectory_attempts and "
                             "counterfactual_draws must be >= 1")
        temps = (self.temperature, self.trajectory_temperature, self.counterfactual_temperature)
        if not all(0 <= t < math.inf for t in temps):
            raise ValueError(f"temperatures must be finite and >= 0, got {temps}")
        if self.max_new_tokens < 1 or self.max_trajectory_tokens < 1:
            raise ValueError("token limits must be >= 1")


def find_critical(counts: Mapping[int, int], *, reset_above: int = 3) -> int | None:
    """The critical position from per-prefix correct counts (Lin et al.'s search rule, as
    their code has it: `analyse_all_token`).

    Scanning positions in increasing order, the first position with 0 correct becomes the
    candidate; a later position with more than `reset_above` correct clears it, and the next
    zero after that becomes the candidate again. When the scan ends with no candidate, the
    last one a reset cleared is returned (counts [5, 0, 2, 4, 1, 1] give 1).

    Args:
        counts: position -> number of correct continuations of the prefix ending there
            (positions not sampled are simply absent).
        reset_above: the reset threshold (paper: 3).

    Returns:
        The critical position, or None when no prefix had 0 correct.
    """
    candidate = cleared = None
    for pos in sorted(counts):
        if counts[pos] == 0 and candidate is None:
            candidate = pos
        elif counts[pos] > reset_above and candidate is not None:
            cleared, candidate = candidate, None
    return candidate if candidate is not None else cleared


def next_prefix(positions: list[int], counts: Mapping[int, int], *, scan: str = "backward",
                reset_above: int = 3) -> int | None:
    """The next prefix position to sample, given the counts so far; None when done.

    "all" samples every position in increasing order. "backward" samples from the last
    position down and, once it has seen a position with 0 correct, stops after a position with
    more than `reset_above` correct: by `find_critical`, positions before it cannot change the
    result. Before a zero is seen a reset does not stop it: the answer is then the candidate
    that reset cleared, further back.
    """
    found = next_prefixes(positions, counts, scan=scan, reset_above=reset_above, limit=1)
    return found[0] if found else None


def next_prefixes(positions: list[int], counts: Mapping[int, int], *, scan: str = "backward",
                  reset_above: int = 3, limit: int = 1) -> list[int]:
    """The next `limit` positions `next_prefix` would give if none of them ended the scan.

    Sampling them together can only add positions before the backward scan's last reset,
    which `find_critical` ignores: the critical token is the one the one-at-a-time scan finds.
    """
    if scan not in SCANS:
        raise ValueError(f"scan must be one of {SCANS}, got {scan!r}")
    found: list[int] = []
    zero = False
    for pos in (positions if scan == "all" else reversed(positions)):
        if len(found) == limit:
            break
        if pos not in counts:
            found.append(pos)
        elif counts[pos] == 0:
            zero = True
        elif scan == "backward" and counts[pos] > reset_above and zero:
            break
    return found


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n - c, k) / C(n, k) (exact)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def rollout_seed(seed: int, task_id: str, kind: str, pos: int, index: int) -> int:
    """A reproducible 63-bit seed for rollout `index` of (`task_id`, `kind`, `pos`)."""
    key = f"{seed}\x00{task_id}\x00{kind}\x00{pos}\x00{index}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") >> 1
