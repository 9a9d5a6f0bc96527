"""Writing figures: offline HTML always; PNG / SVG / PDF / JPEG / WebP through kaleido + Chromium.

An HTML page needs plotly.js (4.8 MB). `save(..., include_plotlyjs=)` says where it comes from:
"inline" (the default) embeds it, so the one file opens anywhere, offline, even moved or emailed
alone; "directory" writes one plotly.min.js beside the pages and every page in that folder shares
it (a few KB a page, still offline: move the folder, not a lone page; `v4lens viz` does this);
"cdn" loads it from cdn.plot.ly when the page is opened (smallest, needs the network).

kaleido (plotly's image exporter) drives a headless Chromium. v4lens uses the system's
Chromium (Debian: `apt-get install chromium`; kaleido finds it on PATH, or set BROWSER_PATH)
and never downloads one. Where none exists, `save` still writes the HTML next to the requested
file and raises `ExportError` saying what to install.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

IMAGE_FORMATS = (".png", ".svg", ".pdf", ".jpg", ".jpeg", ".webp")
PLOTLYJS = ("inline", "directory", "cdn")  # where an HTML page gets plotly.js from (module docstring)
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


class ExportError(RuntimeError):
    """An image could not be written (no Chromium, or kaleido failed); the HTML was written instead."""


def find_browser() -> str | None:
    """The Chromium kaleido will use: $BROWSER_PATH, else the first of BROWSERS on PATH."""
    import os

    if os.environ.get("BROWSER_PATH"):
        path = os.environ["BROWSER_PATH"]
        return path if os.path.isfile(path) and os.access(path, os.X_OK) else None
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def save(fig, path: str | Path, width: int | None = None, height: int | None = None, scale: float = 1.0,
         include_plotlyjs: str = "inline") -> Path:  # fmt: skip
    """Write `fig` to `path`; the suffix picks the format. Returns the path written.

    .html: a page that works offline; include_plotlyjs: "inline" (default: plotly.js embedded, a
    self-contained 4.8 MB file), "directory" (one plotly.min.js shared by the folder's pages) or
    "cdn" (fetched when opened). It also applies to the HTML written when an image export fails.
    .png / .svg / .pdf / .jpg / .webp: through kaleido; width/height in CSS pixels (default: the
    figure's own), `scale` multiplies the PNG resolution.

        v4lens.plot.save(fig, "router.html"); v4lens.plot.save(fig, "router.png", width=900, height=500)
    """
    if include_plotlyjs not in PLOTLYJS:
        raise ValueError(f"include_plotlyjs must be one of {PLOTLYJS}, got {include_plotlyjs!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix in (".html", ".htm"):
        if include_plotlyjs == "directory":
            _ensure_bundle(path.parent / "plotly.min.js")
        plotlyjs = True if include_plotlyjs == "inline" else include_plotlyjs  # plotly's own word for inline
        fig.write_html(path, include_plotlyjs=plotlyjs, full_html=True)
        return path
    if suffix not in IMAGE_FORMATS:
        raise ValueError(f"unknown figure format {suffix!r}: use .html or one of {', '.join(IMAGE_FORMATS)}")
    if find_browser() is None:
        html = save(fig, path.with_suffix(".html"), include_plotlyjs=include_plotlyjs)
        raise ExportError(
            f"cannot write {path.name}: image export needs a Chromium browser and none was found "
            f"(looked for $BROWSER_PATH and {', '.join(BROWSERS)} on PATH). Install one — on Debian/Ubuntu "
            f"`apt-get install chromium` — and retry. The figure was written as HTML instead: {html}"
        )
    try:
        fig.write_image(path, width=width, height=height, scale=scale)
    except Exception as e:  # kaleido / choreographer raise their own error types
        html = save(fig, path.with_suffix(".html"), include_plotlyjs=include_plotlyjs)
        raise ExportError(f"kaleido could not write {path}: {e}. The figure was written as HTML instead: {html}") from e
    return path


def _ensure_bundle(bundle: Path) -> None:
    """The folder's shared plotly.min.js, complete and of this plotly.js version: written (atomically) when
    missing, cut short or another version's. plotly writes it only where none exists, so a truncated
    one would stay; a file of that name that is not a plotly.js bundle is left alone (FileExistsError)."""
    from plotly.offline import get_plotlyjs, get_plotlyjs_version

    data = get_plotlyjs().encode("utf-8")
    if bundle.is_file():
        with open(bundle, "rb") as f:
            head = f.read(200).decode("utf-8", errors="replace")
        if f"plotly.js v{get_plotlyjs_version()}\n" in head and bundle.stat().st_size == len(data):
            return
        if "plotly.js v" not in head:
            raise FileExistsError(f"{bundle} is not a plotly.js bundle: not replacing it. Save the page in another "
                                  "folder, or with include_plotlyjs='inline'")  # fmt: skip
    tmp = bundle.with_name(f".{bundle.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, bundle)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def export_session():
    """Keep one Chromium running while exporting many images (≈0.25 s per image instead of 3–7 s).

    with v4lens.plot.export_session():
        for name, fig in figures.items():
            v4lens.plot.save(fig, f"out/{name}.png")
    """
    import warnings

    import kaleido

    started = False
    if find_browser() is not None:
        try:
            kaleido.start_sync_server(silence_warnings=True)
            started = True
        except Exception:  # no server: each export starts its own browser, slower but correct
            started = False
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The kopts argument is ignored")
            yield
    finally:
        if started:
            kaleido.stop_sync_server(silence_warnings=True)
