"""The `v4lens` command answers a user's mistake with one line on stderr and an exit code (2: a bad
argument, argparse's convention; 1: anything else that failed), never with a traceback."""

from __future__ import annotations

import json

import pytest

import v4lens
import v4lens.weights.loading
from v4lens.cli import main

pytestmark = pytest.mark.usefixtures("single_thread")


def run_cli(argv, capsys) -> tuple[int, str]:
    """Exit code (returned or raised by argparse) and stderr of one `v4lens` call."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, err


def assert_usage_error(argv, capsys, *words):
    code, err = run_cli(argv, capsys)
    assert code == 2, (argv, code, err)
    last = err.strip().splitlines()[-1]
    assert last.startswith("v4lens") and "error:" in last, err
    for word in words:
        assert word in last, (word, err)


PROMPT = ["--prompt", "Hi"]


@pytest.mark.parametrize(
    "argv, named",
    [
        (["run", "tiny", *PROMPT, "--top-k", "0"], "--top-k"),
        (["run", "tiny", *PROMPT, "--top-k", "-3"], "--top-k"),
        (["run", "tiny", *PROMPT, "--top-k", "2.5"], "--top-k"),
        (["generate", "tiny", *PROMPT, "--temperature", "1", "--top-k", "0"], "--top-k"),
        (["run", "tiny", *PROMPT, "--device", "nonsense"], "--device"),
        (["run", "tiny", *PROMPT, "--device", "cuda:999"], "--device"),
        (["generate", "tiny", *PROMPT, "--temperature", "1", "--top-p", "0"], "--top-p"),
        (["generate", "tiny", *PROMPT, "--top-p", "0"], "--top-p"),
        (["generate", "tiny", *PROMPT, "--top-p", "1.5"], "--top-p"),
        (["generate", "tiny", *PROMPT, "--top-p", "nan"], "--top-p"),
        (["generate", "tiny", *PROMPT, "--temperature", "-1"], "--temperature"),
        (["generate", "tiny", *PROMPT, "--temperature", "nan"], "--temperature"),
        (["generate", "tiny", *PROMPT, "--max-new-tokens", "-1"], "--max-new-tokens"),
        (["generate", "tiny", *PROMPT, "--sample-seed", str(2**70)], "--sample-seed"),
        (["run", "tiny", *PROMPT, "--seed", str(2**40)], "--seed"),
        (["run", "tiny", *PROMPT, "--seed", "-1"], "--seed"),
        (["slice", "src", "out", "--experts", "0-99999999999"], "--experts"),
        (["slice", "src", "out", "--experts", "5-1"], "--experts"),
        (["slice", "src", "out", "--hidden", "0,x"], "--hidden"),
        (["viz", "--model", "tiny", *PROMPT, "--head", "-1", "--out", "figs"], "--head"),
        (["info", "tiny", "--bogus"], "--bogus"),
    ],
)
def test_bad_arguments_exit_2_naming_the_option(argv, named, capsys):
    assert_usage_error(argv, capsys, named)


def test_arguments_out_of_range_for_the_loaded_model_exit_1(tmp_path, capsys):
    # (like --layers: checked once the model is loaded)
    for argv, words in [
        (["run", "tiny", *PROMPT, "--top-k", "200000"], ("--top-k", "129280")),
        (["viz", "--model", "tiny", *PROMPT, "--head", "99", "--out", tmp_path / "figs"], ("--head", "0..3")),
    ]:
        code, err = run_cli(argv, capsys)
        assert code == 1 and len(err.strip().splitlines()) == 1 and all(w in err for w in words), err
    assert not (tmp_path / "figs").exists()


def test_bad_prompt_and_files_exit_2(tmp_path, capsys):
    assert_usage_error(["run", "tiny", "--prompt", "ab\ud800"], capsys, "--prompt", "position 2")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    assert_usage_error(["viz", "--model", "tiny", *PROMPT, "--out", a_file, "--no-png"], capsys, "--out", "notes.txt")
    assert a_file.read_text() == "mine"
    as_list = tmp_path / "list.json"
    as_list.write_text(json.dumps([1, 2]))
    assert_usage_error(["slice", tmp_path, tmp_path / "o", "--target", as_list], capsys, "--target", "list.json")
    not_json = tmp_path / "bad.json"
    not_json.write_text("{not json")
    assert_usage_error(["slice", tmp_path, tmp_path / "o", "--target", not_json], capsys, "--target", "bad.json")
    assert not (tmp_path / "o").exists()


def test_other_failures_exit_1_with_one_line(monkeypatch, tmp_path, capsys):
    code, err = run_cli(["info", tmp_path / "nowhere"], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1 and err.startswith("v4lens info: error:")

    def broken(*args, **kwargs):
        raise RuntimeError("the device fell over")

    monkeypatch.setattr(v4lens.weights.loading, "load", broken)
    code, err = run_cli(["run", "tiny", *PROMPT], capsys)
    assert code == 1 and err == "v4lens run: error: RuntimeError: the device fell over\n"
    monkeypatch.setenv("V4LENS_DEBUG", "1")  # asks for the traceback
    with pytest.raises(RuntimeError, match="fell over"):
        main(["run", "tiny", *PROMPT])


@pytest.mark.parametrize("seed", [2**40, 2**64, -1, 1.5, True])
def test_load_names_a_bad_seed(seed):
    with pytest.raises((ValueError, TypeError), match="seed"):
        v4lens.load("tiny", seed=seed)


def test_good_arguments_still_run(capsys):
    sampling = ["--temperature", "0.8", "--top-k", "5", "--top-p", "0.9", "--sample-seed", "3"]
    code, _ = run_cli(["generate", "tiny", *PROMPT, "--max-new-tokens", "2", *sampling, "--seed", 2**32 - 1], capsys)
    assert code == 0
    assert v4lens.load("tiny", seed=2**32 - 1) is not None


def test_init_weights_names_a_bad_seed():
    """Every caller of the seeded init (load, train, init_weights itself) refuses a seed the 64-bit mix overflows."""
    from v4lens.weights.loading import build_empty, init_weights

    model = build_empty(v4lens.preset("tiny", d_vocab=256))
    for bad in (2**40, -1, True, 1.5):
        with pytest.raises(ValueError, match="init_weights: seed"):
            init_weights(model, bad)
