"""The README's Python code blocks run as written (so they cannot rot)."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_the_own_model_examples():
  assert len(BLOCKS) >= 2 and any("nnx" in b for b in BLOCKS)


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_block_runs(i, tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  exec(compile(BLOCKS[i], f"README block {i}", "exec"), {"__name__": "__readme__"})
  files = list(tmp_path.glob("*.lqz"))
  assert files and all(f.stat().st_size > 0 for f in files)
