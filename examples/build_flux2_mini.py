"""Rebuild flux2-mini from nothing: renders, VAE, text encoder, transformer (flux2_kit.mini.build_flux2_mini).

    python examples/build_flux2_mini.py                 # into the package: flux2_kit/assets/flux2-mini-dev
    python examples/build_flux2_mini.py --out /tmp/m    # somewhere else
    python examples/build_flux2_mini.py --quick --out /tmp/m   # a smoke run: a few images and steps, useless weights
"""
import argparse, os, sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="folder to write (default: the packaged flux2_kit/assets/flux2-mini-dev)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a few images and steps (a smoke run for tests)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (1: deterministic, the packaged weights; more: faster, another result)")
    a = ap.parse_args(argv)
    from flux2_kit.mini import build_flux2_mini
    from flux2_kit.tiny import MINI_DIR
    build_flux2_mini(a.out or MINI_DIR, seed=a.seed, quick=a.quick, overwrite=a.overwrite, threads=a.threads,
                     log=lambda *m: print(*m, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
