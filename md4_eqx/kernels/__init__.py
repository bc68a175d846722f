"""Attention kernels. The model calls exactly one function, `attention`, naming an `Impl`."""

from md4_eqx.kernels.attention import Impl, attention

__all__ = ["Impl", "attention"]
