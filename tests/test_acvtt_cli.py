"""CLI round trip on a small real CT crop (tptbox spine CT, 1.5 mm)."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from acvtt_core.checkpoint import CheckpointMeta, save_checkpoint
from acvtt_core.cli import app
from acvtt_core.config import ModelConfig
from acvtt_core.model import ACVTT

pytestmark = pytest.mark.usefixtures("torch_one_thread")


sitk = pytest.importorskip("SimpleITK")


@pytest.fixture(scope="module")
def thick_ct(tmp_path_factory):
    """A 4.5 mm 'thick' crop of the real spine CT (every 3rd slice), with oblique-free geometry."""
    try:
        from dicom_node.devtools.sample_data import fetch_sample_data

        src = fetch_sample_data().spine_ct
    except Exception as exc:  # network-less machine without the cache
        pytest.skip(f"sample data unavailable: {exc}")
    img = sitk.ReadImage(str(src))
    arr = sitk.GetArrayFromImage(img)[:31:3, :40, :48]  # (11, 40, 48)
    out = sitk.GetImageFromArray(arr.astype(np.int16))
    sx, sy, sz = img.GetSpacing()
    out.SetSpacing((sx, sy, sz * 3))
    out.SetOrigin(img.GetOrigin())
    out.SetDirection(img.GetDirection())
    folder = tmp_path_factory.mktemp("ct")
    path = folder / "thick.nii.gz"
    sitk.WriteImage(out, str(path))
    thin = sitk.GetImageFromArray(sitk.GetArrayFromImage(img)[:25, :40, :48].astype(np.int16))
    thin.SetSpacing(img.GetSpacing())
    sitk.WriteImage(thin, str(folder / "thin.nii.gz"))
    return path, arr


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    cfg = ModelConfig(width=4, n_refs=2, mrnla_levels=(0,), fusion_width=4)
    m = ACVTT(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.02 * torch.randn_like(p))
    meta = CheckpointMeta(preset="tiny", model=cfg, factors=[3])
    return save_checkpoint(tmp_path_factory.mktemp("ck") / "tiny.safetensors", m, meta)


def test_interpolate_round_trip(thick_ct, tiny_checkpoint, tmp_path):
    src, arr = thick_ct
    out = tmp_path / "thin.nrrd"
    res = CliRunner().invoke(
        app,
        [
            "interpolate",
            str(src),
            str(out),
            "--factor",
            "3",
            "--checkpoint",
            str(tiny_checkpoint),
            "--device",
            "cpu",
        ],
    )
    assert res.exit_code == 0, res.output
    a, b = sitk.ReadImage(str(src)), sitk.ReadImage(str(out))
    assert b.GetSize() == (48, 40, (11 - 1) * 3 + 1)
    assert b.GetPixelID() == sitk.sitkInt16
    np.testing.assert_allclose(
        b.GetSpacing(), (a.GetSpacing()[0], a.GetSpacing()[1], a.GetSpacing()[2] / 3), rtol=1e-6
    )
    np.testing.assert_allclose(b.GetOrigin(), a.GetOrigin())
    np.testing.assert_allclose(b.GetDirection(), a.GetDirection())
    thin = sitk.GetArrayFromImage(b)
    np.testing.assert_array_equal(thin[::3], arr)  # out[k*R] is in[k]
    # Physical position of output slice k*R equals that of input slice k.
    for k in (0, 5, 10):
        pa = a.TransformIndexToPhysicalPoint((0, 0, k))
        pb = b.TransformIndexToPhysicalPoint((0, 0, 3 * k))
        np.testing.assert_allclose(pa, pb, atol=1e-4)


def test_eval_and_bench_commands(thick_ct, tiny_checkpoint, tmp_path):
    src, _ = thick_ct
    runner = CliRunner()
    out = tmp_path / "eval.json"
    thin = src.parent / "thin.nii.gz"
    res = runner.invoke(
        app,
        [
            "eval",
            "--data",
            str(thin),
            "--factor",
            "2",
            "--checkpoint",
            str(tiny_checkpoint),
            "--device",
            "cpu",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert {r["method"] for r in data["rows"]} == {"linear", "cubic", "acvtt"}
    assert "acvtt_gain_db_vs_best_baseline" in data["summary"]["x2"]
    assert data["model"]["precision"] == "fp32"  # auto on CPU
    bf16_out = tmp_path / "eval_bf16.json"
    args = ["eval", "--data", str(thin), "--factor", "2", "--checkpoint", str(tiny_checkpoint)]
    res = runner.invoke(
        app, [*args, "--device", "cpu", "--precision", "bf16", "--out", str(bf16_out)]
    )
    assert res.exit_code == 0, res.output
    bf16 = json.loads(bf16_out.read_text())
    assert bf16["model"]["precision"] == "bf16"
    acvtt = {d["model"]["precision"]: next(r for r in d["rows"] if r["method"] == "acvtt")
             for d in (data, bf16)}  # fmt: skip
    assert acvtt["bf16"]["psnr"] != acvtt["fp32"]["psnr"]  # the option reached the model
    assert abs(acvtt["bf16"]["psnr"] - acvtt["fp32"]["psnr"]) < 1.0
    bj = tmp_path / "bench.json"
    res = runner.invoke(
        app,
        [
            "bench",
            "--checkpoint",
            str(tiny_checkpoint),
            "--shape",
            "4,32,40",
            "--factor",
            "3",
            "--device",
            "cpu",
            "--slow-samples",
            "2",
            "--out",
            str(bj),
        ],
    )
    assert res.exit_code == 0, res.output
    b = json.loads(bj.read_text())
    assert b["seconds"] > 0 and b["speedup_vs_authors_loop"] > 0 and b["matmul_fp32_gflops"] > 0
    assert b["flops"]["total_paper"] > 0


def test_train_command_resumes(tmp_path):
    vol = (np.random.default_rng(0).normal(0, 300, (13, 24, 24))).astype(np.int16)
    img = sitk.GetImageFromArray(vol)
    data = tmp_path / "v.nii.gz"
    sitk.WriteImage(img, str(data))
    args = [
        "train",
        "--sampler",
        "synthetic-z",
        "--data",
        str(data),
        "--out",
        str(tmp_path / "run"),
        "--width",
        "4",
        "--refs",
        "1",
        "--levels",
        "0",
        "--factor",
        "2",
        "--crop",
        "16",
        "--batch-size",
        "2",
        "--device",
        "cpu",
        "--log-every",
        "1",
        "--ckpt-every",
        "2",
    ]
    runner = CliRunner()
    assert runner.invoke(app, [*args, "--steps", "2"]).exit_code == 0
    res = runner.invoke(app, [*args, "--steps", "4"])
    assert res.exit_code == 0, res.output
    steps = [
        json.loads(x)["step"] for x in (tmp_path / "run/train_log.jsonl").read_text().splitlines()
    ]
    assert steps == [1, 2, 3, 4]
    meta = json.loads((tmp_path / "run/model.json").read_text())
    assert meta["training_data"]["volumes"] == ["v"] and meta["factors"] == [2]


def test_read_dicom_series_folder():
    try:
        from dicom_node.devtools.sample_data import fetch_sample_data

        folder = fetch_sample_data().ct_dicom_repaired
    except Exception as exc:
        pytest.skip(f"sample data unavailable: {exc}")
    from acvtt_core.volume_io import read_volume

    vol, geom = read_volume(folder)
    assert vol.shape == (20, 512, 512)
    assert abs(geom.spacing[2] - 2.0) < 0.01
    assert geom.upsampled_z(4).spacing[2] == pytest.approx(geom.spacing[2] / 4)


def test_read_volume_returns_slices_ascending_along_the_normal(tmp_path):
    """A file stored feet-first along its normal reads as the same ascending array and geometry
    as the head-first file of the same voxels."""
    from acvtt_core.volume_io import read_volume

    arr = np.random.default_rng(0).integers(-1000, 1000, (6, 5, 4)).astype(np.int16)
    ascending = sitk.GetImageFromArray(arr)
    ascending.SetSpacing((0.7, 0.8, 3.0))
    ascending.SetOrigin((1.0, 2.0, 3.0))
    descending = sitk.GetImageFromArray(np.ascontiguousarray(arr[::-1]))
    descending.SetSpacing((0.7, 0.8, 3.0))
    descending.SetOrigin((1.0, 2.0, 3.0 + 3.0 * 5))
    descending.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, -1))
    for name, img in (("a.nii.gz", ascending), ("d.nrrd", descending)):
        sitk.WriteImage(img, str(tmp_path / name))
    # The two files hold the same voxel at the same place.
    np.testing.assert_allclose(
        ascending.TransformIndexToPhysicalPoint((1, 2, 0)),
        descending.TransformIndexToPhysicalPoint((1, 2, 5)),
    )
    va, ga = read_volume(tmp_path / "a.nii.gz")
    vd, gd = read_volume(tmp_path / "d.nrrd")
    np.testing.assert_array_equal(va, arr)
    np.testing.assert_array_equal(vd, arr)
    assert ga.slices_ascend_along_normal and gd.slices_ascend_along_normal
    np.testing.assert_allclose(gd.origin, ga.origin)
    np.testing.assert_allclose(gd.direction, ga.direction, atol=1e-12)
    np.testing.assert_allclose(gd.spacing, ga.spacing)


# -- issue 16: the documented bench commands, and one error line for every failure -------------
DOCS = __import__("pathlib").Path(__file__).resolve().parents[1] / "docs" / "ACVTT.md"


def _documented_bench_commands() -> list[list[str]]:
    """The `acvtt bench` command lines of docs/ACVTT.md, as argument lists (usage synopses, which
    have [optional] parts, left out)."""
    import shlex

    lines = [ln.strip() for ln in DOCS.read_text().splitlines()]
    return [shlex.split(ln)[1:] for ln in lines if ln.startswith("acvtt bench ") and "[" not in ln]


def _run_main(argv, capsys) -> tuple[int, str, str]:
    """`acvtt ARGV` in this process: (exit code, stderr, stdout)."""
    from acvtt_core.cli import main

    with pytest.raises(SystemExit) as ex:
        main([str(a) for a in argv])
    cap = capsys.readouterr()
    return ex.value.code, cap.err, cap.out


def test_documented_bench_commands_run(thick_ct, tmp_path, capsys):
    """Every bench command docs/ACVTT.md gives runs with the same flags (small shapes, and the
    small real CT crop for --input). The paper preset has no shipped weights: it is timed with
    random-initialised weights and says so (it used to fail on the default checkpoint)."""
    src, _ = thick_ct
    commands = _documented_bench_commands()
    assert len(commands) >= 3 and any("paper" in c for c in commands)
    for i, argv in enumerate(commands):
        small = {"--shape": "3,24,24", "--input": str(src), "--device": "cpu"}
        argv = [small.get(argv[j - 1], a) if j else a for j, a in enumerate(argv)]
        if "--device" in argv and "cpu" not in argv:
            continue  # the CUDA command (tests/test_acvtt_cuda.py and scripts/gpu_train.sh)
        out = tmp_path / f"bench{i}.json"
        code, err, stdout = _run_main(
            [*argv, "--device", "cpu", "--threads", "1", "--out", out], capsys
        )
        assert code == 0, err
        res = json.loads(out.read_text())
        preset = argv[argv.index("--preset") + 1]
        assert res["seconds"] > 0 and res["cpu_seconds"] > 0 and res["flops"]["total_paper"] > 0
        assert res["model"]["width"] == {"paper": 64, "compact": 8}[preset]
        if preset == "paper":
            assert res["weights"]["source"] == "random-init"
            assert "weights: random init" in stdout
        if "--skip-slow" not in argv:
            assert res["speedup_vs_authors_loop"] > 0 and res["speedup_vs_authors_loop_cpu"] > 0


def _assert_one_error_line(code: int, err: str, *needles: str) -> None:
    assert code not in (0, None), err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: "), err
    for n in needles:
        assert n in last, last


def test_failures_end_in_one_error_line(thick_ct, tmp_path, capsys):
    src, _ = thick_ct
    bad_ckpt = tmp_path / "bad.safetensors"
    bad_ckpt.write_bytes(b"not a safetensors file")
    cases = [
        (["interpolate", tmp_path / "missing.nii.gz", tmp_path / "o.nii.gz", "--factor", "2"],
         ["missing.nii.gz"]),
        (["interpolate", src, tmp_path / "o.nii.gz", "--factor", "2", "--checkpoint", bad_ckpt],
         ["bad"]),
        (["interpolate", src, tmp_path / "o.nii.gz", "--factor", "2", "--checkpoint",
          tmp_path / "none.safetensors"], ["none.safetensors"]),
        (["bench", "--shape", "12,160", "--skip-slow"], ["--shape", "12,160"]),
        (["bench", "--shape", "a,b,c", "--skip-slow"], ["--shape"]),
        (["bench", "--preset", "nope", "--skip-slow"], ["nope"]),
        (["eval", "--data", tmp_path / "missing.nrrd", "--baselines-only"], ["missing.nrrd"]),
        (["interpolate", src, tmp_path / "o.nii.gz"], ["--factor"]),
        (["no-such-command"], ["no-such-command"]),
        (["train", "--data", src, "--out", tmp_path / "run", "--factor", "x"], ["--factor"]),
    ]  # fmt: skip
    if not torch.cuda.is_available():
        cases.append((["train", "--data", src, "--out", tmp_path / "run", "--device", "cuda"],
                      ["CUDA"]))  # fmt: skip
    for argv, needles in cases:
        code, err, _ = _run_main(argv, capsys)
        _assert_one_error_line(code, err, *needles)
    assert not (tmp_path / "o.nii.gz").exists()


def test_console_script_prints_no_traceback(tmp_path):
    """The installed `acvtt` entry point itself (a real process): one line, exit 1."""
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).parent / "acvtt"
    argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "acvtt_core.cli"]
    p = subprocess.run(
        [*argv, "interpolate", str(tmp_path / "missing.nrrd"), str(tmp_path / "o.nrrd"), "-r", "2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    _assert_one_error_line(p.returncode, p.stderr, "missing.nrrd")
    assert p.stderr.strip().count("\n") == 0


def test_train_stage2_refuses_a_leaking_predictor_then_trains_fusion(tmp_path, capsys):
    """The one `acvtt train`: stage 1 with a named sampler, then stage 2 (fusion samples) from
    that checkpoint. The stage-1 model saw the volume, so its results there would leak: refused
    with one error line, allowed with --allow-leak, and only the fusion net changes."""
    vol = (np.random.default_rng(0).normal(0, 300, (13, 24, 24))).astype(np.int16)
    data = tmp_path / "v.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(vol), str(data))
    common = ["--data", data, "--width", "4", "--refs", "1", "--levels", "0", "--factor", "2"]
    common += ["--crop", "16", "--batch-size", "2", "--device", "cpu", "--steps", "2"]
    s1 = tmp_path / "s1"
    code, err, _ = _run_main(["train", *common, "--sampler", "synthetic-z", "--out", s1], capsys)
    assert code == 0, err
    stage2 = ["train", *common, "--stage", "2", "--init", s1 / "model.safetensors"]
    code, err, _ = _run_main([*stage2, "--out", tmp_path / "s2"], capsys)
    _assert_one_error_line(code, err, "leaked", "['v']")
    code, err, _ = _run_main([*stage2, "--out", tmp_path / "s2", "--allow-leak"], capsys)
    assert code == 0, err
    from acvtt_core.checkpoint import load_checkpoint

    m1, _, _ = load_checkpoint(s1 / "model.safetensors")
    m2, meta2, _ = load_checkpoint(tmp_path / "s2" / "model.safetensors")
    assert meta2.training_data["volumes"] == ["v"] and "stage1" in meta2.extra["training"]
    for k, v in m1.stage1.state_dict().items():
        assert torch.equal(m2.stage1.state_dict()[k], v)
    assert any(not torch.equal(m2.fusion.state_dict()[k], v)
               for k, v in m1.fusion.state_dict().items())  # fmt: skip
    code, err, _ = _run_main(["train", *common, "--sampler", "nope", "--out", s1], capsys)
    _assert_one_error_line(code, err, "nope")
