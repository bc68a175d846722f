"""Strict test configuration: 8 simulated CPU devices, strict promotion, seeded keys."""

import os

# The CPU alone, even where libtpu (the [tpu] extra) or a CUDA plugin is installed: JAX would
# otherwise load them to look for their devices (libtpu then prints its warnings on stderr,
# which the one-line-error tests read). Compile targets (md4_eqx.targets) still load them.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import equinox as eqx
import jax
import pytest
from jax.flatten_util import ravel_pytree

# train.py's flags for a model far smaller than the tiny preset, for the runs of the CLI tests.
SMALL = [
    "--width",
    "32",
    "--num-layers",
    "1",
    "--num-heads",
    "2",
    "--seq-len",
    "32",
    "--batch-size",
    "8",
    "--eval-batches",
    "2",
    "--sampler.steps",
    "4",
    "--num-samples",
    "2",
    "--no-progress",
]

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")

# The slowest files first, longest first (from about 250 s down to 40 s each on 2 cores;
# test_targets.py: the TPU compiler; the rest take less), so that with `--dist loadfile
# --no-loadscope-reorder` (.ci/run) the two workers share out the short files last and finish
# together. A long file left to the end keeps one worker busy alone.
SLOWEST_FIRST = (
    "test_targets.py",
    "test_sampling.py",
    "test_parallel.py",
    "test_train.py",
    "test_ground_truth.py",
    "test_data.py",
    "test_plan.py",
    "test_unet.py",
    "test_sample.py",
    "test_model.py",
    "test_guidance.py",
    "test_attention.py",
    "test_loss.py",
    "test_flash_attention_gpu.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    # stable: files keep their order
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture
def getkey():
    """Returns a function that hands out fresh, deterministic PRNG keys."""
    key = [jax.random.key(0)]

    def _getkey():
        key[0], sub = jax.random.split(key[0])
        return sub

    return _getkey


@eqx.filter_jit
def randomised(module: eqx.Module, key, scale: float) -> eqx.Module:
    """`module` with every parameter moved off its init by scale * N(0, 1) noise, so the
    zero-initialised heads, convs and projections act. The same key gives the same noise to
    modules of the same structure. One flat draw: a draw per parameter shape compiles its own
    random-number kernel, seconds in all."""
    params, static = eqx.partition(module, eqx.is_array)
    flat, unravel = ravel_pytree(params)
    return eqx.combine(unravel(flat + scale * jax.random.normal(key, flat.shape)), static)
