"""Shared fixtures: tiny seeded models, the embedded models, and an independent reference."""
from __future__ import annotations

import copy
import os

import torch

# Without CUDA, Triton kernels run in its interpreter (set before anything imports triton).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# linear_entropy's compiled tile step is tested on its own (test_kernels_linear_entropy); the
# rest of the suite keeps the plain step, so no test compiles for its own shapes.
os.environ.setdefault("TOKENPROBE_COMPILE", "0")

import pytest

import tokenprobe
from tokenprobe.models import LoadedModel

PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hi!",
    "the cat sat on the mat and the dog sat on the rug.\nThen it rained.",
]


@pytest.fixture(scope="session")
def tiny_llama() -> LoadedModel:
    return tokenprobe.load("tiny-llama")


@pytest.fixture(scope="session")
def tiny_gemma3() -> LoadedModel:
    return tokenprobe.load("tiny-gemma3")


@pytest.fixture(scope="session")
def smollm2() -> LoadedModel:
    return tokenprobe.load("smollm2-135m")


@pytest.fixture(scope="session")
def gemma3() -> LoadedModel:
    return tokenprobe.load("gemma3-270m")


def block_outputs(loaded: LoadedModel, text: str) -> tuple[list[int], torch.Tensor]:
    """Independent reference for the residual after each block, without hooks.

    HF's `hidden_states` tuple holds the embeddings, then each block's output except the last,
    whose entry is after the final norm. Replacing the final norm by the identity on a copy of
    the model makes the last entry the last block's output too. Returns the token ids and a
    (L, T, D) float64 tensor of one unpadded prompt.
    """
    model = copy.deepcopy(loaded.model)
    model.model.norm = torch.nn.Identity()
    ids = loaded.tokenizer(text)["input_ids"]
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    return ids, torch.stack(out.hidden_states[1:])[:, 0].double()


def require_tool(what: str, found: object, marker: str) -> None:
    """Fail, saying what to install, when a system tool a test drives is missing.

    `make test` installs these tools (Debian's chromium, chromium-driver, texlive), so a missing
    one is a broken set-up, not a reason to pass quietly; deselect such tests by their marker
    (`pytest -m "not browser and not latex"`) to run without them.
    """
    if not found:
        pytest.fail(f"needs {what} (`make test` installs it with apt-get; or deselect with "
                    f"-m 'not {marker}')")
