"""Attention kernels. The model calls exactly one function: `attention`."""

from md4_eqx.kernels.attention import attention, attention_reference

__all__ = ["attention", "attention_reference"]
