"""The critical-token study (Lin et al., "Critical Tokens Matter", cDPO), one module per part.

`rule` (the search rule, pass@k, the prefix schedule, `CriticalConfig`, rollout seeds), `tasks`
(verifiable tasks and their verifiers), `grading` (the authors' GSM8K answer extraction and
comparison, behind the `final_number` verifier), `sampling` (the KV-shared sampler), `search`
(the search over a task set, its tables and summary) and `cli` (`tokenprobe critical`, loaded
only by the command line). The names below are the study's face:
`from tokenprobe.analyses.critical import CriticalConfig, critical_search, summary_frame`.
"""
from __future__ import annotations

from tokenprobe.analyses.critical.rule import (SCANS, CriticalConfig, find_critical, next_prefix,
                                               next_prefixes, pass_at_k, rollout_seed)
from tokenprobe.analyses.critical.tasks import Task, load_tasks, prompt_ids, stopper
from tokenprobe.analyses.critical.sampling import (Continuation, Job, sample_continuations,
                                                   sample_jobs)
from tokenprobe.analyses.critical.search import (COUNTERFACTUAL, PROMPT_ONLY, STRIDE,
                                                 add_critical_columns, critical_search,
                                                 summarise, summary_frame)

__all__ = ["COUNTERFACTUAL", "PROMPT_ONLY", "SCANS", "STRIDE", "Continuation", "CriticalConfig",
           "Job", "Task", "add_critical_columns", "critical_search", "find_critical",
           "load_tasks", "next_prefix", "next_prefixes", "pass_at_k", "prompt_ids",
           "rollout_seed", "sample_continuations", "sample_jobs", "stopper", "summarise",
           "summary_frame"]
