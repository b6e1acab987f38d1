"""Where jaxllm keeps files between runs."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """jaxllm's files kept between runs (the native CPU kernel, XLA's compiled
    programs): $JAXLLM_CACHE, else $XDG_CACHE_HOME/jaxllm, else ~/.cache/jaxllm."""
    return Path(os.environ.get("JAXLLM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "jaxllm"))
