"""tmbatch: run large batches of inference requests against Tensormesh, safely."""

__version__ = "0.1.0"
