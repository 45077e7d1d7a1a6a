"""Probes: what is captured during the forward pass, one module per phenomenon.

Each module registers its probe (`tokenprobe.probe.register`); importing this package, which
the `tokenprobe.probes` entry point names, registers them all. The built-ins come first, in
this order (it fixes the column order of the tables they share), then any other module here.
"""
from __future__ import annotations

import importlib
import pkgutil

from tokenprobe.probe import make_probes
from tokenprobe.probes.activations import ActivationsConfig, ActivationsProbe
from tokenprobe.probes.sinks import SinksConfig, SinksProbe
from tokenprobe.probes.entropy import EntropyConfig, EntropyProbe

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["make_probes", "ActivationsConfig", "ActivationsProbe", "EntropyConfig",
           "EntropyProbe", "SinksConfig", "SinksProbe"]
