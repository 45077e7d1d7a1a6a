"""Where a model goes: one device (`check_device`), or spread over GPUs, CPU and disk by a
`device_map` through accelerate (`check_placement`, `module_map`), and where its parts then
compute (`execution_device`, `input_device`, `placement_meta`).

accelerate offloads module by module: an offloaded module's weights are `meta` tensors between
its forwards, brought in by its hook for its own forward only. Two things read weights outside
that: tokenprobe's attention function hands a block's output projection to the probes before
the projection runs (`preload_offloaded_blocks` makes each offloaded block load all of its
weights for its whole forward), and the entropy probe reads the unembedding outside any forward
(`tokenprobe.unembedding` brings it in for as long as the probe holds it).
"""
from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Mapping

import torch
import transformers
from transformers import AutoModelForCausalLM, PreTrainedModel

DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's strategies
ACCELERATE_HINT = "pip install 'tokenprobe[accelerate]' (or: pip install 'accelerate>=1.0')"


def check_device(device: str) -> str:
    """`device` if a model can be placed on it on this machine, else ValueError saying why.

    Refused: a string torch does not parse, `meta` (tensors without data: nothing to measure),
    a device type whose backend is not available here (cuda without a GPU or in a CPU build of
    torch, mps off Apple silicon), and an index past the device count.
    """
    try:
        kind = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if kind.type == "meta":
        raise ValueError("device 'meta' holds no weights (tensors without data), so nothing can "
                         "be measured on it; use --device cpu or cuda")
    backend = getattr(torch, kind.type, None)
    if not getattr(backend, "is_available", lambda: False)():
        why = (" (this torch is a CPU-only build)" if kind.type == "cuda" and torch.version.cuda
               is None and torch.version.hip is None else "")
        raise ValueError(f"device {device!r} is not available on this machine{why}; use "
                         "--device cpu")
    count = getattr(backend, "device_count", lambda: 1)()
    if kind.index is not None and kind.index >= count:
        raise ValueError(f"device {device!r} does not exist: this machine has {count} "
                         f"{kind.type} device(s), {kind.type}:0 to {kind.type}:{count - 1}")
    return device


class PlacementError(ValueError):
    """A `device_map`, `max_memory` or `offload_folder` that cannot place this model."""


def _map_device(value: Any, where: str) -> Any:
    """A device_map / max_memory value: a GPU index, "cpu", "disk" or a device string this
    machine has (`check_device`); PlacementError naming `where` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise PlacementError(f"{where}: expected a GPU index, 'cpu', 'disk' or a device such "
                             f"as 'cuda:0', got {value!r}")
    if value in ("cpu", "disk"):
        return value
    text = f"cuda:{value}" if isinstance(value, int) else value
    if isinstance(value, int) and value < 0:
        raise PlacementError(f"{where}: a GPU index is >= 0, got {value}")
    try:
        check_device(text)
    except ValueError as err:
        raise PlacementError(f"{where}: {err}") from None
    return value


def check_placement(device: str | None, device_map: Any, max_memory: Any,
                    offload_folder: Any) -> dict | None:
    """The placement keywords for `from_pretrained` (device_map, max_memory, offload_folder),
    or None to load onto one `device`; PlacementError before anything loads when they
    disagree: `device` with `device_map`, `max_memory` or `offload_folder` without it,
    `max_memory` with a dict map, an unknown strategy or device, or a size that is not one.
    Module names are checked once the config is read (`module_map`)."""
    if device_map is None:
        extra = [n for n, v in (("max_memory", max_memory), ("offload_folder", offload_folder))
                 if v is not None]
        if extra:
            raise PlacementError(f"{' and '.join(extra)} only apply with device_map (e.g. "
                                 "device_map='auto')")
        return None
    if device is not None:
        raise PlacementError(f"pick one of device ({device!r}: the whole model on one device) "
                             f"and device_map ({device_map!r}: blocks spread over devices)")
    if isinstance(device_map, str):
        if device_map not in DEVICE_MAPS:
            raise PlacementError(f"device_map {device_map!r} is not one of {', '.join(DEVICE_MAPS)} "
                                 "or a dict from module name to device")
    elif isinstance(device_map, Mapping):
        if not device_map:
            raise PlacementError("device_map is an empty dict: map module names to devices "
                                 '(e.g. {"": "cpu"}), or use "auto"')
        for module, value in device_map.items():
            if not isinstance(module, str):
                raise PlacementError(f"device_map keys are module names, got {module!r}")
            _map_device(value, f"device_map[{module!r}]")
        if max_memory is not None:
            raise PlacementError("max_memory only applies to a strategy device_map (auto, "
                                 "balanced, sequential), not to a dict that places every module")
        device_map = dict(device_map)
    else:
        raise PlacementError(f"device_map must be a strategy ({', '.join(DEVICE_MAPS)}) or a "
                             f"dict from module name to device, got {type(device_map).__name__}")
    if max_memory is not None:
        if not isinstance(max_memory, Mapping) or not max_memory:
            raise PlacementError("max_memory must be a non-empty dict from device (GPU index, "
                                 "'cpu') to a size (bytes, or a string such as '20GiB')")
        sizes = {}
        for key, size in max_memory.items():
            where = f"max_memory[{key!r}]"
            if isinstance(key, str) and re.fullmatch(r"cuda:\d+", key):
                key = int(key[5:])  # accelerate counts GPUs by index
            if not isinstance(key, int) and key not in ("cpu", "disk", "mps"):
                raise PlacementError(f"{where}: a max_memory device is a GPU index, 'cpu', "
                                     "'disk' or 'mps'")
            _map_device(key, where)
            sizes[key] = size_bytes(size) if isinstance(size, str) else size
            if isinstance(size, bool) or not isinstance(sizes[key], int) or sizes[key] < 0:
                raise PlacementError(f"{where}: expected a size (bytes, or a string "
                                     f"such as '20GiB' or '1.5GB'), got {size!r}")
        max_memory = sizes  # in bytes: accelerate reads no unit differently
    placement = {"device_map": device_map, "max_memory": max_memory,
                 "offload_folder": None if offload_folder is None else str(offload_folder)}
    return {k: v for k, v in placement.items() if v is not None}


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def size_bytes(text: str) -> int:
    """Bytes of a size such as "20GiB", "1.5GB", "64000000" (-1 if it is not one)."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not found or found.group(2).lower() not in _UNITS:
        return -1
    return int(float(found.group(1)) * _UNITS[found.group(2).lower()])


def module_map(directory: Path, gguf_file: str | None, device_map: Mapping[str, Any]
               ) -> dict[str, Any]:
    """`device_map` checked against an empty (meta) copy of the model before the weights load,
    its "" entry (everything else) spelled out as the modules it covers (accelerate takes ""
    only alone). PlacementError for a name that is not a module of the model, a parameter
    left without a device, or tied weights (e.g. lm_head and the embedding) on two devices."""
    config = transformers.AutoConfig.from_pretrained(str(directory), gguf_file=gguf_file)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    modules = dict(skeleton.named_modules())
    unknown = [m for m in device_map if m and m not in modules]
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(modules), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise PlacementError(f"device_map names {unknown[0]!r}{hint}, which is not a module of "
                             f"{type(skeleton).__name__}; its top-level modules: "
                             f"{', '.join(n for n in modules if n and n.count('.') <= 1)}")
    explicit = {m: d for m, d in device_map.items() if m}
    if "" in device_map and explicit:
        rest = device_map[""]

        def cover(name: str, module: torch.nn.Module) -> None:
            if name in explicit:
                return
            if not any(name == "" or m.startswith(f"{name}.") for m in explicit):
                if any(True for _ in module.parameters()) or any(True for _ in module.buffers()):
                    explicit[name] = rest
                return
            if next(module.parameters(recurse=False), None) is not None:
                raise PlacementError(f"device_map splits {name or 'the model'}, which holds "
                                     "parameters of its own: map it as a whole")
            for child, sub in module.named_children():
                cover(f"{name}.{child}" if name else child, sub)

        cover("", skeleton)
        device_map = explicit

    def placed(param: str) -> Any:
        owner = max((m for m in device_map if not m or param == m or param.startswith(f"{m}.")),
                    key=len, default=None)
        return None if owner is None else device_map[owner]

    names = [n for n, _ in skeleton.named_parameters(remove_duplicate=False)]
    unplaced = sorted({n.rsplit(".", 1)[0] for n in names if placed(n) is None})
    if unplaced:
        raise PlacementError(f"device_map gives no device to {', '.join(unplaced[:4])}"
                             f"{' ...' if len(unplaced) > 4 else ''}: map every module, or "
                             'add "" for the rest (e.g. "": "cpu")')
    for target, source in getattr(skeleton, "all_tied_weights_keys", {}).items():
        if placed(target) != placed(source):
            raise PlacementError(f"{target} is tied to {source} (the same tensor), but device_map "
                                 f"puts them on {placed(target)!r} and {placed(source)!r}: "
                                 "map both modules to the same device")
    return dict(device_map)


def _offload_hook(module: torch.nn.Module) -> Any:
    """The accelerate hook that offloads `module`'s own tensors (CPU or disk), or None."""
    hook = getattr(module, "_hf_hook", None)
    for one in getattr(hook, "hooks", (hook,)):  # a SequentialHook holds several
        if getattr(one, "offload", False) and hasattr(getattr(one, "weights_map", None),
                                                      "dataset"):
            return one
    return None


def preload_offloaded_blocks(model: PreTrainedModel) -> None:
    """Make every offloaded decoder block load all of its weights at the start of its forward.

    accelerate offloads module by module: each Linear reads its weight for its own forward
    only. A block's forward also uses weights it does not call: tokenprobe's attention
    function hands the output projection (o_proj) to the probes before o_proj runs. So each
    block whose parameters are all offloaded, to one execution device, gets one hook instead
    (accelerate's `preload_module_classes`): the block's weights are on the device for the
    whole block forward, and dropped after it, as before. A block split over devices is
    handled the same way child by child. A no-op without offloaded weights."""
    if not any(p.is_meta for p in model.parameters()):
        return
    from accelerate.hooks import attach_align_device_hook, remove_hook_from_module

    from tokenprobe.backends import decoder_layers_path

    def regroup(module: torch.nn.Module, name: str) -> None:
        params = list(module.parameters())
        if not any(p.is_meta for p in params):
            return
        hooks = [h for m in module.modules() if (h := _offload_hook(m)) is not None]
        places = {(id(h.weights_map.dataset), str(h.execution_device)) for h in hooks}
        if all(p.is_meta for p in params) and len(places) == 1:
            hook = hooks[0]
            remove_hook_from_module(module, recurse=True)
            attach_align_device_hook(
                module, execution_device=hook.execution_device, offload=True,
                weights_map=hook.weights_map.dataset, offload_buffers=hook.offload_buffers,
                module_name=name, skip_keys=hook.skip_keys,
                preload_module_classes=[type(module).__name__],
                tied_params_map=hook.tied_params_map)
            return
        for child_name, child in module.named_children():
            regroup(child, f"{name}.{child_name}")

    path = decoder_layers_path(model)
    for index, block in enumerate(model.get_submodule(path)):
        regroup(block, f"{path}.{index}")


def _as_device(value: Any) -> torch.device:
    """A torch.device from an accelerate device: an int is an index of the accelerator."""
    if isinstance(value, int):
        accelerator = getattr(torch, "accelerator", None)
        current = accelerator.current_accelerator() if accelerator else None
        return torch.device(current.type if current is not None else "cuda", value)
    return torch.device(value)


def is_dispatched(model: torch.nn.Module) -> bool:
    """Whether accelerate spread `model` over several devices or offloaded part of it."""
    places = set((getattr(model, "hf_device_map", None) or {}).values())
    return len(places) > 1 or "disk" in places


def execution_device(module: torch.nn.Module) -> torch.device:
    """Where `module` computes: its accelerate hook's execution device (an offloaded module's
    weights are on `meta` between forwards), else the device of its first parameter."""
    hook = getattr(module, "_hf_hook", None)
    for one in getattr(hook, "hooks", (hook,)):
        if getattr(one, "execution_device", None) is not None:
            return _as_device(one.execution_device)
    param = next(module.parameters(), None)
    if param is None or param.is_meta:
        param = next((p for p in module.parameters() if not p.is_meta), param)
    return param.device if param is not None else torch.device("cpu")


def input_device(model: PreTrainedModel) -> torch.device:
    """The device a batch's input ids and mask go to: where the input embedding computes
    (the device of the model's parameters when it sits on one)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return execution_device(embeddings if embeddings is not None else model)


def device_map_summary(model: torch.nn.Module) -> dict[str, list[str]] | None:
    """{device: modules} of a dispatched model (`hf_device_map`, runs of consecutive layers
    written `model.layers.0-15`), None for a model on one device."""
    if not is_dispatched(model):
        return None
    grouped: dict[str, list[str]] = {}
    for module, where in model.hf_device_map.items():
        key = "disk" if where == "disk" else str(_as_device(where))
        grouped.setdefault(key, []).append(module or "(rest)")
    summary = {}
    for key, modules in grouped.items():
        out: list[list] = []  # [prefix, first, last] for layer runs, [name] otherwise
        for module in modules:
            found = re.fullmatch(r"(.*\.)(\d+)", module)
            if found and out and len(out[-1]) == 3 and out[-1][0] == found.group(1) \
                    and out[-1][2] + 1 == int(found.group(2)):
                out[-1][2] += 1
            elif found:
                out.append([found.group(1), int(found.group(2)), int(found.group(2))])
            else:
                out.append([module])
        summary[key] = [m[0] if len(m) == 1 else f"{m[0]}{m[1]}" if m[1] == m[2]
                        else f"{m[0]}{m[1]}-{m[2]}" for m in out]
    return summary


def placement_meta(model: torch.nn.Module) -> dict:
    """What run.json records of where `model` ran: {"device": ...} for a model on one device
    (the device of its parameters); for a dispatched one also "device_map" (a summary,
    `device_map_summary`), "device" being where the inputs go (`input_device`)."""
    summary = device_map_summary(model)
    if summary is None:
        return {"device": str(next(model.parameters()).device)}
    return {"device": str(input_device(model)), "device_map": summary}
