"""The ``tcpade`` command: fast --help (no torch) for every subcommand, --version, help texts
that match the code, one-line errors with exit status 2 for every bad value, one-line
missing-extra messages, ``tcpade bench`` on a tiny pipeline saved with save_pretrained and on
a zoo model, ``tcpade calibrate`` on a saved pipeline."""

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import tcpade
from tcpade.integrations.progress import Progress
from tcpade.tools import cli
from tcpade.tools.args import ZOO_MODELS

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


HELPS = [["--help"], ["demo", "--help"], ["bench", "--help"], ["calibrate", "--help"], ["--version"]]


@pytest.mark.parametrize("args", HELPS)
def test_help_and_version_import_no_torch(args):
    code = (
        "import sys, time; t0 = time.perf_counter(); from tcpade.tools.cli import main\n"
        f"try:\n    rc = main({args!r})\nexcept SystemExit as e:\n    rc = e.code\nassert rc in (0, None), rc\n"
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


@pytest.mark.parametrize("args", [a for a in HELPS if a != ["--version"]], ids=lambda a: a[0])
def test_python_m_tcpade_help_imports_no_torch(args):
    """The real entry point: ``python -X importtime -m tcpade ... --help`` lists every module it
    imports on stderr; torch must not be among them."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "tcpade", *args], env=_env(), capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.startswith("usage: tcpade"), proc.stderr[-2000:]
    imported = {ln.rsplit("|", 1)[-1].strip() for ln in proc.stderr.splitlines() if ln.startswith("import time:")}
    assert "tcpade.tools.cli" in imported and not {m for m in imported if m.split(".")[0] == "torch"}, sorted(imported)


def _help(args, capsys):
    assert cli.main([*args, "--help"]) == 0  # COLUMNS is wide: argparse wraps no line (nor at a hyphen)
    return " ".join(capsys.readouterr().out.split())


def test_help_texts_match_the_code(capsys, monkeypatch):
    from tcpade import zoo

    monkeypatch.setenv("COLUMNS", "1000")

    # the zoo's models, known without importing torch
    assert ZOO_MODELS == {n: "images" if len(s.sample_shape) == 3 else "clips" for n, s in zoo.SPECS.items()}
    assert list(ZOO_MODELS) == zoo.names()
    demo = _help(["demo"], capsys)
    images = [n for n, s in zoo.SPECS.items() if len(s.sample_shape) == 3]
    assert f"a zoo image model: {', '.join(images)} (default flux-digits; wan-digits makes clips" in demo
    bench = _help(["bench"], capsys)
    assert f"or a zoo model: {', '.join(zoo.names())}" in bench
    # calibrate: the default search is refine (tcpade.calibrate's default), greedy removal one of the others
    import inspect

    from tcpade import calibrate as cal_module

    assert inspect.signature(cal_module.calibrate).parameters["method"].default == "refine"
    cal = _help(["calibrate"], capsys)
    assert "refine (default) for each pass count, the best evenly spaced schedule, then hill climbing" in cal
    assert "greedy greedy removal" in cal and "lazy the same removal evaluated lazily" in cal
    assert "[--method {refine,lazy,greedy,trace}]" in cal and "[--runs RUNS]" in cal
    assert "Pass counts must be in [lead, --steps]" in cal
    assert f"a zoo model ({', '.join(zoo.names())}) or a local diffusers pipeline folder" in cal


def test_version_matches_the_installed_metadata():
    from importlib.metadata import version

    assert version("tcpade") == tcpade.__version__


def test_unknown_command_and_no_command(capsys):
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'; choose from demo, bench, calibrate" in capsys.readouterr().err
    assert cli.main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


# (argv, the message on the one stderr line): every bad value of every subcommand, exit status 2.
# "empty" is an empty folder, "afile" a file that is neither a folder nor a schedules file.
CAL = ["calibrate", "flux-digits"]
# fmt: off
BAD = [
    (["frobnicate"], "tcpade: unknown command 'frobnicate'"),
    (["--bogus"], "tcpade: error: unrecognized arguments: --bogus"),
    # calibrate
    ([*CAL, "--speedup", "-2"], "tcpade calibrate: error: --speedup must be a finite number >= 1, got -2.0"),
    ([*CAL, "--speedup", "nan"], "--speedup must be a finite number >= 1, got nan"),
    ([*CAL, "--speedup", "fast"], "argument --speedup: invalid float value: 'fast'"),
    ([*CAL, "--passes", "25", "--steps", "20"], "--passes must be in [1, 20] (a schedule computes the first 1 step(s), "
                                                "and at most --steps 20), got 25"),
    ([*CAL, "--passes", "0,7"], "--passes must be in [1, 20]"),
    ([*CAL, "--passes", "2", "--steps", "1", "--predictor", "reuse"], "--passes must be in [1, 1]"),
    ([*CAL, "--passes", "7,x"], "--passes must be comma-separated integers, got '7,x'"),
    ([*CAL, "--passes", ","], "--passes must list at least one integer, got ','"),
    ([*CAL, "--passes", "3", "--speedup", "2"], "argument --speedup: not allowed with argument --passes"),
    (CAL, "one of the arguments --passes --speedup is required"),
    ([*CAL, "--passes", "2", "--steps", "0"], "--steps must be >= 1 (the 'rational' predictor computes the first 1"),
    ([*CAL, "--passes", "2", "--steps", "x"], "argument --steps: invalid int value: 'x'"),
    ([*CAL, "--passes", "7", "--seeds", "a,b"], "--seeds must be comma-separated integers, got 'a,b'"),
    ([*CAL, "--passes", "7", "--seeds", "-1"], "--seeds must be integers in [0, 2**64 - 1], got -1"),
    ([*CAL, "--passes", "7", "--seeds", ""], "--seeds must list at least one integer"),
    ([*CAL, "--passes", "7", "--predictor", "foo"], "argument --predictor: invalid choice: 'foo' (choose from"),
    ([*CAL, "--passes", "7", "--method", "dp"], "argument --method: invalid choice: 'dp'"),
    ([*CAL, "--passes", "7", "--threads", "0"], "--threads must be an int >= 1, got 0"),
    ([*CAL, "--passes", "7", "--labels", "one"], "--labels must be comma-separated integers, got 'one'"),
    ([*CAL, "--passes", "7", "--seeds", "0"], "--holdout: one seed leaves none to hold out for validation"),
    ([*CAL, "--passes", "7", "--runs", "20"], "--runs is the trace search's budget: it needs --method trace"),
    ([*CAL, "--passes", "7", "--method", "trace", "--runs", "x"], "--runs must be an int, got 'x'"),
    ([*CAL, "--passes", "7", "--method", "trace", "--runs", "1"], "--runs must be an int >= 2, got 1"),
    ([*CAL, "--passes", "7", "--holdout", "2"], "--holdout"),
    ([*CAL, "--passes", "7", "--labels", "1,2", "--seeds", "0", "--holdout", "off"],
     "--labels needs one label per seed: 2 label(s) for 1"),
    ([*CAL, "--passes", "7", "--labels", "12", "--seeds", "0", "--holdout", "off"],
     "--labels: flux-digits has classes 0..9, got [12]"),
    ([*CAL, "--passes", "7", "--prompt", "a fox"], "--prompt: zoo model flux-digits takes class labels, not prompts"),
    ([*CAL, "--passes", "7", "--out", "missing/s.json"], "--out: folder "),
    ([*CAL, "--passes", "7", "--out", "empty"], "--out: 'empty' is a folder; give a JSON file"),
    ([*CAL, "--passes", "7", "--out", "afile"], "--out: cannot merge into 'afile': Expecting value"),
    (["calibrate", "no-such-model", "--passes", "7"], "MODEL 'no-such-model' is neither a zoo model (flux-digits, "),
    (["calibrate", "empty", "--passes", "7"], "MODEL: cannot load a diffusers pipeline from 'empty'"),
    # bench
    (["bench", "flux-digits", "--steps", "1"], "tcpade bench: error: --steps must be >= 2, got 1"),
    (["bench", "flux-digits", "--steps", "x"], "argument --steps: invalid int value: 'x'"),
    (["bench", "flux-digits", "--repeats", "0"], "--repeats must be an int >= 1, got 0"),
    (["bench", "flux-digits", "--threads", "-1"], "--threads must be an int >= 1, got -1"),
    (["bench", "flux-digits", "--seeds", "a"], "--seeds must be comma-separated integers, got 'a'"),
    (["bench", "flux-digits", "--labels", "x"], "--labels must be comma-separated integers, got 'x'"),
    (["bench", "flux-digits", "--labels", "12"], "--labels: flux-digits has classes 0..9, got [12]"),
    (["bench", "flux-digits", "--prompt", "a fox"], "--prompt: zoo model flux-digits takes class labels, not prompts"),
    (["bench", "flux-digits", "--presets", "quick"], "--presets: config 'quick': unknown preset 'quick'"),
    (["bench", "flux-digits", "--presets", ","], "nothing to compare: give --presets or --config"),
    (["bench", "flux-digits", "--config", "pole_delta=2"], "--config: TCPadeConfig.pole_delta must be in (0, 1), got"),
    (["bench", "flux-digits", "--config", "warmpu=2"], "--config: config 'warmpu=2': unknown TCPadeConfig field(s)"),
    (["bench", "flux-digits", "--config", "warmup=2,interval"], "--config: config 'warmup=2,interval': 'interval' is"),
    (["bench", "flux-digits", "--config", "pole_delta=abc"], "--config: TCPadeConfig.pole_delta must be a number"),
    (["bench", "flux-digits", "--height", "32"], "--height: zoo model flux-digits has a fixed size and guidance scale"),
    (["bench", "flux-digits", "--device", "cuda"], "--device: zoo models run on the cpu, got 'cuda'"),
    (["bench", "flux-digits", "--dtype", "float16"], "--dtype: zoo models run in float32, got float16"),
    (["bench", "flux-digits", "--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
    (["bench", "flux-digits", "--out", "afile"], "--out: 'afile' exists and is not a folder"),
    (["bench", "no-such-model"], "'no-such-model' is neither a pipeline folder nor a zoo model (flux-digits, "),
    (["bench", "empty"], "TARGET: cannot load a diffusers pipeline from 'empty'"),
    (["bench", "empty", "--width", "0"], "--width must be an int >= 1, got 0"),
    (["bench", "empty", "--num-frames", "-5"], "--num-frames must be an int >= 1, got -5"),
    (["bench", "empty", "--guidance-scale", "inf"], "--guidance-scale must be a finite number, got inf"),
    (["bench", "empty", "--device", "nodevice"], "--device: "),
    # demo
    (["demo", "--steps", "1"], "tcpade demo: error: --steps must be >= 2, got 1"),
    (["demo", "--steps", "x"], "argument --steps: invalid int value: 'x'"),
    (["demo", "--repeats", "0"], "--repeats must be an int >= 1, got 0"),
    (["demo", "--threads", "0"], "--threads must be an int >= 1, got 0"),
    (["demo", "--model", "nope"], "--model: unknown zoo model 'nope'; available: flux-digits, dit-faces, flux-shapes"),
    (["demo", "--model", "wan-digits"], "--model: the demo draws images; 'wan-digits' makes clips"),
    (["demo", "--out", "afile"], "--out: 'afile' exists and is not a folder"),
    (["demo", "--bogus"], "tcpade: error: unrecognized arguments: --bogus"),
]
# fmt: on
# what importing diffusers (torchao) may print on stderr the first time, in-process
NOISE = ("torchao", "_pytree.py", "register_constant", "Failed to load", "CLIPImageProcessor", "SiglipImageProcessor")


@pytest.fixture
def bad_inputs_dir(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    (tmp_path / "afile").write_text("not json\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("argv, message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_every_bad_value_is_one_line_and_exit_status_2(argv, message, bad_inputs_dir, capsys):
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip() and not any(n in ln for n in NOISE)]
    assert rc == 2 and len(lines) == 1 and message in lines[0], (rc, err[-2000:])
    assert lines[0].startswith("tcpade") and "Traceback" not in err and out == ""
    assert sorted(p.name for p in bad_inputs_dir.iterdir()) == ["afile", "empty"]  # nothing written
    assert (bad_inputs_dir / "afile").read_text() == "not json\n"


# fmt: off
SUBPROCESS_BAD = [
    (["calibrate", "flux-digits", "--speedup", "-2"], "--speedup must be a finite number >= 1, got -2.0"),
    (["calibrate", "flux-digits", "--passes", "25", "--steps", "20", "--out", "s.json"], "--passes must be in [1, 20]"),
    (["calibrate", "flux-digits", "--passes", "7", "--seeds", "a,b"], "--seeds must be comma-separated integers"),
    (["calibrate", "flux-digits", "--passes", "7", "--predictor", "foo"], "argument --predictor: invalid choice"),
    (["bench", "flux-digits", "--steps", "x"], "argument --steps: invalid int value: 'x'"),
    (["demo", "--threads", "0"], "--threads must be an int >= 1, got 0"),
]
# fmt: on


@pytest.mark.parametrize("argv, message", SUBPROCESS_BAD, ids=[" ".join(a) for a, _ in SUBPROCESS_BAD])
def test_bad_values_from_the_shell_exit_2_with_one_line(argv, message, tmp_path):
    """The real exit status and the whole of stderr: one line, no traceback, nothing written; these
    are answered before torch is imported."""
    t0 = time.perf_counter()
    proc = _tcpade(argv, tmp_path, timeout=60, check=False)
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout[-2000:] + proc.stderr[-2000:]
    (line,) = proc.stderr.splitlines()
    assert line.startswith(f"tcpade {argv[0]}: error: ") and message in line, line
    assert list(tmp_path.iterdir()) == [], "a refused command wrote a file"
    print(f"{argv}: {time.perf_counter() - t0:.2f} s")


def test_subcommand_table_is_the_one_extension_point():
    names = [n for n, _, _ in cli.SUBCOMMANDS]
    assert names[:2] == ["demo", "bench"] and len(set(names)) == len(names)
    for _, module, help_line in cli.SUBCOMMANDS:
        mod = __import__(module, fromlist=["add_cli"])
        assert callable(mod.add_cli) and callable(mod.run_cli) and help_line


def test_no_tools_module_imports_cli():
    """cli imports the subcommands; they, and every other tools module, import tcpade.tools.args
    for what they share, never cli (no import cycle)."""
    import ast

    tools = ROOT / "tcpade" / "tools"
    for path in tools.glob("*.py"):
        if path.name == "cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom):
                base = ("tcpade.tools." if node.level == 1 else "") + (node.module or "")
                names = [base] + [f"{base}.{a.name}" if node.module else f"tcpade.tools.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            assert "tcpade.tools.cli" not in names, f"{path.name} imports tcpade.tools.cli"


@pytest.mark.parametrize("command, missing, extra", [("demo", "diffusers", "demo"), ("demo", "PIL", "demo"),
                                                     ("demo", "safetensors", "demo"),
                                                     ("bench", "matplotlib", "demo")])  # fmt: skip
def test_missing_extra_is_one_line_naming_the_extra(tmp_path, command, missing, extra):
    # The module is made unimportable (None in sys.modules), as on an install without the extra.
    args = ["demo", "--repeats", "1", "--steps", "2"] if command == "demo" else ["bench", "flux-digits"]
    code = f"import sys; sys.modules[{missing!r}] = None\nfrom tcpade.tools.cli import main\nsys.exit(main({args!r}))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    expected = (f"tcpade {command}: needs {missing}, which is not installed; "
                f"install the extra: pip install 'tcpade[{extra}]'")  # fmt: skip
    assert lines[-1] == expected and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_progress_bar_only_when_asked_or_on_a_terminal():
    import io

    out = io.StringIO()
    bar = Progress(3, "job", enabled=True, stream=out)
    for name in ("a", "b", "c"):
        bar.step(name)
    bar.close()
    text = out.getvalue()
    assert "\rjob [" in text and "3/3" in text and "#" * 24 in text
    quiet = io.StringIO()
    bar = Progress(3, "job", stream=quiet)  # a StringIO is not a terminal
    bar.step("a")
    bar.close()
    assert quiet.getvalue() == ""


def test_config_specs():
    from tcpade.tools.bench import parse_config

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


def tiny_class_pipeline():
    """A tiny random-weight DiTPipeline (class-conditional, batched CFG), built from configs."""
    from diffusers import DDIMScheduler, DiTPipeline

    from tcpade.tools import tiny

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
    # 8 steps: slow (2.5x) and fast (3x) both round to 3 of 8 passes (0, 3, 6: at most 2 steps in a row
    # predicted); warm-up 1, every 3rd, no final step: 0, 1, 3, 6: 4 of 8.
    assert [r[0] for r in rows.values()] == ["8/8", "3/8", "3/8", "4/8"]
    assert rows["fast"][1] == "2.67x" and rows["full"][3] == "inf"
    for name in ("slow", "fast"):
        assert float(rows[name][3]) > 0 and 0 < float(rows[name][4]) <= 1  # finite, against the full run
    # Nothing on stderr but what torchao (in the test environment, not in the demo's) prints
    # when diffusers imports it; .ci/run checks that the demo prints nothing there at all.
    noise = ("torchao", "_pytree.py", "register_constant")
    assert [ln for ln in proc.stderr.splitlines() if not any(n in ln for n in noise)] == [], proc.stderr[-2000:]
    with open(tmp_path / "out" / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["method"] for r in table][:3] == ["full", "slow", "fast"] and table[2]["passes"] == "3.0"
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
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    from tcpade.tools import tiny

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
    return WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                       transformer=tiny.transformer("wan", num_layers=2),
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
    # fast at 6 steps: round(6 / 3) = 2 passes (0, 4: at most 3 steps predicted in a row), in each
    # CFG branch.
    assert rows["full"][0] == "6/6" and rows["fast"][0] == "2/6", proc.stdout
    assert float(rows["fast"][3]) > 0, proc.stdout
    assert (tmp_path / "out" / "grid.png").stat().st_size > 500


def test_bench_on_a_zoo_model(tmp_path):
    pytest.importorskip("matplotlib")
    proc = _tcpade(["bench", "dit-faces", "--labels", "0,1", "--steps", "20", "--presets", "fast", "--threads", "1",
                    "--out", "out"], tmp_path)  # fmt: skip
    print(proc.stdout)
    rows = _table(proc.stdout)
    # fast at 20 steps: 7 of 20 passes (on dit-faces the spaced rule: no calibrated 7-of-20 schedule won its
    # held-out check).
    assert rows["full"][0] == "20/20" and rows["fast"][0] == "7/20" and rows["fast"][1] == "2.86x"
    # A trained model: the skipped steps are predicted well (20 steps: 27.5 dB in bench/results/quality.md).
    assert float(rows["fast"][3]) > 15 and float(rows["fast"][4]) > 0.5, proc.stdout
    assert (tmp_path / "out" / "grid.png").stat().st_size > 1000


def test_calibrate_on_a_saved_class_pipeline(tmp_path, monkeypatch, capsys):
    """``tcpade calibrate FOLDER``: a class-conditional pipeline takes --labels (paired with the
    seeds), and refuses prompts, labels it has no class for, and more labels than seeds."""
    import json

    import torch

    folder = tmp_path / "tiny-dit"
    tiny_class_pipeline().save_pretrained(folder)
    monkeypatch.chdir(tmp_path)
    for args, msg in [
        (["--prompt", "a fox"], "--prompt: DiTPipeline takes class labels, not prompts: use --labels"),
        (["--labels", "1000"], "--labels: DiTPipeline has classes 0..999, got [1000]"),
        (["--labels", "1,2,3"], "--labels: 3 labels for 2 seeds (one calibration input per seed)"),
    ]:
        assert cli.main(["calibrate", "tiny-dit", "--steps", "5", "--passes", "3", *args]) == 2, args
        lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and not any(n in ln for n in NOISE)]
        assert lines == [f"tcpade calibrate: error: {msg}"], lines
    t0, threads = time.perf_counter(), torch.get_num_threads()
    try:
        rc = cli.main(["calibrate", "tiny-dit", "--labels", "1,7", "--seeds", "0,3", "--steps", "5", "--passes", "4,3",
                       "--out", "cal.json", "--threads", "1"])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    print(out, f"({time.perf_counter() - t0:.1f} s)")
    assert rc == 0 and "wrote cal.json" in out and "  3 passes" in out
    (entry,) = json.loads((tmp_path / "cal.json").read_text())["entries"]
    # two seeds: one searched, one held out for the validation (the default --holdout 0.5)
    assert entry["steps"] == 5 and entry["inputs"] == 1 and entry["method"] == "refine" and entry["validated"]
    assert sorted(entry["schedules"]) == ["3", "4"] and all(0 < v < 100 for v in entry["psnr"].values())
