"""tools/bench.py --quick and tools/gpu_check.sh --smoke run end to end and write every
section with positive numbers.

No timing assertions: this machine is shared, and the numbers are BENCHMARKS.md's business.
"""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def test_quick_bench_writes_every_section(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "bench.py"), "--quick", f"--out={out}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
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
    for key in [
        ("baseline", "all", "float32", False),
        ("baseline", "head", "float32", False),
        ("kft", "head", "float32", False),
        ("kft", "top2", "float32", False),
        ("kft", "all", "float32", False),
        ("kft", "head", "mixed_bfloat16", False),
        ("kft", "head", "float32", True),
        ("feature_cache", "extract", "float32", False),
        ("feature_cache", "head", "float32", False),
    ]:
        assert key in rows, key
    for row in result["train"]:
        assert len(row["step_s"]) == 2 and len(row["cpu_s"]) == 2
        for key in (
            "step_s_median",
            "images_per_s",
            "flops_per_image",
            "achieved_flops",
            "peak_fraction",
            "first_step_s",
        ):
            assert _positive(row[key]), (row["row"], key)
    assert rows[("kft", "all", "float32", False)]["l2sp"]

    (cache,) = result["feature_cache"]
    assert all(_positive(v) for v in cache["epoch_s"].values())
    assert _positive(cache["cached_later_epochs_vs_all"])

    assert [s["stage"] for s in result["stage_change"]] == ["head", "top2", "all"]
    for change in result["stage_change"]:
        for key in (
            "setup_s",
            "first_step_s",
            "change_s",
            "epoch_s",
            "stage_s",
            "fraction_of_stage",
            "fraction_of_one_epoch",
        ):
            assert _positive(change[key]), (change["stage"], key)
        # The validation step is traced in the first stage only (kft.trainer.train reuses it).
        assert _positive(change["first_eval_s"]) == (change["stage"] == "head"), change

    sources = {p["source"].split()[0] + p["source"].split()[1] for p in result["pipeline"]}
    assert sources == {"tfds:cifar10(mock_data)", "folder:JPEG", "folder:PNG"}
    for pipe in result["pipeline"]:
        for key in (
            "images",
            "first_pass_images_per_s",
            "cached_pass_images_per_s",
            "first_pass_vs_step",
            "cached_pass_vs_step",
        ):
            assert _positive(pipe[key]), (pipe["source"], key)

    (precision,) = result["precision_xla"]
    assert set(precision["images_per_s"]) == {"float32", "mixed_bfloat16", "float32 + XLA"}
    assert all(_positive(v) for v in precision["images_per_s"].values())

    assert {t["id"] for t in result["targets"]} == {"1", "2a", "2b", "3", "3-first", "4", "5"}
    for target in result["targets"]:
        assert isinstance(target["met"], bool) and _positive(target["worst"]), target["id"]
    assert "targets:" in proc.stdout and _positive(result["wall_s"])


def _gpu_present() -> bool:
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def test_gpu_check_smoke_writes_every_field(tmp_path):
    """tools/gpu_check.sh --smoke: the GPU check's code path on tiny sizes, on any device."""
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(
        [os.path.join(REPO, "tools", "gpu_check.sh"), "--smoke", f"--out={out}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())

    assert result["smoke"] and result["backbone"] == "VGG16" and _positive(result["wall_s"])
    assert {"gpus", "built_with_cuda", "cuda_version", "cudnn_version"} <= set(result["device"])
    assert result["machine"]["cpu_model"] and result["machine"]["commit"]

    hlo = result["hlo"]
    # Every augmentation op lowered into the XLA train step, none through the host.
    assert set(hlo["instructions_per_op"]) == {
        "rotate",
        "crop",
        "flip",
        "rot90",
        "translate",
        "colour",
        "mixup",
        "cutmix",
    }
    assert all(count > 0 for count in hlo["instructions_per_op"].values()), hlo["instructions_per_op"]
    assert hlo["all_ops_in_hlo"] and hlo["no_host_round_trip"]
    assert not any(hlo["host_transfers"].values())

    names = {row["row"] for row in result["rows"]}
    assert names == {"baseline", "float32", "float32 + XLA", "mixed_bfloat16", "mixed_float16", "augment"}
    for row in result["rows"]:
        assert len(row["step_s"]) == 2
        for key in ("step_s_median", "images_per_s", "first_step_s"):
            assert _positive(row[key]), (row["row"], key)

    ratios = result["ratios"]
    precision = ratios["mixed_precision_auto"]
    assert precision["choice"] in ("none", "bfloat16", "float16") and precision["reason"]
    assert set(precision["each_vs_float32"]) == {"float32", "mixed_bfloat16", "mixed_float16"}
    assert precision["each_vs_float32"]["float32"] == 1.0
    assert all(_positive(v) for v in precision["each_vs_float32"].values())
    assert _positive(precision["auto_vs_float32"]) and isinstance(precision["auto_is_fastest"], bool)
    jit = ratios["jit_compile_auto"]
    assert jit["choice"] is _gpu_present() and _positive(jit["auto_vs_other"]) and jit["reason"]
    baseline = ratios["kft_vs_keras_baseline"]
    assert _positive(baseline["kft_defaults_vs_baseline"]) and _positive(baseline["kft_float32_same_xla_vs_baseline"])
    assert _positive(ratios["augmentation_on_device"]["augmented_vs_plain_step"])

    markdown = (tmp_path / "gpu_check.md").read_text()
    assert result["markdown"] == str(tmp_path / "gpu_check.md")
    for text in (
        "`--mixed_precision=auto`",
        "`--jit_compile=auto`",
        "plain Keras",
        "all in the HLO",
        "no host transfer",
        "| mixed_float16 |",
    ):
        assert text in markdown, text
    assert markdown in proc.stdout


def test_gpu_check_without_a_gpu_says_so_and_fails(tmp_path):
    if _gpu_present():
        pytest.skip("a GPU is present")
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(
        [os.path.join(REPO, "tools", "gpu_check.sh"), f"--out={out}"],
        cwd=REPO,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "gpu_check: error: no GPU found" in proc.stderr and "--smoke" in proc.stderr
    assert not out.exists()


def test_hlo_analysis_flags_a_missing_op_and_a_host_transfer():
    import importlib.util

    spec = importlib.util.spec_from_file_location("kft_bench_tool", os.path.join(REPO, "tools", "bench.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    from kft import augment

    ops = augment.OPS
    lines = [
        f'  %a{i} = f32[4]{{0}} add(%p, %p), metadata={{op_type="AddV2" op_name="finetuner/augmenter_1/{op}/add"}}'
        for i, op in enumerate(ops)
    ]
    clean = bench.analyse_hlo("\n".join(lines))
    assert clean["all_ops_in_hlo"] and clean["no_host_round_trip"]
    assert clean["instructions_per_op"] == dict.fromkeys(ops, 1)

    # Under cond/ and with a uniquified scope (mixup_1) still counts; outside the augmenter not.
    nested = lines[:4] + [
        '  %m = f32[4]{0} add(%p, %p), metadata={op_name="augmenter/cond/mixup_1/mul"}',
        '  %c = f32[4]{0} add(%p, %p), metadata={op_name="finetuner/cutmix/mul"}',
    ]
    partial = bench.analyse_hlo("\n".join(nested))
    assert partial["instructions_per_op"]["mixup"] == 1 and partial["instructions_per_op"]["cutmix"] == 0
    assert not partial["all_ops_in_hlo"]

    host = bench.analyse_hlo(
        "\n".join(lines + ["  %s = (f32[4], u32[], token[]) send(%a0, %t), channel_id=1, is_host_transfer=true"])
    )
    assert not host["no_host_round_trip"]
    assert host["host_transfers"]["send"] == 1 and host["host_transfers"]["host_transfer_flag"] == 1
