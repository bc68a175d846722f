"""Datasets for MD4: prepared once into an on-disk token cache, read as seq_len windows.

from md4_eqx.data import DataError, Dataset, BatchLoader, load
ds = load("pystdlib", seq_len=256)            # or text8, owt, cifar10, file:PATH, hf:NAME
loader = BatchLoader(ds.split("train"), batch_size=64, seed=0)
batch = next(loader)                           # {"tokens": int32 [64, 256]}
"""

from md4_eqx.data.cache import default_cache_dir
from md4_eqx.data.dataset import Dataset, Subset, load
from md4_eqx.data.loader import BatchLoader
from md4_eqx.data.sources import dataset_help
from md4_eqx.errors import DataError

__all__ = [
    "BatchLoader",
    "DataError",
    "Dataset",
    "Subset",
    "dataset_help",
    "default_cache_dir",
    "load",
]
