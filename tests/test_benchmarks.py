"""The benchmarks' shared parts: the one ResNet-50 shape list, the harness's
rounds and flag errors, the LARS designs' agreement with float64, and the
memory benchmark end to end at a tiny size (no timing is asserted)."""

import json
import math
import os
import subprocess
import sys
import types

import pytest

from benchmarks import harness

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *arguments],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
        timeout=300,
    )


def test_resnet50_shapes_are_the_apps_models():
    from train import models

    variables = models.build_model("resnet50", 1000, 224).trainable_variables
    stored = json.loads(harness.SHAPES_FILE.read_text())

    assert [entry["path"] for entry in stored] == [v.path for v in variables]
    assert harness.resnet50_shapes() == [tuple(v.shape) for v in variables]
    assert len(variables) == 161
    assert sum(math.prod(v.shape) for v in variables) == 25_557_032


def test_scaled_shapes_shrink_channels_but_not_kernels_inputs_or_classes():
    shapes = harness.resnet50_shapes(scale=0.05)

    assert shapes[:3] == [(7, 7, 3, 3), (3,), (3,)]  # 64 channels -> 3
    assert shapes[-2:] == [(102, 1000), (1000,)]  # 2048 -> 102; 1000 classes kept


def test_rounds_start_at_the_next_candidate():
    calls = []
    candidates = {
        name: (lambda name=name: calls.append(name) or name) for name in "abc"
    }

    results = harness.interleave(candidates, rounds=3)

    assert calls == list("abcbcacab")
    assert results == {"a": ["a"] * 3, "b": ["b"] * 3, "c": ["c"] * 3}


def test_summary_and_ratio_by_hand():
    stats = harness.ratio([2.0, 6.0, 3.0, 8.0], [1.0, 2.0, 1.0, 2.0])

    assert stats["rounds"] == [2.0, 3.0, 3.0, 4.0]
    assert (stats["median"], stats["min"], stats["max"]) == (3.0, 2.0, 4.0)
    assert (stats["p25"], stats["p75"]) == (2.75, 3.25)  # NumPy's linear rule


def test_a_flag_error_is_one_line_and_exit_status_2():
    result = _run("benchmarks.optimizer_step", "--scenarios=float32,nope")

    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "--scenarios" in result.stderr and "mixed_bfloat16" in result.stderr


def test_every_lars_design_matches_float64_in_graph_mode():
    from benchmarks.lars_update_designs import DESIGNS, check_designs

    errors = check_designs(jit_modes=("graph",))

    assert set(errors) == {(name, "graph") for name in ["LARS", *DESIGNS]}
    assert max(errors.values()) < 1e-5  # of the displacement; a 0.1% norm: 1e-3


def test_optimizer_memory_writes_both_candidates(tmp_path):
    output = tmp_path / "memory.json"
    result = _run(
        "benchmarks.optimizer_memory",
        "--rounds=1",
        "--steps=1",
        "--scale=0.05",
        f"--output={output}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(output.read_text())

    assert record["benchmark"] == "optimizer_memory"
    assert record["machine"]["cores"] >= 1
    assert set(record["figures"]) == {"lars", "sgd"}
    for figures in record["figures"].values():
        assert figures["resident_mb"]["median"] > 100  # TensorFlow alone is more
        assert figures["step_peak_mb"]["rounds"][0] >= 0


def test_a_failed_results_write_is_one_line_and_keeps_the_previous_file(
    tmp_path, monkeypatch, capsys
):
    path = tmp_path / "figures.json"
    path.write_text('{"figures": "previous"}\n')

    def full_disk(self, text, *args, **kwargs):
        with open(self, "w") as file:
            file.write(text[:10])  # Half written, then the disk is full.
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(harness.Path, "write_text", full_disk)
    # The flag's value without parsing absl's flags in this shared process.
    monkeypatch.setattr(harness, "FLAGS", types.SimpleNamespace(output=str(path)))
    with pytest.raises(SystemExit) as exit_info:
        harness.write_results("optimizer_memory", {"lars": 1.0})

    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    assert stderr.count("\n") == 1
    assert f"--output: could not write {path}: No space left on device" in stderr
    assert path.read_text() == '{"figures": "previous"}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figures.json"]
