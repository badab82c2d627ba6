"""Text encoding on flux2-small: batched vs one prompt at a time, and the encoder diet vs the full encoder.

    python benchmarks/bench_encode.py [--flavour dev] [--prompts 32] [--batch 16] [--max-length 512] [--repeats 5]
                                      [--threads 1] [--no-memory]

1. Throughput: the same prompts encoded by `encode_prompts` in batches of `--batch` and one at a time, interleaved
   (batched, single, batched, ...) so load bursts on a shared machine hit both alike. Prints prompts/s as median
   (min..max) over `--repeats` and the ratio of medians.
2. Encoder diet: parameters loaded, encode time (same interleaving) and peak RSS of loading + encoding, each
   measured in a fresh subprocess (`ru_maxrss`), diet vs `diet=False`.

On a CPU shared with other jobs, `--threads 1` gives far steadier timings than the default thread count.
"""
import argparse, json, os, statistics, subprocess, sys, time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = ("a cat on a red sofa", "a lighthouse in fog", "street food market at night", "an old map of a harbour",
         "macro photo of a dew-covered leaf", "a robot painting a portrait", "snowy mountain village at dawn",
         "a bowl of ramen, top view")


def prompts(n):
    return [f"{WORDS[i % len(WORDS)]}, variation {i}, " + "detailed, " * (i % 5) for i in range(n)]


def med(xs): return f"{statistics.median(xs):8.2f} ({min(xs):.2f}..{max(xs):.2f})"


def throughput(args):
    import torch
    from flux2_kit.models import encode_prompts, load_text_encoder
    enc = load_text_encoder(f"flux2-small:{args.flavour}", args.flavour, max_length=args.max_length, device="cpu")
    ps = prompts(args.prompts)
    encode_prompts(enc, ps[:2])  # warm-up
    batched, single = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        for i in range(0, len(ps), args.batch): encode_prompts(enc, ps[i:i + args.batch])
        batched.append(len(ps) / (time.perf_counter() - t))
        t = time.perf_counter()
        for p in ps: encode_prompts(enc, [p])
        single.append(len(ps) / (time.perf_counter() - t))
    assert torch.equal(encode_prompts(enc, ps[:3]), torch.cat([encode_prompts(enc, [p]) for p in ps[:3]]))
    print(f"flux2-small {args.flavour}, {args.prompts} prompts, max_length {args.max_length}, "
          f"{torch.get_num_threads()} thread(s), {args.repeats} repeats")
    print(f"  batched (batch {args.batch:>3}): {med(batched)} prompts/s")
    print(f"  one at a time:       {med(single)} prompts/s")
    print(f"  ratio of medians (batched / one at a time): {statistics.median(batched) / statistics.median(single):.2f}x")


def _hwm_kb() -> int:
    "Peak RSS of this process in KiB (VmHWM: reset by exec, unlike ru_maxrss, which a child inherits)."
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"): return int(line.split()[1])
    return 0


def _child(args):
    "Load (diet or full), encode, report params, encode times and peak RSS as JSON."
    import diffusers, transformers  # noqa: F401  (imports are not part of the comparison)
    del diffusers, transformers
    from flux2_kit.models import encode_prompts, load_text_encoder
    base = _hwm_kb()
    enc = load_text_encoder(f"flux2-small:{args.flavour}", args.flavour, max_length=args.max_length, device="cpu",
                            diet=args.child == "diet")
    ps = prompts(args.batch)
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter(); out = encode_prompts(enc, ps); times.append(time.perf_counter() - t)
    peak = _hwm_kb()
    print(json.dumps(dict(params=enc.summary.params_loaded, full=enc.summary.params_full, times=times,
                          peak_kb=peak, base_kb=base, sum=float(out.double().sum()))))


def diet(args):
    res = {}
    for mode in ("diet", "full"):
        cmd = [sys.executable, __file__, "--child", mode, "--flavour", args.flavour, "--batch", str(args.batch),
               "--max-length", str(args.max_length), "--repeats", str(args.repeats), "--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        res[mode] = json.loads(out)
    d, f = res["diet"], res["full"]
    assert d["sum"] == f["sum"], "diet and full embeddings differ"
    print(f"encoder diet, flux2-small {args.flavour}, batch {args.batch} x {args.max_length} tokens (fresh process each):")
    for k, r in res.items():
        print(f"  {k:4}: {r['params']:>11,} params, encode {med(r['times'])} s, "
              f"peak RSS {r['peak_kb'] / 1024:7.1f} MiB (after imports {r['base_kb'] / 1024:.1f})")
    print(f"  params loaded: {d['params'] / f['params']:.1%} of the full model; encode time ratio "
          f"{statistics.median(d['times']) / statistics.median(f['times']):.2f}; peak RSS above imports "
          f"{(d['peak_kb'] - d['base_kb']) / max(f['peak_kb'] - f['base_kb'], 1):.1%} of full; embeddings identical\n"
          f"  (the full model also computes LM-head logits, batch x tokens x 131072 floats, which the pipeline discards)")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--flavour", default="dev", choices=["dev", "klein"])
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--no-memory", action="store_true", help="skip the diet vs full comparison")
    p.add_argument("--no-throughput", action="store_true", help="skip the batched vs one-at-a-time comparison")
    p.add_argument("--child", choices=["diet", "full"], help=argparse.SUPPRESS)
    args = p.parse_args()
    import torch
    if args.threads: torch.set_num_threads(args.threads)
    if args.child: return _child(args)
    if not args.no_throughput: throughput(args)
    if not args.no_memory: diet(args)


if __name__ == "__main__":
    main()
