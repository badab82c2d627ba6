"""TREAD on vs off: LoRA forward+backward per step on flux2-small.

    python benchmarks/bench_tread.py [--repeats 7] [--res 512] [--text 64] [--ratio 0.5] [--start 2] [--end -2]
                                     [--checkpointing] [--flavour klein] [--threads 1]

On a CPU shared with other jobs, `--threads 1` gives far steadier timings than the default thread count.

Both settings run on the same model and batch in one process, interleaved (off, on, off, on, ...) so that load bursts
on a shared machine hit both alike. Prints medians with the spread (min..max) and the ratio of medians.
"""
import argparse, os, statistics, time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch


def build(args, device, dtype):
    from diffusers import Flux2Transformer2DModel
    from peft import LoraConfig
    from flux2_kit.tiny import flux2_tiny
    path = flux2_tiny(args.flavour, "small") / "transformer"
    m = Flux2Transformer2DModel.from_pretrained(path, torch_dtype=dtype).to(device)
    # every LoRA-able linear (DESIGN.md); a regex because a bare "to_out" would hit the double blocks' ModuleList
    targets = r"(transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)" \
              r"|ff\.linear_(in|out)|ff_context\.linear_(in|out))|single_transformer_blocks\.\d+\.attn\.(to_qkv_mlp_proj|to_out))"
    m.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=targets))
    if args.checkpointing: m.enable_gradient_checkpointing()
    return m.train()


def batch(m, args, device, dtype):
    g = torch.Generator().manual_seed(0)
    h = w = args.res // 16
    cp = torch.cartesian_prod
    img_ids = cp(torch.arange(1), torch.arange(h), torch.arange(w), torch.arange(1))[None].expand(args.batch, -1, -1)
    txt_ids = cp(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(args.text))[None].expand(args.batch, -1, -1)
    kw = dict(hidden_states=torch.randn(args.batch, h * w, 128, generator=g),
              encoder_hidden_states=torch.randn(args.batch, args.text, m.config.joint_attention_dim, generator=g),
              timestep=torch.rand(args.batch, generator=g), img_ids=img_ids, txt_ids=txt_ids,
              guidance=torch.full((args.batch,), 3.5) if m.config.guidance_embeds else None)
    kw = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) if v is not None else None for k, v in kw.items()}
    target = torch.randn(args.batch, h * w, 128, generator=g).to(device, dtype)
    return dict(kw, return_dict=False), target


def step(m, kw, target, device):
    if device.type == "cuda": torch.cuda.synchronize()
    t0 = time.perf_counter()
    loss = torch.nn.functional.mse_loss(m(**kw)[0].float(), target.float())
    loss.backward()
    if device.type == "cuda": torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    m.zero_grad(set_to_none=True)
    return dt


def main():
    from flux2_kit.tread import enable_tread
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--flavour", default="dev", choices=["dev", "klein"])
    p.add_argument("--res", type=int, default=512, help="image side in pixels (tokens = (res/16)^2)")
    p.add_argument("--text", type=int, default=64, help="text tokens")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--start", type=int, default=2)
    p.add_argument("--end", type=int, default=-2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    if args.threads: torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    m = build(args, device, dtype)
    kw, target = batch(m, args, device, dtype)
    router = enable_tread(m, {"routes": [{"selection_ratio": args.ratio, "start_layer_idx": args.start,
                                          "end_layer_idx": args.end}]}, torch.Generator().manual_seed(0))
    n_img = (args.res // 16) ** 2
    print(f"flux2-small-{args.flavour} ({len(m.transformer_blocks)}+{len(m.single_transformer_blocks)} blocks, "
          f"inner {m.inner_dim}), {args.res}px = {n_img} image + {args.text} text tokens, batch {args.batch}, "
          f"LoRA r{args.rank}, {device} {dtype}, threads {torch.get_num_threads()}, "
          f"checkpointing {'on' if args.checkpointing else 'off'}")
    print(f"TREAD route {router.spans} (blocks {router.spans[0][0]}..{router.spans[0][1]} see "
          f"{round((1 - args.ratio) * n_img)} of {n_img} image tokens)")
    times = {"off": [], "on": []}
    for i in range(args.warmup + args.repeats):
        for name in ("off", "on"):
            router.enabled = name == "on"
            dt = step(m, kw, target, device)
            if i >= args.warmup: times[name].append(dt)
    for name, ts in times.items():
        print(f"TREAD {name:3s}: median {statistics.median(ts):.3f} s/step  (min {min(ts):.3f}, max {max(ts):.3f}, n={len(ts)})")
    ratio = statistics.median(times["off"]) / statistics.median(times["on"])
    best = min(times["off"]) / min(times["on"])
    print(f"speed-up TREAD {args.ratio:g} vs off: {ratio:.2f}x by medians ({best:.2f}x by best), target >= 1.3x")


if __name__ == "__main__":
    main()
