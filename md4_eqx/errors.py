"""What every one-line error message quotes from a library's exception."""


def first_line(e: BaseException) -> str:
    """The first line of `e`'s message (at most 300 characters), or its type's name if empty."""
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__
