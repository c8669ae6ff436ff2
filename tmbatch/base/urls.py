"""Which paths are URLs: the schemes tmbatch reads and writes through fsspec, and the extra
that brings each one's filesystem. Here, below every part, because the input's reader
(`inputs.files`) and an output URL's store (`journal.store`) both tell a URL from a path.
"""

from __future__ import annotations

# URL scheme -> the extra that brings its fsspec filesystem (http, https, file: fsspec alone)
URL_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure",
              "abfs": "azure", "abfss": "azure", "http": None, "https": None, "file": None}


def url_scheme(path: str) -> str | None:
    """The scheme of an object-store or web URL tmbatch reads through fsspec; None for a
    local path (and for `-`)."""
    head, sep, _ = path.partition("://")
    return head.lower() if sep and head.lower() in URL_EXTRAS else None


