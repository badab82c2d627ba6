"""Does flux2-mini follow prompts, and does a LoRA trained by the Trainer teach it a shape it has never seen?

    python benchmarks/learn.py [--model PATH] [--concept heart] [--steps 600] [--rank 16] [--lr 3e-3] [--known 24] [--target all]
                               [--n 40] [--n-concept 24] [--inference-steps 12]

Prints one table of judge accuracies (flux2_kit.judge.score): the base model on `--n` prompts of pretraining shapes
(the prior) and on `--n-concept` prompts that ask for the held-back concept; then the same prompts with a LoRA
trained by `Trainer` (model_type "lora", SimpleTuner keys from `flux2_kit.mini.mini_config`) on 12 pictures of the
concept, at LoRA scale 1 and 0, and with the exported LoRA loaded into a fresh `Flux2Pipeline` (`load_lora_weights`).
The concept score is the judge's shape accuracy on the concept prompts; the prior is its accuracy on the others.
"""
import argparse, os, tempfile, time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

COLS = ("shape", "colour", "position", "size", "all", "empty")


def row(label, prior, concept):
    cells = " ".join(f"{prior[k]:6.2f}" for k in COLS) + " |" + " ".join(f"{concept[k]:6.2f}" for k in COLS)
    return f"{label:<26}{cells}"


def run(a):
    from flux2_kit import Trainer
    from flux2_kit.mini import eval_specs, load_mini, lora_pipeline, mini_config, prompt_score
    base = load_mini(a.model)
    prior_specs, concept_specs = eval_specs(a.n, 1000), eval_specs(a.n_concept, 2000, shapes=(a.concept,))
    kw = dict(steps=a.inference_steps, seed=a.seed)
    score = lambda pipe, **more: (prompt_score(pipe, prior_specs, **kw, **more), prompt_score(pipe, concept_specs, **kw, **more))
    t = time.time()
    results = {"base": score(base)}
    base_s = time.time() - t
    with tempfile.TemporaryDirectory() as work:
        over = dict(max_train_steps=a.steps, lora_rank=a.rank, lora_alpha=a.rank, learning_rate=a.lr,
                    flux_lora_target=a.target, train_batch_size=a.batch, seed=a.seed)
        if a.model: over["pretrained_model_name_or_path"] = str(Path(a.model).resolve())
        trainer = Trainer(mini_config(work, a.concept, known=a.known, **over))
        t = time.time(); trainer.fit(); train_s = time.time() - t
        pipe = lora_pipeline(trainer, base)
        results["LoRA (scale 1)"] = score(pipe)
        results["LoRA at scale 0"] = score(pipe, lora_scale=0.0)
        fresh = load_mini(a.model)
        fresh.load_lora_weights(str(trainer.rundir.lora_dir), weight_name="pytorch_lora_weights.safetensors")
        results["exported LoRA, fresh pipe"] = score(fresh)
    head = " ".join(f"{k:>6}" for k in COLS)
    print(f"\nflux2-mini learn benchmark: concept {a.concept!r}, {a.n} prior prompts, {a.n_concept} concept prompts, "
          f"{a.inference_steps} inference steps")
    print(f"LoRA: rank {a.rank}, target {a.target}, lr {a.lr:g}, batch {a.batch}, {a.steps} steps, {a.known} known-shape pictures beside the 12; Trainer.fit {train_s:.0f} s "
          f"(base scoring {base_s:.0f} s)")
    print(f"{'':<26}{'prior (pretraining shapes)':^{len(head)}} |{'concept prompts':^{len(head)}}")
    print(f"{'':<26}{head} |{head}")
    for label, (p, c) in results.items(): print(row(label, p, c))
    (bp, bc), (lp, lc) = results["base"], results["LoRA (scale 1)"]
    attrs = ("shape", "colour", "position")
    mean = lambda d: sum(d[k] for k in attrs) / len(attrs)
    print(f"\nconcept score (shape accuracy on concept prompts): {bc['shape']:.2f} -> {lc['shape']:.2f}")
    print(f"prior (mean shape/colour/position accuracy): {mean(bp):.3f} -> {mean(lp):.3f} "
          f"({100 * (mean(lp) - mean(bp)):+.1f} points)")
    return results, train_s


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a flux2-mini folder (default: the packaged one)")
    ap.add_argument("--concept", default="heart")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--known", type=int, default=24, help="pictures of known shapes trained beside the concept (prior preservation); 0: none")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--target", default="all")
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--n-concept", type=int, default=24)
    ap.add_argument("--inference-steps", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    run(ap.parse_args(argv))


if __name__ == "__main__":
    main()
