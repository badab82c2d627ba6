"""flux2_kit speed and memory, measured side by side in one run on flux2-small, printed as a table of ratios.

    python benchmarks/run_all.py [--quick] [--threads N] [--res 512] [--repeats R] [--only overhead,tread,...]

Sections (all on `flux2_tiny("dev", "small")`, LoRA r16 on every target, one 512 px image = 1024 image tokens):

- overhead: a Trainer step (`train_epoch`, callbacks, batch assembly, clipping, scheduler, logging) vs a bare loop
  `transformer(...)`, `loss.backward()`, `optimizer.step()` on the same cached batch and the same model;
- tread: TREAD selection_ratio 0.5 over blocks 2..-2 vs off;
- checkpointing: gradient checkpointing on vs off (time here; peak RSS from the memory children);
- rollout: scheduled sampling with probability 1, max_step_offset 2 vs off (extra no-grad forwards);
- compile: diffusers' regional `compile_repeated_blocks` (inductor) vs eager; compile time reported separately;
- precision: int8-quanto / int4-quanto base vs full precision, and fp32 + checkpointing; each in a fresh subprocess
  that reports its step times, RSS after loading, the peak RSS sampled while training and `getrusage` ru_maxrss;
- cache: `Trainer.cache()` with a warm cache (hit) vs an empty one (miss).

Timed variants are interleaved (base, variant, base, variant, ...) so that load bursts on a shared machine hit both
alike; ratios are medians of the paired per-repeat ratios, with their min-max. On a shared CPU use `--threads 1`.
`--quick` (~3 min) runs 2 repeats and one round of memory children; the full run (7 repeats, two rounds) takes
~6 min on 2 CPU cores with 2 threads, ~10 min with `--threads 1` (add ~50 s for a cold inductor cache). A GPU is used when present (`--device`), with peak memory from `torch.cuda`.
"""
from __future__ import annotations
import argparse, gc, json, os, resource, shutil, statistics, subprocess, sys, tempfile, threading, time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
import torch

SECTIONS = ("overhead", "tread", "checkpointing", "rollout", "compile", "precision", "cache")
MiB = 2 ** 20


# --------------------------------------------------------------------------------------------- timing helpers
def _sync(device):
    if torch.device(device).type == "cuda": torch.cuda.synchronize()

def timed(fn, device="cpu") -> float:
    "Wall seconds of `fn()` (synchronising CUDA around it)."
    _sync(device); t0 = time.perf_counter(); fn(); _sync(device)
    return time.perf_counter() - t0

def stats(ts) -> str:
    return f"{statistics.median(ts):.3f} s ({min(ts):.3f}-{max(ts):.3f})" if ts else "-"

def interleave(fns: dict, repeats: int, warmup: int = 1, device="cpu") -> dict:
    "Run each fn once per round, `warmup + repeats` rounds, in turn; per-name lists of the timed rounds."
    out = {k: [] for k in fns}
    for i in range(warmup + repeats):
        for k, fn in fns.items():
            dt = timed(fn, device)
            if i >= warmup: out[k].append(dt)
    return out

class Row:
    "One line of the final table: base vs variant, ratio = base / variant (> 1: the variant is faster)."
    def __init__(self, name, base_name, base, var_name, var, paired=True, note="", mem=""):
        self.name, self.base_name, self.base, self.var_name, self.var = name, base_name, base, var_name, var
        self.paired, self.note, self.mem = paired, note, mem

    def ratio(self):
        if not self.base or not self.var: return None
        med = statistics.median(self.base) / statistics.median(self.var)
        if self.paired and len(self.base) == len(self.var):
            rs = [b / v for b, v in zip(self.base, self.var)]
            return med, min(rs), max(rs)
        return med, min(self.base) / max(self.var), max(self.base) / min(self.var)

    def ratio_str(self):
        r = self.ratio()
        return "-" if r is None else f"{r[0]:.2f}x ({r[1]:.2f}-{r[2]:.2f})"


# --------------------------------------------------------------------------------------------- memory helpers
def rss() -> int:
    try: return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError): return 0

class PeakRSS:
    "Sample this process's RSS every few ms in a thread; `.peak` after the `with` block."
    def __init__(self, every=0.005): self.every, self.peak, self._stop = every, 0, threading.Event()
    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss()); time.sleep(self.every)
    def __enter__(self):
        self.peak = rss(); self._t = threading.Thread(target=self._run, daemon=True); self._t.start(); return self
    def __exit__(self, *exc):
        self._stop.set(); self._t.join(); self.peak = max(self.peak, rss())

def trim():
    gc.collect()
    try:
        import ctypes; ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError): pass


# --------------------------------------------------------------------------------------------- models and data
def load_lora_model(precision="no_change", device="cpu", rank=16, seed=0):
    "flux2-small's transformer (as the Trainer loads it) with a LoRA on every target, in train mode."
    from flux2_kit.lora import build_lora
    from flux2_kit.models import load_transformer
    from flux2_kit.tiny import flux2_tiny
    torch.manual_seed(seed)
    tr = load_transformer(flux2_tiny("dev", "small"), precision=precision, device=device)
    build_lora(tr, "all", rank=rank)
    return tr.train()

def fwd_bwd(model, batch, seed=0, loss_fn=None, **kw):
    "One flow-matching forward+backward at sigma 0.5 (gradients dropped afterwards)."
    from flux2_kit.flow import FlowSettings, flow_match_loss
    fn = loss_fn or flow_match_loss
    out = fn(model, batch, torch.Generator().manual_seed(seed), FlowSettings(guidance_value=3.5), 0.5, **kw)
    out.loss.backward()
    model.zero_grad(set_to_none=True)
    return out

def trainer_config(workdir: Path, res: int, max_steps: int = 10_000):
    "tiny_config on flux2-small with the sample dataset cropped square at `res` px (all four images in one bucket)."
    from flux2_kit.sample import sample_dataset
    from flux2_kit.tiny import tiny_config
    data = sample_dataset(workdir / "datasets")
    datasets = [dict(id="sample", type="local", instance_data_dir=str(data), caption_strategy="textfile", crop=True,
                     crop_aspect="square", crop_style="center", resolution=res, resolution_type="pixel_area",
                     minimum_image_size=32, cache_dir_vae=str(workdir / "cache" / "vae"), metadata_backend="discovery"),
                dict(id="text-embeds", type="local", dataset_type="text_embeds", default=True,
                     cache_dir=str(workdir / "cache" / "text"), write_batch_size=16)]
    return tiny_config(workdir, "dev", size="small", datasets=datasets, lora_rank=16, max_train_steps=max_steps,
                       learning_rate=1e-4, checkpointing_steps=0, validation_steps=0)


# --------------------------------------------------------------------------------------------- sections
def bench_overhead(ctx, args):
    "Trainer step vs the bare transformer forward+backward+optimizer step, same model, same cached batch."
    from diffusers import Flux2Pipeline as P
    from flux2_kit.trainer import Callback, run_callbacks
    t = ctx["trainer"]
    class StepClock(Callback):
        order = 1000  # after every other callback
        def __init__(self): self.times, self.t0 = [], None
        def before_epoch(self, tr): self.t0 = time.perf_counter()
        def after_step(self, tr):
            _sync(args.device); now = time.perf_counter(); self.times.append(now - self.t0); self.t0 = now
    clock = StepClock()
    t.callbacks.append(clock)
    run_callbacks(t.callbacks, "before_fit", t)
    model, opt = t.transformer, getattr(t.optimizer, "optimizer", t.optimizer)
    b = {k: v.to(t.accelerator.device) if torch.is_tensor(v) else v for k, v in ctx["batch"].items()}
    g = torch.Generator().manual_seed(0)
    x0, emb = b["latents"], b["prompt_embeds"]
    noise = torch.randn(x0.shape, generator=g).to(x0)
    sig = torch.full((x0.shape[0],), 0.5, device=x0.device)
    kw = dict(hidden_states=P._pack_latents(0.5 * x0 + 0.5 * noise), encoder_hidden_states=emb, timestep=sig,
              guidance=torch.full_like(sig, 3.5), img_ids=P._prepare_latent_ids(x0).to(x0.device),
              txt_ids=P._prepare_text_ids(emb).to(x0.device), return_dict=False)
    target = P._pack_latents(noise - x0).float()
    def bare():
        loss = torch.nn.functional.mse_loss(model(**kw)[0].float(), target)
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    trainer_times, bare_times = [], []
    for i in range(1 + args.repeats):
        t.train_epoch(max_steps=t.step + 1)
        dt = timed(bare, args.device)
        if i >= 1: trainer_times.append(clock.times[-1]); bare_times.append(dt)
    t.callbacks.remove(clock)
    return [Row("Trainer step vs bare fwd+bwd+opt", "bare", bare_times, "Trainer", trainer_times,
                note="overhead = ratio^-1 - 1; target <= 5 %")]

def bench_tread(ctx, args):
    from flux2_kit.tread import enable_tread
    m, batch = ctx["model"], ctx["batch"]
    router = enable_tread(m, {"routes": [{"selection_ratio": 0.5, "start_layer_idx": 2, "end_layer_idx": -2}]},
                          torch.Generator().manual_seed(0))
    def run(on):
        def f(): router.enabled = on; fwd_bwd(m, batch)
        return f
    try: ts = interleave({"off": run(False), "on": run(True)}, args.repeats, device=args.device)
    finally: router.remove()
    return [Row("TREAD 0.5 (blocks 2..-2) vs off", "off", ts["off"], "TREAD 0.5", ts["on"], note="target >= 1.3x")]

def bench_checkpointing(ctx, args):
    m, batch = ctx["model"], ctx["batch"]
    def run(on):
        def f():
            m.enable_gradient_checkpointing() if on else m.disable_gradient_checkpointing()
            fwd_bwd(m, batch)
        return f
    try: ts = interleave({"off": run(False), "on": run(True)}, args.repeats, device=args.device)
    finally: m.disable_gradient_checkpointing()
    ctx["ckpt_times"] = ts
    return [Row("gradient checkpointing on vs off", "off", ts["off"], "on", ts["on"],
                note="expected < 1 (recompute); memory in the precision rows")]

def bench_rollout(ctx, args):
    from flux2_kit.rollout import RolloutSettings, flow_match_loss_with_rollout
    m, batch = ctx["model"], ctx["batch"]
    rs = RolloutSettings(max_step_offset=2, probability=1.0)
    extra = []
    def on():
        out = fwd_bwd(m, batch, seed=len(extra), loss_fn=flow_match_loss_with_rollout, rollout=rs)
        extra.append(out.sample_forwards)
    ts = interleave({"off": lambda: fwd_bwd(m, batch), "on": on}, args.repeats, device=args.device)
    k = statistics.mean(extra)
    return [Row("rollout p=1, max_step_offset 2 vs off", "off", ts["off"], "rollout", ts["on"],
                note=f"{k:.1f} extra no-grad forwards/sample (model 1/(1+k/2) = {1 / (1 + k / 2):.2f}x)")]

def bench_compile(ctx, args):
    m, batch = ctx["model"], ctx["batch"]
    c = load_lora_model(device=args.device)
    c.load_state_dict(m.state_dict())
    c.compile_repeated_blocks(dynamic=False)
    try: t_compile = timed(lambda: fwd_bwd(c, batch), args.device)
    except Exception as e:
        print(f"compile: skipped, torch.compile failed here: {type(e).__name__}: {str(e)[:300]}")
        return []
    print(f"compile: first compiled forward+backward (compilation) took {t_compile:.1f} s")
    ts = interleave({"eager": lambda: fwd_bwd(m, batch), "compiled": lambda: fwd_bwd(c, batch)}, args.repeats,
                    device=args.device)
    return [Row("regional compile vs eager", "eager", ts["eager"], "compiled", ts["compiled"],
                note=f"first call (compiles; ~50 s with a cold inductor cache) {t_compile:.0f} s")]

def weight_bytes(model) -> int:
    "Bytes of the model's parameter and buffer storage (quanto tensors counted by their packed data and scales)."
    seen, n = set(), 0
    def add(t):
        nonlocal n
        inner = [getattr(t, a) for a in ("_data", "_scale", "_shift") if torch.is_tensor(getattr(t, a, None))]
        if inner:
            for x in inner: add(x)
            return
        st = t.untyped_storage()
        if st.data_ptr() not in seen: seen.add(st.data_ptr()); n += st.nbytes()
    for t in list(model.parameters()) + list(model.buffers()): add(t)
    return n

def _child_main(spec: dict):
    "In a fresh process: load one configuration, train `steps` steps, print a JSON line with times and memory."
    from safetensors.torch import load_file
    import importlib
    for mod in ("diffusers", "peft", "optimum.quanto", "flux2_kit.lora", "flux2_kit.models", "flux2_kit.flow"):
        importlib.import_module(mod)  # imported before the baseline RSS, so every configuration pays them alike
    if spec["threads"]: torch.set_num_threads(spec["threads"])
    dev = spec["device"]
    tensors = load_file(spec["batch"])
    batch = dict(latents=tensors["latents"].to(dev), prompt_embeds=tensors["prompt_embeds"].to(dev))
    trim(); rss0 = rss()
    m = load_lora_model(spec["precision"], device=dev)
    if spec["checkpointing"]: m.enable_gradient_checkpointing()
    trim(); rss_loaded = rss()
    if dev.startswith("cuda"): torch.cuda.reset_peak_memory_stats()
    times = []
    with PeakRSS() as peak:
        for i in range(spec["warmup"] + spec["steps"]):
            dt = timed(lambda: fwd_bwd(m, batch), dev)
            if i >= spec["warmup"]: times.append(dt)
    out = dict(times=times, rss_imports=rss0, rss_loaded=rss_loaded, train_peak_rss=peak.peak,
               ru_maxrss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, weights=weight_bytes(m),
               cuda_peak=torch.cuda.max_memory_allocated() if dev.startswith("cuda") else None)
    print("CHILD_RESULT " + json.dumps(out))

def _run_child(spec: dict) -> dict:
    p = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    for line in p.stdout.splitlines():
        if line.startswith("CHILD_RESULT "): return json.loads(line[len("CHILD_RESULT "):])
    raise RuntimeError(f"memory child {spec} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")

def bench_precision(ctx, args):
    from safetensors.torch import save_file
    path = ctx["workdir"] / "bench_batch.safetensors"
    save_file({k: ctx["batch"][k].contiguous().cpu() for k in ("latents", "prompt_embeds")}, str(path))
    configs = {"fp32": ("no_change", False), "int8-quanto": ("int8-quanto", False),
               "int4-quanto": ("int4-quanto", False), "fp32 + checkpointing": ("no_change", True)}
    res = {k: [] for k in configs}
    rounds, steps = (1, 2) if args.quick else (2, max(2, args.repeats // 2))
    for r in range(rounds):
        for name, (prec, ck) in configs.items():
            res[name].append(_run_child(dict(precision=prec, checkpointing=ck, device=args.device, threads=args.threads,
                                             batch=str(path), warmup=1, steps=steps)))
    med = lambda k, f: statistics.median([f(x) for x in res[k]])
    above = lambda x: x["train_peak_rss"] - x["rss_imports"]  # training RSS above the imported libraries
    def mem(k):
        s = (f"weights {med(k, lambda x: x['weights']) / MiB:.0f} MiB, train peak RSS {med(k, above) / MiB:.0f} MiB "
             f"above imports, ru_maxrss {med(k, lambda x: x['ru_maxrss']) / MiB:.0f} MiB")
        if res[k][0]["cuda_peak"] is not None: s += f", cuda peak {med(k, lambda x: x['cuda_peak']) / MiB:.0f} MiB"
        return s
    times = {k: [t for x in v for t in x["times"]] for k, v in res.items()}
    for k in configs: print(f"precision {k:22s} {stats(times[k])}; {mem(k)}")
    rows = []
    for k in ("int8-quanto", "int4-quanto", "fp32 + checkpointing"):
        w, w0 = med(k, lambda x: x["weights"]), med("fp32", lambda x: x["weights"])
        pk, pk0 = med(k, above), med("fp32", above)
        rows.append(Row(f"{k} vs fp32 (fresh process)", "fp32", times["fp32"], k, times[k], paired=False,
                        mem=f"weights {w / MiB:.0f} vs {w0 / MiB:.0f} MiB; train peak RSS above imports "
                            f"{pk / MiB:.0f} vs {pk0 / MiB:.0f} MiB ({pk / pk0:.2f}x)"))
    return rows

def bench_cache(ctx, args):
    "Trainer.cache() on an empty cache (miss: encode text + VAE) vs a filled one (hit), each in a fresh Trainer."
    from flux2_kit.trainer import Trainer
    wd = ctx["workdir"] / "cachebench"
    cfg = trainer_config(wd, args.res)
    miss, hit, miss_all, hit_all = [], [], [], []
    for i in range(max(2, args.repeats // 2)):
        shutil.rmtree(wd / "cache", ignore_errors=True)
        for kind in ("miss", "hit"):
            t = Trainer(cfg, progress=False)
            t.prepare_data()
            t_load = timed(t.load_encoders, args.device)
            t_cache = timed(t.cache, args.device)
            stats_ = [c.stats for c in [t.text_cache, *t.latent_caches.values()]]
            if kind == "miss": assert all(s.misses > 0 for s in stats_), stats_; miss.append(t_cache); miss_all.append(t_load + t_cache)
            else: assert all(s.misses == 0 for s in stats_), stats_; hit.append(t_cache); hit_all.append(t_load + t_cache)
            t.finish(); del t; trim()  # finish: the next Trainer may take the run directory
    return [Row("cache hit vs miss: Trainer.cache()", "miss", miss, "hit", hit, note="encoders loaded beforehand"),
            Row("cache hit vs miss: load_encoders + cache()", "miss", miss_all, "hit", hit_all,
                note="what a restarted run waits for")]


# --------------------------------------------------------------------------------------------- main
def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="2 repeats, one round of memory children (~3 min)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads (default: os.cpu_count())")
    p.add_argument("--res", type=int, default=512, help="image side in pixels (tokens = (res/16)^2)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per variant (default 7, quick 2)")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma list of sections: {','.join(SECTIONS)}")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workdir", default=None, help="folder for the dataset copy and caches (default: a temp folder)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None: return _child_main(json.loads(args.child))
    args.repeats = args.repeats or (2 if args.quick else 7)
    if args.threads: torch.set_num_threads(args.threads)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in only if s not in SECTIONS]
    if bad: p.error(f"unknown section(s) {bad}; choose from {SECTIONS}")
    t_start = time.perf_counter()
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="flux2_kit_bench_"))
    workdir.mkdir(parents=True, exist_ok=True)
    from flux2_kit.trainer import Trainer
    print(f"flux2_kit benchmarks: flux2-small dev, {args.res} px ({(args.res // 16) ** 2} image tokens), batch 1, "
          f"LoRA r16 (all targets), {args.device}, fp32, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"repeats {args.repeats}{' (quick)' if args.quick else ''}, workdir {workdir}")
    # the Trainer (also the source of the cached batch every section trains on)
    t0 = time.perf_counter()
    trainer = Trainer(trainer_config(workdir / "run", args.res), progress=False)
    trainer.cache()
    trainer.build_lora()
    ds, idx = next(iter(trainer.data_sampler))
    batch = trainer.make_batch(ds, idx)
    batch = dict(latents=batch["latents"], prompt_embeds=batch["prompt_embeds"])
    print(f"setup: Trainer cache + LoRA in {time.perf_counter() - t0:.1f} s; batch latents "
          f"{tuple(batch['latents'].shape)}, prompt_embeds {tuple(batch['prompt_embeds'].shape)}")
    ctx = dict(trainer=trainer, batch={k: v.to(args.device) for k, v in batch.items()}, workdir=workdir)
    rows = []
    for name in SECTIONS:
        if name not in only: continue
        if name in ("tread", "checkpointing", "rollout", "compile") and "model" not in ctx:
            ctx["model"] = load_lora_model(device=args.device)
        if name == "precision" or name == "cache":
            ctx.pop("model", None); trim()
        ts = time.perf_counter()
        new = globals()[f"bench_{name}"](ctx, args)
        for r in new: print(f"{r.name}: {r.base_name} {stats(r.base)} | {r.var_name} {stats(r.var)} | {r.ratio_str()}")
        print(f"  [{name}: {time.perf_counter() - ts:.0f} s]", flush=True)
        rows += new
    # the table
    print("\nratio = baseline time / variant time (> 1: variant faster); median of paired repeats (min-max)")
    w = max(len(r.name) for r in rows) if rows else 10
    print(f"{'comparison':{w}s} | {'baseline':24s} | {'variant':24s} | {'ratio':20s} | notes")
    print("-" * (w + 100))
    for r in rows:
        notes = "; ".join(x for x in (r.mem, r.note) if x)
        print(f"{r.name:{w}s} | {stats(r.base):24s} | {stats(r.var):24s} | {r.ratio_str():20s} | {notes}")
    for r in rows:
        if r.name.startswith("Trainer step"):
            ratio = r.ratio()
            print(f"\nTrainer overhead over the bare step: {(1 / ratio[0] - 1) * 100:+.1f} % by medians "
                  f"(paired range {(1 / ratio[2] - 1) * 100:+.1f} % .. {(1 / ratio[1] - 1) * 100:+.1f} %)")
    print(f"total {time.perf_counter() - t_start:.0f} s")
    if not args.workdir: shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
