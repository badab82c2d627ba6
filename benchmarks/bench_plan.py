"""Memory planner: measured vs predicted peaks on flux2-small (CPU).

    python benchmarks/bench_plan.py [--quick] [--text 128]

Each configuration runs in a fresh single-threaded subprocess (`flux2_kit.plan.measure_peak`: peak RSS from VmHWM,
reset after loading, glibc's mmap threshold pinned at 64 KiB so freed tensors leave RSS) and `plan(..., device="cpu")`
predicts the same quantity from the configuration alone. Prints the training table (weights + LoRA + optimizer states +
activations of one LoRA step, above the bare process) with the error of each prediction, the least-squares fit of the
one training constant (TRANSIENT) and checks of the inference / text-encoder / VAE constants at a second size.
bf16 steps are slow on CPUs without native bf16 (~20-70 s each); --quick runs the fp32 rows only.
"""
import argparse, os, time
from dataclasses import replace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import flux2_kit.plan as P

TRAIN = [  # (label, settings)
    ("fp32, 256 px, batch 1", dict(base_model_precision="fp32", mixed_precision="no", train_batch_size=1, resolution=256)),
    ("fp32, 512 px, batch 1", dict(base_model_precision="fp32", mixed_precision="no", train_batch_size=1, resolution=512)),
    ("fp32, 256 px, batch 2, checkpointing", dict(base_model_precision="fp32", mixed_precision="no", train_batch_size=2, resolution=256, gradient_checkpointing=True)),
    ("bf16, 256 px, batch 1", dict(base_model_precision="bf16", mixed_precision="bf16", train_batch_size=1, resolution=256)),
    ("bf16, 256 px, batch 2", dict(base_model_precision="bf16", mixed_precision="bf16", train_batch_size=2, resolution=256)),
    ("bf16, 512 px, batch 1, checkpointing", dict(base_model_precision="bf16", mixed_precision="bf16", train_batch_size=1, resolution=512, gradient_checkpointing=True)),
    ("int8-quanto, 256 px, batch 1", dict(base_model_precision="int8-quanto", base_model_default_dtype="bf16", mixed_precision="bf16", train_batch_size=1, resolution=256)),
    ("int8-quanto, 512 px, batch 1, checkpointing", dict(base_model_precision="int8-quanto", base_model_default_dtype="bf16", mixed_precision="bf16", train_batch_size=1, resolution=512, gradient_checkpointing=True)),
]


def train_rows(args):
    rows = []
    for label, cfg in TRAIN:
        if args.quick and "fp32" not in label: continue
        c = dict(model="flux2-small:dev", base_model_default_dtype="fp32", tokenizer_max_length=args.text, lora_rank=16)
        c.update(cfg)
        t = time.time()
        r = P.measure_peak("train", **c)
        s = P.resolve_settings(None, **c)
        act = P.transformer_activations(P.model_spec(s.model), s)
        pred = P.plan(None, device="cpu", **c).phases["training"].peak
        biggest = act.transient / P.TRANSIENT
        rows.append(dict(label=label, measured=r["peak"], predicted=pred, biggest=biggest, seconds=time.time() - t))
        print(f"  {label:<45} measured {r['peak'] / 2**20:7.1f} MiB  predicted {pred / 2**20:7.1f} MiB  "
              f"{pred / r['peak'] - 1:+6.1%}   ({time.time() - t:.0f} s)", flush=True)
    return rows


def other_rows():
    "Inference, text-encoder and VAE constants checked at a size they were not fitted at."
    out = []
    meas, pred = [], []
    for res in (256, 512):  # per-token check: the difference between two sizes drops the process's constant ~12 MiB
        s = P.resolve_settings(None, model="flux2-small:dev", base_model_precision="bf16", base_model_default_dtype="fp32",
                               mixed_precision="bf16", validation_resolution=res, tokenizer_max_length=128)
        r = P.measure_peak("infer", model="flux2-small:dev", base_model_precision="bf16", mixed_precision="bf16",
                           resolution=res, tokenizer_max_length=128)
        meas.append(r["peak"] - r["weights"]); pred.append(P.inference_activations(P.model_spec(s.model), s))
    out.append(("preview forward, bf16: 512 px minus 256 px", meas[1] - meas[0], pred[1] - pred[0]))
    o = dict(hidden_size=256, intermediate_size=1600, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    spec = P.model_spec("flux2-small:dev")
    spec = replace(spec, text_encoder=dict(spec.text_encoder, text_config=dict(spec.text_encoder["text_config"], **o)))
    st = P.resolve_settings(None, base_model_default_dtype="fp32", write_batch_size=6, tokenizer_max_length=512)
    r = P.measure_peak("text", model="flux2-small:dev", dtype="fp32", write_batch_size=6, tokenizer_max_length=512, text_overrides=o)
    out.append(("text encoder (Mistral3 diet, width 256), 6 x 512 tokens", r["peak"] - r["weights"], P.text_activations(spec, st)))
    for kind, dec in (("vae_encode", False), ("vae_decode", True)):
        sv = P.resolve_settings(None, vae_dtype="fp32", resolution=320, validation_resolution=320, vae_batch_size=1)
        r = P.measure_peak(kind, model="dev", vae_dtype="fp32", vae_batch_size=1, resolution=320)
        out.append((f"{kind.replace('_', ' ')} (real VAE), 320 px", r["peak"] - r["weights"],
                    P.vae_activations(P.model_spec("dev"), sv, decode=dec)))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fp32 training rows only")
    p.add_argument("--text", type=int, default=128, help="text tokens per sample")
    p.add_argument("--no-other", action="store_true", help="skip the inference/text/VAE checks")
    args = p.parse_args()
    print(f"training step on flux2-small (LoRA r16 'all', AdamW, text {args.text} tokens), peak above the bare process:")
    rows = train_rows(args)
    # least-squares TRANSIENT: measured = (pred - TRANSIENT*biggest) + c*biggest
    num = sum((r["measured"] - (r["predicted"] - P.TRANSIENT * r["biggest"])) * r["biggest"] for r in rows)
    den = sum(r["biggest"] ** 2 for r in rows)
    errs = [r["predicted"] / r["measured"] - 1 for r in rows]
    print("\n| configuration | measured MiB | predicted MiB | error |\n|---|---:|---:|---:|")
    for r, e in zip(rows, errs): print(f"| {r['label']} | {r['measured'] / 2**20:.1f} | {r['predicted'] / 2**20:.1f} | {e:+.1%} |")
    print(f"\nmax |error| {max(map(abs, errs)):.1%} (goal 15%); TRANSIENT in use {P.TRANSIENT}, least-squares fit {num / den:.2f}")
    if not args.no_other:
        print("\nactivation peaks (peak minus weights):")
        for label, meas, pred in other_rows():
            print(f"  {label:<58} measured {meas / 2**20:7.1f} MiB  predicted {pred / 2**20:7.1f} MiB  {pred / meas - 1:+6.1%}")


if __name__ == "__main__":
    main()
