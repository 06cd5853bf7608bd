"""bench/run_all.py runs every speed and memory benchmark in bench/: a new benchmark file that is
left out of its list (as lora_memory and judge_throughput once were) fails here."""
import ast
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _constants() -> dict:
    tree = ast.parse((BENCH / "run_all.py").read_text())
    return {t.id: ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
            for t in node.targets if isinstance(t, ast.Name) and t.id in {"BENCHES", "TINY_ONLY", "MEASURE_REWARDS"}}


def test_run_all_lists_every_benchmark_once():
    c = _constants()
    files = {p.stem for p in BENCH.glob("*.py")} - {"harness", "run_all"}
    assert len(c["BENCHES"]) == len(set(c["BENCHES"]))
    assert set(c["BENCHES"]) | c["MEASURE_REWARDS"] == files, "add the new benchmark to bench/run_all.py"
    assert not set(c["BENCHES"]) & c["MEASURE_REWARDS"] and c["TINY_ONLY"] <= set(c["BENCHES"])


def test_benchmarks_given_model_accept_it():
    c = _constants()
    for name in set(c["BENCHES"]) - c["TINY_ONLY"]:
        src = (BENCH / f"{name}.py").read_text()
        assert "bench_parser(" in src or '"--model"' in src, f"bench/{name}.py gets --model from run_all.py"
