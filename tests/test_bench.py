"""tools/bench.py --quick runs end to end and writes every section with positive numbers.

No timing assertions: this machine is shared, and the numbers are BENCHMARKS.md's business.
"""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def test_quick_bench_writes_every_section(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "bench.py"), "--quick", f"--out={out}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=90,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())

    machine = result["machine"]
    for key in ("cores", "clock_ghz", "memory_gib", "peak_fp32_flops", "peak_bf16_flops"):
        assert _positive(machine[key]), key
    assert machine["cpu_model"] and machine["commit"]

    (flops,) = result["flops"].values()
    assert _positive(flops["forward_per_image"])
    for stage in ("head", "top2", "all", "extract", "head_on_features"):
        assert _positive(flops["train_per_image"][stage]), stage
    assert flops["train_per_image"]["head"] < flops["train_per_image"]["top2"] < flops["train_per_image"]["all"]

    rows = {(r["impl"], r["stage"], r["precision"], r["jit_compile"]): r for r in result["train"]}
    for key in [("baseline", "all", "float32", False), ("baseline", "head", "float32", False),
                ("kft", "head", "float32", False), ("kft", "top2", "float32", False),
                ("kft", "all", "float32", False), ("kft", "head", "mixed_bfloat16", False),
                ("kft", "head", "float32", True), ("feature_cache", "extract", "float32", False),
                ("feature_cache", "head", "float32", False)]:
        assert key in rows, key
    for row in result["train"]:
        assert len(row["step_s"]) == 2 and len(row["cpu_s"]) == 2
        for key in ("step_s_median", "images_per_s", "flops_per_image", "achieved_flops",
                    "peak_fraction", "first_step_s"):
            assert _positive(row[key]), (row["row"], key)
    assert rows[("kft", "all", "float32", False)]["l2sp"]

    (cache,) = result["feature_cache"]
    assert all(_positive(v) for v in cache["epoch_s"].values())
    assert _positive(cache["cached_later_epochs_vs_all"])

    assert [s["stage"] for s in result["stage_change"]] == ["head", "top2", "all"]
    for change in result["stage_change"]:
        for key in ("setup_s", "first_step_s", "change_s", "epoch_s", "stage_s",
                    "fraction_of_stage", "fraction_of_one_epoch"):
            assert _positive(change[key]), (change["stage"], key)
        # The validation step is traced in the first stage only (kft.trainer.train reuses it).
        assert _positive(change["first_eval_s"]) == (change["stage"] == "head"), change

    sources = {p["source"].split()[0] + p["source"].split()[1] for p in result["pipeline"]}
    assert sources == {"tfds:cifar10(mock_data)", "folder:JPEG", "folder:PNG"}
    for pipe in result["pipeline"]:
        for key in ("images", "first_pass_images_per_s", "cached_pass_images_per_s",
                    "first_pass_vs_step", "cached_pass_vs_step"):
            assert _positive(pipe[key]), (pipe["source"], key)

    (precision,) = result["precision_xla"]
    assert set(precision["images_per_s"]) == {"float32", "mixed_bfloat16", "float32 + XLA"}
    assert all(_positive(v) for v in precision["images_per_s"].values())

    assert {t["id"] for t in result["targets"]} == {"1", "2a", "2b", "3", "3-first", "4", "5"}
    for target in result["targets"]:
        assert isinstance(target["met"], bool) and _positive(target["worst"]), target["id"]
    assert "targets:" in proc.stdout and _positive(result["wall_s"])
