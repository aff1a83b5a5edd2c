"""Distributed training: real ``torchrun`` processes (2 ranks, gloo on CPU) for DDP, FSDP2 and DeepSpeed ZeRO.

Each test launches one worker script from ``tests/distributed/`` (several runs share one launch: starting
Python and importing transformers costs more than the runs), with a timeout: a guard that let one rank
stop alone would leave the other waiting in a collective forever, and the test would fail on the timeout
instead of hanging. The workers write what they saw per rank (``rank<r>.json``); the tests check:

- the same decision at the same step on every rank, attributed to the rank where the fault began, in ONE
  report written by rank 0;
- a healthy run is unaffected (bitwise the same losses and weights as without gradguard);
- the guard adds exactly one all-reduce per optimizer step and no other collective;
- FSDP2 / ZeRO per-group gradient norms, reduced from the local shards, equal the single-process (or
  DeepSpeed's own full-gradient) values.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

WORKERS = Path(__file__).parent / "distributed"
TIMEOUT_S = 150  # generous on 2 loaded cores; a hang is caught, never waited out

# The launch tests: slow (CI still runs them), and they need gloo.
multiprocess = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="needs torch.distributed with the gloo backend",
)


def launch(script: str, *args: str, out: Path) -> dict[int, dict[str, Any]]:
    """Run ``torchrun --standalone --nproc_per_node=2 script *args out``; return each rank's results."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "PYTHONWARNINGS": "ignore",
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += [str(WORKERS / script), *args, str(out)]
    # A session of its own, so that on a timeout the whole tree (torchrun and both ranks) is killed.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"{script} did not finish within {TIMEOUT_S}s (a rank hung?):\n{output.decode()[-4000:]}")
    text = output.decode(errors="replace")
    assert proc.returncode == 0, f"{script} failed (exit {proc.returncode}):\n{text[-6000:]}"
    return {r: json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)}


def added(guarded: dict[str, int], bare: dict[str, int]) -> dict[str, int]:
    """Collective calls the guarded run made beyond the bare one."""
    return {
        k: guarded.get(k, 0) - bare.get(k, 0) for k in guarded.keys() | bare.keys() if guarded.get(k) != bare.get(k)
    }


def check_fault_report(out: Path, *, step: int) -> dict[str, Any]:
    """Exactly one report (rank 0's), naming rank 1 as the origin, with every rank's view."""
    assert not list((out / "fault" / "rank1").glob("gradguard-report*")), "rank 1 must not write a report"
    report = json.loads((out / "fault" / "rank0" / "gradguard-report.json").read_text())
    fault = report["fault"]
    assert report["status"] == "fault"
    assert fault["step"] == step
    assert fault["kind"] == "nonfinite_loss" and fault["origin"]["phase"] == "forward"
    assert fault["origin"]["rank"] == 1
    assert fault["weights_intact"] is True
    ranks = next(e["value"] for e in fault["evidence"] if e["kind"] == "ranks")
    assert [r["rank"] for r in ranks] == [0, 1]
    assert ranks[1]["flagged"] and ranks[1]["kind"] == "nonfinite_loss" and ranks[1]["code"] == fault["code"]
    assert report["environment"]["world_size"] == 2
    return report


def single_process_norms(steps: int) -> list[dict[str, Any]]:
    """The FSDP2 worker's training, in this process without sharding: the reference values."""
    from gradguard import Guard
    from gradguard.testing.models import make_batch, tiny_llama

    torch.set_num_threads(1)
    model = tiny_llama(seed=0)
    batch = make_batch(model, batch_size=2, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    guard = Guard(model, optimizer, console=False)
    out = []
    for _ in range(steps):
        model(**batch).loss.backward()
        assert guard.check()
        assert guard.last is not None
        out.append({"loss": guard.last.loss, "group_norm": guard.last.group_norm})
        optimizer.step()
        optimizer.zero_grad()
    report = guard.close()
    out.append({"group_params": {g.name: g.params for g in report.groups}})
    return out


@pytest.mark.slow
@multiprocess
def test_ddp_trainer_fault_on_one_rank_stops_all_ranks(tmp_path: Path) -> None:
    ranks = launch("ddp_trainer.py", out=tmp_path)
    for r, res in ranks.items():
        bare, guarded, fault = res["bare"], res["guarded"], res["fault"]
        # Healthy: bitwise the same run, plus exactly one small all-reduce per optimizer step.
        assert guarded["losses"] == bare["losses"] and len(bare["losses"]) == 4
        assert guarded["digests"] == bare["digests"]
        assert added(guarded["collectives"], bare["collectives"]) == {"all_reduce": 4}, r
        assert guarded["stopped"] is False and not guarded["internal_errors"]
        # Fault on rank 1 only, from step 3: every rank stops at step 3, the update is skipped.
        assert fault["global_step"] == 3 and fault["fault_step"] == 3 and fault["stopped"], r
        assert fault["origin_rank"] == 1, r
        assert fault["digests"]["3"] == fault["digests"]["2"] == bare["digests"]["2"], "the update was not skipped"
        assert not fault["internal_errors"]
        # Beyond the one all-reduce per step: one all_gather_object, on the fault path only.
        assert added(fault["collectives"], bare["collectives"]).get("all_gather_object") == 1
    # DDP norms are each rank's own (pre-all-reduce) gradients: they differ across ranks' data.
    assert ranks[0]["guarded"]["group_norm"] != ranks[1]["guarded"]["group_norm"]
    report = check_fault_report(tmp_path, step=3)
    ranks = next(e["value"] for e in report["fault"]["evidence"] if e["kind"] == "ranks")
    assert ranks[0].get("kind") is None  # rank 0 saw nothing itself
    # The replay that pinpoints the module ran on rank 1 (where the fault reproduces) and reached rank 0.
    assert "model.layers.0" in json.dumps(report["fault"]["localization"])


@pytest.mark.slow
@multiprocess
def test_fsdp2_norms_from_shards_equal_single_process(tmp_path: Path) -> None:
    ranks = launch("fsdp2_loop.py", out=tmp_path)
    reference = single_process_norms(3)
    for r, res in ranks.items():
        guarded, fault = res["guarded"], res["fault"]
        assert not guarded["internal_errors"] and not fault["internal_errors"]
        # The hooks sit on the sharded DTensor parameters, every one of them, with the model's own groups.
        assert guarded["sharded_params"] == guarded["trainable_params"] == 21
        assert guarded["group_params"] == reference[-1]["group_params"]
        for got, want in zip(guarded["steps"], reference, strict=False):
            assert all(n > 0 for n in got["group_fired"].values())
            assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)
            assert got["group_norm"].keys() == want["group_norm"].keys()
            for group, norm in want["group_norm"].items():
                assert got["group_norm"][group] == pytest.approx(norm, rel=1e-5), (r, got["step"], group)
        assert guarded["weights"] == res["bare"]["weights"]  # observational
        assert added(guarded["collectives"], res["bare"]["collectives"]) == {"all_reduce": 3}
        # Fault on rank 1 only, from step 2: both ranks stop at step 2.
        assert fault["stopped"] and fault["fault_step"] == 2 and len(fault["steps"]) == 2
        assert fault["origin_rank"] == 1
        assert all(math.isnan(v) for v in fault["steps"][-1]["group_norm"].values())  # reduced: NaN everywhere
    check_fault_report(tmp_path, step=2)


@pytest.mark.slow
@multiprocess
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed")
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero(tmp_path: Path, stage: int) -> None:
    ranks = launch("deepspeed_trainer.py", str(stage), out=tmp_path)
    from gradguard.testing.models import tiny_llama

    model = tiny_llama(seed=0)
    counts = {"model": sum(p.numel() for p in model.model.parameters()), "lm_head": model.lm_head.weight.numel()}
    for r, res in ranks.items():
        bare, guarded, fault = res["bare"], res["guarded"], res["fault"]
        assert not guarded["internal_errors"] and not fault["internal_errors"]
        assert guarded["losses"] == bare["losses"] and len(bare["losses"]) == 4
        assert guarded["digests"] == bare["digests"]
        assert added(guarded["collectives"], bare["collectives"]) == {"all_reduce": 4}, r
        # Sharding-aware counts (ZeRO-3 empties param.data), and no false "not in the optimizer".
        assert guarded["group_params"] == guarded["in_optimizer"] == counts
        assert not [f for f in guarded["findings"] if f.startswith("GG003")]
        # Norms from the gradient partitions equal DeepSpeed's own full gradients.
        assert len(guarded["norms"]) == len(guarded["reference"]) == 4
        for got, want in zip(guarded["norms"], guarded["reference"], strict=True):
            assert got == pytest.approx(want, rel=1e-5)
        # Fault on rank 1 only, from step 3: both ranks stop at step 3; DeepSpeed's step was not taken.
        assert fault["global_step"] == 3 and fault["fault_step"] == 3 and fault["origin_rank"] == 1
        assert fault["digests"]["3"] == fault["digests"]["2"] == bare["digests"]["2"]
    check_fault_report(tmp_path, step=3)


# -- the agreement's pure parts, in this process (fast) ------------------------------------------------


def test_origin_is_the_earliest_phase_then_the_lowest_rank() -> None:
    from gradguard.engine.distributed import origin_rank

    backward, forward, data = ({"origin": {"phase": p}} for p in ("backward", "forward", "data"))
    # NaN born in rank 1's forward reaches rank 0's gradients through the reduction: rank 1 is the origin.
    assert origin_rank([backward, forward], [1, 1]) == 1
    assert origin_rank([forward, data, forward], [1, 1, 1]) == 1
    assert origin_rank([forward, forward], [1, 1]) == 0
    assert origin_rank([None, None, None], [0, 0, 1]) == 2  # flagged, but nobody could say more
    assert origin_rank([None], [0]) is None


def test_rank_summaries_say_what_each_rank_saw() -> None:
    from gradguard.engine.diagnosis import plain
    from gradguard.engine.distributed import rank_summaries
    from gradguard.report.model import Finding, Origin

    finding = Finding.of("nonfinite_loss", "step 3: the raw loss is nan", "fix it", "model", step=3, phase="forward")
    view = plain({"finding": finding, "origin": Origin(phase="forward", group="model"), "evidence": {}})
    rows = rank_summaries([None, view], [0, 1])
    assert rows[0] == {"rank": 0, "flagged": False, "saw": "nothing itself: stopped with the other ranks"}
    assert rows[1]["flagged"] and rows[1]["code"] == finding.code and rows[1]["phase"] == "forward"
    assert json.loads(json.dumps(rows)) == rows  # plain data, ready for the report


def test_agreement_in_one_process_is_the_identity() -> None:
    from gradguard.engine import distributed

    flags, total = distributed.agree(torch.tensor(True), sumsq=torch.tensor([1.0, 4.0]))
    assert flags.tolist() == [1.0] and total.tolist() == [1.0, 4.0]
    flags, total = distributed.agree(torch.tensor(False), pending=True)
    assert flags.tolist() == [1.0] and total.numel() == 0
    assert distributed.shard_weight(torch.nn.Parameter(torch.zeros(2))) is None  # not a DTensor: nothing to reduce
    assert distributed.replay_is_local(torch.nn.Linear(2, 2))


def test_zero3_parameter_counts_use_ds_numel() -> None:
    from gradguard.core.audit import summarize
    from gradguard.core.groups import build_groups, param_numel

    model = torch.nn.ModuleDict({"vision_tower": torch.nn.Linear(4, 4), "lm_head": torch.nn.Linear(4, 2)})
    for p in model.parameters():  # what ZeRO-3 does: empty data, the full size in ds_numel
        p.ds_numel = p.numel()  # type: ignore[attr-defined]
        p.data = torch.empty(0)
    assert [param_numel(p) for p in model.parameters()] == [16, 4, 8, 2]
    counts = {g.name: summarize(g).params for g in build_groups(model)}
    assert counts == {"vision_tower": 20, "lm_head": 10}


def test_deepspeed_hook_is_not_attached_without_deepspeed() -> None:
    from gradguard import Guard
    from gradguard.engine.zero import zero_optimizer

    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert zero_optimizer(optimizer) is None and zero_optimizer(None) is None
    guard = Guard(model, optimizer, console=False)
    assert "step" not in optimizer.__dict__  # the torch optimizer is left alone
    guard.close()
