"""The one shard_map step on every (data, model) mesh of 8 CPU devices, and across 2 processes.

Every mesh must give the same run as the (1, 1) mesh: the same parameters, metrics, evaluation
and samples, with no device holding full-vocabulary logits and the state split over `model`.
Run as a script (`python tests/test_parallel.py worker ...`) this file is also the worker of the
two-process test.
"""

import dataclasses
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import randomised
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from md4_eqx import checkpoint
from md4_eqx.config import (
    Config,
    DiffusionConfig,
    ExecutionConfig,
    ModelConfig,
    OptimConfig,
    Precision,
    SamplerConfig,
    TrainConfig,
    preset,
)
from md4_eqx.distributed import batch_part, gather, global_batch, initialize
from md4_eqx.evaluate import nelbo
from md4_eqx.loss import log_probs_at, losses, strata
from md4_eqx.model import HEAD_CHUNK, MD4
from md4_eqx.parallel import (
    DATA,
    MODEL,
    batch_specs,
    example_ids,
    make_mesh,
    param_specs,
    shard_map_modules,
    shardings,
    vocab_log_normaliser,
)
from md4_eqx.sampling import generate
from md4_eqx.train_step import TrainState, init_state, make_optimizer, make_train_step, state_specs

# GenMD4 (two forward passes and the learned schedule's REINFORCE gradient) with dropout and
# class labels: every part of the step that touches the mesh. 8 heads, hidden 128 and the
# padded vocabulary 640 all divide by model=8; 600, 601 and 640 are no other size (tokens per
# device or chunk, 256 and 512; 6 x width), so `test_no_device_holds_full_vocabulary_logits`
# finds only vocabularies.
CONFIG = Config(
    model=ModelConfig(
        vocab_size=600,
        seq_len=32,
        width=64,
        num_layers=2,
        num_heads=8,
        mlp_hidden=128,
        cond_dim=32,
        num_classes=4,
        dropout=0.1,
    ),
    execution=ExecutionConfig(precision=Precision.FLOAT32),
    diffusion=DiffusionConfig(learnable=True),
    optim=OptimConfig(lr=1e-3, warmup=1, ema=0.9),
    train=TrainConfig(batch_size=16, steps=10),
)
REFERENCE = (1, 1)
MESHES = [(8, 1), (4, 2), (2, 4), (1, 8)]
# This mesh's run also computes the head and the loss's log-softmax 24 tokens at a time
# (head_chunk, MD4.readout): the chunked loop under the vocabulary split over 8, the last chunk
# padded (512 tokens).
CHUNKED = (1, 8)
STEPS = 3
# float32 parameters after 3 steps: the meshes sum the same numbers in different orders (psum
# over `data`, `model`), a few ulp (~1e-7) per step. AdamW's update is O(lr) = 1e-3 whatever the
# gradient's size, so rounding in a near-zero gradient moves a parameter by up to ~lr times its
# relative error: measured 7e-7 after 5 steps (at lr 1e-2 it reaches 1e-4, hence lr 1e-3).
ATOL = 1e-5


def batches(steps: int = STEPS) -> list[tuple[np.ndarray, np.ndarray]]:
    """The same global batches (tokens [B, L], labels [B]) for every mesh and process."""
    key = jax.random.key(1)
    out = []
    for i in range(steps):
        kt, kl = jax.random.split(jax.random.fold_in(key, i))
        shape = (CONFIG.train.batch_size, CONFIG.model.seq_len)
        tokens = jax.random.randint(kt, shape, 0, CONFIG.model.vocab_size, jnp.int32)
        labels = jax.random.randint(kl, shape[:1], 0, CONFIG.model.num_classes, jnp.int32)
        out.append((np.asarray(tokens), np.asarray(labels)))
    return out


def local_rows(x: np.ndarray, mesh) -> np.ndarray:
    """This process's part of a global batch, as a data loader would read it."""
    index, count = batch_part(mesh)
    return x.reshape(count, -1, *x.shape[1:])[index]


def train(mesh, state, optimizer, steps: int = STEPS):
    """`steps` steps from `state` on `mesh`; each process feeds only its rows."""
    step = make_train_step(state, optimizer, mesh, clip=CONFIG.optim.clip, ema=CONFIG.optim.ema)
    metrics = []
    for tokens, labels in batches(steps):
        state, m = step(
            state,
            global_batch(local_rows(tokens, mesh), mesh),
            global_batch(local_rows(labels, mesh), mesh),
        )
        metrics.append([float(v) for v in m])
    return state, step, optimizer, np.asarray(metrics)


def host(tree) -> list[np.ndarray]:
    """Every array of `tree` in full, on the host (PRNG keys as their raw data)."""

    def value(x):
        return jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x

    return [gather(value(x)) for x in jax.tree.leaves(eqx.filter(tree, eqx.is_array))]


def max_difference(a, b) -> float:
    return max(float(np.max(np.abs(x - y))) for x, y in zip(host(a), host(b), strict=True))


def on_mesh(model, mesh):
    """`model`'s parameters placed on `mesh` (single process)."""
    arrays, static = eqx.partition(model, eqx.is_array)
    return eqx.combine(jax.device_put(arrays, shardings(mesh, param_specs(arrays))), static)


def eval_inputs():
    tokens, labels = batches(STEPS + 1)[-1]
    return jax.random.key(5), jnp.asarray(tokens), jnp.asarray(labels)


def place(state: TrainState, optimizer, mesh) -> TrainState:
    """Every array of `state` (held by this process) moved onto `mesh` with its sharding."""
    arrays, static = eqx.partition(state, eqx.is_array)
    specs = eqx.filter(
        state_specs(state, optimizer),
        lambda s: isinstance(s, P),
        is_leaf=lambda s: isinstance(s, P),
    )
    return eqx.combine(jax.device_put(arrays, shardings(mesh, specs)), static)


def mesh_of(shape):
    return make_mesh(*shape, jax.devices()[: shape[0] * shape[1]])


@pytest.fixture(scope="module")
def runs():
    """(state, step fn, optimizer, metrics [steps, 3]) after STEPS steps on each mesh, all from
    the same fresh state (made once and moved: `init_state` compiles for each mesh)."""
    optimizer = make_optimizer(CONFIG.optim, CONFIG.train.steps)
    fresh = init_state(CONFIG, optimizer, mesh_of(REFERENCE))
    # The same arrays under another static config: the chunked state's structure (traced, not
    # compiled) with the fresh state's leaves.
    chunked_config = dataclasses.replace(
        CONFIG, execution=dataclasses.replace(CONFIG.execution, head_chunk=24)
    )
    chunked = jax.tree.unflatten(
        jax.tree.structure(
            eqx.filter_eval_shape(init_state, chunked_config, optimizer, mesh_of(REFERENCE))
        ),
        jax.tree.leaves(fresh),
    )
    # Copies first: training donates its state, and a moved array may share the original's buffer.
    starts = {
        shape: place(
            jax.tree.map(jnp.copy, chunked if shape == CHUNKED else fresh),
            optimizer,
            mesh_of(shape),
        )
        for shape in MESHES
    }
    starts[REFERENCE] = fresh
    return {shape: train(mesh_of(shape), start, optimizer) for shape, start in starts.items()}


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: f"data{s[0]}-model{s[1]}")
def test_sharded_step_equals_single_device(runs, shape):
    state, _, _, metrics = runs[shape]
    assert state.model.execution.head_chunk == (24 if shape == CHUNKED else 0)
    ref_state, _, _, ref_metrics = runs[REFERENCE]
    assert max_difference(state.model, ref_state.model) < ATOL
    assert max_difference(state.ema, ref_state.ema) < ATOL
    assert max_difference(state.opt_state, ref_state.opt_state) < ATOL
    np.testing.assert_allclose(metrics, ref_metrics, rtol=1e-5)
    assert int(state.step) == STEPS
    # The model-split parameters really are split: one vocabulary slice per `model` device.
    table = state.model.net.embed.weight
    assert table.addressable_shards[0].data.shape == (
        CONFIG.model.padded_vocab // shape[1],
        CONFIG.model.width,
    )


def test_evaluation_and_sampling_do_not_depend_on_the_mesh(runs):
    model = runs[REFERENCE][0].ema
    key, tokens, labels = eval_inputs()
    sampler = SamplerConfig(steps=16)
    results = []
    for shape in [REFERENCE, (2, 4)]:
        mesh = mesh_of(shape)
        placed = on_mesh(model, mesh)
        template = jnp.full((8, CONFIG.model.seq_len), model.mask_id, jnp.int32)
        samples = generate(placed, key, template, mesh, sampler, labels[:8])
        results.append((gather(nelbo(placed, key, tokens, mesh, labels)), gather(samples.tokens)))
    (nll_a, samples_a), (nll_b, samples_b) = results
    # NELBO per sequence, ~L log V = 170 nats: float32 sums in another order, relative 1e-6.
    np.testing.assert_allclose(nll_a, nll_b, rtol=1e-5)
    np.testing.assert_array_equal(samples_a, samples_b)
    assert (samples_a != model.mask_id).all()


def test_vocab_parallel_log_softmax_matches_float64():
    """Each device holds [b, l, V_pad / M] logits; the distributed log-softmax over the real
    vocabulary (padded columns excluded) equals numpy's in float64."""
    mesh = mesh_of((2, 4))
    v, v_pad = 200, 256
    kl, kx = jax.random.split(jax.random.key(2))
    logits = 4.0 * jax.random.normal(kl, (4, 8, v_pad), jnp.float32)
    logits = logits.at[..., v:].set(50.0)  # padded columns: must not count
    x = jax.random.randint(kx, (4, 8), 0, v, jnp.int32)
    local_shapes = []

    def local(logits, x):
        local_shapes.append(logits.shape)
        return log_probs_at(logits, x, v), vocab_log_normaliser(logits, v)

    fn = jax.jit(
        jax.shard_map(
            local, mesh=mesh, in_specs=(P(DATA, None, MODEL), P(DATA)), out_specs=(P(DATA), P(DATA))
        )
    )
    logp, log_norm = fn(logits, x)
    assert local_shapes == [(2, 8, v_pad // 4)]
    real = np.asarray(logits, np.float64)[..., :v]
    top = real.max(-1, keepdims=True)
    want_norm = np.log(np.exp(real - top).sum(-1)) + top[..., 0]
    want = np.take_along_axis(real, np.asarray(x)[..., None], -1)[..., 0] - want_norm
    # float32 logits of size ~10: the float32 result is good to a few ulp of ~10.
    np.testing.assert_allclose(np.asarray(log_norm), want_norm, atol=1e-5)
    np.testing.assert_allclose(np.asarray(logp), want, atol=1e-5)


def loss_and_grad(model: MD4, mesh, tokens, labels, key):
    """The mean training objective over the global batch and its gradient, on `mesh`."""
    batch = tokens.shape[0]

    def objective(model, key, tokens, labels):
        ids = example_ids(tokens.shape[0])
        return losses(model, tokens, labels, ids, key, global_batch=batch, train=True).objective

    per_example = shard_map_modules(objective, mesh, batch_specs, P(DATA))
    mean = lambda model: jnp.mean(per_example(model, key, tokens, labels))  # noqa: E731
    return eqx.filter_jit(eqx.filter_value_and_grad(mean))(model)


@pytest.mark.parametrize(
    "diffusion, shapes",
    [
        (DiffusionConfig(), [REFERENCE, (8, 1), (4, 2), (1, 8)]),
        (DiffusionConfig(timesteps=10), [REFERENCE, (4, 2)]),
        (DiffusionConfig(learnable=True), [REFERENCE, (1, 8)]),
    ],
    ids=["md4", "md4-discrete", "genmd4"],
)
def test_masked_only_head_equals_full_head(diffusion, shapes, monkeypatch):
    """The loss reads the head only where z_t is masked (each GenMD4 draw its own mask), in
    chunks of 24 of the 512 tokens with the empty ones skipped: the same objective and gradient
    as the head on every token on one device, for the same key. (GenMD4's masked-only head on
    the other meshes: `test_sharded_step_equals_single_device`; fewer meshes here keep the
    compiles few.)"""
    cfg = dataclasses.replace(
        CONFIG,
        model=dataclasses.replace(CONFIG.model, num_layers=1),
        execution=dataclasses.replace(CONFIG.execution, head_chunk=24),
        diffusion=diffusion,
    )
    model = randomised(
        MD4(cfg.model, cfg.diffusion, cfg.execution, key=jax.random.key(3)), jax.random.key(4), 0.3
    )
    key, tokens, labels = eval_inputs()
    sparse = {
        shape: loss_and_grad(on_mesh(model, mesh_of(shape)), mesh_of(shape), tokens, labels, key)
        for shape in shapes
    }
    every_token = MD4.readout

    def full_readout(self, fn, z, t, labels, x, where, *, keys=None):
        return every_token(self, fn, z, t, labels, x, jnp.ones_like(where), keys=keys)

    monkeypatch.setattr(MD4, "readout", full_readout)
    full_loss, full_grad = loss_and_grad(model, mesh_of(REFERENCE), tokens, labels, key)
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(full_grad))
    for shape, (loss, grad) in sparse.items():
        # float32 sums in other orders (chunks, meshes): a few ulp of a loss of hundreds of nats.
        np.testing.assert_allclose(loss, full_loss, rtol=1e-5, err_msg=str(shape))
        for got, want in zip(host(grad), host(full_grad), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale, err_msg=str(shape))


def test_antithetic_strata_spread_over_shards():
    """perm(b) keeps the stratified set {(u + k / B) mod 1}, gives every contiguous shard of B / D
    examples one time in each 1/D of [0, 1) (D = 2, 4, 8), and is the bit reversal for B a power
    of two; for other B it is still a permutation."""
    for batch in (16, 64):
        perm = strata(batch)
        bits = batch.bit_length() - 1
        assert [int(format(b, f"0{bits}b")[::-1], 2) for b in range(batch)] == list(perm)
        for shards in (2, 4, 8):
            for shard in perm.reshape(shards, -1):
                assert sorted(shard // shards) == list(range(batch // shards))
    for batch in (1, 6, 12, 100):
        assert sorted(strata(batch)) == list(range(batch))
    assert list(strata(6)) == [0, 3, 2, 5, 1, 4]  # radical inverses 0 1/2 1/4 3/4 1/8 5/8


def sub_jaxprs(eqn):
    """The jaxprs an equation calls (a shard_map's body, a scan's, a custom_vjp's...)."""
    for param in eqn.params.values():
        for sub in param if isinstance(param, (tuple, list)) else [param]:
            sub = getattr(sub, "jaxpr", sub)
            if hasattr(sub, "eqns"):
                yield sub


def shard_map_avals(jaxpr, inside: bool = False):
    """Shapes of every value computed inside a shard_map body (per device), recursively."""
    for eqn in jaxpr.eqns:
        if inside:
            yield from (v.aval.shape for v in eqn.outvars)
        for sub in sub_jaxprs(eqn):
            yield from shard_map_avals(sub, inside or eqn.primitive.name == "shard_map")


def primitives(jaxpr):
    """Names of every primitive in `jaxpr`, recursively."""
    for eqn in jaxpr.eqns:
        yield eqn.primitive.name
        for sub in sub_jaxprs(eqn):
            yield from primitives(sub)


@pytest.mark.parametrize("shape", [REFERENCE, (2, 4)], ids=["data1-model1", "data2-model4"])
def test_collectives_only_over_axes_of_size_above_one(runs, shape):
    """An axis of size 1 costs nothing: the (1, 1) step has no collective at all (XLA:CPU would
    run each as an all-reduce over one device), while a split mesh sums over `data` and `model`."""
    state, step, _, _ = runs[shape]
    tokens, labels = batches(1)[0]
    jaxpr = eqx.filter_make_jaxpr(step)(state, jnp.asarray(tokens), jnp.asarray(labels))[0]
    names = set(primitives(jaxpr.jaxpr))
    collectives = {"psum", "psum_invariant", "pmax", "pmin", "all_gather", "ppermute", "all_to_all"}
    if shape == REFERENCE:
        assert names & collectives == set()
    else:
        assert {"psum_invariant", "pmax"} <= names


@pytest.mark.parametrize("shape", [REFERENCE, (2, 4)], ids=["data1-model1", "data2-model4"])
def test_no_device_holds_full_vocabulary_logits(runs, shape):
    """No value of rank >= 2 inside the training step has a vocabulary-sized axis (V, V + 1 or the
    padded V) once the vocabulary is split; on one device a chunk's logits [HEAD_CHUNK, V_pad]
    are found (a chunk of all the b l tokens, where HEAD_CHUNK is more), never [b, l, V_pad]."""
    state, step, _, _ = runs[shape]
    tokens, labels = batches(1)[0]
    jaxpr = eqx.filter_make_jaxpr(step)(state, jnp.asarray(tokens), jnp.asarray(labels))[0]
    m = CONFIG.model
    vocab_sized = [
        s
        for s in shard_map_avals(jaxpr.jaxpr)
        if len(s) >= 2 and {m.vocab_size, m.vocab_size + 1, m.padded_vocab} & set(s)
    ]
    if shape == REFERENCE:
        chunk = min(HEAD_CHUNK, CONFIG.train.batch_size * m.seq_len)
        assert (chunk, m.padded_vocab) in vocab_sized
        assert (CONFIG.train.batch_size, m.seq_len, m.padded_vocab) not in vocab_sized
    else:
        assert vocab_sized == []


def state_bytes_per_device(state) -> dict:
    """{device: bytes of the shards of every array of `state` it holds}."""
    out = {}
    for leaf in jax.tree.leaves(eqx.filter(state, eqx.is_array)):
        for shard in leaf.addressable_shards:
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out


def test_state_memory_per_device_falls_as_one_over_m(runs):
    """Parameters, EMA and optimizer state: the split parts fall exactly as 1/M, the replicated
    rest (conditioning MLP, adaLN projections, GenMD4's schedule, counters) stays. At MD4-S
    scale the replicated rest is ~2% of the state, so per-device memory is within 20% of 1/M."""
    ref = runs[REFERENCE][0]
    total = sum(state_bytes_per_device(ref).values())
    specs = param_specs(eqx.filter(ref.model, eqx.is_array))
    split = 4 * sum(  # model, EMA, Adam's two moments
        x.nbytes
        for x, s in zip(
            jax.tree.leaves(eqx.filter(ref.model, eqx.is_array)),
            jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, P)),
            strict=True,
        )
        if MODEL in s
    )
    for shape in [(8, 1), (4, 2), (2, 4), (1, 8)]:
        per_device = set(state_bytes_per_device(runs[shape][0]).values())
        assert per_device == {total - split + split // shape[1]}, shape

    cfg = preset("md4-s")
    optimizer = make_optimizer(cfg.optim, cfg.train.steps)
    abstract = eqx.filter_eval_shape(init_state, cfg, optimizer, mesh_of(REFERENCE))
    leaves = jax.tree.leaves(abstract)
    specs = jax.tree.leaves(state_specs(abstract, optimizer), is_leaf=lambda s: isinstance(s, P))

    def md4s_bytes(model: int) -> int:  # shard shapes of the MD4-S state, nothing allocated
        mesh = mesh_of((1, model))
        return sum(
            math.prod(NamedSharding(mesh, s).shard_shape(x.shape)) * x.dtype.itemsize
            for x, s in zip(leaves, specs, strict=True)
        )

    full = md4s_bytes(1)
    for model in (2, 4, 8):
        assert full / model < md4s_bytes(model) < 1.2 * full / model


def test_checkpoint_saved_on_one_mesh_restores_on_others(runs, tmp_path):
    """Saved on (4, 2), restored bit for bit on (2, 4) and (1, 1); the next step on (2, 4)
    continues the run as the next step on (4, 2) does."""
    saved, _, optimizer, _ = runs[(4, 2)]
    restored = {}
    with checkpoint.Checkpoints(tmp_path, CONFIG.train.keep_checkpoints) as checkpoints:
        checkpoints.save(saved, {"seed": 0, "epoch": 0, "position": 48}, CONFIG)
        for shape in [(2, 4), REFERENCE]:
            mesh = mesh_of(shape)
            state, data_state = checkpoints.restore(mesh, optimizer, CONFIG)
            assert checkpoints.read_meta()[1] == CONFIG and data_state["position"] == 48
            for got, want in zip(host(state), host(saved), strict=True):
                np.testing.assert_array_equal(got, want)
            assert state.model.net.embed.weight.sharding.is_equivalent_to(
                NamedSharding(mesh, P(MODEL, None)), 2
            )
            restored[shape] = state
    tokens, labels = batches(STEPS + 1)[-1]

    def next_step(shape, state):  # inputs placed as in training, so nothing recompiles
        mesh = mesh_of(shape)
        return runs[shape][1](state, global_batch(tokens, mesh), global_batch(labels, mesh))[0]

    moved = next_step((2, 4), restored[(2, 4)])
    stayed = next_step((4, 2), jax.tree.map(jnp.copy, saved))
    assert int(moved.step) == STEPS + 1
    assert max_difference(moved.model, stayed.model) < ATOL


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(runs, tmp_path):
    """Two processes of 2 CPU devices each (gloo collectives): train on a (2, 2) mesh with data
    split over the processes, save a checkpoint from both, restore it onto a (1, 4) mesh whose
    model axis spans the processes and evaluate there. Same numbers as the one-process run."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "worker", str(i), str(port), str(tmp_path)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
    got = np.load(tmp_path / "result.npz")
    ref_state, _, optimizer, ref_metrics = runs[REFERENCE]
    np.testing.assert_allclose(got["metrics"], ref_metrics, rtol=1e-5)
    params = host(ref_state.model)
    assert max(float(np.max(np.abs(got[f"p{i}"] - p))) for i, p in enumerate(params)) < ATOL
    key, tokens, labels = eval_inputs()
    mesh = mesh_of(REFERENCE)
    want = gather(nelbo(ref_state.ema, key, tokens, mesh, labels))
    np.testing.assert_allclose(got["nelbo"], want, rtol=1e-5)
    # The checkpoint the two processes wrote restores in this one.
    with checkpoint.Checkpoints(tmp_path / "run") as checkpoints:
        restored, _ = checkpoints.restore(mesh, optimizer, CONFIG)
    assert max_difference(restored.model, ref_state.model) < ATOL


def worker(process_id: int, port: int, out: Path) -> None:
    """One of the two processes of `test_two_processes_match_one`."""
    jax.config.update("jax_num_cpu_devices", 2)
    jax.config.update("jax_numpy_rank_promotion", "raise")
    jax.config.update("jax_numpy_dtype_promotion", "strict")
    initialize(f"127.0.0.1:{port}", 2, process_id)
    assert jax.device_count() == 4 and jax.local_device_count() == 2
    mesh = make_mesh(2, 2)
    assert batch_part(mesh) == (process_id, 2)
    optimizer = make_optimizer(CONFIG.optim, CONFIG.train.steps)
    state, _, _, metrics = train(mesh, init_state(CONFIG, optimizer, mesh), optimizer)
    spanning = make_mesh(1, 4)  # `model` spans both processes: each loads the whole batch
    assert batch_part(spanning) == (0, 1)
    with checkpoint.Checkpoints(out / "run", CONFIG.train.keep_checkpoints) as checkpoints:
        checkpoints.save(state, {"seed": 0, "epoch": 0, "position": 48}, CONFIG)
        restored, _ = checkpoints.restore(spanning, optimizer, CONFIG)
    key, tokens, labels = eval_inputs()
    nll = nelbo(
        restored.ema,
        key,
        global_batch(local_rows(np.asarray(tokens), spanning), spanning),
        spanning,
        global_batch(local_rows(np.asarray(labels), spanning), spanning),
    )
    result = {f"p{i}": p for i, p in enumerate(host(state.model))}
    result.update(metrics=metrics, nelbo=gather(nll))
    if jax.process_index() == 0:
        np.savez(out / "result.npz", **result)


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    worker(int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
