"""`make demo`: the training quickstart on flux2-tiny and the sample dataset.

Builds flux2-tiny (the real FLUX.2 classes at toy width) and the sample dataset (real photographs that ship with
scikit-image and matplotlib), caches text embeddings and latents, trains a LoRA for 100 steps with previews and
checkpoints, exports it in diffusers and ComfyUI formats, and prints where everything went.
"""
import os, sys, time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(workdir="runs/demo", steps=100):
    from flux2_kit import Trainer
    from flux2_kit.tiny import tiny_config
    t0 = time.time()
    workdir = Path(workdir).resolve()
    cfg = tiny_config(workdir, "dev", "small", max_train_steps=int(steps), checkpointing_steps=50, checkpoints_total_limit=2,
                      validation_steps=25, validation_resolution="128x128", validation_num_inference_steps=4,
                      learning_rate=2e-3, lora_rank=16, flux_guidance_mode="random-range", flux_guidance_min=1.0,
                      flux_guidance_max=5.0, overwrite_output_dir=True,
                      datasets=[dict(id="sample", type="local", instance_data_dir=str(workdir / "datasets" / "flux2-sample"),
                                     caption_strategy="textfile", crop=True, crop_aspect="square", crop_style="center",
                                     resolution=128, resolution_type="pixel_area", minimum_image_size=64,
                                     cache_dir_vae=str(workdir / "cache" / "vae")),
                                dict(id="text-embeds", type="local", dataset_type="text_embeds", default=True,
                                     cache_dir=str(workdir / "cache" / "text"))],
                      prompt_library={"cat": "a close-up photo of a ginger tabby cat looking to the side",
                                      "coffee": "a cup of coffee on a saucer with a spoon, seen from above on a wooden table",
                                      "rocket": "a rocket standing on its launch pad against a blue sky"})
    t = Trainer(cfg)
    t.fit()
    out = t.rundir.root
    last = sorted((out / "previews").iterdir())[-1]
    from flux2_kit.runlog import read_events
    losses = [e["loss"] for e in read_events(out / "events.jsonl", types=["step"])]
    k = max(len(losses) // 5, 1)
    print(f"\nflux2_kit demo: trained a LoRA on flux2-tiny (size small) for {t.step} steps in {time.time() - t0:.0f}s")
    print(f"  mean loss, first {k} steps: {sum(losses[:k]) / k:.4f}; last {k} steps: {sum(losses[-k:]) / k:.4f}")
    print(f"  run directory:    {out}")
    print(f"  events:           {out / 'events.jsonl'}")
    print(f"  validation grid:  {last / 'grid.png'}")
    print(f"  checkpoints:      {', '.join(p.name for p in sorted((out / 'checkpoints').glob('checkpoint-*')))}")
    print(f"  LoRA (diffusers): {out / 'lora' / 'pytorch_lora_weights.safetensors'}")
    print(f"  LoRA (ComfyUI):   {out / 'lora' / 'comfyui_lora.safetensors'}")


if __name__ == "__main__":
    main(*sys.argv[1:])
