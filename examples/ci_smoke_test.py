"""A training-health smoke test for your CI: copy this file into your tests and swap in your set-up.

    pytest examples/ci_smoke_test.py

``gradguard_smoke`` is a fixture of gradguard's pytest plugin (active as soon as gradguard is installed):
it runs a few real optimizer steps of your model on your batches under a strict guard, restores the
weights afterwards, and fails the test with the full report unless the run is healthy. The second test
breaks the run on purpose, to prove that the guard is wired and names the right module.
"""

from __future__ import annotations

from peft import LoraConfig, PeftModel, get_peft_model

from gradguard.testing import inject_nan, smoke_test
from gradguard.testing.models import make_batch, tiny_minicpmv2


def build_model() -> PeftModel:
    """Your training set-up: here LoRA on a tiny MiniCPM-V-shaped model, with the resampler fully trained."""
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["resampler"])
    return get_peft_model(tiny_minicpmv2(), lora)


def test_training_is_healthy(gradguard_smoke):
    model = build_model()
    gradguard_smoke(model, [make_batch(model, seed=0), make_batch(model, seed=1)], expect_trainable=["resampler"])


def test_guard_catches_a_nan_in_the_resampler():
    model = build_model()
    with inject_nan(model.base_model.model.resampler, start=2):  # NaN from the 2nd training forward on
        report = smoke_test(model, [make_batch(model)], steps=3)
    assert report.fault.step == 2 and report.fault.origin.group == "resampler", report
    assert report.fault.weights_intact
