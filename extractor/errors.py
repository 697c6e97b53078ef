"""The one exception bad input raises, so every caller can catch a single class."""


class ExtractError(ValueError):
    """Bad input to the extractor: the message names the problem and the path."""
