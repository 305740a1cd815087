"""scripts/gpu_check.py and scripts/gpu_check.sh on CPU: argument parsing, the JSON it writes (a failing or slow
section is recorded and the others still run), the quick refusal without CUDA, and one tiny section end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import gpu_check  # noqa: E402

SCRIPT = ROOT / "scripts" / "gpu_check.sh"
HEADLINE_KEYS = {  # issue 17's keys, and the rest of what gpu.json promises at its top level
    "cuda_delete_exact", "stacked_train_speedup_gpu", "stacked_vs_looped_gpu_b64", "delete_k1_seconds_gpu",
    "speedup_k8_vs_monolithic_gpu", "gpu_vs_cpu_shard_throughput", "gpu_tests_passed",
    "stacked_train_speedup_gpu_b512", "stacked_vs_looped_gpu_b1", "stacked_vs_looped_gpu_b4096",
}  # fmt: skip
ENV_KEYS = {
    "device",
    "torch",
    "cuda",
    "python",
    "cublas_workspace_config",
    "device_kind",
    "quick",
    "budget_s",
}


# ---- argument parsing -------------------------------------------------------------------------------------------
def test_defaults_run_every_section_on_cuda_within_the_budget(tmp_path):
    a = gpu_check.parse_args(["--out", str(tmp_path)])
    assert a.device == "cuda" and not a.quick and a.out == tmp_path
    assert a.sections == list(gpu_check.SECTIONS)
    assert a.sections[:2] == ["gpu_tests", "exactness"]  # correctness first
    assert a.budget == 420.0  # + imports, under the shell's 470 s hard stop and the 8 minutes
    assert gpu_check.parse_args(["--out", "x", "--quick"]).budget == 150.0


def test_only_keeps_the_listed_order_and_budget_and_device_parse():
    a = gpu_check.parse_args(
        ["--out", "x", "--only", "deletion,inference", "--budget", "30", "--device", "cpu"]
    )
    assert a.sections == ["inference", "deletion"] and a.budget == 30.0 and a.device == "cpu"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--only", "exactness,nope"], "unknown sections ['nope']"),
        ([], "--out"),
        (["--device", "tpu"], "tpu"),
    ],
)
def test_bad_arguments_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        gpu_check.parse_args(argv if not argv or argv[0] == "--out" else ["--out", "x", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_device_flag_is_hidden_from_help(capsys):
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--help"])
    options = capsys.readouterr().out.split("options:")[1]
    assert "--quick" in options and "--budget" in options and "--device" not in options


# ---- JSON: structure, errors, time caps --------------------------------------------------------------------------
def _fine(ctx, res):
    res["stacked_vs_looped_gpu_b64"] = 3.5
    res["delete_k1_seconds_gpu"] = 0.25
    res["cuda_delete_exact"] = True


def _broken(ctx, res):
    res["partial"] = 1
    raise RuntimeError("CUDA error: an illegal memory access was encountered")


def _slow(ctx, res):
    time.sleep(30)


def test_a_failing_section_records_its_error_and_the_rest_still_run(tmp_path):
    fake = {"first": (_broken, 60, 60), "second": (_fine, 60, 60)}
    args = gpu_check.parse_args(["--out", str(tmp_path / "o"), "--device", "cpu", "--quick"])
    args.sections = list(fake)
    result = gpu_check.run(args, fake)
    on_disk = json.loads((tmp_path / "o" / "gpu.json").read_text())
    assert on_disk == result
    assert HEADLINE_KEYS | ENV_KEYS | {"targets", "sections", "seconds"} <= set(result)
    first, second = result["sections"]["first"], result["sections"]["second"]
    assert first["error"] == "RuntimeError: CUDA error: an illegal memory access was encountered"
    assert first["partial"] == 1 and "Traceback" in first["traceback"]  # what it had measured is kept
    assert "error" not in second and second["seconds"] >= 0
    # headline keys come from the sections; those no section produced are null, never invented
    assert result["stacked_vs_looped_gpu_b64"] == 3.5 and result["cuda_delete_exact"] is True
    assert result["stacked_train_speedup_gpu"] is None and result["gpu_vs_cpu_shard_throughput"] is None
    t = result["targets"]
    assert set(t) == {*gpu_check.TARGETS, "cuda_delete_exact"}
    assert t["stacked_vs_looped_gpu_b64"] == {"target": ">= 3.0", "value": 3.5, "met": True}
    assert t["delete_k1_seconds_gpu"] == {"target": "<= 0.1", "value": 0.25, "met": False}
    assert t["stacked_train_speedup_gpu"]["met"] is None
    assert t["cuda_delete_exact"]["met"] is True
    assert result["device"] == "cpu" and result["device_kind"] == "cpu"


def test_a_section_past_its_cap_is_stopped_and_the_budget_skips_the_rest(tmp_path):
    fake = {"slow": (_slow, 1, 1), "second": (_fine, 60, 60), "third": (_fine, 60, 60)}
    args = gpu_check.parse_args(["--out", str(tmp_path), "--device", "cpu", "--budget", "1.5"])
    args.sections = list(fake)
    t0 = time.perf_counter()
    result = gpu_check.run(args, fake)
    assert time.perf_counter() - t0 < 5
    assert result["sections"]["slow"]["error"] == "SectionTimeout: section ran past its time cap"
    assert result["sections"]["slow"]["seconds"] < 2
    # the second section gets what is left of the budget (< 1 s: skipped), and so does the third
    assert result["sections"]["third"]["error"] == "skipped: the run's time budget is spent"
    assert result["delete_k1_seconds_gpu"] is None


def test_exactness_overall_is_false_if_any_scenario_differs_and_null_if_none_ran():
    assert gpu_check._overall([True, True]) is True
    assert gpu_check._overall([True, False, None]) is False
    assert gpu_check._overall([True, None]) is None  # a scenario that did not run proves nothing
    assert gpu_check._overall([]) is None


# ---- the shell entry point without CUDA --------------------------------------------------------------------------
def _sh(tmp_path, path_prefix: str = "", python: str | None = None):
    env = {**os.environ, "PATH": f"{path_prefix}{os.environ['PATH']}"}
    if python:
        env["PYTHON"] = python
    t0 = time.perf_counter()
    p = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], env=env, capture_output=True, text=True)
    return p, time.perf_counter() - t0


def test_shell_without_nvidia_smi_refuses_at_once(tmp_path):
    if any((Path(d) / "nvidia-smi").exists() for d in os.environ["PATH"].split(os.pathsep)):
        pytest.skip("this machine has nvidia-smi")
    p, seconds = _sh(tmp_path)
    assert p.returncode == 2 and seconds < 1.0
    assert "no CUDA here: nvidia-smi is not on PATH" in p.stderr
    assert "no CUDA here" in (tmp_path / "out" / "gpu_check.log").read_text()
    assert not (tmp_path / "out" / "gpu.json").exists()


def test_shell_with_a_gpu_driver_but_a_cpu_torch_refuses(tmp_path):
    """nvidia-smi present (a fake), torch without CUDA: the torch probe refuses, before any section starts."""
    if gpu_check.torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: Fake'\n")
    (fake / "nvidia-smi").chmod(0o755)
    p, seconds = _sh(tmp_path, f"{fake}{os.pathsep}", sys.executable)
    assert p.returncode == 2 and seconds < 15
    assert "torch.cuda.is_available() is False" in p.stderr
    assert not (tmp_path / "out" / "gpu.json").exists()


def test_shell_usage():
    p = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True)
    assert p.returncode == 64 and "usage: bash scripts/gpu_check.sh OUTDIR" in p.stderr


# ---- one section end to end, on CPU ------------------------------------------------------------------------------
def test_quick_exactness_section_on_cpu_end_to_end_without_serving_or_cluster_modules(tmp_path):
    """The exactness section compares real runs bit for bit; the whole path imports no FastAPI, uvicorn or Dask."""
    code = (
        "import sys; sys.path.insert(0, 'scripts'); import gpu_check; "
        f"rc = gpu_check.main(['--out', {str(tmp_path)!r}, '--quick', '--device', 'cpu', '--only', 'exactness']); "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'fastapi', 'uvicorn', 'starlette', 'dask', 'distributed'}); "
        "print('EXTRAS', bad); sys.exit(rc)"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "EXTRAS []" in p.stdout
    result = json.loads((tmp_path / "gpu.json").read_text())
    ex = result["sections"]["exactness"]
    assert "error" not in ex
    assert set(ex["scenarios"]) == {"mlp/loop/first_slice", "mlp/stacked/first_slice"}
    assert all(s["exact"] is True for s in ex["scenarios"].values())
    assert result["cuda_delete_exact"] is True and result["targets"]["cuda_delete_exact"]["met"] is True
    assert result["sections_run"] == ["exactness"] and set(result["sections"]) == {"exactness"}


def test_exactness_records_a_bit_difference_as_false_and_a_crash_as_unknown(tmp_path, monkeypatch):
    import tests.test_exactness as te

    calls = []

    def fake(tmp, df, cfg, choose):
        calls.append((cfg.training.executor, cfg.training.device, cfg.training.stack_size))
        if cfg.training.executor == "loop":
            raise AssertionError("0/slice-000/model.safetensors:net.0.weight differs")
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(te, "delete_and_compare", fake)
    args = gpu_check.parse_args(["--out", str(tmp_path), "--device", "cpu", "--quick"])
    res: dict = {}
    gpu_check.exactness(gpu_check.Context(args, tmp_path / "w", 10), res)
    assert calls == [("loop", "cpu", None), ("stacked", "cpu", 3)]
    loop, stacked = res["scenarios"]["mlp/loop/first_slice"], res["scenarios"]["mlp/stacked/first_slice"]
    assert loop["exact"] is False and "differs" in loop["why"]
    assert stacked["exact"] is None and stacked["error"] == "RuntimeError: CUDA out of memory"
    assert res["cuda_delete_exact"] is False
