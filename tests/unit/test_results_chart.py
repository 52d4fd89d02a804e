"""The README's results chart is drawn by bench/chart.py from the record the README's results table cites, and the
table's numbers are that record's."""
import os
import re
import subprocess
import sys

from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "bench"))
import chart  # noqa: E402


def readme():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        return f.read()


def test_chart_from_the_readmes_record(tmp_path):
    text = readme()
    results = text.split("## Results", 1)[1].split("\n## ", 1)[0]
    record = re.search(r"\((bench/results/[^)]+\.md)\)", results).group(1)
    assert "![" in results and "docs/results.png" in results, "the README's results have no chart"
    picked = chart.pick(chart.read_table(os.path.join(REPO, record)))
    assert set(picked) == {"large", "medium"}
    for v, row in (("large", "SD3.5 Large"), ("medium", "SD3.5 Medium")):
        line = next(x for x in results.splitlines() if x.startswith(f"| {row} |"))
        ms = [float(m) for m in re.findall(r"([0-9]+\.[0-9]+) ms", line)]
        want = [picked[v][k][1] for k in ("stock BF16", "best stock", "ours")]
        assert all(abs(a - b) <= 0.051 for a, b in zip(ms[:3], want)), (line, want)  # the table rounds to 0.1
    out = tmp_path / "chart.png"
    r = subprocess.run([sys.executable, os.path.join(REPO, "bench", "chart.py"), os.path.join(REPO, record), str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    committed = Image.open(os.path.join(REPO, "docs", "results.png"))
    assert Image.open(out).size == committed.size


def test_chart_refuses_a_record_without_the_table(tmp_path):
    p = tmp_path / "r.md"
    p.write_text("# nothing\n\n| a | b |\n|---|---|\n| 1 | 2 |\n")
    r = subprocess.run([sys.executable, os.path.join(REPO, "bench", "chart.py"), str(p), str(tmp_path / "x.png")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "no table with the columns" in r.stderr
