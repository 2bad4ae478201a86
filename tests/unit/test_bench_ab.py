"""benchmarks/ab.sh runs A and B in an order that puts neither side first every round."""

import os
import subprocess
from pathlib import Path

_AB = Path(__file__).resolve().parents[2] / "benchmarks" / "ab.sh"


def test_ab_order_alternates_which_side_runs_first(tmp_path):
    """A B, B A, A B, B A: a card that warms up or slows down over the session (or a cache
    the first run fills) favours neither side; plain A B A B ... puts B after A every time."""
    root, log = tmp_path / "tree", tmp_path / "order.log"
    (root / "ab_base").mkdir(parents=True)
    (root / "side.txt").write_text("A")
    (root / "ab_base" / "side.txt").write_text("B")
    (root / "ab_base" / "BASE").write_text("base\n")
    env = {**os.environ, "AB_B_DIR": str(tmp_path / "b_tree")}
    cmd = f'echo "$AB$ROUND $(cat side.txt)" >> {log}'
    subprocess.run(["bash", str(_AB), "run", "4", cmd], cwd=root, env=env, check=True,
                   capture_output=True)  # fmt: skip
    runs = log.read_text().split("\n")[:-1]
    assert runs == ["A1 A", "B1 B", "B2 B", "A2 A", "A3 A", "B3 B", "B4 B", "A4 A"]
