"""Shared by the example scripts: a parser built from the script's docstring, and model loading."""

import argparse


def parser(doc: str) -> argparse.ArgumentParser:
    """First paragraph of `doc` as the description, the rest (usage examples) as the epilog, plus --dtype and
    --device."""
    ap = argparse.ArgumentParser(
        description=doc.split("\n\n")[0],
        epilog=doc.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--dtype", default="auto", help="fp32 / bf16; auto = bf16 for mini-3b, fp32 otherwise")
    ap.add_argument("--device", default=None, help="where the model runs: cpu (default), cuda, cuda:1, ...")
    return ap


def load_model(args):
    """`v4lens.load(args.model)` on args.device in args.dtype (auto: bf16 for mini-3b), gradients off."""
    import torch  # imported late so that --help is instant

    import v4lens

    torch.set_grad_enabled(False)
    dtype = ("bf16" if args.model == "mini-3b" else None) if args.dtype == "auto" else args.dtype
    return v4lens.load(args.model, device=args.device, dtype=dtype)


def save_figure(fig, path) -> None:
    """Write a figure (.html always works; .png/.svg/.pdf need Chromium — otherwise say so, HTML written)."""
    from v4lens import plot

    try:
        print("wrote", plot.save(fig, path))
    except plot.ExportError as e:
        print(e)
