"""Probes: what is captured during the forward pass, one module per phenomenon."""
from __future__ import annotations

from tokenprobe.probe import Probe
from tokenprobe.probes.activations import ActivationsConfig, ActivationsProbe
from tokenprobe.probes.entropy import EntropyConfig, EntropyProbe
from tokenprobe.probes.sinks import SinksConfig, SinksProbe

# Probes that need only the model being probed (the CLI's default set).
REGISTRY: dict[str, type[Probe]] = {"activations": ActivationsProbe, "sinks": SinksProbe,
                                    "entropy": EntropyProbe}


def make_probes(probes: list[str | Probe] | None) -> list[Probe]:
    """Instances for a list of probe names or instances; None means every registered probe."""
    if probes is None:
        return [cls() for cls in REGISTRY.values()]
    out = []
    for p in probes:
        if isinstance(p, Probe):
            out.append(p)
        elif p in REGISTRY:
            out.append(REGISTRY[p]())
        else:
            raise ValueError(f"unknown probe {p!r}; available: {', '.join(REGISTRY)}")
    if len({p.name for p in out}) != len(out):
        raise ValueError("each probe may be given once")
    return out


__all__ = ["REGISTRY", "make_probes", "ActivationsConfig", "ActivationsProbe", "EntropyConfig",
           "EntropyProbe", "SinksConfig", "SinksProbe"]
