"""Readable output: where an HTML figure gets plotly.js from, long token labels that are
not clipped, a short printed summary of a LensResult, and command-line defaults that take seconds."""

from __future__ import annotations

import io
import shutil

import plotly.graph_objects as go
import pytest
import torch

import v4lens
import v4lens.weights.loading
from v4lens import plot
from v4lens.cli import build_parser
from v4lens.cli import main as cli_main

pytestmark = pytest.mark.usefixtures("single_thread")
CHROMIUM = plot.find_browser()


def _figure(labels=("0·x", "1·y")):
    fig = plot.style.figure("test", width=600, height=400)
    fig.add_trace(go.Heatmap(z=[[0.1, 0.9], [0.7, 0.2]], x=["a", "b"], y=list(labels), showscale=False))
    return fig


# ---------------------------------------------------------------------- plot.save(include_plotlyjs=)
def test_save_puts_plotlyjs_inline_beside_or_on_a_cdn(tmp_path):
    inline = plot.save(_figure(), tmp_path / "inline" / "fig.html")
    assert inline.stat().st_size > 1_000_000 and "<script src=" not in inline.read_text()  # the default: standalone
    pages = [plot.save(_figure(), tmp_path / "dir" / f"fig{i}.html", include_plotlyjs="directory") for i in range(2)]
    assert sorted(p.name for p in (tmp_path / "dir").iterdir()) == ["fig0.html", "fig1.html", "plotly.min.js"]
    assert all(p.stat().st_size < 50_000 and 'src="plotly.min.js"' in p.read_text() for p in pages)
    assert (tmp_path / "dir" / "plotly.min.js").stat().st_size > 1_000_000  # one copy for the folder
    cdn = plot.save(_figure(), tmp_path / "cdn.html", include_plotlyjs="cdn")
    assert cdn.stat().st_size < 50_000 and "cdn.plot.ly" in cdn.read_text()
    with pytest.raises(ValueError, match=r"include_plotlyjs must be one of \('inline', 'directory', 'cdn'\), got True"):
        plot.save(_figure(), tmp_path / "x.html", include_plotlyjs=True)


def test_a_stale_plotlyjs_beside_the_page_is_replaced(tmp_path):
    (tmp_path / "plotly.min.js").write_text("/** plotly.js v1.0.0 */ old")
    plot.save(_figure(), tmp_path / "fig.html", include_plotlyjs="directory")
    assert (tmp_path / "plotly.min.js").stat().st_size > 1_000_000


def test_a_cut_short_plotlyjs_is_rewritten_and_a_foreign_file_is_left_alone(tmp_path):
    from plotly.offline import get_plotlyjs

    full = get_plotlyjs().encode()
    (tmp_path / "plotly.min.js").write_bytes(full[:100_000])  # an earlier write that did not finish
    plot.save(_figure(), tmp_path / "fig.html", include_plotlyjs="directory")
    assert (tmp_path / "plotly.min.js").read_bytes() == full
    other = tmp_path / "other"
    other.mkdir()
    (other / "plotly.min.js").write_text("// my own script")
    with pytest.raises(FileExistsError, match="not a plotly.js bundle"):
        plot.save(_figure(), other / "fig.html", include_plotlyjs="directory")
    assert (other / "plotly.min.js").read_text() == "// my own script"


# ---------------------------------------------------------------------- long labels
class _LongTokens:
    """A stand-in model whose tokenizer decodes every id to a long string."""

    def to_str_tokens(self, tokens, prepend_bos=False):
        return ["    def forward(self, x: torch.Tensor) -> torch.Tensor:" if int(t) else "short" for t in tokens]


def test_long_token_labels_are_cut_and_axes_make_room():
    labels = plot.style.token_labels(_LongTokens(), tokens=torch.tensor([0, 1]))
    assert labels[0] == "0·short" and labels[1].endswith("…")
    assert len(labels[1]) == len("1·") + plot.style.MAX_TOKEN_CHARS
    layout = _figure().layout.template.layout
    assert layout.xaxis.automargin is True and layout.yaxis.automargin is True  # every figure's axes


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on PATH (apt-get install chromium)")
def test_a_long_label_is_drawn_whole():
    from PIL import Image

    fig = _figure(labels=["0·" + "W" * 24, "1·b"])  # as long as token_labels lets a label be
    image = Image.open(io.BytesIO(fig.to_image(format="png"))).convert("L")
    edge = [image.getpixel((x, y)) for x in range(6) for y in range(image.height)]
    assert min(edge) == 255, "the tick label runs off the left edge of the figure"


# ---------------------------------------------------------------------- LensResult summary
def test_lens_result_prints_a_short_summary():
    model = v4lens.load("tiny-recall")
    _, cache = model.run_with_cache(torch.tensor([[0, 8, 9, 10, 16, 72, 11, 12, 4, 16]]))
    text = repr(cache.logit_lens(k=3))
    lines = text.splitlines()
    assert lines[0].startswith("LensResult: 4 boundaries × batch 1 × 10 positions (0..9); top-3, targets, per_stream")
    assert len(lines) == 2 + 4 and len(text) < 1000
    assert lines[1].strip() == "top-1 at position 8 (batch row 0; target id 16):"
    assert lines[-1].split()[0] == "2_post" and "target p=" in lines[-1] and "rank" in lines[-1]
    each = repr(cache.logit_lens(k=3).per_stream).splitlines()  # one short cell per stream
    assert each[0].endswith("top-3, targets, each of 4 streams read alone") and len(each) == 6
    assert all(line.count(" | ") == 3 for line in each[2:])


# ---------------------------------------------------------------------- command-line defaults
def test_cli_defaults_fit_any_machine(monkeypatch):
    args = build_parser().parse_args(["viz", "--out", "figs"])
    assert args.model == "tiny-recall" and args.dtype is None and args.prompt is None and args.plotlyjs == "directory"
    asked = {}

    def fake_load(name, dtype=None, **kwargs):
        asked[name] = dtype
        raise RuntimeError("stop here")

    monkeypatch.setattr(v4lens.weights.loading, "load", fake_load)
    for name in ("tiny-recall", "tiny", "mini-3b"):
        assert cli_main(["run", name, "--prompt", "x"]) == 1
    assert asked == {"tiny-recall": "fp32", "tiny": "fp32", "mini-3b": "bf16"}  # fp32 below 1B parameters
    assert cli_main(["run", "mini-3b", "--dtype", "fp32", "--prompt", "x"]) == 1 and asked["mini-3b"] == "fp32"


def test_cli_viz_by_default_writes_small_pages(tmp_path, capsys):
    out = tmp_path / "figs"
    assert cli_main(["viz", "--out", str(out), "--no-png"]) == 0
    pages = sorted(out.glob("*.html"))
    assert len(pages) > 10 and (out / "plotly.min.js").is_file()
    assert sum(p.stat().st_size for p in pages) < 5_000_000  # one plotly.js for the folder, not 4.8 MB a page
    index = (out / "index.html").read_text()
    assert "tiny-recall" in index and "BOS FILL_" in index and "QUERY KEY_" in index
    assert "wrote" in capsys.readouterr().out
    shutil.rmtree(out)
