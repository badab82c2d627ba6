"""The script API: train a FLUX.2 LoRA on flux2-tiny and the sample dataset in a few lines.

    python examples/train_tiny.py --workdir runs/tiny --steps 100

With a real model, the same two lines take a SimpleTuner config:

    from flux2_kit import Trainer
    Trainer.from_config("config/config.json").fit()
"""
import argparse, os
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from flux2_kit import Trainer
from flux2_kit.tiny import tiny_config


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="runs/tiny", help="datasets/, cache/ and output/ go here")
    p.add_argument("--steps", type=int, default=100, help="max_train_steps")
    p.add_argument("--flavour", choices=["dev", "klein"], default="dev")
    p.add_argument("--resume", action="store_true", help="continue the run in --workdir from its latest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="delete the run in --workdir and start over")
    a = p.parse_args()
    cfg = tiny_config(a.workdir, a.flavour, max_train_steps=a.steps, checkpointing_steps=max(a.steps // 2, 1),
                      validation_steps=max(a.steps // 2, 1), overwrite_output_dir=a.overwrite,
                      resume_from_checkpoint="latest" if a.resume else None)
    t = Trainer.from_config(cfg)
    t.fit()
    print(f"trained {t.step} steps; LoRA in {t.rundir.lora_dir}; previews in {t.rundir.previews_dir}")


if __name__ == "__main__":
    main()
