"""The README and docs say what the code does: the family table lists exactly the table's families and classes, the
Layout section names every module, and every private transformers / torch name the package uses is listed with
what breaks if it changes (docs/private_api.md)."""

import re
from pathlib import Path

import hf_gpam
from hf_gpam.modeling.configuration_gpam_decoders import DECODER_FAMILIES


ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def readme_section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end]


def family_rows() -> dict[str, str]:
    """stock model type -> its row of the Supported architectures table."""
    rows = {}
    for line in readme_section("Supported architectures").splitlines():
        match = re.match(r"\| [^|]*?\(`(\w+)`[^|]*\|", line)
        if match:
            rows[match.group(1)] = line
    return rows


def test_readme_family_table_lists_exactly_the_table_families():
    rows = family_rows()
    assert set(rows) == set(hf_gpam.ARCHITECTURES), sorted(set(rows) ^ set(hf_gpam.ARCHITECTURES))
    for model_type, architecture in hf_gpam.ARCHITECTURES.items():
        gpam_cell = rows[model_type].split("|")[2]
        # the first class is named in full, the others by their family prefix ("GpamMistral…") or full name
        first = list(architecture.model_classes.values())[0].__name__
        prefix = re.match(r"Gpam[A-Z][A-Za-z0-9]*?(?=Model|For|LMHead|MT)", first).group(0)
        assert first in gpam_cell or f"{prefix}…" in gpam_cell, (model_type, gpam_cell)


def test_readme_marks_eager_only_exactly_the_soft_capping_families():
    rows = family_rows()
    eager_only = {model_type for model_type, row in rows.items() if "eager only" in row}
    soft_capped = {t for t, family in DECODER_FAMILIES.items() if family.softcap_attribute is not None}
    assert eager_only == soft_capped == {"gemma2"}


def test_readme_layout_names_every_module_of_the_package():
    layout = readme_section("Layout")
    for path in sorted((ROOT / "hf_gpam").rglob("*.py")):
        name = path.name
        if name == "__init__.py" and path.parent.name == "modeling":
            continue
        stem = path.stem
        # configuration_gpam_{gpt2,bart,marian}.py names three files at once
        grouped = re.sub(r"_(gpt2|bart|marian)$", "_{gpt2,bart,marian}", stem)
        assert name in layout or f"{grouped}.py" in layout, f"README Layout does not mention hf_gpam/{path.relative_to(ROOT / 'hf_gpam')}"


def private_names_used() -> set[str]:
    """Underscore attribute / import names the package reads but does not define itself."""
    used, defined = set(), set()
    for path in (ROOT / "hf_gpam").rglob("*.py"):
        text = path.read_text()
        used |= set(re.findall(r"\.(_[A-Za-z]\w*)", text)) | set(re.findall(r"import\s+(_[A-Za-z]\w*)", text))
        defined |= set(re.findall(r"(?:def|class)\s+(_\w+)", text))
        defined |= set(re.findall(r"^\s*(_[A-Za-z]\w*)\s*[:=]", text, re.MULTILINE))
        defined |= set(re.findall(r"self\.(_\w+)\s*=", text))
    # torch's own namespace for private C bindings, reached as torch._C
    return used - defined - {"_C"}


def test_every_private_name_the_package_uses_is_documented():
    documented = (ROOT / "docs" / "private_api.md").read_text()
    used = private_names_used()
    assert "_CAN_RECORD_REGISTRY" in used and "_unsafe_preserve_version_counter" in used
    missing = sorted(name for name in used if f"{name}`" not in documented and f"{name}(" not in documented)
    assert not missing, f"private names used but not listed in docs/private_api.md: {missing}"


# --- prose lists of families -------------------------------------------------------------------------------------

# how prose names each decoder family ("Qwen2/3" names two); a family added to the table needs its entry here
FAMILY_NAMES = {
    "llama": r"\bLlama\b", "mistral": r"\bMistral\b", "qwen2": r"\bQwen2\b|Qwen2/3", "qwen3": r"\bQwen3\b|Qwen2/3",
    "gemma2": r"\bGemma2\b|Gemma2/3", "gemma3_text": r"\bGemma3\b|Gemma2/3", "phi3": r"\bPhi-?3\b",
    "gpt_neox": r"GPT-?NeoX", "opt": r"\bOPT\b", "olmo2": r"\bOL[Mm]o2\b|\bOlmo2\b",
}
# every file whose prose may list the families
PROSE_FILES = [
    ROOT / "README.md", ROOT / "recipes" / "README.md", ROOT / "pyproject.toml",
    *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "hf_gpam").rglob("*.py")),
    *sorted((ROOT / "recipes").glob("*.py")), *sorted((ROOT / "benchmarks").glob("*.py")),
]


def family_subsets() -> dict[str, set[str]]:
    """The sets of decoder families a prose list may name, each computed from the table and transformers: all of
    them, the RoPE families (their stock attention takes position_embeddings), those transformers reads GGUF files of."""
    import importlib
    import inspect

    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    rope = set()
    for model_type, family in DECODER_FAMILIES.items():
        module = importlib.import_module(f"transformers.models.{family.package}.modeling_{family.package}")
        if "position_embeddings" in inspect.signature(getattr(module, family.attention_class).forward).parameters:
            rope.add(model_type)
    return {
        "every decoder family": set(DECODER_FAMILIES),
        "the RoPE families": rope,
        "the families with a GGUF reader": {t for t, f in DECODER_FAMILIES.items() if f.package in GGUF_CONFIG_MAPPING},
    }


def test_family_names_cover_the_table():
    assert set(FAMILY_NAMES) == set(DECODER_FAMILIES)
    assert family_subsets()["the RoPE families"] == set(DECODER_FAMILIES) - {"opt"}


def test_every_prose_list_of_families_names_a_set_the_table_defines():
    # a paragraph naming five or more decoder families is a list of them: it must be complete, or exactly one of the
    # subsets the table and transformers define, so that a family added to the table fails here until every list
    # that should name it does
    subsets = family_subsets()
    stale = []
    lists_seen = 0
    for path in PROSE_FILES:
        for paragraph in re.split(r"\n\s*\n", path.read_text()):
            named = {t for t, pattern in FAMILY_NAMES.items() if re.search(pattern, paragraph)}
            if len(named) < 5:
                continue
            lists_seen += 1
            if named not in subsets.values():
                missing = ", ".join(sorted(set(DECODER_FAMILIES) - named))
                stale.append(f"{path.relative_to(ROOT)}: {paragraph.strip()[:80]!r}... lacks {missing}")
    assert lists_seen >= 8, lists_seen
    assert not stale, "\n".join(stale)
