"""Library defaults that the command-line parser needs without importing torch."""

DEFAULT_SINK = 32  # tokens kept in full at the start of the context
DEFAULT_RECENT = 64  # most recent tokens kept in full
