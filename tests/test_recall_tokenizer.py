"""tiny-recall reads and writes its synthetic vocabulary by name: KEY_3, VAL_7, QUERY, ...
mean what the ids mean in v4lens.tasks, in to_tokens / to_str_tokens / to_string, the logit lens,
figure labels, generate(...).text and the command line."""

from __future__ import annotations

import pytest
import torch

import v4lens
from v4lens import plot
from v4lens.cli import main as cli_main
from v4lens.tasks import BOS, FILLER_IDS, KEY_IDS, QUERY, TOKEN_NAMES, VALUE_IDS, recall_batch
from v4lens.tokenizer import SyntheticTokenizer, load_tokenizer, synthetic_tokenizer, tokenizer_for

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def model():
    return v4lens.load("tiny-recall")


@pytest.fixture(scope="module")
def batch():
    return recall_batch(2, generator=torch.Generator().manual_seed(3))


def names(ids) -> list[str]:
    return [TOKEN_NAMES[int(i)] for i in ids]


def test_names_mean_what_the_task_ids_mean():
    assert len(TOKEN_NAMES) == 128 == len(set(TOKEN_NAMES))
    assert (TOKEN_NAMES[BOS], TOKEN_NAMES[QUERY]) == ("BOS", "QUERY")
    assert TOKEN_NAMES[KEY_IDS[3]] == "KEY_3" and TOKEN_NAMES[VALUE_IDS[7]] == "VAL_7"
    assert TOKEN_NAMES[FILLER_IDS[0]] == "FILL_0" and TOKEN_NAMES[KEY_IDS[-1]] == "KEY_55"
    tok = synthetic_tokenizer()
    assert (len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (128, 0, 1, 2)
    assert tok("QUERY KEY_3 VAL_7")["input_ids"] == [QUERY, KEY_IDS[3], VALUE_IDS[7]]


def test_load_gives_tiny_recall_its_tokenizer(model):
    assert isinstance(model.tokenizer, SyntheticTokenizer)
    assert tokenizer_for(model.cfg) is synthetic_tokenizer()
    assert tokenizer_for(v4lens.preset("tiny")) is load_tokenizer()  # the real vocabulary keeps the V4 tokenizer


def test_to_tokens_to_str_tokens_to_string_round_trip(model, batch):
    tokens = batch["tokens"]
    assert model.to_str_tokens(tokens[0]) == names(tokens[0])
    assert model.to_str_tokens(tokens) == [names(row) for row in tokens]
    text = model.to_string(tokens[0])
    assert text == " ".join(names(tokens[0])) and text.startswith("BOS FILL_")
    assert torch.equal(model.to_tokens(text)[0].cpu(), tokens[0])  # BOS is not doubled
    assert model.to_tokens("QUERY KEY_3").tolist() == [[BOS, QUERY, KEY_IDS[3]]]  # BOS prepended, as TL does
    assert model.to_single_token("VAL_7") == VALUE_IDS[7]
    assert model.to_string(VALUE_IDS[7]) == "VAL_7"


def test_an_unknown_word_is_refused_by_name(model):
    with pytest.raises(ValueError, match=r"'key_3' is not a token.*did you mean 'KEY_3'.*KEY_0\.\.55"):
        model.to_tokens("QUERY key_3")
    with pytest.raises(ValueError, match="'The' is not a token"):
        model.to_tokens("The capital of France is")


def test_lens_figures_and_generate_speak_in_names(model, batch):
    tokens, qpos, answer = batch["tokens"], batch["query_pos"], batch["answer"]
    _, cache = model.run_with_cache(tokens)
    lens = cache.logit_lens(k=3, positions=[int(qpos[0])], per_stream=False)
    assert lens.top_strs[-1][0][0][0] == TOKEN_NAMES[int(answer[0])]  # the trained model's answer, by name
    table = plot.logit_lens_table(lens)
    assert TOKEN_NAMES[int(answer[0])] in str(table.data[0].text)
    assert plot.style.token_labels(model, cache) == [f"{p}·{n}" for p, n in enumerate(names(tokens[0]))]
    router = plot.router_heatmap(model, cache, 1)
    assert "QUERY" in " ".join(map(str, router.data[0].y))
    out = model.generate(tokens[:, :-1], max_new_tokens=1, return_type="generation")
    assert out.text == names(answer)


def test_cli_run_takes_ids_names_or_nothing(capsys, batch):
    prompt = batch["tokens"][0, :-1].tolist()  # up to the query key
    answer = f"'{TOKEN_NAMES[int(batch['answer'][0])]}'"
    for given in (["--tokens", ",".join(map(str, prompt))], ["--tokens", ",".join(names(prompt))],
                  ["--prompt", " ".join(names(prompt))]):  # fmt: skip
        assert cli_main(["run", "tiny-recall", *given, "--top-k", "2"]) == 0
        out = capsys.readouterr().out
        assert f"last: ['{TOKEN_NAMES[prompt[-1]]}']" in out, given
        assert out.split("next token")[1].splitlines()[1].endswith(answer), (given, out)  # the top-1 line
    assert cli_main(["run", "tiny-recall", "--top-k", "1"]) == 0  # no input: a recall example
    captured = capsys.readouterr()
    assert "input (no --prompt or --tokens): BOS " in captured.err and "'VAL_" in captured.out
    assert cli_main(["generate", "tiny-recall", "--tokens", ",".join(names(prompt)), "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().out.startswith(f" {answer[1:-1]} ")  # streamed names are spaced
