"""`make demo`: build flux2-tiny and the sample dataset, then render a preview grid through the real pipeline.

Until the Trainer lands this is the quickstart: it shows flux2-tiny loading through `Flux2Pipeline` exactly as
`black-forest-labs/FLUX.2-dev` would, with the sample dataset's captions as prompts.
"""
import os, sys, time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

def main(out_dir="runs/demo"):
    import torch
    from PIL import Image
    from flux2_kit.tiny import flux2_tiny, pipeline_class
    from flux2_kit.sample import sample_dataset
    t0 = time.time()
    data = sample_dataset()
    model = flux2_tiny("dev")
    print(f"flux2-tiny (dev): {model}\nsample dataset:   {data} ({len(list(data.glob('*.txt')))} captioned photos)")
    pipe = pipeline_class("dev").from_pretrained(model)
    prompts = [p.read_text().strip() for p in sorted(data.glob("*.txt"))[:4]]
    images = pipe(prompt=prompts, height=128, width=128, num_inference_steps=4, guidance_scale=4.0,
                  max_sequence_length=128, generator=torch.Generator().manual_seed(0)).images
    grid = Image.new("RGB", (128 * len(images), 128))
    for i, im in enumerate(images): grid.paste(im, (128 * i, 0))
    out = Path(out_dir); out.mkdir(parents=True, exist_ok=True)
    grid.save(out / "grid.png")
    print(f"wrote {out / 'grid.png'} ({len(images)} previews, {time.time() - t0:.1f}s)")

if __name__ == "__main__":
    main(*sys.argv[1:])
