"""A tiny run of ``benchmarks/run.py`` so the benchmark code path cannot rot.

Two steps per arm on the smallest models, through the real Trainer: every arm runs, the results have
their shape, and the one property that is not a timing (gradguard reads the device at most once per
optimizer step) holds. No wall-clock assertion: speed is measured by the benchmark, never by tests.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gradguard_bench_run", ROOT / "benchmarks" / "run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_smoke_run(bench: ModuleType, tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    out = tmp_path / "bench.json"
    doc = tmp_path / "performance.md"
    doc.write_text(f"# Performance\n\nprose stays\n\n{bench.DOC_BEGIN}\nold table\n{bench.DOC_END}\n\ntail stays\n")
    res = bench.run(
        [
            "--smoke",
            "--workloads",
            "llama_lora,llava_lora",
            "--no-memory",
            "--no-wandb",
            "--threads",
            "0",
            "--out",
            str(out),
            "--doc",
            str(doc),
        ]
    )

    # Every arm ran (or says why it could not), through the real Trainer, in both workloads.
    for wl in ("llama_lora", "llava_lora"):
        rows = res["trainer_step"][wl]["arms"]
        assert set(rows) == {
            "bare",
            "bare_aa",
            "gradguard",
            "gradguard_trace",
            "debug_underflow_overflow",
            "detect_anomaly",
            "naive_norms",
        }
        for name, row in rows.items():
            if row["status"] == "n/a":
                assert row["reason"].startswith("n/a"), (name, row)
                continue
            assert row["status"] == "ok", (name, row)
            assert row["steps"] == 2 and row["ratio"]["median"] > 0, (name, row)
        # gradguard's one packed read per optimizer step, no more (steady state, healthy run).
        syncs = res["host_syncs"][wl]
        assert syncs["bare"]["gradguard_per_step_max"] == 0
        assert syncs["gradguard"]["gradguard_per_step_max"] == 1
        trace = syncs["gradguard_trace"]
        assert "reason" in trace or trace["gradguard_per_step_max"] <= 1

    audit = res["audit"][0]
    assert audit["audit_ok"] and audit["trainable"] > 0
    assert any(t["name"].startswith("host syncs/step, gradguard on") for t in res["targets"])

    # Results on disk; the doc's generated block replaced, the prose around it kept.
    assert bench.json.loads(out.read_text())["schema"] == bench.SCHEMA
    text = doc.read_text()
    assert "prose stays" in text and "tail stays" in text and "old table" not in text
    assert "Host syncs per optimizer step" in text

    # The harness put everything back: threads, anomaly mode, the Tensor methods it wrapped.
    assert torch.get_num_threads() == threads
    assert not torch.is_anomaly_enabled()
    from gradguard.testing.syncs import _METHODS

    assert all(getattr(torch.Tensor, m).__name__ != "wrapper" for m in _METHODS)


def test_rotation_interleaves_one_at_a_time(bench: ModuleType) -> None:
    """The baton: arms take turns one step each, every round a permutation of all arms."""
    import threading

    names = ["a", "b", "c"]
    rot = bench.Rotation(names, seed=1, timeout=30)
    log: list[str] = []
    running = []

    def arm(name: str) -> None:
        rot.arrive(name)
        for _ in range(4):
            running.append(name)
            assert len(running) == 1  # nobody else is running
            log.append(name)
            running.remove(name)
            rot.pass_turn(name)
        rot.retire(name)

    threads = [threading.Thread(target=arm, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(log) == 12
    for r in range(4):
        assert sorted(log[3 * r : 3 * r + 3]) == names


def test_sync_counter_attributes_to_gradguard_only() -> None:
    """The benchmark's and the GPU test's sync counter (gradguard.testing.syncs)."""
    from gradguard.engine.read import params_finite
    from gradguard.testing.syncs import SyncCounter

    model = torch.nn.Linear(3, 3)
    with SyncCounter() as counter:
        torch.ones(()).item()  # the harness's own read: not gradguard's
        assert params_finite(model)  # one .item() inside gradguard
    assert counter.total == 2 and counter.gradguard == 1
    assert torch.Tensor.item.__name__ != "wrapper"
