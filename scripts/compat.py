#!/usr/bin/env python3
"""Run the test modules of every feature against each transformers release of the verified range, one venv each.

    make compat                                              # the default range and test modules
    make compat COMPAT_VERSIONS="5.23.0 5.24.0" COMPAT_TESTS=tests/test_ops.py
    python scripts/compat.py --versions 5.24.0 --tests tests/test_ops.py tests/test_models.py

For each version, ``.compat/venv-<version>`` is created (a clean virtual environment, no system site-packages) or
reused when it already holds the same torch, transformers and ``pyproject.toml``. Into it go torch
(``--torch-spec``, the Makefile's ``TORCH_SPEC``), then hf_gpam in editable mode with its ``[all,dev,serving]`` extras
under a constraints file that pins ``transformers==<version>`` and the torch just installed, so that no dependency can
move either. A version outside the range ``pyproject.toml`` declares therefore fails to install: widen the
requirement first, then verify it here.

The default tests are the core modules and the features that differ most between releases: the attention backends
and continuous batching (``tests/test_backends.py``) and ``hf-gpam serve`` (``tests/test_serving.py``, its
``serving`` marker selected). In each venv the record of the keywords that release hands to attention functions
(``tests/fixtures/attention_keywords.json``, read by tests/test_contract.py) is refreshed first, and pytest writes
a JUnit file, from which the report says which features each release runs.

The versions run one after the other (each pytest run is single-threaded work on a shared machine and the results
must not depend on what runs beside them), one pytest run per version, from the repository root. The import gate
is part of what is verified, so ``HF_GPAM_SKIP_VERSION_CHECK`` is removed from the tests' environment unless
``--keep-skip-version-check`` is given, in which case the report says so. The script prints a version × result
table, writes it with the date, torch version and command to ``docs/compat.md`` (``--output``), and exits with
status 1 when any version fails to install or has a failing test.

Only the standard library is used, so any Python >= 3.10 can run it without an environment.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_VERSIONS = ("5.19.0", "5.20.2", "5.21.1", "5.22.2", "5.23.0", "5.24.0", "5.25.0")
DEFAULT_TESTS = (
    "tests/test_ops.py",
    "tests/test_models.py",
    "tests/test_generation.py",
    "tests/test_hub.py",
    "tests/test_patching.py",
    "tests/test_peft.py",
    "tests/test_interface.py",
    "tests/test_eager_autograd.py",
    "tests/test_config.py",
    "tests/test_promises.py",
    "tests/test_decoders.py",
    "tests/test_rope.py",
    "tests/test_contract.py",
    "tests/test_backends.py",
    "tests/test_edges.py",
    "tests/test_loading.py",
    "tests/test_serving.py",
)
# test module -> the feature it verifies, the columns of the report's feature table
FEATURES = {
    "test_ops": "daGPAM math",
    "test_models": "GPT-2 / BART / Marian",
    "test_decoders": "decoder families",
    "test_generation": "generate",
    "test_hub": "save / remote code",
    "test_patching": "patch_model",
    "test_peft": "PEFT / QLoRA",
    "test_interface": "attention interface",
    "test_eager_autograd": "eager autograd",
    "test_config": "config",
    "test_promises": "README promises",
    "test_rope": "RoPE",
    "test_contract": "keyword contract",
    "test_backends": "flex, paged eager, continuous batching",
    "test_edges": "flash name, inference_mode, padded generate",
    "test_loading": "checkpoint checks",
    "test_serving": "hf-gpam serve",
}
# the extras installed into each venv: the test suite's, and transformers serve for tests/test_serving.py
EXTRAS = "all,dev,serving"
# the markers of the default test run, with the serving tests selected (slow and vLLM tests stay out)
PYTEST_MARKERS = "not slow and not vllm"
KEYWORD_RECORD = "tests/fixtures/attention_keywords.json"
DEFAULT_TORCH_SPEC = "torch==2.13.0"
SKIP_VERSION_CHECK_ENV = "HF_GPAM_SKIP_VERSION_CHECK"
# pytest's final line, e.g. "3 failed, 120 passed, 4 warnings in 95.31s (0:01:35)" or "no tests ran in 0.01s"
_SUMMARY_LINE = re.compile(r"^=*\s*(?P<body>.*?)\s+in\s+(?P<seconds>[\d.]+)s\b.*$")
_COUNT = re.compile(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|deselected|warnings?|rerun)\b")


@dataclass
class PytestSummary:
    """The counts of pytest's final summary line."""

    passed: int = 0
    failed: int = 0
    errors: int = 0
    skipped: int = 0
    xfailed: int = 0
    xpassed: int = 0
    deselected: int = 0
    seconds: float = 0.0


def parse_pytest_summary(output: str) -> PytestSummary | None:
    """The counts of the last pytest summary line in ``output``; ``None`` when there is none (pytest crashed).

    Example:

    ```python
    >>> parse_pytest_summary("...\\n===== 1 failed, 12 passed, 2 errors, 3 warnings in 4.56s =====\\n")
    PytestSummary(passed=12, failed=1, errors=2, skipped=0, xfailed=0, xpassed=0, deselected=0, seconds=4.56)
    ```
    """
    for line in reversed(output.strip().splitlines()):
        match = _SUMMARY_LINE.match(line.strip())
        if not match:
            continue
        body = match.group("body")
        counts = {}
        for number, word in _COUNT.findall(body):
            # pytest says "1 error" / "2 errors" and "1 warning" / "2 warnings"
            key = {"error": "errors", "warning": "warnings"}.get(word, word)
            counts[key] = int(number)
        if not counts and "no tests ran" not in body:
            continue
        counts.pop("warnings", None)
        counts.pop("rerun", None)
        return PytestSummary(**counts, seconds=float(match.group("seconds")))
    return None


@dataclass
class VersionResult:
    """What one transformers version gave: installed versions, the pytest counts and the wall-clock time."""

    transformers: str
    torch: str = "?"
    summary: PytestSummary | None = None
    exit_status: int | None = None
    seconds: float = 0.0
    problem: str = ""
    log_path: str = ""
    # test module -> (passed, failed or errored, skipped), from pytest's JUnit file
    modules: dict[str, tuple[int, int, int]] | None = None

    @property
    def ok(self) -> bool:
        return not self.problem and self.exit_status == 0 and self.summary is not None and self.summary.failed == 0

    @property
    def outcome(self) -> str:
        if self.problem:
            return f"FAIL ({self.problem})"
        if self.summary is None:
            return f"FAIL (pytest exit status {self.exit_status}, no summary line; see the log)"
        return "pass" if self.ok else f"FAIL (pytest exit status {self.exit_status})"


def markdown_table(results: list[VersionResult]) -> str:
    """The version × result table (one row per transformers version), in GitHub markdown.

    Example:

    ```python
    >>> row = VersionResult("5.24.0", "2.13.0", PytestSummary(passed=10, seconds=3.0), exit_status=0, seconds=4.2)
    >>> print(markdown_table([row]).splitlines()[2])
    | 5.24.0 | 2.13.0 | 10 | 0 | 0 | 0 | 4.2 | pass |
    ```
    """
    lines = [
        "| transformers | torch | passed | failed | errors | skipped | seconds | result |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for result in results:
        summary = result.summary
        counts = (
            [summary.passed, summary.failed, summary.errors, summary.skipped] if summary else ["–"] * 4
        )
        cells = [result.transformers, result.torch, *map(str, counts), f"{result.seconds:.1f}", result.outcome]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_report(
    results: list[VersionResult],
    *,
    command: str,
    tests: list[str],
    missing_tests: list[str],
    kept_skip_version_check: bool,
    date: str | None = None,
    python_version: str | None = None,
) -> str:
    """The text of ``docs/compat.md``: what was run, on what, and the table."""
    date = date or datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    # a version that failed to install has no torch to report
    torch_versions = ", ".join(sorted({r.torch for r in results if r.torch != "?"})) or "?"
    lines = [
        "# transformers compatibility",
        "",
        "The test modules of the core and of the features that differ between releases (attention backends and",
        "continuous batching, hf-gpam serve), run once per transformers release of the verified range, each release",
        "in its own virtual environment (`scripts/compat.py`; the default test run uses one release only).",
        "",
        f"- date: {date}",
        f"- torch: {torch_versions}; Python {python_version or platform.python_version()}",
        f"- command: `{command}`",
        f"- tests: {', '.join(f'`{t}`' for t in tests)} (markers: `{PYTEST_MARKERS}`)",
    ]
    if missing_tests:
        lines.append(f"- not in the tree yet, so not run: {', '.join(f'`{t}`' for t in missing_tests)}")
    if kept_skip_version_check:
        lines.append(
            f"- **{SKIP_VERSION_CHECK_ENV}=1 was kept**: the import gate was bypassed, so this table does not "
            "verify it"
        )
    lines += ["", markdown_table(results), ""]
    if any(r.modules for r in results):
        lines += [
            "## Features per release",
            "",
            "Each column is one test module (the feature it verifies); \"yes\": every test of it passed on that release.",
            "",
            feature_table(results, tests),
            "",
        ]
    return "\n".join(lines)


def _run_logged(command: list[str], log, **kwargs) -> int:
    log.write(f"$ {shlex.join(map(str, command))}\n")
    log.flush()
    return subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, **kwargs).returncode


def _tail(path: Path, lines: int = 25) -> str:
    return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])


def _venv_python(venv_dir: Path) -> Path:
    return venv_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _probe(python: Path, *distributions: str) -> dict[str, str]:
    """The installed versions of ``distributions`` in the venv of ``python``, read from their metadata (importing
    torch and transformers would take seconds, and importing hf_gpam would run its version gate)."""
    code = (
        "import importlib.metadata as m, json; "
        f"print(json.dumps({{d: m.version(d) for d in {list(distributions)!r}}}))"
    )
    output = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def ensure_environment(version: str, torch_spec: str, compat_dir: Path) -> tuple[Path, dict]:
    """Create (or reuse) ``compat_dir/venv-<version>`` and return its python and the installed versions.

    Raises ``RuntimeError`` with the tail of the install log when a step fails or pip resolved another
    transformers than ``version``.
    """
    venv_dir = compat_dir / f"venv-{version}"
    python = _venv_python(venv_dir)
    marker = venv_dir / "hf_gpam-compat.json"
    wanted = {
        "transformers": version,
        "torch_spec": torch_spec,
        "extras": EXTRAS,
        # a changed pyproject.toml (requirements, extras) means a re-install
        "pyproject_sha256": hashlib.sha256((REPO_ROOT / "pyproject.toml").read_bytes()).hexdigest(),
    }
    if python.is_file() and marker.is_file() and json.loads(marker.read_text()).get("wanted") == wanted:
        return python, _probe(python, "torch", "transformers")

    venv_dir.mkdir(parents=True, exist_ok=True)
    log_path = venv_dir / "install.log"
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check"]
    with open(log_path, "w", encoding="utf-8") as log:

        def step(command: list[str], what: str) -> None:
            if _run_logged(command, log, cwd=REPO_ROOT) != 0:
                log.flush()
                raise RuntimeError(f"{what} failed; the end of {log_path}:\n{_tail(log_path)}")

        if not python.is_file():
            step([sys.executable, "-m", "venv", str(venv_dir)], "creating the virtual environment")
        step([*pip, torch_spec], f"pip install {torch_spec}")
        torch_version = _probe(python, "torch")["torch"]
        constraints = venv_dir / "constraints.txt"
        # the [all] extras (peft, accelerate...) must not replace the transformers under test nor the torch build
        constraints.write_text(f"transformers=={version}\ntorch=={torch_version}\n", encoding="utf-8")
        step(
            [*pip, "-c", str(constraints), "-e", f".[{EXTRAS}]"],
            f"pip install -e '.[{EXTRAS}]' with transformers=={version}",
        )
    installed = _probe(python, "torch", "transformers")
    if installed["transformers"] != version:
        raise RuntimeError(f"pip installed transformers {installed['transformers']} in {venv_dir}, not {version}")
    marker.write_text(json.dumps({"wanted": wanted, "installed": installed}, indent=2), encoding="utf-8")
    return python, installed


def pytest_environment(keep_skip_version_check: bool) -> dict[str, str]:
    """The environment of a pytest run: the caller's, offline, without anything that reaches outside the venv."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    if not keep_skip_version_check:
        # the import gate is part of what a compatibility run verifies
        env.pop(SKIP_VERSION_CHECK_ENV, None)
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def run_version(version: str, args: argparse.Namespace, tests: list[str]) -> VersionResult:
    result = VersionResult(transformers=version)
    started = time.perf_counter()
    try:
        python, installed = ensure_environment(version, args.torch_spec, args.compat_dir)
    except (RuntimeError, subprocess.CalledProcessError, OSError) as error:
        result.problem = "install failed"
        print(f"[compat] transformers {version}: {error}", file=sys.stderr)
        result.seconds = time.perf_counter() - started
        return result
    result.torch = installed["torch"]
    log_path = args.compat_dir / f"pytest-{version}.log"
    result.log_path = str(log_path)
    print(f"[compat] transformers {version} (torch {result.torch}): pytest {' '.join(tests)}", flush=True)
    test_started = time.perf_counter()
    junit_path = args.compat_dir / f"junit-{version}.xml"
    env = pytest_environment(args.keep_skip_version_check)
    with open(log_path, "w", encoding="utf-8") as log:
        if args.refresh_keywords:
            # the keywords this release hands to attention functions, for tests/test_contract.py
            _run_logged(
                [str(python), "-m", "tests.attention_keywords", "--update", KEYWORD_RECORD], log, cwd=REPO_ROOT, env=env
            )
        result.exit_status = _run_logged(
            [str(python), "-m", "pytest", "-q", "--color=no", "-p", "no:cacheprovider", "-m", PYTEST_MARKERS,
             f"--junitxml={junit_path}", *tests],
            log,
            cwd=REPO_ROOT,
            env=env,
        )
    result.seconds = time.perf_counter() - test_started
    result.summary = parse_pytest_summary(log_path.read_text(encoding="utf-8", errors="replace"))
    result.modules = module_results(junit_path) if junit_path.is_file() else None
    print(f"[compat] transformers {version}: {result.outcome} in {result.seconds:.1f}s (log: {log_path})", flush=True)
    return result


def module_results(junit_path: Path) -> dict[str, tuple[int, int, int]]:
    """Test module -> (passed, failed or errored, skipped), read from a pytest JUnit file."""
    import xml.etree.ElementTree as ElementTree

    counts: dict[str, list[int]] = {}
    for case in ElementTree.parse(junit_path).getroot().iter("testcase"):
        # classname: "tests.test_backends" or "tests.test_backends.TestClass"
        parts = case.get("classname", "").split(".")
        module = next((p for p in parts if p.startswith("test_")), parts[-1])
        row = counts.setdefault(module, [0, 0, 0])
        if case.find("failure") is not None or case.find("error") is not None:
            row[1] += 1
        elif case.find("skipped") is not None:
            row[2] += 1
        else:
            row[0] += 1
    return {module: tuple(row) for module, row in counts.items()}


def feature_table(results: list[VersionResult], tests: list[str]) -> str:
    """Which features each release runs: one row per release, one column per test module (``FEATURES``); a cell is
    "yes" (every test passed), "FAIL n/m", "skipped" or "–" (no result).

    Example:

    ```python
    >>> row = VersionResult("5.23.0", modules={"test_backends": (27, 1, 0)})
    >>> print(feature_table([row], ["tests/test_backends.py"]).splitlines()[2])
    | 5.23.0 | FAIL 1/28 |
    ```
    """
    modules = [Path(t).stem for t in tests]
    header = [FEATURES.get(m, m) for m in modules]
    lines = ["| transformers | " + " | ".join(header) + " |", "|---|" + "---|" * len(modules)]
    for result in results:
        cells = []
        for module in modules:
            counts = (result.modules or {}).get(module)
            if counts is None:
                cells.append("–")
            elif counts[1]:
                cells.append(f"FAIL {counts[1]}/{sum(counts)}")
            elif counts[0] == 0:
                cells.append("skipped")
            else:
                cells.append("yes")
        lines.append(f"| {result.transformers} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Run the core tests against each transformers release of the verified range, one venv each."
    )
    parser.add_argument("--versions", nargs="+", default=list(DEFAULT_VERSIONS), help="transformers releases")
    parser.add_argument("--tests", nargs="+", default=list(DEFAULT_TESTS), help="test modules, relative to the repo")
    parser.add_argument("--torch-spec", default=DEFAULT_TORCH_SPEC, help="pip requirement for torch")
    parser.add_argument(
        "--compat-dir", type=Path, default=REPO_ROOT / ".compat", help="where the venvs and logs go (gitignored)"
    )
    parser.add_argument(
        "--output", default=str(REPO_ROOT / "docs" / "compat.md"), help="the report to write; '' to write none"
    )
    parser.add_argument(
        "--no-refresh-keywords", dest="refresh_keywords", action="store_false",
        help=f"leave {KEYWORD_RECORD} as it is (by default each release's entry is recorded again)",
    )
    parser.add_argument(
        "--keep-skip-version-check",
        action="store_true",
        help=f"pass {SKIP_VERSION_CHECK_ENV} from the caller's environment to pytest (by default it is removed so "
        "that the import gate is verified too); the report says so",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for version in args.versions:
        if not re.fullmatch(r"\d+\.\d+\.\d+(\.?(dev|rc|a|b)\d+)?", version):
            print(f"compat: --versions: {version!r} is not a release number such as 5.24.0", file=sys.stderr)
            return 2
    tests = [t for t in args.tests if (REPO_ROOT / t).exists()]
    missing = [t for t in args.tests if t not in tests]
    for name in missing:
        print(f"[compat] note: {name} is not in the tree (yet); running without it", file=sys.stderr)
    if not tests:
        print(f"compat: none of the test modules exists: {' '.join(args.tests)}", file=sys.stderr)
        return 2
    args.compat_dir = args.compat_dir.resolve()
    if args.keep_skip_version_check and os.environ.get(SKIP_VERSION_CHECK_ENV) == "1":
        print(f"[compat] note: {SKIP_VERSION_CHECK_ENV}=1 kept: the import gate is not verified", file=sys.stderr)

    results = [run_version(version, args, tests) for version in args.versions]
    command = "python scripts/compat.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    report = render_report(
        results,
        command=command.strip(),
        tests=tests,
        missing_tests=missing,
        kept_skip_version_check=args.keep_skip_version_check and os.environ.get(SKIP_VERSION_CHECK_ENV) == "1",
    )
    print()
    print(markdown_table(results))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(report, encoding="utf-8")
        print(f"\n[compat] written to {args.output}")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
