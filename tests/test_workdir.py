"""The workdir claim: one run per workdir (flock), a writable directory, room for a checkpoint."""

import collections
import dataclasses
import shutil

import jax
import pytest

from md4_eqx.config import preset
from md4_eqx.parallel import make_mesh
from md4_eqx.train_step import init_state, make_optimizer
from md4_eqx.workdir import WorkdirError, check_space, checkpoint_bytes, claim


def test_a_second_claim_is_refused_until_the_first_is_released(tmp_path):
    workdir = tmp_path / "run"
    with claim(workdir):
        with pytest.raises(WorkdirError, match="in use by another run"):
            with claim(workdir):
                pass
    with claim(workdir):  # released at the end of the first `with`
        pass


def test_a_workdir_that_cannot_be_created_is_refused(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(WorkdirError, match="not writable"):
        with claim(tmp_path / "file" / "run"):
            pass


def test_a_disk_without_room_for_one_checkpoint_is_refused(tmp_path, monkeypatch):
    base = preset("tiny")
    cfg = dataclasses.replace(
        base, model=dataclasses.replace(base.model, width=32, num_layers=1, num_heads=2)
    )
    optimizer = make_optimizer(cfg.optim, cfg.train.steps)
    state = init_state(cfg, optimizer, make_mesh(1, 1, jax.devices()[:1]))
    params = sum(x.size for x in jax.tree.leaves(state.model))
    # float32 model, EMA and Adam's two moments, plus the counters, hyperparameters and key
    assert 4 * 4 * params <= checkpoint_bytes(state) < 4 * 4 * params + 256
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(1 << 40, 0, checkpoint_bytes(state)))
    check_space(tmp_path, state)
    monkeypatch.setattr(
        shutil, "disk_usage", lambda _: usage(1 << 40, 0, checkpoint_bytes(state) - 1)
    )
    with pytest.raises(WorkdirError, match="MiB free, a checkpoint needs"):
        check_space(tmp_path, state)
