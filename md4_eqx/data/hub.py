"""Calls to the Hugging Face hub (datasets, tokenizers, causal LMs): one line when they fail.

An unreachable hub makes `huggingface_hub` retry each request five times over about 23 s,
logging two warnings per try on stderr, before it raises an error that says the same in its
first line. Inside `hub_call` those warnings are dropped and the error is that first line.
"""

import contextlib
import logging
from collections.abc import Iterator

from md4_eqx.errors import Md4Error, first_line


@contextlib.contextmanager
def hub_call(error: type[Md4Error], what: str) -> Iterator[None]:
    """Run the body with the hub library's warnings (its retries) off stderr; its failure
    (OSError, the hub's connection errors included, ValueError or RuntimeError) is raised as
    `error(f"cannot {what}: <first line of the hub's message>")`."""
    hub = logging.getLogger("huggingface_hub")  # the library's root logger and its handler
    level = hub.level
    hub.setLevel(logging.ERROR)
    try:
        yield
    except (OSError, ValueError, RuntimeError) as e:
        raise error(f"cannot {what}: {first_line(e)}") from None
    finally:
        hub.setLevel(level)
