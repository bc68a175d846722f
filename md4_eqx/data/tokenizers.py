"""Tokenizers: raw bytes (V = 256), text8's 27 characters, and any Hugging Face tokenizer.

Every tokenizer maps text to int32 ids in [0, vocab_size) and back, and describes itself as
a small JSON-able dict so that a prepared cache knows how to decode its tokens.
"""

import os
from pathlib import Path

import numpy as np
from jaxtyping import Int32, Integer

from md4_eqx.errors import DataError
from md4_eqx.errors import first_line


class _FixedVocab:
    """What the two fixed-vocabulary tokenizers share: no EOS, and their `name` says it all."""

    eos_id = None

    def encode_batch(self, texts: list[str]) -> list[Int32[np.ndarray, " _"]]:
        return [self.encode(text) for text in texts]

    def describe(self) -> dict:
        return {"kind": self.name}


class ByteTokenizer(_FixedVocab):
    """UTF-8 bytes as tokens: V = 256, lossless for any file (undecodable bytes round-trip)."""

    name = "bytes"
    vocab_size = 256

    def encode(self, text: str) -> Int32[np.ndarray, " n"]:
        # surrogateescape carries bytes that were not UTF-8 through str unchanged.
        return np.frombuffer(text.encode("utf-8", "surrogateescape"), np.uint8).astype(np.int32)

    def encode_raw(self, raw: bytes, where: str) -> Int32[np.ndarray, " n"]:
        del where  # every byte string is valid input
        return np.frombuffer(raw, np.uint8).astype(np.int32)

    def decode(self, ids: Integer[np.ndarray, " n"]) -> str:
        _check_range(ids, self.vocab_size)
        return bytes(ids.astype(np.uint8)).decode("utf-8", "replace")


class Text8Tokenizer(_FixedVocab):
    """text8's alphabet: space -> 0, 'a'..'z' -> 1..26 (V = 27)."""

    name = "text8"
    alphabet = " abcdefghijklmnopqrstuvwxyz"
    vocab_size = 27

    def __init__(self):
        self._ids = np.full(256, -1, np.int32)  # byte value -> id, -1 outside the alphabet
        self._ids[np.frombuffer(self.alphabet.encode("ascii"), np.uint8)] = np.arange(27)
        self._chars = np.array(list(self.alphabet))

    def encode_raw(self, raw: bytes, where: str) -> Int32[np.ndarray, " n"]:
        ids = self._ids[np.frombuffer(raw, np.uint8)]
        bad = np.flatnonzero(ids < 0)
        if bad.size:
            byte = raw[bad[0] : bad[0] + 1]
            raise DataError(f"{where} has {byte!r} at offset {bad[0]}; text8 allows only ' ' and a-z")
        return ids

    def encode(self, text: str) -> Int32[np.ndarray, " n"]:
        return self.encode_raw(text.encode("utf-8"), "the text")

    def decode(self, ids: Integer[np.ndarray, " n"]) -> str:
        _check_range(ids, self.vocab_size)
        return "".join(self._chars[ids])


class HFTokenizer:
    """A `transformers` tokenizer by hub name ("gpt2") or local directory."""

    def __init__(self, name: str):
        # transformers advises on import that PyTorch is absent: irrelevant to a JAX project.
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
        from transformers import AutoTokenizer

        try:
            self._tok = AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError) as e:
            raise DataError(f"cannot load tokenizer {name!r}: {first_line(e)}") from None
        self.name = name
        self.vocab_size = len(self._tok)
        self.eos_id = self._tok.eos_token_id

    def encode_batch(self, texts: list[str]) -> list[Int32[np.ndarray, " _"]]:
        # verbose=False: documents longer than the model's context are fine, they get packed.
        ids = self._tok(texts, add_special_tokens=False, verbose=False)["input_ids"]
        return [np.asarray(x, np.int32) for x in ids]

    def encode(self, text: str) -> Int32[np.ndarray, " n"]:
        return self.encode_batch([text])[0]

    def encode_raw(self, raw: bytes, where: str) -> Int32[np.ndarray, " n"]:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise DataError(f"{where} is not UTF-8 text; use --tokenizer bytes") from None
        return self.encode(text)

    def decode(self, ids: Integer[np.ndarray, " n"]) -> str:
        _check_range(ids, self.vocab_size)
        return self._tok.decode(ids.tolist())

    def save(self, directory: Path) -> None:
        """Keeps a copy beside the cached tokens, so decoding works offline later."""
        self._tok.save_pretrained(directory)

    def describe(self) -> dict:
        return {"kind": "hf", "name": self.name}


Tokenizer = ByteTokenizer | Text8Tokenizer | HFTokenizer


def get_tokenizer(name: str) -> Tokenizer:
    """"bytes", "text8", or a Hugging Face tokenizer's hub name or local directory."""
    fixed = {"bytes": ByteTokenizer, "text8": Text8Tokenizer}
    return fixed[name]() if name in fixed else HFTokenizer(name)


def _check_range(ids: np.ndarray, vocab_size: int) -> None:
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise DataError(f"token ids must lie in [0, {vocab_size}); got {ids.min()}..{ids.max()}")
