"""The transformers releases this code is verified on, and the check run when it is imported.

This file ships next to every checkpoint (``save_pretrained`` copies it with the modeling code), so a checkpoint
loaded with ``trust_remote_code=True`` checks the installed transformers exactly as ``import hf_gpam`` does. A copy
frozen on the Hub can never be fixed by upgrading hf_gpam, so the check must not turn a working checkpoint into a
broken one on the next transformers release:

- below the verified range: ``ImportError`` naming the range and the fix (the attention interface daGPAM relies on
  is older there); ``HF_GPAM_SKIP_VERSION_CHECK=1`` turns it into a warning, to try anyway;
- a release known to break daGPAM (``KNOWN_BAD_RELEASES``): ``ImportError`` saying why;
- above the verified range: a ``UserWarning`` that the release is not verified yet, and the import goes on. What
  keeps a newer release from computing something else is not this check but the attention functions themselves:
  every keyword they receive is applied, refused or ignored by an explicit policy, and an unknown one raises.

New releases are verified with ``make compat`` (docs/compat.md), which then raises ``TRANSFORMERS_VERIFIED_BELOW``.
"""

from __future__ import annotations

import os
import re
import warnings

import transformers


# every minor release in [TRANSFORMERS_MIN, TRANSFORMERS_VERIFIED_BELOW) is verified with `make compat`. The lower
# bound is where verification stopped, not a known break: 5.17 was not finished, older releases were not tried
TRANSFORMERS_MIN = "5.19.0"
TRANSFORMERS_VERIFIED_BELOW = "5.26.0"
# release -> why daGPAM refuses it (none known; an entry here is the only way to refuse a release above the range)
KNOWN_BAD_RELEASES: dict[str, str] = {}
SKIP_VERSION_CHECK_ENV = "HF_GPAM_SKIP_VERSION_CHECK"


def transformers_requirement() -> str:
    """The pip requirement of the verified range, e.g. ``transformers>=5.19.0,<5.26.0``."""
    return f"transformers>={TRANSFORMERS_MIN},<{TRANSFORMERS_VERIFIED_BELOW}"


def release_tuple(version: str) -> tuple[int, int, int]:
    """``"5.24.0"`` -> ``(5, 24, 0)``; pre-releases count as their release (``"5.26.0.dev0"`` -> ``(5, 26, 0)``)."""
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version)
    if match is None:
        raise ValueError(f"cannot read the release number of version {version!r}")
    return tuple(int(part or 0) for part in match.groups())


def check_transformers_version(version: str | None = None) -> None:
    """Check ``version`` (default: the installed transformers) against the verified range.

    Raises ``ImportError`` below the range or on a known-bad release (a ``UserWarning`` instead with
    ``HF_GPAM_SKIP_VERSION_CHECK=1``); warns above the range.
    """
    version = version or transformers.__version__
    release = release_tuple(version)
    if release >= release_tuple(TRANSFORMERS_VERIFIED_BELOW):
        reason = KNOWN_BAD_RELEASES.get(".".join(map(str, release)))
        if reason is None:
            warnings.warn(
                f"daGPAM (hf_gpam) is verified with {transformers_requirement()}; transformers {version} is newer "
                "and not verified yet. It runs: any attention keyword this code does not know raises an error rather "
                "than being ignored. Upgrading hf_gpam brings the newest verified range.",
                UserWarning,
                stacklevel=2,
            )
            return
        problem = f"daGPAM (hf_gpam) does not work with transformers {version}: {reason}"
    elif release < release_tuple(TRANSFORMERS_MIN):
        problem = f"daGPAM (hf_gpam) needs {transformers_requirement()} but transformers {version} is installed"
    else:
        return
    message = f"{problem}. Run `pip install '{transformers_requirement()}'`"
    if os.environ.get(SKIP_VERSION_CHECK_ENV) == "1":
        warnings.warn(f"{message}; continuing because {SKIP_VERSION_CHECK_ENV}=1.", UserWarning, stacklevel=2)
        return
    raise ImportError(f"{message}, or set {SKIP_VERSION_CHECK_ENV}=1 to try this version anyway.")
