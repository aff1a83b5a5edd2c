"""Shared fixtures: tiny real models (random weights, never downloaded) and quiet defaults."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _no_leaked_accelerate_env():
    """transformers 4.x's ``TrainingArguments(bf16=True)`` sets ``ACCELERATE_MIXED_PRECISION=bf16`` in
    ``os.environ`` and never unsets it, so every later fp32 Trainer in the process trains in bf16 (TRL's
    ``SFTConfig`` defaults to bf16). 5.x does not. Each test leaves the ``ACCELERATE_*`` variables as it found them."""
    before = {k: v for k, v in os.environ.items() if k.startswith("ACCELERATE_")}
    yield
    for key in [k for k in os.environ if k.startswith("ACCELERATE_")]:
        if key not in before:
            del os.environ[key]
    os.environ.update(before)


def trainer_args(tmp_path, **overrides):
    """TrainingArguments for a short, quiet CPU run (imported lazily: transformers is heavy)."""
    from transformers import TrainingArguments

    kwargs = dict(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


@pytest.fixture(autouse=True)
def _no_guard_left_open(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every guard a test opens is closed by the end of it (hooks off, report written): one left open would leak
    hooks and signal handlers into the next test. Closed here either way, so the next test starts clean."""
    yield
    from gradguard.engine import shutdown

    left = shutdown.open_guards()
    shutdown.close_all()
    assert not left, f"{request.node.nodeid} left {len(left)} gradguard guard(s) open"
