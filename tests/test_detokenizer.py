"""Incremental detokenization: split characters, special tokens, stop strings, EOS ids."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from moeserve.request import SamplingParams
from moeserve.detokenizer import IncrementalDetokenizer, load_eos_token_ids

CORPUS = ["Héllo wörld, café crème brûlée.", "中文测试，你好世界。",
          "Emoji time 😀🎉🚀 and more 😀!", "The quick brown fox jumps over the lazy dog."] * 3
TEXT = "Héllo 中文 wörld 😀🎉 café, stop here 你好 END tail 🚀 done."
SPECIALS = ["<|endoftext|>", "<|im_end|>"]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE small enough (300 ids) that CJK characters and emoji span several ids."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=SPECIALS[0])


def stream(tokenizer, ids, chunk=1, prompt=(),
           **params) -> tuple[list[str], IncrementalDetokenizer]:
    """Feed ids `chunk` at a time, then finish; return every delta."""
    detok = IncrementalDetokenizer(tokenizer, SamplingParams(**params), prompt)
    deltas = [detok.step(ids[i : i + chunk]).text for i in range(0, len(ids), chunk)]
    return deltas + [detok.finish().text], detok


def test_tokenizer_really_splits_characters(tokenizer):
    ids = tokenizer.encode(TEXT)
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)


@pytest.mark.parametrize("chunk", [1, 2, 3])
@pytest.mark.parametrize("text", [TEXT, "中文测试😀", "😀", "é"])
def test_deltas_join_to_full_decode(tokenizer, chunk, text):
    ids = tokenizer.encode(text)
    deltas, detok = stream(tokenizer, ids, chunk)
    assert "".join(deltas) == tokenizer.decode(ids) == text
    assert detok.output_text == text
    assert not any("\ufffd" in d for d in deltas)


def test_complete_text_is_released_before_finish(tokenizer):
    ids = tokenizer.encode(TEXT)
    deltas, _ = stream(tokenizer, ids)
    assert deltas[-1] == "" and "".join(deltas[:-1]) == TEXT


@pytest.mark.parametrize("skip", [True, False])
def test_skip_special_tokens(tokenizer, skip):
    a, b = tokenizer.encode("中文 😀"), tokenizer.encode(" café")
    ids = a + [tokenizer.convert_tokens_to_ids("<|im_end|>")] + b + [tokenizer.eos_token_id]
    deltas, _ = stream(tokenizer, ids, skip_special_tokens=skip)
    joined = "".join(deltas)
    assert joined == tokenizer.decode(ids, skip_special_tokens=skip)
    assert ("<|im_end|>" in joined) is not skip and ("<|endoftext|>" in joined) is not skip


def test_truncated_character_is_flushed_by_finish(tokenizer):
    ids = tokenizer.encode("ab 🦀")                     # not in the corpus: four byte tokens
    cut = next(n for n in range(len(ids), 0, -1) if tokenizer.decode(ids[:n]).endswith("\ufffd"))
    deltas, _ = stream(tokenizer, ids[:cut])
    assert "".join(deltas) == tokenizer.decode(ids[:cut]) and deltas[-1].endswith("\ufffd")


def test_prompt_context(tokenizer):
    prompt, out = tokenizer.encode("Héllo 中"), tokenizer.encode("文 wörld 😀")
    deltas, _ = stream(tokenizer, out, prompt=prompt)
    assert "".join(deltas) == "文 wörld 😀"


def test_only_a_short_window_is_decoded(tokenizer):
    ids = tokenizer.encode(TEXT * 20)
    lengths: list[int] = []
    decode = tokenizer.decode

    class Spy:
        def decode(self, token_ids, **kwargs):
            lengths.append(len(token_ids))
            return decode(token_ids, **kwargs)

    deltas, _ = stream(Spy(), ids)
    assert "".join(deltas) == TEXT * 20
    assert max(lengths) <= 8 and len(lengths) <= 2 * len(ids)


@pytest.mark.parametrize("chunk", [1, 2, 5])
@pytest.mark.parametrize("stop", ["stop here", "文 wö", "😀🎉", "é", "END"])
def test_stop_string_is_trimmed_and_never_streamed(tokenizer, chunk, stop):
    ids = tokenizer.encode(TEXT)
    detok = IncrementalDetokenizer(tokenizer, SamplingParams(stop=["never", stop]))
    deltas, stops = [], []
    for i in range(0, len(ids), chunk):
        result = detok.step(ids[i : i + chunk])
        deltas.append(result.text)
        stops.append(result.stop)
    want = TEXT[: TEXT.index(stop)]
    assert "".join(deltas) == want == detok.output_text
    assert stops.count(stop) == 1 and set(stops) == {None, stop} and detok.stop == stop
    assert detok.step(ids[:1]).text == "" and detok.finish().text == ""


def test_stop_string_included_when_asked(tokenizer):
    ids = tokenizer.encode(TEXT)
    deltas, detok = stream(tokenizer, ids, stop=["stop here"], include_stop_str_in_output=True)
    assert "".join(deltas) == TEXT[: TEXT.index("stop here") + len("stop here")]
    assert detok.stop == "stop here"


def test_first_completed_then_earliest_stop_wins(tokenizer):
    ids, stops = tokenizer.encode(TEXT), ["END", "café", "wörld 😀🎉 café, stop"]
    deltas, detok = stream(tokenizer, ids, stop=stops)          # "café" completes first
    assert "".join(deltas) == TEXT[: TEXT.index("café")] and detok.stop == "café"
    deltas, detok = stream(tokenizer, ids, chunk=len(ids), stop=stops)   # all found at once
    assert "".join(deltas) == TEXT[: TEXT.index("wörld")] and detok.stop == stops[2]


def test_possible_stop_start_is_held_then_released(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, SamplingParams(stop=["stop there"]))
    got = "".join(detok.step([i]).text for i in tokenizer.encode("go stop th"))
    assert got == "go "                                 # "stop th" may still become the stop
    got += "".join(detok.step([i]).text for i in tokenizer.encode("ese"))
    assert got == "go stop these"                       # ruled out: released
    got += "".join(detok.step([i]).text for i in tokenizer.encode(" stop"))
    assert got == "go stop these "
    assert detok.finish().text == "stop" and detok.stop is None


def test_eos_ids_from_generation_config(tmp_path, tokenizer):
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 7, 5]}))
    assert load_eos_token_ids(tmp_path, tokenizer) == [5, 7]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 3}))
    assert load_eos_token_ids(tmp_path, tokenizer) == [3]


def test_eos_ids_fall_back_to_tokenizer(tmp_path, tokenizer):
    assert load_eos_token_ids(tmp_path, tokenizer) == [tokenizer.eos_token_id]
    (tmp_path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1}))
    tokenizer.save_pretrained(tmp_path)
    assert load_eos_token_ids(tmp_path) == [tokenizer.convert_tokens_to_ids(SPECIALS[0])]
