"""Figure export (offline HTML, PNG through kaleido + Chromium), pages rendered in headless Chromium, the CLI.

Tests that need Chromium are skipped with a reason where it is absent; `scripts/setup.sh` (run by
`.ci/run`) installs Debian's chromium and chromium-driver, so CI runs them.
"""

from __future__ import annotations

import io
import json
import shutil

import plotly.graph_objects as go
import pytest
import torch

import v4lens
from v4lens import plot
from v4lens.cli import main as cli_main

pytestmark = pytest.mark.usefixtures("single_thread")
CHROMIUM, CHROMEDRIVER = plot.find_browser(), shutil.which("chromedriver")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on PATH (apt-get install chromium)")
needs_driver = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None, reason="no Chromium + chromedriver (apt-get install chromium-driver)"
)


def _figure():
    fig = plot.style.figure("test", width=640, height=400)
    fig.add_trace(go.Heatmap(z=[[0.1, 0.9, 0.4], [0.7, 0.2, 0.5]], x=["a", "b", "c"], y=["0·x", "1·y"]))
    return fig


def test_html_is_self_contained(tmp_path):
    path = plot.save(_figure(), tmp_path / "fig.html")
    page = path.read_text()
    assert "<script src=" not in page  # nothing fetched from a CDN
    assert "Plotly.newPlot" in page or "Plotly.react" in page
    assert len(page) > 1_000_000  # plotly.js itself is embedded (works offline)


def test_unknown_format_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown figure format"):
        plot.save(_figure(), tmp_path / "fig.bmp")


def test_without_chromium_html_is_still_written(tmp_path, monkeypatch):
    monkeypatch.setattr(plot.export, "find_browser", lambda: None)
    with pytest.raises(plot.ExportError, match="apt-get install chromium.*fig.html"):
        plot.save(_figure(), tmp_path / "fig.png")
    assert (tmp_path / "fig.html").exists() and not (tmp_path / "fig.png").exists()


@needs_chromium
def test_png_svg_pdf_export(tmp_path):
    from PIL import Image

    fig = _figure()
    with plot.export_session():
        png = plot.save(fig, tmp_path / "fig.png", width=500, height=300)
        doubled = plot.save(fig, tmp_path / "fig2.png", width=500, height=300, scale=2)
        svg = plot.save(fig, tmp_path / "fig.svg")
        pdf = plot.save(fig, tmp_path / "fig.pdf")
    assert Image.open(png).size == (500, 300) and Image.open(doubled).size == (1000, 600)
    assert svg.read_text().lstrip().startswith(("<svg", "<?xml")) and pdf.read_bytes()[:4] == b"%PDF"
    image = Image.open(png).convert("RGB")
    assert len(image.getcolors(1 << 20)) > 50  # a drawn heatmap, not a blank page


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1100,800"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def render(browser, path):
    """Open a page, wait for plotly to draw, return (screenshot as PIL image, severe console messages)."""
    from PIL import Image
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get_log("browser")  # drop earlier pages' messages
    browser.get(path.resolve().as_uri())
    WebDriverWait(browser, 30).until(
        lambda d: d.execute_script("return document.querySelectorAll('.main-svg').length") > 0
    )
    shot = Image.open(io.BytesIO(browser.get_screenshot_as_png())).convert("RGB")
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    return shot, errors


@needs_driver
def test_exported_page_renders_in_chromium(tmp_path, browser):
    shot, errors = render(browser, plot.save(_figure(), tmp_path / "fig.html"))
    assert errors == []
    assert len(shot.getcolors(1 << 20)) > 50  # heatmap colours, axes, text: not blank
    browser.execute_script("console.error('a deliberate error')")
    assert any("deliberate" in e["message"] for e in browser.get_log("browser"))  # errors would be seen


# ---------------------------------------------------------------------- the command line
def test_cli_info(capsys, tmp_path):
    assert cli_main(["info", "mini-3b"]) == 0
    out = capsys.readouterr().out
    assert "3.17B" in out and "sliding: 3" in out and "csa: 13" in out and "hca: 12" in out and "3:H112" in out
    assert cli_main(["info", "tiny", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["d_model"] == 64
    model = v4lens.load("tiny", d_vocab=512)
    model.save_pretrained(tmp_path / "ckpt")
    assert cli_main(["info", str(tmp_path / "ckpt")]) == 0
    assert "vocab 512" in capsys.readouterr().out
    assert cli_main(["info", str(tmp_path / "nowhere")]) == 1


def test_cli_run(capsys):
    assert cli_main(["run", "tiny", "--prompt", "The capital of France is", "--top-k", "3", "--dtype", "fp32"]) == 0
    out = capsys.readouterr().out
    assert "next token" in out and "MTP depth 0" in out
    model = v4lens.load("tiny")
    tokens = model.to_tokens("The capital of France is")
    with torch.no_grad():
        best = int(model(tokens)[0, -1].argmax())
    assert repr(model.to_string([best])) in out.split("MTP depth 0")[0]
    assert cli_main(["run", "tiny", "--prompt", "Hi", "--chat", "--top-k", "2"]) == 0


def test_cli_generate_streams_the_greedy_continuation(capsys):
    for extra in ([], ["--speculative"]):
        assert cli_main(["generate", "tiny", "--prompt", "Hello there", "--max-new-tokens", "5", "--dtype", "fp32", *extra]) == 0
        captured = capsys.readouterr()
        model = v4lens.load("tiny")
        expected = model.generate("Hello there", 5, return_type="generation")
        assert captured.out == model.to_string(expected.new_tokens[0]) + "\n"
        assert "5 tokens in" in captured.err


def test_every_command_has_help(capsys):
    for command in ([], ["slice"], ["info"], ["run"], ["generate"], ["viz"]):
        with pytest.raises(SystemExit) as exit_:
            cli_main([*command, "--help"])
        assert exit_.value.code == 0
        assert "usage: v4lens" in capsys.readouterr().out


def test_cli_viz_writes_what_it_promises(tmp_path, capsys):
    out = tmp_path / "figs"
    args = ["viz", "--model", "tiny", "--dtype", "fp32", "--prompt", "The capital of France is Paris, and the",
            "--layers", "1,2", "--out", str(out)]  # fmt: skip
    if CHROMIUM is None:
        args.append("--no-png")
    assert cli_main(args) == 0
    names = ["expert_load", "routed_vs_shared", "comb_grid", "pre_post_weights", "stream_norms", "sink_mass",
             "indexer_L1", "entries_L1", "entries_L2", "attention_L1_h0", "attention_L2_h0"]  # fmt: skip
    names += [f"router_L{l}" for l in range(4)] + [f"sinkhorn_L{l}" for l in range(4)]
    assert (out / "plotly.min.js").stat().st_size > 1_000_000  # one plotly.js beside the pages (--plotlyjs directory)
    for name in names:
        assert 'src="plotly.min.js"' in (out / f"{name}.html").read_text(), name
        if CHROMIUM is not None:
            assert (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG", name
    assert not (out / "indexer_L2.html").exists()  # layer 2 is HCA: no indexer
    index = (out / "index.html").read_text()
    assert all(f'href="{name}.html"' in index for name in names)
    assert "wrote 19 figures" in capsys.readouterr().out
    assert cli_main(["viz", "--model", "tiny", "--prompt", "x", "--layers", "9", "--out", str(out)]) == 1


@needs_driver
def test_viz_pages_render_in_chromium(tmp_path, browser):
    out = tmp_path / "figs"
    assert cli_main(["viz", "--model", "tiny", "--prompt", "Rome is the capital of", "--layers", "1",
                     "--out", str(out), "--no-png"]) == 0  # fmt: skip
    for name in ("comb_grid", "attention_L1_h0", "router_L0", "indexer_L1"):
        shot, errors = render(browser, out / f"{name}.html")
        assert errors == [], (name, errors)
        assert len(shot.getcolors(1 << 20)) > 50, name
