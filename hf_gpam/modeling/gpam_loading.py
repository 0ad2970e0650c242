"""Checks on what a user asks to load, made before anything is loaded or downloaded.

Part of the modeling folder, so the GPAM classes shipped next to a checkpoint (remote code) make the same checks as
the installed package and its command line.
"""

from __future__ import annotations

import os
import re


def looks_like_local_path(name: str) -> bool:
    """True when ``name`` can only mean a local path (``./x``, ``/x``, ``~/x``, ``a/b/c``), not a Hub id.

    A Hub id is ``name`` or ``namespace/name``; transformers answers a missing local folder that looks like one
    with a confusing "Repo id must be in the form..." message, so the sub-commands check such paths first.
    """
    if name.startswith((".", "/", "~")) or (os.altsep is not None and os.altsep in name):
        return True
    return os.sep in name and not re.fullmatch(r"[\w.-]+/[\w.-]+", name)


def check_model_source(name: str) -> None:
    """Raise ``FileNotFoundError`` when ``name`` is meant as a local folder (by its form) and there is none."""
    if not os.path.isdir(name) and (looks_like_local_path(name) or os.path.exists(name)):
        raise FileNotFoundError(f"model folder {name!r} does not exist (pass a local folder or a Hub id)")
