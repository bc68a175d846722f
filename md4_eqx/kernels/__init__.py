"""Attention kernels. The model calls exactly one function: `attention`."""

from md4_eqx.kernels.attention import (
    IMPLS,
    attention,
    attention_reference,
    available_impls,
    resolve_impl,
)
from md4_eqx.kernels.flash_attention import BlockSizes, flash_attention

__all__ = [
    "IMPLS",
    "BlockSizes",
    "attention",
    "attention_reference",
    "available_impls",
    "flash_attention",
    "resolve_impl",
]
