"""Shared by the example scripts: a parser built from the script's docstring, and model loading."""

import argparse


def parser(doc: str) -> argparse.ArgumentParser:
    """First paragraph of `doc` as the description, the rest (usage examples) as the epilog, plus --dtype."""
    ap = argparse.ArgumentParser(
        description=doc.split("\n\n")[0],
        epilog=doc.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--dtype", default="auto", help="fp32 / bf16; auto = bf16 for mini-3b, fp32 otherwise")
    return ap


def load_model(args):
    """`v4lens.load(args.model)` in args.dtype (auto: bf16 for mini-3b), with gradients off for the script."""
    import torch  # imported late so that --help is instant

    import v4lens

    torch.set_grad_enabled(False)
    dtype = ("bf16" if args.model == "mini-3b" else None) if args.dtype == "auto" else args.dtype
    return v4lens.load(args.model, dtype=dtype)


def save_figure(fig, path) -> None:
    """Write a figure (.html always works; .png/.svg/.pdf need Chromium — otherwise say so, HTML written)."""
    from v4lens import plot

    try:
        print("wrote", plot.save(fig, path))
    except plot.ExportError as e:
        print(e)
