"Training on cached tensors: the loss on fresh noise falls, and two gloo processes agree (NaN skips included)."
import json
import os
import socket
import subprocess
import sys
import textwrap

import torch

from flux2_kit.flow import flow_match_loss, make_generator
from flux2_kit.lora import build_lora
from flux2_kit.tiny import flux2_tiny
from flux2_kit.train import make_accelerator, make_lr_scheduler, make_optimizer, prepare_training, train_epoch

torch.set_num_threads(1)  # the test box's cores are shared; oversubscribed threads are much slower


def _latent(tiny_dev):
    "One real-looking image encoded with the tiny VAE, normalised and patchified as the pipeline does."
    from diffusers import AutoencoderKLFlux2, Flux2Pipeline
    vae = AutoencoderKLFlux2.from_pretrained(tiny_dev / "vae")
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, 64), torch.linspace(-1, 1, 64), indexing="ij")
    img = torch.stack([torch.sin(3 * xs), torch.cos(2 * ys), xs * ys])[None].clamp(-1, 1)
    with torch.no_grad():
        z = Flux2Pipeline._patchify_latents(vae.encode(img).latent_dist.mode())
        mean = vae.bn.running_mean.view(1, -1, 1, 1)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    return (z - mean) / std


def test_loss_on_fresh_noise_falls(tiny_dev):
    "Random sigmas and noise in training; evaluated at sigma 0.5 on noise never trained on (flux2-small: width 384)."
    from diffusers import Flux2Transformer2DModel
    one = dict(latents=_latent(tiny_dev), prompt_embeds=torch.randn(1, 16, 96, generator=torch.Generator().manual_seed(1)))

    def eval_loss(tr):
        with torch.no_grad(): return flow_match_loss(tr, one, make_generator(12345), sigmas=0.5).loss.item()

    tr = Flux2Transformer2DModel.from_pretrained(flux2_tiny("dev", "small") / "transformer")
    torch.manual_seed(0)
    build_lora(tr, "all", rank=16)
    acc = make_accelerator()
    opt = make_optimizer(tr, lr=5e-3)
    tr, opt, sch = prepare_training(acc, tr, opt, make_lr_scheduler(opt, "constant", warmup_steps=2))
    start = eval_loss(tr)
    res = train_epoch(acc, tr, opt, sch, [one] * 40, make_generator(0))
    end = eval_loss(tr)
    assert all(r.finite and r.stepped for r in res)
    assert len({round(float(r.sigmas[0]), 6) for r in res}) == 40  # really random sigmas
    print(f"fresh-noise loss at sigma 0.5: {start:.4f} -> {end:.4f}")
    assert end < 0.75 * start, (start, end)


DDP_SCRIPT = textwrap.dedent('''
    import json, os, sys, torch
    torch.set_num_threads(1)
    from diffusers import Flux2Transformer2DModel
    from flux2_kit.flow import make_generator
    from flux2_kit.lora import build_lora, lora_state_dict
    from flux2_kit.tiny import flux2_tiny
    from flux2_kit.train import make_accelerator, make_optimizer, make_lr_scheduler, prepare_training, train_epoch
    acc = make_accelerator(cpu=True)
    rank = acc.process_index
    tr = Flux2Transformer2DModel.from_pretrained(flux2_tiny("dev") / "transformer")
    torch.manual_seed(0)
    build_lora(tr, "all", rank=4, init=False)
    opt = make_optimizer(tr, lr=1e-3)
    tr, opt, sch = prepare_training(acc, tr, opt, make_lr_scheduler(opt, num_processes=acc.num_processes))
    g = torch.Generator().manual_seed(100 + rank)  # each process its own data
    def batch(nan=False):
        b = dict(latents=torch.randn(1, 128, 4, 4, generator=g), prompt_embeds=torch.randn(1, 8, 48, generator=g))
        if nan: b["latents"][0, 0, 0, 0] = float("nan")
        return b
    batches = [batch(), batch(nan=(rank == 1)), batch()]  # only process 1 sees a NaN in step 2
    res = train_epoch(acc, tr, opt, sch, batches, make_generator(7 + rank))
    sd = lora_state_dict(tr)
    out = dict(rank=rank, world=acc.num_processes, finite=[r.finite for r in res], stepped=[r.stepped for r in res],
               checksum=float(sum(v.double().sum() for v in sd.values())),
               probe=sd["transformer_blocks.0.attn.to_q.lora_B.weight"].flatten()[:8].tolist())
    json.dump(out, open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w"))
''')


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_agree_and_skip_nan_together(tmp_path, tiny_dev):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(script), str(tmp_path)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert r0["finite"] == r1["finite"] == [True, False, True]  # the NaN on process 1 skipped the step on both
    assert r0["stepped"] == r1["stepped"] == [True, False, True]
    assert r0["probe"] == r1["probe"] and r0["checksum"] == r1["checksum"]  # DDP kept the LoRA identical


# --- Trainer data order: stopping at a step limit must not consume a sampled batch ---------------------------------
def _trainer(workdir, **kw):
    from flux2_kit.trainer import Trainer
    from flux2_kit.tiny import tiny_config
    return Trainer(tiny_config(workdir, **kw), default_callbacks=False, progress=False)


def _names(results):
    from pathlib import Path
    return [Path(k).name for r in results for k in r.keys]


def _train_to(t, n):
    out = []
    while t.step < n: out += t.train_epoch(max_steps=n)
    return out


def test_trainer_step_limit_keeps_data_order(tmp_path):
    "N steps then N more (same Trainer, and through a checkpoint into a new one) sees the batches of 2N straight."
    n = 3  # 4 images, batch 1: the second half crosses the epoch boundary
    straight = _names(_train_to(_trainer(tmp_path / "straight"), 2 * n))
    assert len(straight) == 2 * n and len(set(straight[:4])) == 4  # an epoch visits every image once
    t = _trainer(tmp_path / "split")
    first = _names(t.train_epoch(max_steps=n))
    assert t.step == n and len(first) == n
    assert t.data_sampler.position == n  # nothing drawn beyond the last trained batch
    ck = t.save()
    again = _names(_train_to(t, 2 * n))
    assert first + again == straight
    resumed = _trainer(tmp_path / "resumed")  # `t` still owns its output_dir: continue its step-n checkpoint in another
    assert resumed.resume(ck) == ck and resumed.step == n
    assert first + _names(_train_to(resumed, 2 * n)) == straight
