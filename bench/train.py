"""Train a model of tcpade's zoo (tcpade/zoo) on CPU, reproducibly, within a time budget.

    python bench/train.py --model flux-digits --minutes 12
    python bench/train.py --model all --minutes 12

Writes tcpade/zoo/weights/<name>.safetensors (EMA weights, float16), <name>.json (the
training record) and <name>.md (the model card), and a grid of samples to
bench/results/zoo/<name>.png. Objectives: rectified flow (x_t = (1 - t) x0 + t eps, target
eps - x0, t logit-normal as in SD3) for FLUX and Wan; DDPM epsilon-prediction (linear betas)
for DiT. Labels are dropped to the empty prompt 10% of the time, for classifier-free guidance.
The time budget ends training, so the step count depends on the machine; the record has it.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from _bench_common import cpu_name

from tcpade import zoo
from tcpade.zoo import data

DEFAULTS = {  # batch, peak learning rate
    "flux-digits": (64, 1e-3),
    "dit-faces": (64, 5e-4),
    "wan-digits": (32, 1e-3),
    "flux-shapes": (32, 1e-3),
    "dit-photos": (32, 1e-3),
    "flux-photos": (32, 1e-3),
}


def grid_png(images, path, nrow):
    """Save images (N, C, [F,] H, W) in [-1, 1], C = 1 (grey) or 3 (RGB), as a grid PNG (clips:
    frames left to right)."""
    import numpy as np
    from PIL import Image

    x = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
    if x.ndim == 5:  # clips: one row per clip, frames side by side
        n, _, f, h, w = x.shape
        rows = [np.concatenate([np.pad(x[i, 0, j], 1, constant_values=255) for j in range(f)], 1) for i in range(n)]
        Image.fromarray(np.concatenate(rows, 0)).resize((rows[0].shape[1] * 4, len(rows) * rows[0].shape[0] * 4),
                                                        Image.NEAREST).save(path)  # fmt: skip
        return
    n, ch, h, w = x.shape
    ncol = math.ceil(n / nrow)
    canvas = np.full((nrow * (h + 2), ncol * (w + 2), ch), 255, np.uint8)
    for i in range(n):
        r, c = i % nrow, i // nrow
        canvas[r * (h + 2) + 1 : r * (h + 2) + 1 + h, c * (w + 2) + 1 : c * (w + 2) + 1 + w] = x[i].transpose(1, 2, 0)
    canvas = canvas[..., 0] if ch == 1 else canvas
    Image.fromarray(canvas).resize((canvas.shape[1] * 4, canvas.shape[0] * 4), Image.NEAREST).save(path)


def train(name, minutes, seed, threads, max_steps=None, log_every=100, snapshot=None, snapshot_minutes=5.0):
    from diffusers import DDPMScheduler

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = zoo.build(name)
    spec = model.spec
    model.train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    x_all, y_all = data.for_spec(spec)  # 12,000 clips, seed 1, for wan-digits
    batch, lr = DEFAULTS[name]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    ddpm = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear") if spec.objective == "eps" else None
    g = torch.Generator().manual_seed(seed)
    budget = minutes * 60.0
    t0 = time.perf_counter()
    step, losses, log = 0, [], []
    next_snapshot = snapshot_minutes * 60.0
    while True:
        elapsed = time.perf_counter() - t0
        if snapshot and elapsed >= next_snapshot:  # the EMA so far, to look at while training goes on
            from safetensors.torch import save_file

            save_file({k: v.detach().half().contiguous() for k, v in ema.state_dict().items()}, snapshot)
            print(f"{name} step {step} t={elapsed:.0f}s: snapshot {snapshot}", flush=True)
            next_snapshot += snapshot_minutes * 60.0
        if elapsed >= budget or (max_steps and step >= max_steps):
            break
        frac = elapsed / budget
        warm = min(1.0, (step + 1) / 200)
        for group in opt.param_groups:  # linear warm-up, cosine decay to 10% over the time budget
            group["lr"] = lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        idx = torch.randint(len(x_all), (batch,), generator=g)
        x0, y = x_all[idx], y_all[idx].clone()
        if spec.data == "faces":  # horizontal flips: 200 images are few
            flip = torch.rand(batch, generator=g) < 0.5
            x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        y[torch.rand(batch, generator=g) < 0.1] = spec.num_classes  # CFG: the empty prompt
        eps = torch.randn(x0.shape, generator=g)
        if spec.objective == "flow":
            t = torch.sigmoid(torch.randn(batch, generator=g))
            tb = t.view(-1, *[1] * (x0.ndim - 1))
            xt, target = (1 - tb) * x0 + tb * eps, eps - x0
        else:
            t = torch.randint(0, 1000, (batch,), generator=g)
            xt, target = ddpm.add_noise(x0, eps, t), eps
        pred = model.to_images(model(model.to_latents(xt), t, y))
        loss = torch.nn.functional.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        losses.append(loss.item())
        step += 1
        if step % log_every == 0:
            mean = sum(losses[-log_every:]) / log_every
            log.append((step, round(time.perf_counter() - t0, 1), round(mean, 5)))
            print(f"{name} step {step} t={log[-1][1]}s loss={mean:.4f}", flush=True)
    seconds = time.perf_counter() - t0
    return model, ema, dict(steps=step, seconds=round(seconds, 1), batch=batch, lr=lr, log=log,
                            final_loss=round(sum(losses[-200:]) / max(1, len(losses[-200:])), 5))  # fmt: skip


def save(name, ema, record, seed, threads, minutes, command=None):
    from safetensors.torch import save_file

    os.makedirs(os.path.join(ROOT, "tcpade", "zoo", "weights"), exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in ema.state_dict().items()}
    save_file(state, zoo.weights_path(name))
    spec = ema.spec
    params = sum(v.numel() for v in ema.parameters())
    record.update(
        name=name, family=spec.family, data=spec.data, objective=spec.objective, params=params, seed=seed,
        threads=threads, machine=cpu_name(), torch=torch.__version__,
        command=command or f"python bench/train.py --model {name} --minutes {minutes:g} --seed {seed} --threads {threads}",
        bytes=os.path.getsize(zoo.weights_path(name)),
    )  # fmt: skip
    with open(os.path.join(ROOT, "tcpade", "zoo", "weights", f"{name}.json"), "w") as f:
        json.dump(record, f, indent=1)
    # samples: 2 per class (DiT: 8), 20 steps, full computation
    per = 8 if spec.num_classes == 2 else 2
    labels = [c for c in range(spec.num_classes) for _ in range(per)]
    imgs = ema.sample(seeds=list(range(len(labels))), labels=labels, steps=20)
    out = os.path.join(ROOT, "bench", "results", "zoo")
    os.makedirs(out, exist_ok=True)
    grid_png(imgs, os.path.join(out, f"{name}.png"), nrow=per)
    write_card(name, record)


def write_card(name, r):
    spec = zoo.SPECS[name]
    what = {
        "digits": "scikit-learn's handwritten digits (1,797 images, 8x8, resized to 16x16), 10 classes",
        "faces": "scikit-image's LFW subset (200 grey 24x24 crops: 100 faces = class 0, 100 non-faces = class 1), "
        "horizontal flips",
        "moving_digits": "12,000 clips of 6 frames, 16x16: a scikit-learn digit (10x10) moving on a straight line, "
        "bouncing off the borders; class = the digit",
        "shapes": "12,000 procedural RGB 24x24 scenes (`tcpade.zoo.data.shapes`, seed 1): a textured background "
        "(stripes, checkerboard, dots or blobs in two random colours), a small grey distractor shape and the "
        "object of the class, 4 shapes x 4 colours = 16 classes, random position, size and rotation, striped shading",
        "photos": "12,000 RGB 24x24 patches (`tcpade.zoo.data.photos`, seed 1) of 12 photographs and textures bundled "
        "with scikit-image (astronaut, chelsea, coffee, rocket, Hubble deep field, retina, immunohistochemistry, "
        "motorcycle, and tinted brick, grass, gravel, moon): class = the source image; random position, scale "
        "(1/2-1/5) and flips",
    }[spec.data]
    cond = {
        "flux": "4 learned prompt tokens per class (encoder_hidden_states) + a pooled vector",
        "dit": "class_labels (AdaLN-Zero)",
        "wan": "4 learned prompt tokens per class (encoder_hidden_states)",
    }
    objective = ("rectified flow, v = noise - x0, t logit-normal" if spec.objective == "flow"
                 else "DDPM epsilon, 1000 linear betas")  # fmt: skip
    sampling = f"Euler flow matching, shift {spec.shift:g}" if spec.objective == "flow" else "DDIM"
    text = f"""# {name}

A small {spec.family.upper()}-family diffusion transformer (diffusers `{type(zoo.build(name).transformer).__name__}`)
really trained on CPU, for tcpade's benchmarks and demo. Not a general-purpose model.

| | |
|---|---|
| data | {what} |
| conditioning | {cond[spec.family]}; the empty prompt (row {spec.num_classes}) 10% of the time, for CFG |
| objective | {objective} |
| sampling | {sampling}, guidance scale {spec.guidance_scale:g} |
| parameters | {r["params"]:,} (stored as float16, {r["bytes"] / 1e6:.2f} MB) |
| training | {r["steps"]} steps, batch {r["batch"]}, AdamW peak lr {r["lr"]:g}, cosine, EMA 0.999 |
| final loss | {r["final_loss"]} (mean of the last 200 steps) |
| training time | {r["seconds"] / 60:.1f} min on {r["threads"]} threads of {r["machine"]}, torch {r["torch"]} |
| command | `{r["command"]}` |

Samples (20 steps, full computation): `bench/results/zoo/{name}.png`.
The loss curve is in `{name}.json` (`log`: step, seconds, mean loss).
"""
    with open(os.path.join(ROOT, "tcpade", "zoo", "weights", f"{name}.md"), "w") as f:
        f.write(text)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="all", choices=["all", *zoo.names()])
    p.add_argument("--minutes", type=float, default=12.0, help="training time budget per model")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--log-every", type=int, default=100, help="steps per line of the loss log")
    p.add_argument("--snapshot", default=None, help="also save the EMA weights here every --snapshot-minutes")
    p.add_argument("--snapshot-minutes", type=float, default=5.0)
    args = p.parse_args(argv)
    for name in zoo.names() if args.model == "all" else [args.model]:
        _, ema, record = train(name, args.minutes, args.seed, args.threads, args.max_steps, args.log_every,
                               args.snapshot, args.snapshot_minutes)  # fmt: skip
        command = f"python bench/train.py --model {name} --minutes {args.minutes:g} --seed {args.seed} --threads {args.threads}"
        if args.log_every != 100:
            command += f" --log-every {args.log_every}"
        save(name, ema, record, args.seed, args.threads, args.minutes, command)
        print(f"{name}: {record['steps']} steps in {record['seconds']} s, final loss {record['final_loss']}")


if __name__ == "__main__":
    main()
