"""DCP checkpoints after WeLore hand-offs under FSDP2 (``fully_shard``), 2 gloo CPU ranks.

One spawn plays three phases on each rank and saves what it saw:

1. ``straight``: a tiny LLaMA, ``fully_shard`` per decoder layer and at the root, trained by
   WeLoreAdamW with ``model = optimizer.maybe_handoff(model)`` after every step; at ``SAVE_AT``
   (after hand-offs) it saves :func:`sharded_checkpoint_state` with ``dcp.save`` and goes on;
   once with hand-offs at steps 6, 9 and 12 (``staged``), once with every layer at step 6.
2. ``resumed``: a new process group of the same 2 ranks; a freshly built model, sharded the same
   way, and a fresh optimizer load the checkpoint with :func:`load_sharded_checkpoint` (the plan
   is re-applied, then model and optimizer state are loaded) and continue. Losses, hand-off
   records and parameters equal the straight run's exactly.
3. ``reshard``: rank 0 alone, in a 1-rank group, builds the model on the meta device
   (``fully_shard``, then ``to_empty``), loads the 2-rank checkpoint the same way and continues
   on the whole batches: the same hand-offs, and losses and parameters equal to the straight
   run's up to the summation order of the 2-rank run.
"""

from __future__ import annotations

import datetime
import os
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from helpers import spawn_ranks
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from lowrank_optim import HandoffConfig, ProjectionConfig, StabilityConfig, WeLoreAdamW
from lowrank_optim.distributed import load_sharded_checkpoint, sharded_checkpoint_state
from lowrank_optim.factory import lowrank_param_groups
from lowrank_optim.train.models import build_llama, tiny_llama_config

WORLD = 2
TIMEOUT_S = 120
SPAWN_TIMEOUT_S = 300
VOCAB = 96
BATCH = 4
STEPS = 13
SAVE_AT = 7  # after the hand-offs of step 6; more are due at steps 9 and 12
#: threshold of the stability criterion: 0.3 hands layers off at steps 6, 9 and 12; 0.01 all of
#: them at step 6, which empties the projected param group (DCP cannot tell empty groups apart)
THRESHOLDS = {"staged": 0.3, "all_at_once": 0.01}
# matched-each: the factors' lr multipliers must survive the DCP round trip too
HANDOFF = HandoffConfig(
    start_step=6, target_reduction=0.7, min_ratio=0.4, check_every=3, factor_step="matched-each"
)
PROJECTION = ProjectionConfig(rank=8, update_proj_gap=2, scale=1.0, proj_type="right")


def _llama(device: str = "cpu") -> nn.Module:
    config = tiny_llama_config(VOCAB, hidden=48, layers=2, heads=4, intermediate=96)
    return build_llama(config, seed=0, device=device)


def _sharded_model(case: str, meta: bool = False) -> tuple[nn.Module, WeLoreAdamW]:
    model = _llama("meta" if meta else "cpu")
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    if meta:  # allocate the shards; the checkpoint fills them
        model.to_empty(device="cpu")
        with torch.no_grad():  # non-persistent buffers (rotary frequencies) are not saved
            for mine, built in zip(model.buffers(), _llama().buffers(), strict=True):
                mine.copy_(built)
    groups = lowrank_param_groups(model, "attn-mlp", PROJECTION)
    stability = StabilityConfig(policy="fixed", threshold=THRESHOLDS[case], patience=1)
    optimizer = WeLoreAdamW(
        groups, lr=3e-3, weight_decay=0.01, model=model, stability=stability, handoff=HANDOFF
    )
    return model, optimizer


def _batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (BATCH, 16), generator=generator) for _ in range(STEPS)]


def _train(
    model: nn.Module, optimizer: WeLoreAdamW, steps: range, checkpoint: str | None = None
) -> tuple[nn.Module, list[float]]:
    world, me = dist.get_world_size(), dist.get_rank()
    rows = BATCH // world
    batches, losses = _batches(), []
    for step in steps:
        ids = batches[step - 1][me * rows : (me + 1) * rows]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model = optimizer.maybe_handoff(model)
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(float(total) / world)
        if step == SAVE_AT and checkpoint is not None:
            dcp.save(sharded_checkpoint_state(model, optimizer), checkpoint_id=checkpoint)
    return model, losses


def _outcome(model: nn.Module, optimizer: WeLoreAdamW, losses: list[float]) -> dict[str, Any]:
    weights = {
        name: (value.full_tensor() if isinstance(value, DTensor) else value).detach().clone()
        for name, value in model.state_dict().items()
    }
    records = [(r["step"], r["layer"], r["rank"]) for r in optimizer.handoff_report()]
    return {"losses": losses, "weights": weights, "handoffs": records}


def _resume(case: str, checkpoint: str, meta: bool = False) -> dict[str, Any]:
    model, optimizer = _sharded_model(case, meta)
    load_sharded_checkpoint(model, optimizer, checkpoint_id=checkpoint)
    model, losses = _train(model, optimizer, range(SAVE_AT + 1, STEPS + 1))
    return _outcome(model, optimizer, losses)


def _play(results: dict[str, Any], name: str, scenario: Any) -> None:
    try:
        results[name] = scenario()
    except Exception:  # noqa: BLE001 - reported by the tests
        results[name] = {"failure": traceback.format_exc()}


def _straight(case: str, checkpoint: str) -> dict[str, Any]:
    model, optimizer = _sharded_model(case)
    model, losses = _train(model, optimizer, range(1, STEPS + 1), checkpoint)
    return _outcome(model, optimizer, losses)


def _run(rank: int, port: int, directory: str) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=TIMEOUT_S)
    checkpoint = {case: str(Path(directory) / f"ckpt_{case}") for case in THRESHOLDS}
    results: dict[str, Any] = {}
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timeout)
    for case in THRESHOLDS:
        _play(results, f"straight_{case}", lambda c=case: _straight(c, checkpoint[c]))
    dist.barrier()
    dist.destroy_process_group()
    # The resume: a new process group, a fresh model and optimizer, nothing kept but the files.
    store = f"file://{Path(directory) / 'resume_store'}"
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=WORLD, timeout=timeout)
    for case in THRESHOLDS:
        _play(results, f"resumed_{case}", lambda c=case: _resume(c, checkpoint[c]))
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:  # the 2-rank checkpoint, loaded by one rank alone
        store = f"file://{Path(directory) / 'reshard_store'}"
        dist.init_process_group("gloo", init_method=store, rank=0, world_size=1, timeout=timeout)
        _play(results, "reshard", lambda: _resume("staged", checkpoint["staged"], meta=True))
        dist.destroy_process_group()
    torch.save(results, Path(directory) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    directory = tmp_path_factory.mktemp("fsdp_handoff_resume")
    return spawn_ranks(_run, WORLD, directory, SPAWN_TIMEOUT_S, with_world=False)


def _phase(runs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    per_rank = [result[name] for result in runs if name in result]
    for result in per_rank:
        if "failure" in result:
            pytest.fail(f"phase {name} failed on a rank:\n{result['failure']}")
    return per_rank


def test_checkpoints_taken_after_handoffs(runs: list[dict[str, Any]]) -> None:
    staged = _phase(runs, "straight_staged")[0]["handoffs"]
    assert sorted({step for step, _, _ in staged}) == [6, 9, 12], staged
    every = _phase(runs, "straight_all_at_once")[0]["handoffs"]
    assert len(every) == 14 and {step for step, _, _ in every} == {6}, every


@pytest.mark.parametrize("case", list(THRESHOLDS))
def test_resume_after_handoffs_is_bit_for_bit(runs: list[dict[str, Any]], case: str) -> None:
    pairs = zip(_phase(runs, f"straight_{case}"), _phase(runs, f"resumed_{case}"), strict=True)
    for straight, resumed in pairs:
        assert resumed["handoffs"] == straight["handoffs"]
        assert resumed["losses"] == straight["losses"][SAVE_AT:]
        assert set(resumed["weights"]) == set(straight["weights"])
        for name, tensor in straight["weights"].items():
            assert torch.equal(resumed["weights"][name], tensor), name


def test_resume_on_one_rank_continues(runs: list[dict[str, Any]]) -> None:
    """Full-precision state saved on 2 ranks loads on 1 (DCP reshards the factors' rows)."""
    straight, resumed = _phase(runs, "straight_staged")[0], _phase(runs, "reshard")[0]
    assert resumed["handoffs"] == straight["handoffs"]
    torch.testing.assert_close(
        torch.tensor(resumed["losses"]),
        torch.tensor(straight["losses"][SAVE_AT:]),
        rtol=1e-4,
        atol=1e-5,
    )
    assert set(resumed["weights"]) == set(straight["weights"])
    for name, tensor in straight["weights"].items():
        torch.testing.assert_close(resumed["weights"][name], tensor, rtol=1e-4, atol=1e-5)
