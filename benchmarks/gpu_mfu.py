"""Model FLOPs utilisation of a LoRA training step on full-width FLUX.2 blocks (one CUDA GPU, bf16).

    python benchmarks/gpu_mfu.py [--double 2] [--single 4] [--res 1024] [--text 512] [--rank 16] [--batch 1]
                                 [--repeats 10] [--warmup 3] [--peak_tflops T] [--checkpointing] [--compile]

Builds `Flux2Transformer2DModel` with FLUX.2-dev's width (48 heads x 128 = 6144, joint_attention_dim 15360,
mlp_ratio 3) but only a few blocks (random weights: FLOPs do not depend on the values), puts a peft LoRA (rank 16,
every attention/MLP Linear of the blocks, as flux2_kit's preset "all") on it, and times forward+backward with
fp32 LoRA weights under bf16 autocast on a bf16 base, the way a bf16 Trainer run trains.

FLOPs are counted analytically from the configuration:

- every Linear: 2 * tokens * in * out (image tokens for the image stream, text tokens for the text stream, both for
  the single blocks), LoRA adapters as two small Linears (in*r + r*out);
- attention: 4 * N^2 * inner (Q K^T and attention x V over the N = image + text tokens);
- model FLOPs (the MFU convention) = 3 x forward (backward = 2 x forward);
- executed FLOPs: with a frozen base the backward skips the base weights' gradients, so the Linears cost
  2 x forward (forward + input gradient) and attention 3 x; checkpointing adds one more forward.

MFU = model FLOPs / step time / peak dense bf16 FLOPs of the GPU (from a table of known GPUs by
`torch.cuda.get_device_name`, or `--peak_tflops`). The analytic Linear count is cross-checked against a count made
by forward hooks on every `nn.Linear` during one forward. Without CUDA it prints one line and exits 0
(`--dry-run` runs the same code at toy width on the CPU, to check the script, not to measure).
"""
from __future__ import annotations
import argparse, os, statistics, sys, time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# dense bf16 tensor-core peaks in TFLOPs (no sparsity); most specific names first
PEAK_BF16_TFLOPS = [
    ("GB200", 2500.0), ("B200", 2250.0), ("H200", 989.4), ("GH200", 989.4), ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0), ("H100", 989.4), ("H800", 989.4), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.1),
    ("L40", 181.0), ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0), ("RTX 4090", 165.2), ("RTX 6000 Ada", 364.2),
    ("RTX 3090", 71.0),
]


def peak_tflops(name: str) -> float | None:
    "Dense bf16 peak of a GPU by (part of) its name, None if unknown."
    for key, v in PEAK_BF16_TFLOPS:
        if key.lower() in name.lower(): return v
    return None


def analytic_flops(inner: int, mlp_hidden: int, joint_dim: int, in_channels: int, n_img: int, n_txt: int,
                   n_double: int, n_single: int, rank: int, batch: int = 1) -> dict:
    "Forward FLOPs of the blocks and embedders by part (Linears, LoRA, attention), for `batch` samples."
    D, M, N = inner, mlp_hidden, n_img + n_txt
    lin = lambda tokens, i, o: 2 * tokens * i * o
    lora = lambda tokens, i, o: 2 * tokens * (i * rank + rank * o)
    base = adapters = attn = 0
    for _ in range(n_double):
        for n in (n_img, n_txt):  # each stream: q, k, v, out; SwiGLU MLP in (D -> 2M) and out (M -> D)
            shapes = [(D, D)] * 4 + [(D, 2 * M), (M, D)]
            base += sum(lin(n, i, o) for i, o in shapes)
            adapters += sum(lora(n, i, o) for i, o in shapes)
        attn += 4 * N * N * D
    for _ in range(n_single):  # fused qkv + MLP in, fused attention-out + MLP out
        shapes = [(D, 3 * D + 2 * M), (D + M, D)]
        base += sum(lin(N, i, o) for i, o in shapes)
        adapters += sum(lora(N, i, o) for i, o in shapes)
        attn += 4 * N * N * D
    embed = lin(n_img, in_channels, D) + lin(n_txt, joint_dim, D) + lin(n_img, D, in_channels)  # x/context embedders, proj_out
    return {k: v * batch for k, v in dict(linear=base + embed, lora=adapters, attention=attn).items()}


def fmt_flops(x: float) -> str:
    return f"{x / 1e12:.2f} TFLOP" if x >= 1e11 else f"{x / 1e9:.3f} GFLOP"


def build(args, device, dtype):
    import torch
    from diffusers import Flux2Transformer2DModel
    from flux2_kit.lora import build_lora
    torch.manual_seed(0)
    with torch.device(device):
        m = Flux2Transformer2DModel(num_layers=args.double, num_single_layers=args.single,
                                    num_attention_heads=args.heads, attention_head_dim=args.head_dim,
                                    joint_attention_dim=args.joint_dim, axes_dims_rope=args.rope)
    m.to(dtype)
    info = build_lora(m, "all", rank=args.rank)  # fp32 adapter weights over the bf16 base
    if args.checkpointing: m.enable_gradient_checkpointing()
    if args.compile: m.compile_repeated_blocks(dynamic=False)
    return m.train(), info


def inputs(m, args, device, dtype):
    import torch
    h = w = args.res // 16
    cp = torch.cartesian_prod
    g = torch.Generator(device=device).manual_seed(0)
    img_ids = cp(torch.arange(1), torch.arange(h), torch.arange(w), torch.arange(1)).to(device)
    txt_ids = cp(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(args.text)).to(device)
    kw = dict(hidden_states=torch.randn(args.batch, h * w, 128, generator=g, device=device, dtype=dtype),
              encoder_hidden_states=torch.randn(args.batch, args.text, args.joint_dim, generator=g, device=device, dtype=dtype),
              timestep=torch.full((args.batch,), 0.5, device=device), guidance=torch.full((args.batch,), 3.5, device=device),
              img_ids=img_ids, txt_ids=txt_ids, return_dict=False)
    return kw, torch.randn(args.batch, h * w, 128, generator=g, device=device, dtype=torch.float32)


def counted_linear_flops(m, kw, device, dtype) -> int:
    "2 * tokens * in * out summed over every nn.Linear call of one forward (forward hooks)."
    import torch
    total = [0]
    def hook(mod, inp, out):
        x = inp[0]
        total[0] += 2 * (x.numel() // x.shape[-1]) * mod.in_features * mod.out_features
    hs = [mod.register_forward_hook(hook) for mod in m.modules() if isinstance(mod, torch.nn.Linear)]
    try:
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"): m(**kw)
    finally:
        for h in hs: h.remove()
    return total[0]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--double", type=int, default=2, help="double-stream blocks")
    p.add_argument("--single", type=int, default=4, help="single-stream blocks")
    p.add_argument("--res", type=int, default=1024, help="image side in pixels ((res/16)^2 image tokens)")
    p.add_argument("--text", type=int, default=512, help="text tokens")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--peak_tflops", type=float, default=None, help="the GPU's dense bf16 peak (default: from its name)")
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true", help="regional torch.compile of the blocks")
    p.add_argument("--dry-run", action="store_true", help="toy width on any device, to check the script")
    args = p.parse_args()
    import torch
    if not torch.cuda.is_available() and not args.dry_run:
        print("gpu_mfu: skipped, no CUDA device (torch.cuda.is_available() is False); run it on a GPU machine")
        return 0
    args.heads, args.head_dim, args.joint_dim, args.rope = 48, 128, 15360, (32, 32, 32, 32)
    if args.dry_run:  # toy width: checks the code path and the FLOP cross-check, measures nothing
        args.heads, args.head_dim, args.joint_dim, args.rope = 2, 32, 96, (8, 8, 8, 8)
        args.res, args.text, args.repeats, args.warmup = min(args.res, 128), min(args.text, 32), 2, 1
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda": torch.backends.cuda.matmul.allow_tf32 = True
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = args.peak_tflops or (peak_tflops(name) if device.type == "cuda" else None)

    m, info = build(args, device, dtype)
    kw, target = inputs(m, args, device, dtype)
    inner, n_img = args.heads * args.head_dim, (args.res // 16) ** 2
    fl = analytic_flops(inner, int(inner * 3.0), args.joint_dim, 128, n_img, args.text, args.double, args.single,
                        args.rank, args.batch)
    fwd = sum(fl.values())
    model_flops = 3 * fwd
    executed = 2 * fl["linear"] + 3 * (fl["lora"] + fl["attention"]) + (fwd if args.checkpointing else 0)
    counted = counted_linear_flops(m, kw, device, dtype)
    analytic_lin = fl["linear"] + fl["lora"]
    params = sum(q.numel() for q in m.parameters())

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            out = m(**kw)[0]
        loss = torch.nn.functional.mse_loss(out.float(), target)
        loss.backward()
        m.zero_grad(set_to_none=True)

    if device.type == "cuda": torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(args.warmup + args.repeats):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record(); step(); b.record(); torch.cuda.synchronize()
            dt = a.elapsed_time(b) / 1e3
        else:
            t0 = time.perf_counter(); step(); dt = time.perf_counter() - t0
        if i >= args.warmup: times.append(dt)
    med = statistics.median(times)

    print(f"{'DRY RUN (toy width, not a measurement): ' if args.dry_run else ''}FLUX.2 blocks {args.double} double + "
          f"{args.single} single, inner {inner} ({args.heads}x{args.head_dim}), joint_attention_dim {args.joint_dim}, "
          f"{params / 1e9:.2f} B params; {args.res} px = {n_img} image + {args.text} text tokens, batch {args.batch}; "
          f"LoRA r{args.rank} on {len(info.targets)} Linears ({info.trainable_params / 1e6:.1f} M trainable); "
          f"{dtype} base, fp32 adapters{', autocast bf16' if device.type == 'cuda' else ''}"
          f"{', checkpointing' if args.checkpointing else ''}{', compiled' if args.compile else ''}")
    print(f"device: {name}; torch {torch.__version__}")
    print(f"forward: {fmt_flops(fwd)} (Linears {fmt_flops(fl['linear'])}, LoRA {fmt_flops(fl['lora'])}, "
          f"attention {fmt_flops(fl['attention'])}); Linear FLOPs counted by hooks {fmt_flops(counted)} vs "
          f"analytic {fmt_flops(analytic_lin)} ({counted / analytic_lin:.4f}x; the rest: modulation/timestep Linears)")
    print(f"step (forward+backward): median {med * 1e3:.1f} ms (min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f}, "
          f"n={len(times)})" + (f"; peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.type == "cuda" else ""))
    achieved = model_flops / med / 1e12
    print(f"model FLOPs/step {fmt_flops(model_flops)} (3 x forward) -> {achieved:.3f} TFLOP/s; "
          f"executed {fmt_flops(executed)} -> {executed / med / 1e12:.3f} TFLOP/s")
    if peak:
        print(f"MFU {achieved / peak:.1%} of {peak:g} TFLOP/s dense bf16 ({name}); "
              f"hardware utilisation (executed FLOPs) {executed / med / 1e12 / peak:.1%}")
    else:
        print(f"MFU: unknown peak for {name!r}; pass --peak_tflops")
    return 0


if __name__ == "__main__":
    sys.exit(main())
