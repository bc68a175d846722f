"""Tokenizers: raw bytes (V = 256), text8's 27 characters, and any Hugging Face tokenizer.

Every tokenizer maps text to int32 ids in [0, vocab_size) and back (`Dataset.decode` checks the
range), and describes itself as a small JSON-able dict so that a prepared cache knows how to
decode its tokens.
"""

import os
from pathlib import Path

import numpy as np
from jaxtyping import Int32, Integer

from md4_eqx.data.hub import hub_call
from md4_eqx.errors import DataError

ALPHABETS = {
    "bytes": bytes(range(256)),  # UTF-8 bytes: lossless for any file, V = 256
    "text8": b" abcdefghijklmnopqrstuvwxyz",  # text8's: space -> 0, 'a'..'z' -> 1..26, V = 27
}


class ByteTokenizer:
    """One token per byte, for an alphabet of `ALPHABETS` ("bytes" or "text8"); no EOS."""

    eos_id = None

    def __init__(self, name: str):
        self.name = name
        self._bytes = np.frombuffer(ALPHABETS[name], np.uint8)  # id -> byte
        self.vocab_size = self._bytes.size
        self._ids = np.full(256, -1, np.int32)  # byte -> id, -1 outside the alphabet
        self._ids[self._bytes] = np.arange(self.vocab_size)

    def encode_raw(self, raw: bytes, where: str) -> Int32[np.ndarray, " n"]:
        ids = self._ids[np.frombuffer(raw, np.uint8)]
        bad = np.flatnonzero(ids < 0)  # only text8's alphabet leaves bytes out
        if bad.size:
            byte = raw[bad[0] : bad[0] + 1]
            raise DataError(
                f"{where} has {byte!r} at offset {bad[0]}; text8 allows only ' ' and a-z"
            )
        return ids

    def encode(self, text: str) -> Int32[np.ndarray, " n"]:
        # surrogateescape carries bytes that were not UTF-8 through str unchanged.
        return self.encode_raw(text.encode("utf-8", "surrogateescape"), "the text")

    def encode_batch(self, texts: list[str]) -> list[Int32[np.ndarray, " _"]]:
        return [self.encode(text) for text in texts]

    def decode(self, ids: Integer[np.ndarray, " n"]) -> str:
        return self._bytes[ids].tobytes().decode("utf-8", "replace")

    def describe(self) -> dict:
        return {"kind": self.name}


class HFTokenizer:
    """A `transformers` tokenizer by hub name ("gpt2") or local directory."""

    def __init__(self, name: str):
        # transformers advises on import that PyTorch is absent: irrelevant to a JAX project.
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
        from transformers import AutoTokenizer

        with hub_call(DataError, f"load tokenizer {name!r}"):
            self._tok = AutoTokenizer.from_pretrained(name)
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
        return self._tok.decode(ids.tolist())

    def save(self, directory: Path) -> None:
        """Keeps a copy beside the cached tokens, so decoding works offline later."""
        self._tok.save_pretrained(directory)

    def describe(self) -> dict:
        return {"kind": "hf", "name": self.name}


Tokenizer = ByteTokenizer | HFTokenizer


def get_tokenizer(name: str) -> Tokenizer:
    """ "bytes", "text8", or a Hugging Face tokenizer's hub name or local directory."""
    return ByteTokenizer(name) if name in ALPHABETS else HFTokenizer(name)
