"Checkpoints under failure, with real processes: a raise mid-save, SIGKILL mid-save, retention, junk, truncation, NaN refusal, and bit-exact resume of a peft LoRA in a new process."
import json, os, random, signal, subprocess, sys, textwrap, time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from flux2_kit.checkpoint import _load_safetensors
from flux2_kit.checkpoint import (CheckpointError, ResumeError, capture_rng, check_resume_compatible, latest_checkpoint,
                                  list_checkpoints, load_checkpoint, prune_checkpoints, read_checkpoint_meta,
                                  restore_rng, save_checkpoint, scan_checkpoints)


def _child(code: str, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _names(root: Path): return sorted(p.name for p in root.iterdir())


def _state(seed: int, n: int = 3, size: int = 64):
    "A LoRA-like weight dict and an AdamW-like optimizer state, deterministic in `seed`."
    g = torch.Generator().manual_seed(seed)
    w = {f"blocks.{i}.lora_A.weight": torch.randn(size, 8, generator=g) for i in range(n)}
    opt = {"state": {i: {"step": torch.tensor(float(seed)), "exp_avg": torch.randn(size, 8, generator=g)} for i in range(n)},
           "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "params": list(range(n))}]}
    return w, opt


def _assert_is(ck: dict, seed: int):
    w, opt = _state(seed)
    assert ck["tensors"].keys() == w.keys() and all(torch.equal(ck["tensors"][k], w[k]) for k in w)
    assert torch.equal(ck["optimizer_state"]["state"][1]["exp_avg"], opt["state"][1]["exp_avg"])
    assert ck["optimizer_state"]["param_groups"] == opt["param_groups"]


class _FailsMidway(dict):
    "An optimizer state whose serialisation fails (as a device or memory error would) after the weights were written."
    def __init__(self, root): super().__init__(); self.root, self.seen = root, None
    def items(self):
        self.seen = sorted(f.name for d in self.root.glob("checkpoint-*.tmp-*") for f in d.iterdir())
        raise MemoryError("simulated: out of memory while copying optimizer state")


def test_raise_mid_save_keeps_previous(tmp_path):
    root = tmp_path / "checkpoints"
    w, opt = _state(1)
    save_checkpoint(root, 100, w, opt, meta={"lora_rank": 8})
    bad = _FailsMidway(root)
    w2, _ = _state(2)
    with pytest.raises(MemoryError, match="simulated"):
        save_checkpoint(root, 200, w2, bad)
    assert bad.seen == ["lora.safetensors"]  # the failure really came halfway through the save
    assert _names(root) == ["checkpoint-000100"]  # the half-written folder is gone
    assert latest_checkpoint(root) == root / "checkpoint-000100"
    _assert_is(load_checkpoint(latest_checkpoint(root)), 1)
    # a value that cannot be serialised: a clear error naming where it is, same outcome
    with pytest.raises(TypeError, match=r"optimizer_state\['param_groups'\]\[0\]\['fn'\]: cannot store"):
        save_checkpoint(root, 200, w2, {"param_groups": [{"fn": lambda x: x}]})
    assert _names(root) == ["checkpoint-000100"]
    # the next good save works and becomes latest
    save_checkpoint(root, 200, *_state(2))
    assert latest_checkpoint(root).name == "checkpoint-000200"


_SAVER = """
    import sys, torch
    from flux2_kit.checkpoint import save_checkpoint
    root = sys.argv[1]
    g = torch.Generator().manual_seed(0)
    save_checkpoint(root, 1, {"w": torch.arange(10.0)}, {"state": {}, "param_groups": []}, meta={"m": 1})
    big = {f"w{i}": torch.randn(256, 1024, generator=g) for i in range(8)}  # 8 MB of weights
    opt = {"state": {i: {"exp_avg": torch.randn(256, 1024, generator=g)} for i in range(8)}}  # + 8 MB of optimizer state
    print("ready", flush=True)
    step = 2
    while True:  # keep saving until killed
        save_checkpoint(root, step, big, opt, meta={"m": step})
        step += 1
"""


@pytest.mark.parametrize("delay", [0.0, 0.03, 0.12])
def test_sigkill_mid_save_keeps_previous(tmp_path, delay):
    "A child saving 16 MB checkpoints in a loop is SIGKILLed while a temporary folder exists (then `delay` s later)."
    root = tmp_path / "checkpoints"
    child = _child(_SAVER, root)
    try:
        assert child.stdout.readline().strip() == "ready", child.stderr.read()
        deadline = time.time() + 60
        while not list(root.glob("checkpoint-*.tmp-*")):
            assert time.time() < deadline and child.poll() is None, "no save started"
            time.sleep(0.001)
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None: child.kill(); child.wait()
    assert child.returncode == -signal.SIGKILL
    sc = scan_checkpoints(root)
    if delay == 0.0: assert len(sc.tmp) == 1  # it was killed mid-save
    assert sc.skipped == {}  # nothing half-written under a committed name
    latest = latest_checkpoint(root)
    assert latest == sc.complete[-1]
    ck = load_checkpoint(latest)  # every byte verified against the manifest
    if ck["step"] == 1:
        assert torch.equal(ck["tensors"]["w"], torch.arange(10.0))
    else:
        g = torch.Generator().manual_seed(0)
        assert torch.equal(ck["tensors"]["w0"], torch.randn(256, 1024, generator=g))
        assert ck["meta"] == {"m": ck["step"]}
    # the run resumes and saves again: the stale temporary folder is cleaned by pruning
    nxt = 1000
    save_checkpoint(root, nxt, {"w": torch.ones(1)})
    prune_checkpoints(root, keep=2)
    after = scan_checkpoints(root)
    assert after.tmp == [] and len(after.complete) == min(2, len(sc.complete) + 1)
    assert after.complete[-1].name == f"checkpoint-{nxt:06d}"


def test_retention_keeps_exactly_k_and_never_touches_junk(tmp_path):
    root = tmp_path / "checkpoints"
    root.mkdir()
    junk = ["checkpoint-abc", "checkpoint-000012", "checkpoint-12x", "logs", "checkpoint-000015.bak"]
    for j in junk: (root / j).mkdir()
    (root / "checkpoint-000012" / "optimizer.bin").write_bytes(b"x")  # another tool's folder, no marker
    (root / "README.txt").write_text("mine")
    (root / "checkpoint-000011").write_text("a file with a checkpoint name")
    for k, steps in [(3, range(1, 9)), (1, range(9, 12))]:
        for s in steps:
            save_checkpoint(root, s * 5, *_state(s))
            prune_checkpoints(root, keep=k)
            assert len(list_checkpoints(root)) == min(k, s)
    assert [p.name for p in list_checkpoints(root)] == ["checkpoint-000055"]
    assert _names(root) == sorted(junk + ["README.txt", "checkpoint-000011", "checkpoint-000055"])
    assert (root / "checkpoint-000012" / "optimizer.bin").read_bytes() == b"x"
    assert latest_checkpoint(root).name == "checkpoint-000055"
    sc = scan_checkpoints(root)
    assert sorted(p.name for p in sc.skipped) == ["checkpoint-000011", "checkpoint-000012"]
    assert "no COMPLETE marker" in sc.skipped[root / "checkpoint-000012"]


def test_junk_and_marker_less_newer_folders_are_skipped(tmp_path):
    root = tmp_path / "ck"
    save_checkpoint(root, 10, *_state(1))
    (root / "checkpoint-000090").mkdir()  # marker-less, higher step
    save_file({"w": torch.ones(2)}, str(root / "checkpoint-000090" / "lora.safetensors"))
    (root / "checkpoint-000095.tmp-zz").mkdir()  # an unfinished save
    (root / "checkpoint-999").mkdir(); (root / "checkpoint-999" / "COMPLETE").write_text("{not json")
    (root / "random.bin").write_bytes(os.urandom(100))
    assert latest_checkpoint(root) == root / "checkpoint-000010"
    with pytest.raises(CheckpointError, match="checkpoint-000090 has no COMPLETE marker"):
        load_checkpoint(root / "checkpoint-000090")
    with pytest.raises(CheckpointError, match="checkpoint-000090 already exists; pass overwrite=True"):
        save_checkpoint(root, 90, *_state(2))  # a folder it did not write is never silently replaced
    with pytest.raises(CheckpointError, match="COMPLETE is not valid JSON"):
        load_checkpoint(root / "checkpoint-999")


@pytest.mark.parametrize("name", ["lora.safetensors", "state.safetensors"])
def test_truncated_safetensors_fails_clearly_and_latest_falls_back(tmp_path, name):
    root = tmp_path / "ck"
    save_checkpoint(root, 1, *_state(1))
    c2 = save_checkpoint(root, 2, *_state(2))
    f = c2 / name
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=rf"{name} has \d+ bytes, COMPLETE says \d+ \(truncated"):
        load_checkpoint(c2)
    with pytest.raises(CheckpointError, match=rf"{name} cannot be read as safetensors"):
        _load_safetensors(f)  # what load_checkpoint meets when the manifest is bypassed (verify is not skipped in practice)
    assert latest_checkpoint(root).name == "checkpoint-000001"
    # same size, flipped bytes: only the sha256 check can see it
    c1 = root / "checkpoint-000001" / name
    data = bytearray(c1.read_bytes()); data[-1] ^= 0xFF; c1.write_bytes(bytes(data))
    assert latest_checkpoint(root).name == "checkpoint-000001"  # sizes still match
    with pytest.raises(CheckpointError, match=rf"{name} does not match its sha256"):
        load_checkpoint(root / "checkpoint-000001")
    assert latest_checkpoint(root, verify="sha256") is None


def test_nan_or_inf_is_never_written(tmp_path):
    root = tmp_path / "ck"
    save_checkpoint(root, 1, *_state(1))
    w, opt = _state(2)
    w["blocks.1.lora_A.weight"][3, 4] = float("nan")
    with pytest.raises(CheckpointError, match=r"tensors\['blocks.1.lora_A.weight'\] \(shape \(64, 8\)\) holds 1 NaN and 0 inf"):
        save_checkpoint(root, 2, w, opt)
    w, opt = _state(2)
    opt["state"][2]["exp_avg"][0, 0] = float("-inf")
    with pytest.raises(CheckpointError, match=r"optimizer_state\['state'\]\[2\]\['exp_avg'\]"):
        save_checkpoint(root, 2, w, opt)
    w, opt = _state(2)
    w["bf16"] = torch.full((2,), float("inf"), dtype=torch.bfloat16)
    with pytest.raises(CheckpointError, match=r"tensors\['bf16'\].*0 NaN and 2 inf"):
        save_checkpoint(root, 2, w, opt)
    assert _names(root) == ["checkpoint-000001"]
    assert latest_checkpoint(root).name == "checkpoint-000001"


def test_resume_compatibility_from_a_saved_checkpoint(tmp_path):
    meta = {"base_model": "flux2-tiny-dev", "dataset_fingerprint": "d1", "lora_rank": 8, "lora_alpha": 8,
            "lora_targets": ["attn.to_q", "attn.to_k"], "config_hash": "c1"}
    c = save_checkpoint(tmp_path / "ck", 3, *_state(1), meta=meta)
    saved = read_checkpoint_meta(c)
    assert check_resume_compatible(saved, dict(meta)) == []
    with pytest.raises(ResumeError) as e:
        check_resume_compatible(saved, {**meta, "base_model": "flux2-tiny-klein", "lora_targets": ["attn.to_q"]}, checkpoint=c)
    msg = str(e.value)
    assert str(c) in msg and "base model: saved 'flux2-tiny-dev', now 'flux2-tiny-klein'" in msg
    assert "LoRA target modules: removed ['attn.to_k']" in msg and "resume_from_checkpoint=None" in msg


# ---------------------------------------------------------------------------------------------------------------
# Bit-exact resume in a new process: a real peft LoRA (inject_adapter_in_model) trained with AdamW + a warmup
# LambdaLR, batches from a seeded sampler, input noise from a named generator, dropout on torch's global RNG, and
# draws from python `random` and numpy. N steps straight == k steps + save + new process + load + N-k steps.

_TRAIN = '''
import random, numpy as np, torch
from peft import LoraConfig, inject_adapter_in_model

def make():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Dropout(0.2), torch.nn.Linear(32, 4))
    model = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=["0", "3"], lora_dropout=0.1), model)
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for n, p in model.named_parameters(): p.requires_grad_("lora_" in n)
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))
    data = torch.randn(40, 8, generator=torch.Generator().manual_seed(123))
    target = torch.randn(40, 4, generator=torch.Generator().manual_seed(456))
    gens = {"noise": torch.Generator().manual_seed(7)}
    random.seed(1); np.random.seed(2)
    return model, opt, sched, data, target, gens

class Sampler:
    "Shuffled batches of 6 from 40 items, a new permutation per epoch; state = (epoch, position)."
    def __init__(self, seed=5): self.seed, self.epoch, self.pos = seed, 0, 0
    def next(self):
        perm = torch.randperm(40, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        if self.pos + 6 > 40: self.epoch, self.pos = self.epoch + 1, 0; return self.next()
        idx = perm[self.pos:self.pos + 6]; self.pos += 6; return idx
    def state_dict(self): return {"seed": self.seed, "epoch": self.epoch, "pos": self.pos}
    def load_state_dict(self, d): self.seed, self.epoch, self.pos = d["seed"], d["epoch"], d["pos"]

def lora_sd(model): return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}

def run(model, opt, sched, data, target, gens, sampler, steps, order):
    model.train()
    for _ in range(steps):
        idx = sampler.next(); order.append(idx.tolist())
        x = data[idx] + 0.1 * torch.randn(6, 8, generator=gens["noise"])
        scale = random.uniform(0.5, 1.5) * float(np.random.uniform(0.9, 1.1))
        loss = ((model(x) - target[idx]) ** 2).mean() * scale
        opt.zero_grad(); loss.backward(); opt.step(); sched.step()
'''

_RESUME = '''
import sys, json, torch
from safetensors.torch import save_file
sys.path.insert(0, sys.argv[1])
from trainlib import make, Sampler, run, lora_sd
from flux2_kit.checkpoint import latest_checkpoint, load_checkpoint, restore_rng, check_resume_compatible
import random, numpy as np
model, opt, sched, data, target, gens = make()  # the same base model; the LoRA, optimizer, ... come from the checkpoint
with torch.no_grad():
    for n, p in model.named_parameters():
        if "lora_" in n: p.normal_()  # scrambled: only loading can bring the trained LoRA back
random.seed(11); np.random.seed(12); torch.manual_seed(13); gens["noise"].manual_seed(14)  # scrambled RNGs
ck = load_checkpoint(latest_checkpoint(sys.argv[2]))
check_resume_compatible(ck["meta"], {"lora_rank": 4, "lora_targets": ["3", "0"]})
missing, unexpected = model.load_state_dict(ck["tensors"], strict=False)
assert not unexpected and all("lora_" not in k for k in missing), (missing, unexpected)
opt.load_state_dict(ck["optimizer_state"]); sched.load_state_dict(ck["scheduler_state"])
sampler = Sampler(); sampler.load_state_dict(ck["sampler_state"])
restore_rng(ck["rng"], gens)
order = []
run(model, opt, sched, data, target, gens, sampler, int(sys.argv[3]) - ck["step"], order)
out = {f"lora/{k}": v for k, v in lora_sd(model).items()}
for i, st in opt.state_dict()["state"].items():
    for k, v in st.items(): out[f"opt/{i}/{k}"] = v
save_file(out, sys.argv[4])
print(json.dumps({"lr": sched.get_last_lr(), "order": order}))
'''


def test_bit_exact_resume_in_a_new_process(tmp_path):
    (tmp_path / "trainlib.py").write_text(_TRAIN)
    sys.path.insert(0, str(tmp_path))
    try:
        import trainlib
    finally:
        sys.path.remove(str(tmp_path))
    N, k = 14, 6  # k steps cross no epoch boundary, N does (40 items / 6 per batch = 6 batches per epoch)
    # straight
    model, opt, sched, data, target, gens = trainlib.make()
    straight_order = []
    trainlib.run(model, opt, sched, data, target, gens, trainlib.Sampler(), N, straight_order)
    straight = trainlib.lora_sd(model)
    straight_opt = opt.state_dict()["state"]
    straight_lr = sched.get_last_lr()
    # k steps, save
    model, opt, sched, data, target, gens = trainlib.make()
    sampler, order = trainlib.Sampler(), []
    trainlib.run(model, opt, sched, data, target, gens, sampler, k, order)
    root = tmp_path / "checkpoints"
    save_checkpoint(root, k, trainlib.lora_sd(model), opt.state_dict(), sched.state_dict(), sampler.state_dict(),
                    capture_rng(gens), meta={"lora_rank": 4, "lora_targets": ["0", "3"]})
    # resume N-k steps in a fresh interpreter
    out = tmp_path / "resumed.safetensors"
    p = subprocess.run([sys.executable, "-c", _RESUME, str(tmp_path), str(root), str(N), str(out)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert order + res["order"] == straight_order  # data order continues exactly
    assert res["lr"] == straight_lr
    got = load_file(str(out))
    assert len(straight) == 4  # lora_A and lora_B of two Linears
    for name, w in straight.items():
        assert torch.equal(got[f"lora/{name}"], w), name  # bit for bit
    for i, st in straight_opt.items():
        for key, v in st.items():
            assert torch.equal(got[f"opt/{i}/{key}"], v), (i, key)
    # and the run really moved: LoRA B started at zero
    assert all(w.abs().sum() > 0 for n, w in straight.items() if "lora_B" in n)


def test_capture_restore_rng_next_draws_identical():
    gens = {"noise": torch.Generator().manual_seed(3), "t": torch.Generator().manual_seed(4)}
    torch.rand(5); random.random(); np.random.rand(); torch.randn(2, generator=gens["noise"])
    st = capture_rng(gens)
    draw = lambda: (torch.rand(3).tolist(), random.random(), float(np.random.rand()), np.random.randn(),
                    torch.randn(4, generator=gens["noise"]).tolist(), torch.rand(2, generator=gens["t"]).tolist())
    a = draw(); draw()
    restore_rng(st, gens)
    assert draw() == a
    with pytest.raises(ValueError, match=r"has generators \['noise', 't'\] but \[\] were given"):
        restore_rng(st, {})
