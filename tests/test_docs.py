"""The documentation site builds without a warning, and the Python examples of its pages run as written."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# pages whose ```python blocks are run; CONTRIBUTING.md (docs/contributing.md) shows a method class to copy, not a
# program, and the benchmark pages hold commands only
EXECUTED_PAGES = [
    "index.md",
    "usage.md",
    "methods.md",
    "recipe.md",
    "saving.md",
    "inference.md",
    "failures.md",
    "sharded.md",
]


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), re.S | re.M)


def run_page(page: str, tmp_path, monkeypatch) -> dict:
    """Run every ```python block of `docs/<page>` in order, in one namespace, from an empty folder."""
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for i, block in enumerate(python_blocks(DOCS / page)):
        exec(compile(block, f"docs/{page} (block {i + 1})", "exec"), namespace)
    return namespace


def test_every_docs_page_is_listed_here_or_in_the_nav():
    """A new page is either executed here or deliberately not; nothing slips through."""
    pages = {p.name for p in DOCS.glob("*.md")}
    assert pages - set(EXECUTED_PAGES) == {"contributing.md", "architectures.md", "benchmarks.md"}
    assert not python_blocks(DOCS / "architectures.md") and not python_blocks(DOCS / "benchmarks.md")


@pytest.mark.parametrize("page", [p for p in EXECUTED_PAGES if python_blocks(DOCS / p)])
def test_docs_page_examples_run(page, tmp_path, monkeypatch):
    namespace = run_page(page, tmp_path, monkeypatch)
    if page == "usage.md":  # the trainer, the functional core and the Pruner in a plain loop
        trainer, pruner, student = namespace["trainer"], namespace["pruner"], namespace["student"]
        assert sum(int((~m).sum()) for m in trainer.masks.values()) == round(
            0.95 * trainer.pruning_report["prunable"]["numel"]
        )
        assert (tmp_path / "resnet18-tgp-95" / "sparsity.json").is_file()
        params = dict(student.named_parameters())
        assert all(int(params[n][~m].count_nonzero()) == 0 for n, m in pruner.masks.items())
        assert namespace["report"]["pruned_by_mask"] == round(0.9 * namespace["report"]["prunable"]["numel"])
        assert (tmp_path / "pruning-state" / "pruning_state.safetensors").is_file()
    if page == "inference.md":
        assert namespace["report"].sparse_layers and namespace["report"].max_abs_error < 1e-4


def test_docs_site_builds_without_warnings(tmp_path):
    """`mkdocs build --strict`: a broken link, a page missing from the nav or a docstring that does not match its
    signature fails the build."""
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "site" / "api" / "pruner" / "index.html").is_file()
    assert "compute_masks" in (tmp_path / "site" / "api" / "pruner" / "index.html").read_text()
