"""`make demo`: a LoRA on flux2-mini for a shape it has never seen, trained and scored in under a minute on a CPU.

flux2-mini is the real FLUX.2-dev architecture (diffusers' Flux2Pipeline), small, and trained on procedurally drawn
shapes — except stars and hearts, which were held back. The demo writes 12 pictures of hearts (and 24 of shapes it knew, so it keeps them) with their captions,
writes SimpleTuner's three config files for them, trains a LoRA with flux2_kit's Trainer (previews of the base model
and of the LoRA as it learns go into one grid), then loads the exported LoRA into a fresh diffusers pipeline and lets
`flux2_kit.judge` say what the base model and the LoRA draw for heart prompts — and for the shapes the model already
knew, to show what the LoRA cost. 

usage: python examples/demo.py [WORKDIR] [STEPS]
"""
import os, sys, time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CONCEPT = "heart"
PROMPTS = {"red heart": "a large red heart in the center on a white background",
           "blue heart": "a large blue heart at the top left on a light blue background",
           "yellow heart": "a large yellow heart at the bottom right on a black background",
           "green circle": "a large green circle in the center on a grey background"}  # a shape it knew: kept?


def main(workdir="runs/demo", steps=None):
    from flux2_kit import Trainer
    from flux2_kit.mini import eval_specs, load_mini, lora_pipeline, mini_config, prompt_score
    import diffusers, transformers
    diffusers.utils.logging.disable_progress_bar(); transformers.utils.logging.disable_progress_bar()  # loading bars: noise here
    t0 = time.time()
    workdir = Path(workdir).resolve()
    over = dict(overwrite_output_dir=True, validation_steps=200, checkpointing_steps=300, checkpoints_total_limit=2)
    if steps: over["max_train_steps"] = int(steps)
    cfg = mini_config(workdir, CONCEPT, prompts=PROMPTS, **over)  # SimpleTuner's files: 12 hearts + 24 known shapes
    t = Trainer(cfg)
    t.fit()
    trained = time.time() - t0
    out = t.rundir.root
    grid = sorted((out / "previews").iterdir())[-1] / "grid.png"
    print(f"\nflux2_kit demo: a '{CONCEPT}' LoRA on flux2-mini, {t.step} steps in {trained:.0f}s")
    print(f"  SimpleTuner files: {workdir / 'multidatabackend.json'}, {workdir / 'user_prompt_library.json'}")
    print(f"  run directory:     {out}")
    print(f"  validation grid:   {grid}")
    print(f"                     (row 'base': flux2-mini before the LoRA; then one row per validation step)")
    print(f"  LoRA (diffusers / ComfyUI / kohya): {out / 'lora'}")
    base = load_mini()
    fresh = load_mini()
    fresh.load_lora_weights(str(out / "lora"), weight_name="pytorch_lora_weights.safetensors")
    prior, concept = eval_specs(40, 1000), eval_specs(24, 2000, shapes=(CONCEPT,))  # benchmarks/learn.py's sets
    print(f"\nthe judge (flux2_kit.judge) on 24 {CONCEPT} prompts and 40 prompts of shapes flux2-mini knew;")
    print("the LoRA is the exported file loaded into a fresh diffusers Flux2Pipeline:")
    print(f"  {'':<12}{CONCEPT + ' drawn':>14}{'prior: shape':>14}{'colour':>8}{'position':>10}")
    for label, pipe in (("base", base), ("with LoRA", fresh)):
        c, p = prompt_score(pipe, concept), prompt_score(pipe, prior)
        print(f"  {label:<12}{c['shape']:>14.0%}{p['shape']:>14.0%}{p['colour']:>8.0%}{p['position']:>10.0%}")
    print(f"\ndone in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main(*sys.argv[1:])
