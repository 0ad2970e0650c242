"""The transformers releases this code is verified on, and the check run when it is imported.

This file ships next to every checkpoint (``save_pretrained`` copies it with the modeling code), so a checkpoint
loaded with ``trust_remote_code=True`` checks the installed transformers exactly as ``import hf_gpam`` does.

Outside the verified range the import raises ``ImportError`` naming the range and the fix; setting
``HF_GPAM_SKIP_VERSION_CHECK=1`` turns the error into a warning, to try a newer release at your own risk. daGPAM
lives behind transformers' attention interface and refuses any keyword it does not know, so a release that changes
that interface fails loudly rather than computing something else; the range is widened as releases are verified
(``make compat``).
"""

from __future__ import annotations

import os
import re
import warnings

import transformers


# every minor release in the range is verified with `make compat` (docs/compat.md). The lower bound is where
# verification stopped, not a known break: 5.17 was not finished, older releases were not tried
TRANSFORMERS_MIN = "5.19.0"
TRANSFORMERS_MAX_EXCLUSIVE = "5.25.0"
SKIP_VERSION_CHECK_ENV = "HF_GPAM_SKIP_VERSION_CHECK"


def transformers_requirement() -> str:
    """The pip requirement of the verified range, e.g. ``transformers>=5.19.0,<5.25.0``."""
    return f"transformers>={TRANSFORMERS_MIN},<{TRANSFORMERS_MAX_EXCLUSIVE}"


def release_tuple(version: str) -> tuple[int, int, int]:
    """``"5.24.0"`` -> ``(5, 24, 0)``; pre-releases count as their release (``"5.25.0.dev0"`` -> ``(5, 25, 0)``)."""
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version)
    if match is None:
        raise ValueError(f"cannot read the release number of version {version!r}")
    return tuple(int(part or 0) for part in match.groups())


def check_transformers_version(version: str | None = None) -> None:
    """Raise ``ImportError`` when ``version`` (default: the installed transformers) is outside the verified range.

    With ``HF_GPAM_SKIP_VERSION_CHECK=1`` a ``UserWarning`` is issued instead.
    """
    version = version or transformers.__version__
    if release_tuple(TRANSFORMERS_MIN) <= release_tuple(version) < release_tuple(TRANSFORMERS_MAX_EXCLUSIVE):
        return
    message = (
        f"daGPAM (hf_gpam) is verified with {transformers_requirement()} but transformers {version} is installed. "
        f"Run `pip install '{transformers_requirement()}'`"
    )
    if os.environ.get(SKIP_VERSION_CHECK_ENV) == "1":
        warnings.warn(f"{message}; continuing because {SKIP_VERSION_CHECK_ENV}=1.", UserWarning, stacklevel=2)
        return
    raise ImportError(f"{message}, or set {SKIP_VERSION_CHECK_ENV}=1 to try this version anyway.")
