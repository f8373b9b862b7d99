"""The README's Python examples run as they are."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    for args in (["--rows", "20000"], ["--rows", "5000", "--sample-seed", "1"]):
        name = "clicks" if "--sample-seed" not in args else "test"
        out = tmp_path / "data" / "synthetic" / f"{name}.parquet"
        proc = subprocess.run(
            [sys.executable, "-m", "mtrec", "datasets", "synthetic", *args, "--output", str(out)],
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stderr
    section = (ROOT / "README.md").read_text().split("## Python", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) >= 3
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    ranked = namespace["ranked"]
    assert ranked.height == 1000
    scores = ranked.get_column("score").to_numpy()
    assert (scores[:-1] >= scores[1:]).all()
    assert set(namespace["logits"]) == {"ctr", "cvr", "satisfaction"}
    assert namespace["logits"]["ctr"].shape == (4,)
