"""Multi-process runs (flux2_kit.launch) on flux2-tiny with 2 CPU (gloo) processes: identical LoRA on every rank,
sharded caching, rank-0-only events (global mean loss), 2 x batch 1 == 1 x batch 2, multi-process resume, FSDP2
sharding with torch's `fully_shard` over gloo, and FSDP2 Trainer runs (== DDP, resume, export loadable by diffusers)."""
import json, os, shutil, socket
from pathlib import Path
import pytest
import torch
from safetensors.torch import load_file

from flux2_kit.distributed import LaunchError, full_lora_state_dict, fsdp2_shard
from flux2_kit.launch import check_port, launch
from flux2_kit.check import CheckError
from flux2_kit.trainer import Callback
from flux2_kit.tiny import tiny_config

LORA = "pytorch_lora_weights.safetensors"
# 2 processes x batch 1 vs 1 process x batch 2, same seed, 3 AdamW steps at lr 1e-3: the data order and the noise are
# the same by construction (global batches split over ranks, one shared generator stream), so the only difference
# is float rounding (batched vs per-rank forward, gradient all-reduce): measured 7.9e-07 max abs difference on
# LoRA weights of up to 3e-3 (2-core CPU, torch 2.13). Tolerance: 1e-5 absolute.
TOL = 1e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_dev):
    "A 2-process run (batch 1 per rank, checkpoint at step 2), then the same with 1 process and batch 2."
    root = tmp_path_factory.mktemp("launch")
    two = launch(tiny_config(root / "two", max_train_steps=3, train_batch_size=1, checkpointing_steps=2,
                             checkpoints_total_limit=3), num_processes=2)
    two_lora = load_file(two.run_dir.lora_dir / LORA)
    one = launch(tiny_config(root / "one", max_train_steps=3, train_batch_size=2), num_processes=1)
    return dict(root=root, two=two, two_results=two.results(), two_lora=two_lora, one=one,
                one_lora=load_file(one.run_dir.lora_dir / LORA))


def test_ranks_identical_and_sharded_cache(runs):
    res = runs["two_results"]
    assert [r["rank"] for r in res] == [0, 1] and {r["status"] for r in res} == {"completed"}
    assert {r["backend"] for r in res} == {"gloo"}
    assert res[0]["lora_sha256"] == res[1]["lora_sha256"]  # DDP kept the LoRA identical on both ranks
    assert res[0]["losses"] != res[1]["losses"]  # ... while each rank trained on its own half of the batch
    # the cache: 7 prompts and 4 images, each encoded once, about half on each rank
    per = res[0]["text_misses_per_rank"]
    assert sum(per) == res[0]["text_misses"] == 7 and sorted(per) == [3, 4]
    assert res[1]["text_misses_per_rank"] == per
    (lat,) = res[0]["latent_misses_per_rank"].values()
    assert lat == [2, 2]
    assert all(r["text_batches"] == 1 for r in res)  # every rank ran its own encoder pass (on its share)


def test_events_from_rank0_only(runs):
    h = runs["two"]
    steps = [e["step"] for e in h.events(["step"])]
    assert steps == [1, 2, 3]  # one event per step: no duplicates from rank 1
    assert [e["type"] for e in h.events(["run_start"])] == ["run_start"]
    losses = [e["loss"] for e in h.events(["step"])]
    r0, r1 = runs["two_results"][0]["losses"], runs["two_results"][1]["losses"]
    assert losses == pytest.approx([(a + b) / 2 for a, b in zip(r0, r1)], abs=1e-6)  # the global mean, not rank 0's
    assert losses != pytest.approx(r0, abs=1e-4)
    # ... which is the loss of the 1-process run on the same global batches
    assert [e["loss"] for e in runs["one"].events(["step"])] == pytest.approx(losses, abs=1e-5)
    run = json.loads((h.run_dir.root / "run.json").read_text())
    assert run["world_size"] == 2
    ck = sorted(p.name for p in h.run_dir.checkpoints_dir.iterdir())
    assert ck == ["checkpoint-000002", "checkpoint-000003"]


def test_two_processes_match_one_process_batch_two(runs):
    a, b = runs["two_lora"], runs["one_lora"]
    assert a.keys() == b.keys() and len(a) > 0
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    moved = max(b[k].abs().max().item() for k in b if "lora_B" in k)
    print(f"max |2x1 - 1x2| = {diff:.2e}; largest lora_B weight {moved:.2e}")
    assert moved > 1e-3  # the LoRA really trained
    assert diff < TOL
    # the per-sample losses of the 1-process run are the two ranks' losses
    one = runs["one"].events(["step"])
    two = runs["two"].events(["step"])
    for e1, e2 in zip(one, two):
        assert e1["sigma"][0] == pytest.approx(e2["sigma"][0], abs=1e-6)  # rank 0 got sample 0's sigma


def test_resume_on_every_rank(runs):
    "Both ranks resume from checkpoint 2 and end exactly where the straight run ended."
    h = runs["two"]
    shutil.rmtree(h.run_dir.checkpoints_dir / "checkpoint-000003"); shutil.rmtree(h.run_dir.lora_dir)
    cfg = tiny_config(runs["root"] / "two", max_train_steps=3, train_batch_size=1, checkpointing_steps=2,
                      checkpoints_total_limit=3, resume_from_checkpoint="latest")
    res = launch(cfg, num_processes=2).results()
    assert [os.path.basename(r["resumed_from"]) for r in res] == ["checkpoint-000002"] * 2
    assert res[0]["lora_sha256"] == res[1]["lora_sha256"] == runs["two_results"][0]["lora_sha256"]


def test_guards(tmp_path):
    cfg = tiny_config(tmp_path / "g", max_train_steps=1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); s.listen()
        with pytest.raises(LaunchError, match="is busy"): launch(cfg, num_processes=2, port=s.getsockname()[1])
        with pytest.raises(LaunchError, match="is busy"): check_port(s.getsockname()[1])
    with pytest.raises(LaunchError, match="needs CUDA GPUs"): launch(cfg, num_processes=2, strategy="deepspeed")
    with pytest.raises(LaunchError, match="quanto"):
        launch(cfg.replace(base_model_precision="int8-quanto"), num_processes=2, strategy="fsdp2")
    with pytest.raises(LaunchError, match="enable_group_offload"):
        launch(cfg.replace(enable_group_offload=True), num_processes=2, strategy="fsdp2")
    with pytest.raises(LaunchError, match="num_processes"): launch(cfg, num_processes=0)


class _Boom(Callback):
    def before_step(self, t): raise RuntimeError(f"boom on rank {t.accelerator.process_index}")


def test_child_error_is_reraised(tmp_path):
    "A failure inside a rank comes back to the caller with its message and traceback."
    cfg = tiny_config(tmp_path / "bad", max_train_steps=1)
    with pytest.raises(LaunchError, match=r"rank \d failed: RuntimeError: boom on rank \d"):
        launch(cfg, num_processes=2, trainer_kwargs=dict(callbacks=[_Boom()]))


def test_config_mistakes_are_caught_before_forking(tmp_path):
    "The check phase runs in the kernel: a batch no bucket fills is refused before any process starts."
    cfg = tiny_config(tmp_path / "bad", max_train_steps=1, train_batch_size=3)  # 4 images: no global batch of 6
    with pytest.raises(CheckError, match=r"no bucket fills a batch of 6 \(the global batch is train_batch_size 3 x 2 processes\)"):
        launch(cfg, num_processes=2)
    assert not (Path(cfg.output_dir) / "launch").exists()  # nothing was started


# ---- FSDP2 on CPU: torch's fully_shard over gloo (accelerate ignores FSDP on CPU) ----
def _fsdp2_child(rank, port, model_path, out_dir):
    import copy
    import torch.distributed as dist
    from flux2_kit.flow import flow_match_loss, make_generator
    from flux2_kit.lora import build_lora, lora_state_dict
    from flux2_kit.models import load_transformer
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        tr = load_transformer(model_path, device="cpu")
        build_lora(tr, "all", rank=4)
        for n, p in tr.named_parameters():  # non-zero lora_B so every LoRA weight gets a gradient in one step
            if "lora_B" in n: torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(1))
        ref = copy.deepcopy(tr)
        init = {k: v.detach().clone() for k, v in lora_state_dict(ref).items()}
        g = torch.Generator().manual_seed(3)
        lat, emb = torch.randn(2, 128, 4, 4, generator=g), torch.randn(2, 16, 48, generator=g)
        sig = torch.tensor([0.3, 0.7])
        # reference, unsharded: the mean of the two samples' losses (sample r with generator 100 + r)
        ropt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-3)
        loss = sum(flow_match_loss(ref, dict(latents=lat[i:i + 1], prompt_embeds=emb[i:i + 1]), make_generator(100 + i),
                                   sigmas=sig[i:i + 1]).loss for i in range(2)) / 2
        loss.backward(); ropt.step()
        # sharded: rank r trains on sample r; FSDP2 averages the gradients over the ranks
        fsdp2_shard(tr)
        sharded = [n for n, p in tr.named_parameters() if p.requires_grad and p.to_local().numel() < p.numel()]
        opt = torch.optim.AdamW([p for p in tr.parameters() if p.requires_grad], lr=1e-3)
        out = flow_match_loss(tr, dict(latents=lat[rank:rank + 1], prompt_embeds=emb[rank:rank + 1]),
                              make_generator(100 + rank), sigmas=sig[rank:rank + 1])
        out.loss.backward(); opt.step()
        full = full_lora_state_dict(tr)
        want = {k: v.detach() for k, v in lora_state_dict(ref).items()}
        diff = max((full[k] - want[k]).abs().max().item() for k in want)
        moved = max((want[k] - init[k]).abs().max().item() for k in want)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(dict(diff=diff, n_sharded=len(sharded), n_trainable=sum(p.requires_grad for p in tr.parameters()),
                           keys_equal=sorted(full) == sorted(want), loss=float(out.loss), moved=moved), f)
    finally:
        dist.destroy_process_group()


def test_fsdp2_fully_shard_gloo(tmp_path, tiny_dev):
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    mp.start_processes(_fsdp2_child, args=(port, str(tiny_dev), str(tmp_path)), nprocs=2, start_method="fork")
    res = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in res:
        assert r["keys_equal"] and r["n_sharded"] > 0  # LoRA weights really sharded across the 2 ranks
        assert torch.isfinite(torch.tensor(r["loss"]))
        assert r["moved"] > 1e-4  # the step changed the LoRA
        assert r["diff"] < 1e-5, r  # one sharded step == the unsharded step on the full batch


# ---- FSDP2 Trainer runs on CPU (gloo): fully_shard in the Trainer, full state gathered for checkpoints/exports ----
def _fsdp2_cfg(root, **kw):
    return tiny_config(root / "fsdp2", max_train_steps=3, train_batch_size=1, checkpointing_steps=2,
                       checkpoints_total_limit=3, validation_steps=2, **kw)  # previews: sharded forwards on both ranks


@pytest.fixture(scope="module")
def fsdp2(runs):
    "The 2-process DDP run of `runs` again with strategy='fsdp2': same seed, config and data."
    h = launch(_fsdp2_cfg(runs["root"]), num_processes=2, strategy="fsdp2")
    return dict(h=h, results=h.results(), lora=load_file(h.run_dir.lora_dir / LORA))


def h_previews(run): return run["h"].events(["preview"])


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and len(a) > 0
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_fsdp2_trainer_matches_ddp(fsdp2, runs):
    "FSDP2 and DDP train the same LoRA: step-2 checkpoint (LoRA and AdamW state), final export, losses."
    from flux2_kit.checkpoint import load_checkpoint
    res = fsdp2["results"]
    assert [r["status"] for r in res] == ["completed"] * 2 and {r["backend"] for r in res} == {"gloo"}
    assert res[0]["lora_sha256"] == res[1]["lora_sha256"]  # the gathered LoRA is the same on both ranks
    assert all(r["sharded_params"] > 0 for r in res)  # really sharded (DDP: no DTensor parameters)
    assert all(r["sharded_params"] == 0 for r in runs["two_results"])
    assert [e["step"] for e in h_previews(fsdp2)] == [0, 2, 3]  # previews ran (every rank forwards, rank 0 writes)
    for a, b in zip(res, runs["two_results"]):  # each rank saw the same data and noise as under DDP
        assert a["losses"] == pytest.approx(b["losses"], abs=1e-5)
    h = fsdp2["h"]
    losses = [e["loss"] for e in h.events(["step"])]
    assert [e["step"] for e in h.events(["step"])] == [1, 2, 3]
    assert losses == pytest.approx([(a + b) / 2 for a, b in zip(res[0]["losses"], res[1]["losses"])], abs=1e-6)
    fs = load_checkpoint(h.run_dir.checkpoints_dir / "checkpoint-000002")
    dd = load_checkpoint(runs["two"].run_dir.checkpoints_dir / "checkpoint-000002")
    assert fs["extra"]["strategy"] == "fsdp2" and fs["step"] == 2
    d_ck = _max_diff(fs["tensors"], dd["tensors"])
    # AdamW state: FSDP2's is keyed by parameter name, DDP's by index, both in the optimizer's parameter order
    names, idx = fs["optimizer_state"]["param_groups"][0]["params"], dd["optimizer_state"]["param_groups"][0]["params"]
    assert len(names) == len(idx) == len(fs["tensors"]) and all(isinstance(n, str) for n in names)
    d_opt = max((fs["optimizer_state"]["state"][n][m] - dd["optimizer_state"]["state"][i][m]).abs().max().item()
                for n, i in zip(names, idx) for m in ("exp_avg", "exp_avg_sq"))
    d_final = _max_diff(fsdp2["lora"], runs["two_lora"])
    moved = max(v.abs().max().item() for k, v in fsdp2["lora"].items() if "lora_B" in k)
    print(f"FSDP2 vs DDP: checkpoint-2 LoRA {d_ck:.2e}, AdamW state {d_opt:.2e}, final LoRA {d_final:.2e} "
          f"(largest lora_B {moved:.2e})")
    assert moved > 1e-3 and d_ck < TOL and d_opt < TOL and d_final < TOL


def test_fsdp2_resume_and_export_loads_in_diffusers(fsdp2, runs, tiny_dev):
    "Both ranks resume the FSDP2 run from checkpoint 2 and end where the straight run ended; diffusers loads the LoRA."
    from flux2_kit.flow import flow_match_loss, make_generator
    from flux2_kit.lora import lora_state_dict
    from flux2_kit.tiny import pipeline_class
    h = fsdp2["h"]
    shutil.rmtree(h.run_dir.checkpoints_dir / "checkpoint-000003"); shutil.rmtree(h.run_dir.lora_dir)
    res = launch(_fsdp2_cfg(runs["root"], resume_from_checkpoint="latest"), num_processes=2, strategy="fsdp2").results()
    assert [os.path.basename(r["resumed_from"]) for r in res] == ["checkpoint-000002"] * 2
    assert res[0]["lora_sha256"] == res[1]["lora_sha256"] == fsdp2["results"][0]["lora_sha256"]  # bit-identical
    lora = load_file(h.run_dir.lora_dir / LORA)
    assert _max_diff(lora, fsdp2["lora"]) == 0.0
    # the exports load with diffusers (both layouts) and change the transformer's output the same way
    g = torch.Generator().manual_seed(0)
    batch = dict(latents=torch.randn(1, 128, 4, 4, generator=g), prompt_embeds=torch.randn(1, 8, 48, generator=g))
    out = {}
    for name, src in (("base", None), ("diffusers", h.run_dir.lora_dir / LORA),
                      ("comfyui", h.run_dir.lora_dir / "comfyui_lora.safetensors")):
        pipe = pipeline_class("dev").from_pretrained(tiny_dev)
        if src is not None: pipe.load_lora_weights(str(src))
        if name == "diffusers":
            got = lora_state_dict(pipe.transformer)
            assert _max_diff(got, {k.removeprefix("transformer."): v for k, v in lora.items()}) == 0.0
        seen = []
        hook = pipe.transformer.register_forward_hook(lambda m, a, o: seen.append(o[0] if isinstance(o, tuple) else o.sample))
        with torch.no_grad(): flow_match_loss(pipe.transformer, batch, make_generator(1), sigmas=torch.tensor([0.5]))
        hook.remove(); out[name] = seen[0]
    d_lora, d_comfy = (out["diffusers"] - out["base"]).abs().max().item(), (out["comfyui"] - out["diffusers"]).abs().max().item()
    print(f"prediction: LoRA vs base {d_lora:.2e}, comfyui vs diffusers export {d_comfy:.2e}")
    assert d_lora > 1e-4  # the LoRA changes the prediction
    assert d_comfy < 1e-5


def test_fsdp2_accumulation_clipping_checkpointing_match_ddp(tmp_path):
    """gradient_accumulation_steps=2 (FSDP2 reduce-scatters only at the end of a window), a clip norm small enough to
    clip every step (DTensor gradients), gradient checkpointing and `fsdp_enable: true` (no strategy argument) on
    the FSDP2 side: the same LoRA as DDP."""
    out = {}
    for s in ("ddp", "fsdp2"):
        cfg = tiny_config(tmp_path / s, max_train_steps=2, train_batch_size=1, gradient_accumulation_steps=2,
                          max_grad_norm=1e-3, gradient_checkpointing=s == "fsdp2", fsdp_enable=s == "fsdp2")
        h = launch(cfg, num_processes=2)  # the strategy comes from the config's fsdp_enable
        assert all((r["sharded_params"] > 0) == (s == "fsdp2") for r in h.results())
        out[s] = (load_file(h.run_dir.lora_dir / LORA), h.events(["step"]))
    (a, ea), (b, eb) = out["ddp"], out["fsdp2"]
    assert [e["step"] for e in eb] == [1, 2]
    assert min(e["grad_norm"] for e in ea) > 1e-3  # every update was clipped
    assert [e["grad_norm"] for e in eb] == pytest.approx([e["grad_norm"] for e in ea], rel=1e-5)
    assert [e["loss"] for e in eb] == pytest.approx([e["loss"] for e in ea], abs=1e-6)
    d = _max_diff(a, b)
    print(f"FSDP2 vs DDP with accumulation 2 + clipping: max |diff| = {d:.2e}; grad norms {[e['grad_norm'] for e in eb]}")
    assert max(v.abs().max().item() for k, v in a.items() if "lora_B" in k) > 1e-4 and d < TOL


# ---- the terminal path: `accelerate launch --multi_gpu ... -m flux2_kit.cli train` on 2 CPU processes ----
def test_accelerate_launch_cli_two_processes(runs):
    """accelerate's own launcher (torchrun underneath) runs the CLI's Trainer on 2 CPU processes: a gloo group with
    world_size 2, rank-0-only events, a committed checkpoint and the export, and the same LoRA as `launch` (the `two`
    run of `runs`: same config and seed). No extra environment is needed on CPU: with no CUDA device the Trainer's
    PartialState picks gloo."""
    import subprocess, sys
    from flux2_kit.runlog import RunDir
    cfg = tiny_config(runs["root"] / "cli", max_train_steps=3, train_batch_size=1, checkpointing_steps=2,
                      checkpoints_total_limit=3)
    path = cfg.save(runs["root"] / "cli" / "config.json")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--main_process_port", str(port),
           "-m", "flux2_kit.cli", "train", "--config", str(path), "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert p.stdout.count("trained 3 steps") == 1  # rank 0 alone reports
    rd = RunDir(cfg.output_dir)
    run = json.loads((rd.root / "run.json").read_text())
    assert run["world_size"] == 2
    events = [json.loads(l) for l in (rd.root / "events.jsonl").read_text().splitlines() if l.strip()]
    assert [e["step"] for e in events if e["type"] == "step"] == [1, 2, 3]  # written once: rank 0 only
    assert [e["type"] for e in events].count("run_start") == 1
    ck = sorted(p.name for p in rd.checkpoints_dir.iterdir())
    assert ck == ["checkpoint-000002", "checkpoint-000003"]
    from flux2_kit.checkpoint import latest_checkpoint
    assert latest_checkpoint(rd.checkpoints_dir).name == "checkpoint-000003"  # committed (completion marker)
    lora = load_file(rd.lora_dir / LORA)
    assert (rd.lora_dir / "comfyui_lora.safetensors").exists()
    d = _max_diff(lora, runs["two_lora"])
    print(f"accelerate launch CLI vs launch(): max |diff| = {d:.2e}")
    assert d < TOL


def test_rollout_two_processes_match_one_process_batch_two(runs):
    """Scheduled sampling under 2 processes: the coins and rollout lengths are drawn for the whole global batch and
    sliced per rank like the noise (`_global_draws`), so 2 x batch 1 trains the LoRA of 1 x batch 2 (same seed)."""
    kw = dict(max_train_steps=3, scheduled_sampling_max_step_offset=3, scheduled_sampling_probability=0.5)
    two = launch(tiny_config(runs["root"] / "ro_two", train_batch_size=1, **kw), num_processes=2)
    one = launch(tiny_config(runs["root"] / "ro_one", train_batch_size=2, **kw), num_processes=1)
    l2, l1 = [e["loss"] for e in two.events(["step"])], [e["loss"] for e in one.events(["step"])]
    plain = [e["loss"] for e in runs["one"].events(["step"])]
    assert l1 != pytest.approx(plain, abs=1e-4)  # samples really were rolled out (same data, noise and sigmas as plain)
    assert l2 == pytest.approx(l1, abs=1e-5)
    a, b = load_file(two.run_dir.lora_dir / LORA), load_file(one.run_dir.lora_dir / LORA)
    d = _max_diff(a, b)
    print(f"rollout: max |2x1 - 1x2| = {d:.2e}; losses 2x1 {l2}, 1x2 {l1}, plain {plain}")
    assert max(v.abs().max().item() for k, v in b.items() if "lora_B" in k) > 1e-3 and d < TOL
