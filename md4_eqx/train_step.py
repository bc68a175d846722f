"""The training state and the ONE training step: a `jax.shard_map` over the (data, model) mesh.

Inside the map each device holds its slice of the parameters, the EMA and the optimizer state
(split over `model` like the parameters, replicated over `data`) and its slice of the batch
(split over `data`). It accumulates its examples' gradients over the microbatches, sums them over
`data` once, clips by the global norm, and applies AdamW and the EMA, all in the same compiled
step. A (1, 1) mesh is the single-device run; there is no other code path.

A step whose loss or gradient norm is not finite changes nothing but the step counter (its
update, optimizer moments and EMA are all dropped) and says so in `Metrics.skipped`, so one bad
batch or one overflow cannot poison the run; `md4_eqx.divergence` decides when to give up.
"""

import math
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray, PyTree

from md4_eqx.config import Config, OptimConfig
from md4_eqx.loss import losses
from md4_eqx.model import MD4
from md4_eqx.parallel import (
    DATA,
    example_ids,
    global_norm,
    param_specs,
    psum,
    pvary,
    shard_map_modules,
    shardings,
)


class TrainState(eqx.Module):
    """Everything a checkpoint holds but the data position: resuming it continues the run
    exactly."""

    step: Int[Array, ""]
    model: MD4
    ema: MD4  # exponential moving average of the parameters, used for evaluation and sampling
    opt_state: PyTree
    key: PRNGKeyArray  # the run's base key; step i uses fold_in(key, i)


class Metrics(NamedTuple):
    """Global-batch means, identical on every device."""

    bpt: Float[Array, ""]  # NELBO, bits per token
    grad_norm: Float[Array, ""]
    lr: Float[Array, ""]  # the learning rate this step used, read from the optimizer's state
    skipped: Bool[Array, ""]  # the loss or gradient norm was not finite: the state was kept


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """AdamW, its learning rate warmed up linearly (over at most a tenth of the run) then decayed
    as a cosine; weight decay only on weight matrices and embedding tables (fields named `weight`).
    Its hyperparameters live in its state (`optax.inject_hyperparams`), so the step can report its
    lr."""

    def decay_mask(params):
        return jax.tree.map_with_path(
            lambda path, _: getattr(path[-1], "name", None) == "weight", params
        )

    warmup = min(cfg.warmup, max(1, total_steps // 10))
    lr = optax.warmup_cosine_decay_schedule(
        0.0, cfg.lr, warmup, max(total_steps, warmup + 1), cfg.lr * cfg.min_lr_ratio
    )
    adamw = optax.inject_hyperparams(optax.adamw, static_args=("mask",))
    return adamw(lr, cfg.b1, cfg.b2, weight_decay=cfg.weight_decay, mask=decay_mask)


def init_state(config: Config, optimizer: optax.GradientTransformation, mesh: Mesh) -> TrainState:
    """A fresh state, computed on the mesh with every array's sharding (see `state_specs`): each
    device computes only its own slices, so a mesh over several processes needs nothing more."""

    def fresh() -> TrainState:
        model = MD4(
            config.model, config.diffusion, config.execution, key=jax.random.key(config.train.seed)
        )
        with jax.numpy_dtype_promotion("standard"):  # optax mixes Python floats and int32 counts
            opt_state = optimizer.init(eqx.filter(model, eqx.is_array))
        ema = jax.tree.map(jnp.copy, model)  # its own buffers: the step donates both
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            model=model,
            ema=ema,
            opt_state=opt_state,
            key=jax.random.key(config.train.seed + 1),
        )

    abstract = eqx.filter_eval_shape(fresh)
    out_shardings = shardings(mesh, state_specs(abstract, optimizer))
    arrays = jax.jit(lambda: eqx.filter(fresh(), eqx.is_array), out_shardings=out_shardings)()
    # the arrays, and abstract's static fields where they have none
    return eqx.combine(arrays, abstract)


def state_specs(state: TrainState, optimizer: optax.GradientTransformation) -> PyTree:
    """PartitionSpecs of every array of the state: the optimizer state is split like the params.
    `state` may also be abstract (`eqx.filter_eval_shape(init_state, ...)`), e.g. to restore."""
    arrays = eqx.filter(state, lambda x: eqx.is_array(x) or isinstance(x, jax.ShapeDtypeStruct))
    params = param_specs(arrays.model)
    with jax.numpy_dtype_promotion("standard"):  # it calls optimizer.init: see init_state
        opt = optax.tree_map_params(
            optimizer,
            lambda _, spec: spec,
            arrays.opt_state,
            params,
            transform_non_params=lambda _: P(),
            is_leaf=lambda x: isinstance(x, P),
        )
    # Built by tree maps, not TrainState(...): its fields are typed as arrays, these are specs.
    specs = jax.tree.map(lambda _: P(), arrays)
    return eqx.tree_at(lambda s: (s.model, s.ema, s.opt_state), specs, (params, params, opt))


def make_train_step(
    state: TrainState,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    *,
    microbatches: int = 1,
    clip: float,
    ema: float,
):
    """The jitted step `(state, tokens, labels) -> (state, metrics)`; it donates `state`.

    `tokens` is the global batch [B, L] (B divisible by the mesh's `data` size times `microbatches`,
    the gradient-accumulation chunks), `labels` [B] or None; `clip` and `ema` as in `OptimConfig`.
    `md4_eqx.validate` checks the model and batch against the mesh."""
    specs = state_specs(state, optimizer)

    def local_step(batch, state: TrainState) -> tuple[TrainState, Metrics]:
        """One optimisation step on this device's slice of the batch and of the parameters."""
        tokens, labels = batch
        global_batch, seq_len = tokens.shape[0] * mesh.shape[DATA], tokens.shape[1]
        key = jax.random.fold_in(state.key, state.step)
        ids = example_ids(tokens.shape[0])
        params, static = eqx.partition(state.model, eqx.is_array)

        def loss_fn(params, x, y, ids):
            terms = losses(
                eqx.combine(params, static), x, y, ids, key, global_batch=global_batch, train=True
            )
            norm = global_batch * seq_len
            return jnp.sum(terms.objective) / norm, jnp.sum(terms.nelbo) / norm

        def chunks(a):  # (b, ...) -> (microbatches, b / microbatches, ...)
            return (
                None
                if a is None
                else a.reshape(microbatches, a.shape[0] // microbatches, *a.shape[1:])
            )

        # Parameters marked as varying over `data` keep each device's gradient local: replicated
        # ones would have their cotangents summed over `data` in every microbatch's backward pass.
        local_params = pvary(params, DATA)

        def accumulate(carry, batch):
            grads, nelbo = carry
            (_, nll), g = jax.value_and_grad(loss_fn, has_aux=True)(local_params, *batch)
            return (jax.tree.map(jnp.add, grads, g), nelbo + nll), None

        # per-device sums
        zero = (jax.tree.map(jnp.zeros_like, local_params), pvary(jnp.zeros(()), DATA))
        (grads, nelbo), _ = lax.scan(
            accumulate, zero, (chunks(tokens), chunks(labels), chunks(ids))
        )
        grads, nelbo = psum((grads, nelbo), DATA)

        grad_norm = global_norm(grads, specs.model)
        if clip:
            grads = jax.tree.map(lambda g: g * jnp.minimum(1.0, clip / (grad_norm + 1e-6)), grads)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes Python floats and int32 counts
            updates, opt_state = optimizer.update(grads, state.opt_state, params)
        lr = jnp.asarray(opt_state.hyperparams["learning_rate"], jnp.float32)
        # A non-finite loss or gradient norm keeps every array of the old state but the counter
        # (`where`, not `cond`: both sides are computed anyway, and NaNs in the unused side vanish).
        # Each `where` sits in the elementwise pass that computes its array from the old one, so
        # XLA fuses it there: the update is gated to -0.0 (p + -0.0 == p, bitwise, for every p),
        # which makes the gated params both the new state's and the EMA's input; selecting the
        # params after the EMA had read them would cost a pass over every parameter of its own.
        skipped = ~(jnp.isfinite(nelbo) & jnp.isfinite(grad_norm))

        def keep(old, new):
            return jax.tree.map(lambda o, n: jnp.where(skipped, o, n), old, new)

        params = optax.apply_updates(
            params, jax.tree.map(lambda u: jnp.where(skipped, -0.0, u), updates)
        )
        # EMA decay warmed up as min(decay, (1 + step) / (10 + step)), so short runs are not all
        # init.
        step = state.step.astype(jnp.float32)
        decay = jnp.minimum(ema, (1.0 + step) / (10.0 + step))
        ema_old = eqx.filter(state.ema, eqx.is_array)
        ema_params = keep(ema_old, optax.incremental_update(params, ema_old, 1.0 - decay))
        new_state = TrainState(
            step=state.step + 1,
            model=eqx.combine(params, static),
            ema=eqx.combine(ema_params, static),
            opt_state=keep(state.opt_state, opt_state),
            key=state.key,
        )
        return new_state, Metrics(nelbo / math.log(2.0), grad_norm, lr, skipped)

    def in_specs(batch, state):  # P(DATA) covers the batch's labels when they are None, too
        return P(DATA), specs

    step = eqx.filter_jit(
        shard_map_modules(local_step, mesh, in_specs, (specs, P())), donate="all-except-first"
    )

    def train_step(state: TrainState, tokens, labels=None):
        return step((tokens, labels), state)

    return train_step
