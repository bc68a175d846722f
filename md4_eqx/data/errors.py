"""The one exception the data library raises for bad user input."""


class DataError(Exception):
    """Bad input to the data pipeline (unknown dataset, missing file, bad value).

    The message is one line meant for the user; the CLIs print it and exit with status 2.
    """
