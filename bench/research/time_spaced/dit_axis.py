"""The DiT models (DDIM: timesteps even in the step index, so time_spacing changes nothing there):
the spaced rule on two noise-level axes instead, sqrt(1 - alpha_bar_t) ("std") and log SNR ("logsnr"),
at weights 0.25 and 0.5; margins over the best peer (dB). Measurement only; see README.md."""
import torch
# run from the repository root with PYTHONPATH=bench
torch.set_num_threads(1)
from quality import eval_set
from defaults import passes_at, best_peers
from tcpade import zoo, metrics
from tcpade.policy.config import TCPadeConfig
from tcpade.policy.schedules import spaced
peers = best_peers(['dit-faces', 'dit-photos'])
for name in ['dit-faces', 'dit-photos']:
    m = zoo.load(name); s, l = eval_set(name, False, 16)
    for T in (10, 20, 50):
        ref = m.sample(s, l, steps=T)
        sch = m.noise_scheduler(); sch.set_timesteps(T)
        ac = sch.alphas_cumprod
        axes = {'std': [float((1 - ac[int(t)]).sqrt()) for t in sch.timesteps],
                'logsnr': [float(torch.log(ac[int(t)] / (1 - ac[int(t)]))) for t in sch.timesteps]}
        for lv in (2.0, 2.5, 20 / 7):
            K = passes_at(T, lv); peer = peers[(name, T, round(lv, 4))][0]
            res = []
            for ax, times in axes.items():
                for a in (0.0, 0.25, 0.5):
                    if a == 0 and ax != 'std':
                        continue
                    sched = spaced(T, K, times=times, time_weight=a)
                    o = m.sample(s, l, steps=T, config=TCPadeConfig(predictor='linear', schedule=sched, schedule_steps=T))
                    res.append(f"{ax}{a:g}={float(metrics.psnr(o, ref).mean()) - peer:+.2f}")
            print(name, T, round(lv, 2), K, ' '.join(res), flush=True)
