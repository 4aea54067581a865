"""The README's Python examples run as written."""

import re
from pathlib import Path


def _run_block(after: str, tmp_path, monkeypatch) -> dict:
    """Run the first ```python block of README.md that follows the text `after`; returns its namespace."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    example = re.search(re.escape(after) + r".*?```python\n(.*?)```", readme, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(example, "README.md", "exec"), namespace)
    return namespace


def test_readme_example_runs(tmp_path, monkeypatch):
    namespace = _run_block("## Quick start", tmp_path, monkeypatch)
    trainer = namespace["trainer"]
    pruned = sum(int((~m).sum()) for m in trainer.masks.values())
    assert pruned == round(0.95 * namespace["report"]["prunable"]["numel"])
    assert (tmp_path / "resnet18-tgp-95" / "sparsity.json").is_file()
