"""The ``tcpade`` command: fast --help, --version, one-line missing-extra messages, and
``tcpade bench`` on a tiny pipeline saved with save_pretrained and on a zoo model."""

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import tcpade
from tcpade import cli

ROOT = Path(__file__).resolve().parents[1]


def _env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _tcpade(args, cwd, timeout=300, python=None, check=True):
    proc = subprocess.run([python or sys.executable, "-m", "tcpade", *args], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _table(stdout):
    """{method: (passes, fewer, wall, psnr, ssim)} from a printed results table."""
    rows = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) == 6 and "/" in parts[1] and parts[2].endswith("x"):
            rows[parts[0]] = parts[1:]
    return rows


@pytest.mark.parametrize("args", [["--help"], ["demo", "--help"], ["bench", "--help"], ["--version"]])
def test_help_and_version_import_no_torch(args):
    code = (
        "import sys, time; t0 = time.perf_counter(); from tcpade.cli import main\n"
        f"try:\n    main({args!r})\nexcept SystemExit as e:\n    assert e.code in (0, None), e.code\n"
        "heavy = [m for m in ('torch', 'diffusers', 'numpy', 'matplotlib') if m in sys.modules]\n"
        "print('HEAVY', heavy, 'SECONDS', round(time.perf_counter() - t0, 3))"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY [] " in proc.stdout, proc.stdout
    if args == ["--version"]:
        assert f"tcpade {tcpade.__version__}" in proc.stdout
    elif args == ["--help"]:
        assert "demo" in proc.stdout and "bench" in proc.stdout
    else:
        assert f"usage: tcpade {args[0]}" in proc.stdout


def test_version_matches_the_installed_metadata():
    from importlib.metadata import version

    assert version("tcpade") == tcpade.__version__


def test_unknown_command_and_no_command(capsys):
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'; choose from demo, bench" in capsys.readouterr().err
    assert cli.main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_subcommand_table_is_the_one_extension_point():
    names = [n for n, _, _ in cli.SUBCOMMANDS]
    assert names[:2] == ["demo", "bench"] and len(set(names)) == len(names)
    for _, module, help_line in cli.SUBCOMMANDS:
        mod = __import__(module, fromlist=["add_cli"])
        assert callable(mod.add_cli) and callable(mod.run_cli) and help_line


@pytest.mark.parametrize("command, missing, extra", [("demo", "diffusers", "demo"), ("demo", "PIL", "demo"),
                                                     ("demo", "safetensors", "demo"), ("bench", "matplotlib", "demo")])
def test_missing_extra_is_one_line_naming_the_extra(tmp_path, command, missing, extra):
    # The module is made unimportable (None in sys.modules), as on an install without the extra.
    args = ["demo", "--repeats", "1", "--steps", "2"] if command == "demo" else ["bench", "flux-digits"]
    code = (
        f"import sys; sys.modules[{missing!r}] = None\n"
        "from tcpade.cli import main\n"
        f"sys.exit(main({args!r}))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    expected = f"tcpade {command}: needs {missing}, which is not installed; install the extra: pip install 'tcpade[{extra}]'"
    assert lines[-1] == expected and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_progress_bar_only_when_asked_or_on_a_terminal():
    import io

    out = io.StringIO()
    bar = cli.Progress(3, "job", enabled=True, stream=out)
    for name in ("a", "b", "c"):
        bar.step(name)
    bar.close()
    text = out.getvalue()
    assert "\rjob [" in text and "3/3" in text and "#" * 24 in text
    quiet = io.StringIO()
    bar = cli.Progress(3, "job", stream=quiet)  # a StringIO is not a terminal
    bar.step("a")
    bar.close()
    assert quiet.getvalue() == ""


def test_config_specs():
    from tcpade.bench import parse_config

    assert parse_config("fast") == tcpade.TCPadeConfig.fast()
    assert parse_config("fast:interval=3") == tcpade.TCPadeConfig.fast(interval=3)
    assert parse_config("fast:level=output") == tcpade.TCPadeConfig.fast(level="output")
    cfg = parse_config("warmup=1,interval=3,max_skips=2,final_steps=0,policy=tsi,input_correction=none")
    assert (cfg.warmup, cfg.interval, cfg.policy, cfg.input_correction) == (1, 3, "tsi", None)
    assert parse_config("store_predictions=true").store_predictions is True
    with pytest.raises(TypeError, match=r"TCPadeConfig\.pole_delta must be a number, got str 'abc'"):
        parse_config("pole_delta=abc")
    with pytest.raises(ValueError, match=r"unknown TCPadeConfig field\(s\) \['warmpu'\]"):
        parse_config("warmpu=2")
    with pytest.raises(ValueError, match="unknown preset 'quick'"):
        parse_config("quick:warmup=2")
    with pytest.raises(ValueError, match="'interval' is not key=value"):
        parse_config("warmup=2,interval")


def test_bench_bad_arguments_are_usage_errors(capsys):
    for args, msg in [
        (["bench", "flux-digits", "--config", "pole_delta=2"], "TCPadeConfig.pole_delta must be in (0, 1), got 2"),
        (["bench", "no-such-model"], "'no-such-model' is neither a pipeline folder nor a zoo model"),
        (["bench", "flux-digits", "--labels", "12"], "--labels: flux-digits has classes 0..9, got [12]"),
        (["bench", "flux-digits", "--prompt", "a fox"], "takes class labels, not prompts"),
        (["bench", "flux-digits", "--steps", "1"], "--steps must be >= 2"),
    ]:
        with pytest.raises(SystemExit) as info:
            cli.main(args)
        assert info.value.code == 2
        assert msg in capsys.readouterr().err, args


def tiny_class_pipeline():
    """A tiny random-weight DiTPipeline (class-conditional, batched CFG), built from configs."""
    from diffusers import DDIMScheduler, DiTPipeline
    from tcpade import tiny

    return DiTPipeline(transformer=tiny.transformer("dit"), vae=tiny.tiny_vae(8), scheduler=DDIMScheduler())


def test_bench_on_a_saved_pipeline(tmp_path):
    pytest.importorskip("diffusers")
    pytest.importorskip("matplotlib")
    folder = tmp_path / "tiny-dit"
    tiny_class_pipeline().save_pretrained(folder)
    t0 = time.perf_counter()
    proc = _tcpade(["bench", str(folder), "--labels", "1,7", "--seeds", "0,3", "--steps", "8", "--threads", "1",
                    "--presets", "slow,fast", "--config", "warmup=1,interval=3,policy=tsi,final_steps=0",
                    "--out", "out"], tmp_path)  # fmt: skip
    print(proc.stdout, f"({time.perf_counter() - t0:.1f} s)")
    assert "DiTPipeline, DiTTransformer2DModel" in proc.stdout and "4 sample(s), 8 steps" in proc.stdout
    rows = _table(proc.stdout)
    assert list(rows) == ["full", "slow", "fast", "warmup=1,interval=3,po"]  # names cut at 22 characters
    # 8 steps: slow (2.5x) and fast (2.9x) both round to 3 of 8 passes, raised to 4 (0, 1, 3, 6) so that
    # at most 3 steps in a row are predicted; warm-up 1, every 3rd, no final step: 0, 1, 3, 6: 4 of 8.
    assert [r[0] for r in rows.values()] == ["8/8", "4/8", "4/8", "4/8"]
    assert rows["fast"][1] == "2.00x" and rows["full"][3] == "inf"
    for name in ("slow", "fast"):
        assert float(rows[name][3]) > 0 and 0 < float(rows[name][4]) <= 1  # finite, against the full run
    # Nothing on stderr but what torchao (in the test environment, not in the demo's) prints
    # when diffusers imports it; .ci/run checks that the demo prints nothing there at all.
    noise = ("torchao", "_pytree.py", "register_constant")
    assert [ln for ln in proc.stderr.splitlines() if not any(n in ln for n in noise)] == [], proc.stderr[-2000:]
    with open(tmp_path / "out" / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["method"] for r in table][:3] == ["full", "slow", "fast"] and table[2]["passes"] == "4.0"
    for name in ("grid.png", "quality_speed.png"):
        assert (tmp_path / "out" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    w, h = Image.open(tmp_path / "out" / "grid.png").size
    assert h > 4 * 8 and w > 4 * 8  # four rows (methods), four columns (samples)


def tiny_prompt_pipeline():
    """A tiny random-weight WanPipeline that takes prompts: a word-level tokenizer and a one-layer
    UMT5 text encoder built from configs (nothing downloaded); cond / uncond as two calls."""
    import torch
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline
    from tcpade import tiny
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    words = "a red fox in the snow lighthouse at dusk".split()
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=32, num_layers=1,
                                               num_heads=2))  # fmt: skip
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])  # fmt: skip
    return WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=tiny.transformer("wan", num_layers=2),
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0))  # fmt: skip


def test_bench_on_a_saved_prompt_pipeline(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("matplotlib")
    folder = tmp_path / "tiny-wan"
    tiny_prompt_pipeline().save_pretrained(folder)
    proc = _tcpade(["bench", str(folder), "--prompt", "a red fox in the snow", "--steps", "6", "--height", "32",
                    "--width", "32", "--num-frames", "5", "--presets", "fast", "--threads", "1", "--out", "out"],
                   tmp_path)  # fmt: skip
    print(proc.stdout)
    assert "WanPipeline, WanTransformer3DModel" in proc.stdout and "1 sample(s), 6 steps" in proc.stdout
    rows = _table(proc.stdout)
    # fast at 6 steps: round(6 / 2.9) = 2 passes, raised to 3 (0, 1, 4: at most 3 steps predicted in a
    # row), in each CFG branch.
    assert rows["full"][0] == "6/6" and rows["fast"][0] == "3/6", proc.stdout
    assert float(rows["fast"][3]) > 0, proc.stdout
    assert (tmp_path / "out" / "grid.png").stat().st_size > 500


def test_bench_on_a_zoo_model(tmp_path):
    pytest.importorskip("matplotlib")
    proc = _tcpade(["bench", "dit-faces", "--labels", "0,1", "--steps", "20", "--presets", "fast", "--threads", "1",
                    "--out", "out"], tmp_path)  # fmt: skip
    print(proc.stdout)
    rows = _table(proc.stdout)
    # fast at 20 steps: 7 of 20 passes, on the zoo's calibrated schedule for this model.
    assert rows["full"][0] == "20/20" and rows["fast"][0] == "7/20" and rows["fast"][1] == "2.86x"
    # A trained model: the skipped steps are predicted well (20 steps: 27.5 dB in bench/results/quality.md).
    assert float(rows["fast"][3]) > 15 and float(rows["fast"][4]) > 0.5, proc.stdout
    assert (tmp_path / "out" / "grid.png").stat().st_size > 1000
