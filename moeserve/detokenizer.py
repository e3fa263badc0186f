"""Incremental detokenization and stop strings, one IncrementalDetokenizer per sequence.

Token ids arrive a few at a time; the client must get text deltas that it can simply append:
never half a character, and never text that a stop string later trims away.

Decoding: the prefix-offset / read-offset trick of vLLM and TGI. Only a short window of recent
ids is decoded: ids[prefix:read] were already turned into text, ids[read:] are new. The new text
is decode(ids[prefix:]) minus decode(ids[prefix:read]); decoding from `prefix` rather than `read`
gives the tokenizer the context it needs (e.g. SentencePiece's leading space). A byte-level BPE
token may hold part of a UTF-8 character, which decodes to U+FFFD: such text is held back (and
the offsets stay put) until a later token completes the character.

Stop strings: the full output text is kept, and only its tail is searched, since a match has to
touch the newest characters. Text that could be the start of a stop string is held back until it
is either completed (and trimmed) or ruled out.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from moeserve.request import SamplingParams

REPLACEMENT_CHAR = "\ufffd"
PROMPT_CONTEXT_TOKENS = 5        # prompt ids decoded before the output, for context (as vLLM)


@dataclass(frozen=True, slots=True)
class DetokenizedDelta:
    text: str                    # new text, safe to send: it will never be taken back
    stop: str | None = None      # the stop string that ended the sequence, when one matched


class IncrementalDetokenizer:
    """Turns one sequence's output ids into streamable text deltas, and finds stop strings.

    `step(ids)` takes the newly generated ids; once it reports a stop, the sequence is over and
    later calls return nothing. `finish()` releases whatever is still held back (an incomplete
    character, a possible stop-string start) when the sequence ends for another reason.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, params: SamplingParams,
                 prompt_token_ids: Sequence[int] = ()) -> None:
        self._tokenizer = tokenizer
        self._skip_special = params.skip_special_tokens
        self._stops = [s for s in (params.stop or ()) if s]
        self._include_stop = params.include_stop_str_in_output
        context = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:]) if prompt_token_ids else []
        self._ids = context                  # prompt context + output ids
        self._prefix = 0                     # ids[prefix:read] are already in self._text
        self._read = len(context)
        self._text = ""                      # output text decoded so far (complete characters)
        self._sent = 0                       # chars of self._text already returned
        self.stop: str | None = None         # the stop string that matched, once one has

    @property
    def output_text(self) -> str:
        """All text returned so far (stop string trimmed as asked)."""
        return self._text[: self._sent]

    @property
    def stopped(self) -> bool:
        return self.stop is not None

    def step(self, new_token_ids: Sequence[int]) -> DetokenizedDelta:
        if self.stopped:
            return DetokenizedDelta("")
        self._ids.extend(new_token_ids)
        return self._advance(self._decode_new(final=False), final=False)

    def finish(self) -> DetokenizedDelta:
        """The sequence ended (EOS, length, abort): release all held-back text."""
        if self.stopped:
            return DetokenizedDelta("")
        return self._advance(self._decode_new(final=True), final=True)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special,
                                      clean_up_tokenization_spaces=False)

    def _decode_new(self, final: bool) -> str:
        """Text of ids[read:], or "" while it ends in an incomplete character (unless final)."""
        if self._read == len(self._ids):
            return ""
        seen = self._decode(self._ids[self._prefix : self._read])
        window = self._decode(self._ids[self._prefix :])
        # A skipped special token adds nothing yet; keep the window so context is not lost.
        if len(window) <= len(seen) or (window.endswith(REPLACEMENT_CHAR) and not final):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return window[len(seen) :]

    def _advance(self, new_text: str, final: bool) -> DetokenizedDelta:
        searched_to = len(self._text)
        self._text += new_text
        match = self._find_stop(searched_to) if new_text else None
        if match is not None:
            start, stop = match
            self._text = self._text[: start + len(stop) if self._include_stop else start]
            self.stop = stop
            return DetokenizedDelta(self._release(len(self._text)), stop)
        held = 0 if final else self._stop_prefix_len()
        return DetokenizedDelta(self._release(len(self._text) - held))

    def _release(self, end: int) -> str:
        delta = self._text[self._sent : end]
        self._sent = max(self._sent, end)
        return delta

    def _find_stop(self, searched_to: int) -> tuple[int, str] | None:
        """Earliest stop string that ends after `searched_to` (earlier text had none)."""
        best: tuple[int, str] | None = None
        for stop in self._stops:
            start = self._text.find(stop, max(0, searched_to - len(stop) + 1))
            if start != -1 and (best is None or start < best[0]):
                best = (start, stop)
        return best

    def _stop_prefix_len(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        text, longest = self._text, 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest


def load_eos_token_ids(model_dir: str | Path,
                       tokenizer: PreTrainedTokenizerBase | None = None) -> list[int]:
    """EOS ids of a model: generation_config.json's eos_token_id (an int or a list) when given,
    else the tokenizer's (loaded from model_dir when not passed). Chat models often list several
    (e.g. <|endoftext|> and <|im_end|>), which the tokenizer alone does not know."""
    path = Path(model_dir) / "generation_config.json"
    if path.is_file():
        eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
        if eos is not None:
            ids = [eos] if isinstance(eos, int) else list(eos)
            return list(dict.fromkeys(int(i) for i in ids))
    if tokenizer is None:
        from transformers import AutoTokenizer   # slow import; only needed on this path
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    return [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
