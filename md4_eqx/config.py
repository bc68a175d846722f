"""Configuration: one frozen dataclass per concern, and the paper's presets (MD4_MATH.md, end).

Every field is a plain value (int, float, bool, str or an Enum) so that `train.py` can expose each
one as a command-line flag and a checkpoint can store the whole `Config` as JSON.
"""

import dataclasses
import enum
import math
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp

from md4_eqx.errors import ConfigError


class Schedule(enum.Enum):
    """The masking schedule a(t) of paper section 2 (see `md4_eqx.schedule`)."""

    LINEAR = "linear"
    COSINE = "cosine"
    POLY = "poly"


class Backbone(enum.Enum):
    """The network mu_theta: the transformer (`md4_eqx.transformer`), or the VDM-style U-Net
    (`md4_eqx.unet`)."""

    TRANSFORMER = "transformer"
    UNET = "unet"


class MLPKind(enum.Enum):
    """Gated MLP flavour: W2(act(W1 x) * W3 x) with act = sigmoid, swish or gelu."""

    GLU = "glu"
    SWIGLU = "swiglu"
    GEGLU = "geglu"


class Precision(enum.Enum):
    """Compute dtype of the transformer's matmuls. Parameters always stay float32."""

    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"

    @property
    def dtype(self) -> Any:
        return jnp.dtype(self.value)


class Impl(enum.Enum):
    """Which attention to run (the kernels: md4_eqx/kernels/attention.py)."""

    AUTO = "auto"  # the first row of KERNELS that runs here: pallas on TPU, cudnn on GPU, else xla
    XLA = "xla"  # the plain-JAX attention_reference, on any backend
    CUDNN = "cudnn"  # cuDNN's fused kernel (jax.nn.dot_product_attention), GPU
    PALLAS = "pallas"  # our hand-written flash attention: Mosaic TPU, or Mosaic GPU on Hopper
    # the same kernel run by the Pallas interpreter: any backend, slow (tests)
    PALLAS_INTERPRET = "pallas-interpret"


class Remat(enum.Enum):
    """What the backward pass recomputes of each block instead of keeping it (`jax.checkpoint`),
    named as JAX's and MaxText's remat policies are: more recomputation, less memory, more work
    per token."""

    NONE = "none"  # nothing: every block keeps what its backward pass reads
    MINIMAL = "minimal"  # each block's MLP half (its residual, norm and hidden units)
    FULL = "full"  # the whole block, from its input


class Rule(enum.Enum):
    """The reverse step t -> s of paper section 4 (see `md4_eqx.reverse_step`)."""

    ANCESTRAL = "ancestral"
    TOP_P = "top_p"  # ancestral, each token drawn from the top-p part of mu_theta
    MEAN = "mean"  # draw z0 ~ mu_theta, then unmask (the paper's App. G)
    REMDM = "remdm"  # ancestral plus remasking of decoded tokens (Wang et al. 2025)


class Remask(enum.Enum):
    """ReMDM's remasking probability sigma_t (arXiv 2503.00307, section 4.1), both <= sigma_max."""

    CAP = "cap"  # sigma_t = min(eta, sigma_max)
    RESCALE = "rescale"  # sigma_t = eta * sigma_max


class Draws(enum.Enum):
    """How the samplers draw categoricals (see `md4_eqx.categorical`)."""

    EXACT = "exact"  # no truncated tails: rare tokens drawn at their rate
    FLOAT32 = "float32"  # jax.random's float32 Gumbel noise, capped near 16.6 (for comparison)


class Loop(enum.Enum):
    """Which steps of the time grid call the network (see `md4_eqx.sampling`)."""

    AUTO = "auto"  # exact_skip wherever it samples the rule's law, else every_step
    EVERY_STEP = "every_step"
    EXACT_SKIP = "exact_skip"  # the same law, calling the network only on steps that unmask


class TimeGrid(enum.Enum):
    """Time discretisation of the reverse process."""

    UNIFORM = "uniform"
    COSINE = "cosine"


def _check(config: Any, rule: str, holds: Callable[[Any], bool], *names: str) -> None:
    """A ConfigError `name=value rule` for the first of `names` whose value `holds` rejects."""
    for name in names:
        if not holds(getattr(config, name)):
            raise ConfigError(name, f"{name}={getattr(config, name)} {rule}")


# sub-pixels per pixel (RGB); the data pipeline flattens images row-major (h, w, c)
UNET_CHANNELS = 3
UNET_GROUPS = 32  # the U-Net's GroupNorm groups (Flax's default, as the VDM U-Net uses)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The network mu_theta (MD4_MATH.md, "Network"), all a checkpoint's parameters must match on
    resume (how it is computed is `ExecutionConfig`). mlp, mlp_hidden and rope_theta are the
    transformer's only; the U-Net's width is its channels, num_layers its residual blocks down
    (one more up)."""

    backbone: Backbone = Backbone.TRANSFORMER
    vocab_size: int = 256
    seq_len: int = 256
    width: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp: MLPKind = MLPKind.GLU
    mlp_hidden: int = 0  # 0: 2/3 of 4 * width rounded up to a multiple of 32 (2048 at width 768)
    cond_dim: int = 64  # width of the time (and class) conditioning vector
    num_classes: int = 0  # > 0 adds a class-label embedding (CIFAR-10: 10), plus a null class
    # with classes: P(a training label becomes the null class), for guidance
    label_dropout: float = 0.1
    dropout: float = 0.0
    rope_theta: float = 10_000.0

    def __post_init__(self):
        _check(
            self,
            "must be positive",
            lambda v: v > 0,
            "vocab_size",
            "seq_len",
            "width",
            "num_layers",
            "num_heads",
            "cond_dim",
        )
        _check(self, "must be in [0, 1)", lambda v: 0.0 <= v < 1.0, "dropout", "label_dropout")
        if self.width % self.num_heads:
            raise ConfigError(
                "width", f"width={self.width} must be a multiple of num_heads={self.num_heads}"
            )
        if self.backbone is Backbone.UNET:
            side = math.isqrt(self.seq_len // UNET_CHANNELS)
            if UNET_CHANNELS * side * side != self.seq_len:
                raise ConfigError(
                    "seq_len",
                    f"the U-Net needs seq_len = {UNET_CHANNELS} * side^2 sub-pixels, "
                    f"got {self.seq_len}",
                )
            if self.width % UNET_GROUPS:
                raise ConfigError(
                    "width",
                    f"the U-Net's GroupNorm needs width={self.width} to be a multiple "
                    f"of {UNET_GROUPS}",
                )

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def hidden(self) -> int:
        return self.mlp_hidden or -(-(2 * 4 * self.width // 3) // 32) * 32

    @property
    def padded_vocab(self) -> int:
        """V + 1 ids (the mask is id V) rounded up to a multiple of 128, for fast matmuls and
        so that a vocabulary-parallel table splits evenly over up to 128 devices."""
        return -(-(self.vocab_size + 1) // 128) * 128


@dataclasses.dataclass(frozen=True)
class ExecutionConfig:
    """How the network is computed: the same parameters and the same function, in any of these
    ways, so every field may change when a run resumes."""

    precision: Precision = Precision.BFLOAT16
    attention: Impl = Impl.AUTO  # which kernel (md4_eqx/kernels/attention.py)
    remat: Remat = Remat.NONE  # what each block recomputes in the backward pass
    # Straight-line blocks (faster steps); False, or Remat.FULL: a rolled loop (faster compiles).
    unroll_layers: bool = True
    # The loss's head runs on the masked tokens this many at a time (MD4.readout); 0: HEAD_CHUNK.
    head_chunk: int = 0

    def __post_init__(self):
        _check(self, "must be 0 (the default) or a token count", lambda v: v >= 0, "head_chunk")


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
    """The forward process and the loss (MD4_MATH.md, "Forward process" to "GenMD4")."""

    schedule: Schedule = Schedule.LINEAR
    exponent: float = 1.0  # k of the polynomial schedule a(t) = 1 - t^k
    eps: float = 1e-4  # alpha(t) = (1 - 2 eps) a(t) + eps
    timesteps: int = 0  # 0: continuous-time NELBO; T > 0: the discrete-time NELBO with T steps
    antithetic: bool = True  # t_b = (u + b / B) mod 1 across the global batch
    learnable: bool = False  # GenMD4: a learnable per-token polynomial schedule
    t1: float = 1e-3  # GenMD4 draws t in [t1, 1]

    def __post_init__(self):
        _check(self, "must be in (0, 0.5)", lambda v: 0.0 < v < 0.5, "eps")
        _check(self, "must be positive", lambda v: v > 0, "exponent")
        _check(self, "must be >= 0 (0 means continuous time)", lambda v: v >= 0, "timesteps")
        if self.learnable and self.timesteps:
            raise ConfigError(
                "timesteps", "GenMD4 (learnable=True) is a continuous-time model: set timesteps=0"
            )


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """The reverse process (MD4_MATH.md, "Reverse process")."""

    rule: Rule = Rule.ANCESTRAL
    loop: Loop = Loop.AUTO  # md4_eqx.sampling.resolve_loop
    steps: int = 1000
    grid: TimeGrid = TimeGrid.COSINE
    top_p: float = 0.98
    draws: Draws = Draws.EXACT
    remask: Remask = Remask.CAP  # Rule.REMDM only, as are the three below
    eta: float = 0.02
    remask_from: float = 1.0  # remasking is on for t in (remask_until, remask_from]
    remask_until: float = 0.0
    guidance: float = 0.0  # classifier-free guidance w: (1 + w) cond - w uncond logits; 0: none

    def __post_init__(self):
        _check(self, "must be positive", lambda v: v > 0, "steps")
        _check(self, "must be in [0, 1]", lambda v: 0.0 <= v <= 1.0, "eta")
        if not 0.0 <= self.remask_until < self.remask_from <= 1.0:
            raise ConfigError(
                "remask_from",
                f"need 0 <= remask_until={self.remask_until} < remask_from={self.remask_from} <= 1",
            )
        _check(self, "must be in (0, 1]", lambda v: 0.0 < v <= 1.0, "top_p")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup then cosine decay, clipping and an EMA of the parameters."""

    lr: float = 3e-4
    warmup: int = 2000
    min_lr_ratio: float = 0.0  # the cosine decays to lr * min_lr_ratio at the last step
    b1: float = 0.9
    b2: float = 0.999
    weight_decay: float = 0.0
    clip: float = 1.0  # global gradient norm; 0 disables clipping
    ema: float = 0.9999

    def __post_init__(self):
        _check(self, "must be positive", lambda v: v > 0, "lr")
        _check(self, "must be >= 0", lambda v: v >= 0, "warmup")
        _check(self, "must be in [0, 1)", lambda v: 0.0 <= v < 1.0, "ema")


AUTO = 0  # train.batch_size or train.microbatches chosen for the devices' memory by md4_eqx.plan
AUTO_FIELDS = ("batch_size", "microbatches")  # the TrainConfig fields that take AUTO


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The training loop: batch, length of the run, logging, evaluation and checkpoints."""

    dataset: str = "pystdlib"
    # global batch, over every device and microbatch; AUTO: the largest that fits
    batch_size: int = 512
    # gradient accumulation: the batch is split into this many chunks; AUTO: the fewest that fit
    microbatches: int = 1
    steps: int = 1_000_000
    seed: int = 0
    log_every: int = 100
    eval_every: int = 5000
    eval_batches: int = 20
    eval_draws: int = 4  # Monte Carlo draws of (t, z_t) per evaluation sequence
    checkpoint_every: int = 5000
    keep_checkpoints: int = 3
    num_samples: int = 4  # samples written at each evaluation
    max_bad_steps: int = 10  # consecutive non-finite steps (each one skipped) before the run stops

    def __post_init__(self):
        _check(self, "must be positive (or auto)", lambda v: v >= 0, *AUTO_FIELDS)
        _check(
            self,
            "must be positive",
            lambda v: v > 0,
            "steps",
            "log_every",
            "eval_every",
            "eval_batches",
            "eval_draws",
            "checkpoint_every",
            "keep_checkpoints",
            "max_bad_steps",
        )
        if self.microbatches and self.batch_size % self.microbatches:
            raise ConfigError(
                "batch_size",
                f"batch_size={self.batch_size} must be a multiple of "
                f"microbatches={self.microbatches}",
            )


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a run needs; a preset fills it, command-line flags override fields."""

    model: ModelConfig = ModelConfig()
    execution: ExecutionConfig = ExecutionConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    sampler: SamplerConfig = SamplerConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()


def _md4_s() -> Config:
    """The paper's MD4-S on OpenWebText: seq 1024, else the defaults (12 layers, width 768, GLU,
    linear, batch 512)."""
    return Config(
        model=ModelConfig(vocab_size=50257, seq_len=1024), train=TrainConfig(dataset="owt")
    )


def _text8() -> Config:
    """text8: the MD4-S network over 27 characters, sequences of 256, batch 512."""
    return Config(model=ModelConfig(vocab_size=27, seq_len=256), train=TrainConfig(dataset="text8"))


def _cifar10() -> Config:
    """CIFAR-10 as the paper trains it (DeepMind's md4/configs/md4/cifar10.py): the VDM-style
    U-Net over the 32x32 RGB images of sub-pixels (feature dim 128, 32 residual blocks down and
    33 up, one attention head, conditioning 128), unconditional, computed in float32 as the
    reference is; continuous time, linear schedule, no gradient clipping. `--num-classes 10`
    makes it class-conditional; `--backbone transformer` runs the transformer over the 3,072
    flattened sub-pixels instead."""
    return Config(
        model=ModelConfig(
            backbone=Backbone.UNET,
            vocab_size=256,
            seq_len=3072,
            width=128,
            num_layers=32,
            num_heads=1,
            cond_dim=128,
            dropout=0.1,
        ),
        execution=ExecutionConfig(precision=Precision.FLOAT32),
        diffusion=DiffusionConfig(schedule=Schedule.LINEAR, timesteps=0),
        sampler=SamplerConfig(rule=Rule.ANCESTRAL, steps=256, grid=TimeGrid.COSINE),
        optim=OptimConfig(lr=2e-4, warmup=100, b2=0.99, weight_decay=0.01, clip=0.0, ema=0.9999),
        train=TrainConfig(dataset="cifar10", batch_size=256, steps=2_000_000),
    )


def _tiny() -> Config:
    """Trains in about five minutes on 2 CPU cores: byte-level Python source from the standard
    library. Tuned for that budget: two layers at batch 64 see twice the tokens of four at batch
    32 in the same time and end lower (eval 3.07 against 3.58 bits/token). Its 512 evaluation
    sequences take 8 draws each: the standard error is then 0.34% of a fresh model's 8.01 bits
    and 0.91% of the 3.11 bits it ends at (256 sequences: 1.2% there). The samples use top-p
    0.8: a model this small still puts visible mass on rare bytes."""
    return Config(
        model=ModelConfig(vocab_size=256, seq_len=128, width=128, num_layers=2, num_heads=4),
        execution=ExecutionConfig(precision=Precision.FLOAT32),
        sampler=SamplerConfig(rule=Rule.TOP_P, steps=128, top_p=0.8),
        optim=OptimConfig(lr=2e-3, warmup=50, ema=0.99),
        train=TrainConfig(
            dataset="pystdlib",
            batch_size=64,
            steps=600,
            log_every=20,
            eval_every=200,
            eval_batches=8,
            eval_draws=8,
            checkpoint_every=200,
        ),
    )


PRESETS = {"md4-s": _md4_s, "text8": _text8, "cifar10": _cifar10, "tiny": _tiny}


def preset(name: str) -> Config:
    """The named preset; a ConfigError lists the known names."""
    if name not in PRESETS:
        raise ConfigError("preset", f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()


# ---------------------------------------------------------------------------------------------
# The config as JSON (what a checkpoint stores).


def config_to_json(config: Config) -> dict[str, dict[str, Any]]:
    """{section: {field: value}} with enums as their values."""
    return {
        section: {k: v.value if isinstance(v, enum.Enum) else v for k, v in fields.items()}
        for section, fields in dataclasses.asdict(config).items()
    }


def config_from_json(data: dict) -> Config:
    """The inverse of `config_to_json`; a missing field takes its default, an unknown one fails.
    Checkpoints written before `ExecutionConfig` existed kept its fields under `model`: they
    are read from there."""
    data = {name: dict(values) for name, values in data.items()}
    execution = {f.name for f in dataclasses.fields(ExecutionConfig)}
    moved = {k: data["model"].pop(k) for k in execution & set(data.get("model", {}))}
    data["execution"] = {**moved, **data.get("execution", {})}
    sections = {}
    for section in dataclasses.fields(Config):
        values = data.get(section.name, {})
        kinds = {f.name: f.type for f in dataclasses.fields(section.type)}
        if unknown := set(values) - set(kinds):
            raise ConfigError(
                section.name, f"unknown config fields {section.name}.{sorted(unknown)}"
            )
        sections[section.name] = section.type(
            **{name: _json_value(section.name, name, kinds[name], v) for name, v in values.items()}
        )
    return Config(**sections)


def _json_value(section: str, name: str, kind: Any, value: Any) -> Any:
    """A saved field's value as its type: an enum by its value (a ConfigError naming the choices
    for one this code does not know, e.g. a checkpoint's `remat: true` from before `Remat`)."""
    if not isinstance(kind, enum.EnumMeta):
        return value
    try:
        return kind(value)
    except ValueError:
        choices = ", ".join(str(m.value) for m in kind)
        raise ConfigError(name, f"{section}.{name}={value!r} is not one of: {choices}") from None


def model_differences(saved: Config, config: Config) -> list[str]:
    """`section.field: saved -> new` for every field that changes the model: the network
    (`model`, whole), the diffusion process, and the dataset."""
    old, new = config_to_json(saved), config_to_json(config)
    fields = [(section, name) for section in ("model", "diffusion") for name in old[section]]
    return [
        f"{s}.{name}: {old[s][name]} -> {new[s][name]}"
        for s, name in [*fields, ("train", "dataset")]
        if old[s][name] != new[s][name]
    ]
