"model_type 'full' (issue 17): every transformer weight trains; checkpoints resume it; the export is a diffusers transformer."
import pytest
import torch

from flux2_kit.check import CheckError
from flux2_kit.lora import unwrap_model
from flux2_kit.models import load_transformer
from flux2_kit.tiny import tiny_config
from flux2_kit.trainer import Trainer


def test_full_fine_tune_trains_checkpoints_resumes_and_exports(tmp_path):
    over = dict(model_type="full", base_model_default_dtype="fp32", learning_rate=1e-3, max_train_steps=3,
                checkpointing_steps=2, validation_steps=3, validation_num_inference_steps=1)
    t = Trainer(tiny_config(tmp_path / "a", **over), progress=False)
    t.fit()
    assert t.lora_info is None and t.status == "completed"
    model = unwrap_model(t.transformer)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == len(list(model.parameters()))  # every weight, no adapter
    base = load_transformer(t.cfg.model_path, default_dtype="fp32")
    changed = sum(not torch.equal(p, q) for p, q in zip(model.state_dict().values(), base.state_dict().values()))
    assert changed > len(base.state_dict()) // 2  # the weights themselves moved
    out = t.rundir.root / "transformer"
    back = type(base).from_pretrained(out)
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), model.state_dict().values()))
    grids = sorted(t.rundir.previews_dir.glob("step-*/grid.png"))
    assert [g.parent.name for g in grids] == ["step-000000", "step-000003"]
    # resume the step-2 checkpoint in a new process state: the same step 3
    r = Trainer(tiny_config(tmp_path / "b", **over), progress=False)
    r.resume(t.rundir.checkpoints_dir / "checkpoint-000002")
    assert r.step == 2
    r.fit()
    assert r.step == 3
    rm = unwrap_model(r.transformer)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(rm.state_dict().values(), model.state_dict().values()))


def test_full_fine_tune_refuses_a_quantised_base_and_warns_for_bf16(tmp_path):
    with pytest.raises(CheckError, match="'model_type' = 'full' trains every weight, so they cannot be quantised"):
        Trainer(tiny_config(tmp_path / "q", model_type="full", base_model_precision="int4-quanto"), progress=False).check()
    t = Trainer(tiny_config(tmp_path / "w", model_type="full", base_model_default_dtype="bf16"), progress=False)
    assert any("use optimizer 'adamw_bf16'" in p.message for p in t.check().problems)
    t.finish()
