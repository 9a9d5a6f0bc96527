"""Export a standard set of v4lens figures for one prompt: HTML always, images when Chromium exists.

One cached forward feeds every figure (routing, expert load, mHC combs, stream norms, indexer
scores, compressed entries, attention pattern, sink mass, logit lens). Each is written as a
self-contained HTML page and, for every other --formats entry (png, svg, pdf), through kaleido in a
single browser session (`plot.export_session`). Without Chromium the images are skipped with
`plot.ExportError`'s message and the HTML files are still written. An index.html links them all.

    python examples/export_figures.py --model mini-3b --out-dir figs/
    python examples/export_figures.py --model tiny --formats html,png,svg --layer 1 --out-dir figs/
"""

import html
import time
from pathlib import Path

from _common import load_model, parser

DEFAULT_PROMPT = "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy cat."


def parse_args(argv=None):
    ap = parser(__doc__)
    ap.add_argument(
        "--model", default="mini-3b", help="preset (tiny, mini-3b) or checkpoint directory (default: mini-3b)"
    )
    ap.add_argument("--prompt", default=DEFAULT_PROMPT)
    ap.add_argument("--layer", type=int, default=None, help="CSA layer for the per-layer figures (default: the first)")
    ap.add_argument("--head", type=int, default=0, help="attention head for the pattern figure (default 0)")
    ap.add_argument("--formats", default="html,png", help="comma-separated: html, png, svg, pdf (default html,png)")
    ap.add_argument("--scale", type=float, default=2.0, help="PNG resolution multiplier (default 2)")
    ap.add_argument("--out-dir", default="figures", help="output folder (default figures/)")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)

    from v4lens import plot

    formats = [f.strip().lower().lstrip(".") for f in args.formats.split(",") if f.strip()]
    bad = sorted(set(formats) - {"html", "png", "svg", "pdf"})
    if bad:
        raise SystemExit(f"unknown format(s) {bad}: use html, png, svg, pdf")
    model = load_model(args)
    cfg = model.cfg
    csa = [l for l in range(cfg.n_layers) if cfg.layer_type(l) == "csa"]
    layer = csa[0] if args.layer is None else args.layer
    compressed = [l for l in range(cfg.n_layers) if cfg.layer_type(l) in ("csa", "hca")]
    tokens = model.to_tokens(args.prompt)
    _, cache = model.run_with_cache(tokens)

    builders = {
        "router_heatmap": lambda: plot.router_heatmap(model, cache, layer=layer),
        "expert_load": lambda: plot.expert_load(model, cache, normalize=True),
        "comb_grid": lambda: plot.comb_grid(model, cache),
        "stream_norms": lambda: plot.stream_norms(model, cache),
        "indexer_scores": lambda: plot.indexer_scores(model, cache, layer=layer) if layer in csa else None,
        "compressed_entries": lambda: (
            plot.compressed_entries(model, cache, layer=compressed[-1]) if compressed else None
        ),
        "attention_pattern": lambda: plot.attention_pattern(model, cache, layer=layer, head=args.head),
        "sink_mass": lambda: plot.sink_mass(model, cache),
        "logit_lens": lambda: plot.logit_lens_table(cache),
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = {name: fig for name, build in builders.items() if (fig := build()) is not None}
    written: dict[str, list[Path]] = {name: [] for name in figures}
    t0 = time.perf_counter()
    for name, fig in figures.items():
        written[name].append(plot.save(fig, out / f"{name}.html"))  # HTML: always possible, offline
    images = [f for f in formats if f != "html"]
    problem = None
    if images:
        with plot.export_session():  # one Chromium for every image
            for name, fig in figures.items():
                for fmt in images:
                    try:
                        written[name].append(plot.save(fig, out / f"{name}.{fmt}", scale=args.scale))
                    except plot.ExportError as e:
                        problem = e
                        break
                if problem:
                    break
    if problem:
        print(f"images skipped: {problem}")
    index = ["<!doctype html><meta charset='utf-8'><title>v4lens figures</title>",
             f"<h1>v4lens figures · {html.escape(args.model)}</h1><p>{html.escape(args.prompt)}</p><ul>"]  # fmt: skip
    for name, paths in written.items():
        links = " · ".join(f"<a href='{p.name}'>{p.suffix[1:]}</a>" for p in paths)
        index.append(f"<li>{name}: {links}</li>")
    (out / "index.html").write_text("\n".join(index + ["</ul>"]), encoding="utf-8")
    n_files = sum(len(p) for p in written.values())
    print(
        f"{args.model}: {len(figures)} figures, {n_files} files in {time.perf_counter() - t0:.1f} s "
        f"-> {out / 'index.html'}"
    )
    for name, paths in written.items():
        print(f"  {name:20s} {', '.join(p.name for p in paths)}")


if __name__ == "__main__":
    main()
