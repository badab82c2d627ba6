"""A training process for the Trainer tests: python trainer_child.py SPEC.json

SPEC: {"workdir", "overrides": {...}, "stop_after": int|null, "out": path|null, "sleep": float}
Writes to `out` (safetensors): the LoRA weights and the flattened optimizer state, and `out`.json: the batch keys
of each step, the LR of each step, the final step. `stop_after` raises CancelFitException after that many updates
(a clean stop: checkpoint, then end). `sleep` slows each step (so a test can SIGKILL it mid-run).
"""
import json, sys, time
from pathlib import Path


def main(spec_path):
    spec = json.loads(Path(spec_path).read_text())
    import torch
    from safetensors.torch import save_file
    from flux2_kit.trainer import Callback, CancelFitException, Trainer
    from flux2_kit.tiny import tiny_config
    from flux2_kit.lora import lora_state_dict

    class Record(Callback):
        order = 100
        def __init__(self): self.keys, self.lrs = [], []
        def after_step(self, t):
            if t.last.stepped:
                self.keys.append(t.last.keys); self.lrs.append(t.last.lr)
            if spec.get("sleep"): time.sleep(spec["sleep"])
            if spec.get("stop_after") and t.step >= spec["stop_after"]: raise CancelFitException()

    rec = Record()
    t = Trainer(tiny_config(spec["workdir"], **spec.get("overrides", {})), callbacks=[rec], progress=False)
    t.fit()
    if spec.get("out"):
        tensors = {f"lora.{k}": v for k, v in lora_state_dict(t.transformer).items()}
        opt = t.optimizer.optimizer if hasattr(t.optimizer, "optimizer") else t.optimizer
        for pid, st in opt.state_dict()["state"].items():
            for k, v in st.items():
                if torch.is_tensor(v): tensors[f"opt.{pid}.{k}"] = v.detach().clone().contiguous()
        save_file(tensors, spec["out"])
        Path(spec["out"] + ".json").write_text(json.dumps(dict(keys=rec.keys, lrs=rec.lrs, step=t.step,
                                                               last_lr=t.lr_scheduler.get_last_lr()[0])))


if __name__ == "__main__":
    main(sys.argv[1])
