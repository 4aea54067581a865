"""The README's Python example runs as written."""

import re
from pathlib import Path


def test_readme_example_runs(tmp_path, monkeypatch):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    example = re.search(r"## Use it from Python.*?```python\n(.*?)```", readme, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(example, "README.md", "exec"), namespace)
    trainer = namespace["trainer"]
    pruned = sum(int((~m).sum()) for m in trainer.masks.values())
    assert pruned == round(0.95 * namespace["report"]["prunable"]["numel"])
    assert (tmp_path / "resnet18-tgp-95" / "sparsity.json").is_file()
