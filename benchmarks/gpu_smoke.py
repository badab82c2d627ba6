"""The Trainer on one CUDA GPU in bf16: flux2-small, the sample dataset, a short fit with checks (skips without CUDA).

    python benchmarks/gpu_smoke.py [--steps 30] [--res 256] [--tread] [--checkpointing] [--workdir DIR]

Runs `Trainer(tiny_config(..., size="small", mixed_precision="bf16")).fit()` and checks that the transformer ran on
the GPU, every loss is finite, the loss on a fixed probe (one cached image at sigmas 0.25/0.5/0.75, fixed noise) fell,
and the LoRA was exported; prints steps/s and peak GPU memory. Exit 0 on success (or when skipped), 1 when a check fails.
`--allow-cpu` runs the same on the CPU (fp32, few steps) to check the script.
"""
from __future__ import annotations
import argparse, math, os, statistics, sys, tempfile, time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--res", type=int, default=256, help="training resolution (pixel area, square crops)")
    p.add_argument("--tread", action="store_true", help="TREAD 0.5 over blocks 2..-2")
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing")
    p.add_argument("--workdir", default=None)
    p.add_argument("--allow-cpu", action="store_true", help="run on the CPU in fp32 (a check of the script)")
    args = p.parse_args()
    import torch
    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        print("gpu_smoke: skipped, no CUDA device (torch.cuda.is_available() is False); run it on a GPU machine")
        return 0
    from flux2_kit.sample import sample_dataset
    from flux2_kit.trainer import Trainer
    from flux2_kit.tiny import tiny_config
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="flux2_kit_gpu_smoke_"))
    data = sample_dataset(workdir / "datasets")
    datasets = [dict(id="sample", type="local", instance_data_dir=str(data), caption_strategy="textfile", crop=True,
                     crop_aspect="square", crop_style="center", resolution=args.res, resolution_type="pixel_area",
                     minimum_image_size=32, cache_dir_vae=str(workdir / "cache" / "vae"), metadata_backend="discovery"),
                dict(id="text-embeds", type="local", dataset_type="text_embeds", default=True,
                     cache_dir=str(workdir / "cache" / "text"), write_batch_size=16)]
    extra = dict(tread_config={"routes": [{"selection_ratio": 0.5, "start_layer_idx": 2, "end_layer_idx": -2}]}) if args.tread else {}
    cfg = tiny_config(workdir, "dev", size="small", mixed_precision="bf16" if cuda else "no", datasets=datasets,
                      max_train_steps=args.steps if cuda else min(args.steps, 4), learning_rate=1e-3, lora_rank=16,
                      gradient_checkpointing=args.checkpointing, checkpointing_steps=0, validation_steps=0, **extra)
    t = Trainer(cfg, progress=False)
    if cuda: torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    t.cache()
    t.build_lora()
    t_setup = time.perf_counter() - t0
    probe_batch = t.make_batch("sample", [0])

    def probe() -> float:
        "Mean flow-matching loss of the current LoRA on one cached image at fixed sigmas and noise (eval mode)."
        from flux2_kit.flow import flow_match_loss
        from flux2_kit.train import to_device
        b = to_device(dict(latents=probe_batch["latents"], prompt_embeds=probe_batch["prompt_embeds"]), t.accelerator.device)
        t.transformer.eval()
        try:
            with torch.no_grad():
                return statistics.mean(float(flow_match_loss(t.transformer, b, torch.Generator().manual_seed(0),
                                                             t.flow_settings, sigmas=s).loss) for s in (0.25, 0.5, 0.75))
        finally: t.transformer.train()

    before = probe()
    t0 = time.perf_counter()
    hist = t.fit()
    t_fit = time.perf_counter() - t0
    after = probe()
    dev = next(p for p in t.transformer.parameters() if p.requires_grad).device
    losses = [r.loss for r in hist]
    exported = sorted(x.name for x in t.rundir.lora_dir.glob("*.safetensors"))
    name = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"gpu_smoke: {name}, torch {torch.__version__}, mixed_precision {cfg.mixed_precision}, flux2-small dev at "
          f"{args.res} px, LoRA r16{', TREAD 0.5' if args.tread else ''}{', checkpointing' if args.checkpointing else ''}")
    print(f"setup (cache + LoRA) {t_setup:.1f} s; {len(hist)} steps in {t_fit:.1f} s = {len(hist) / t_fit:.2f} steps/s"
          + (f"; peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if cuda else ""))
    print(f"probe loss before {before:.4f}, after {after:.4f}; adapters on {dev}; exported {exported}")
    checks = {"all losses finite": all(math.isfinite(x) for x in losses), "LoRA exported": bool(exported),
              "steps done": t.step == cfg.max_train_steps}
    if cuda: checks.update({"trained on the GPU": dev.type == "cuda", "probe loss fell": after < before})
    else: print("  (CPU check run: the GPU and learning checks are not applicable)")
    for k, ok in checks.items(): print(f"  [{'ok' if ok else 'FAIL'}] {k}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
