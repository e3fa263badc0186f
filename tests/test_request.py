"""SamplingParams validation, Request and Sequence basics."""

import pytest

from moeserve.request import FinishReason, Request, SamplingParams, Sequence, SequenceStatus


def test_defaults_and_normalisation():
    params = SamplingParams(stop="###", stop_token_ids=(3, 4))
    assert params.stop == ["###"] and params.stop_token_ids == [3, 4]
    assert params.n == 1 and params.max_tokens == 16 and not params.is_greedy
    assert SamplingParams(temperature=0).is_greedy
    assert SamplingParams(max_tokens=None, logprobs=0, top_k=0, seed=-5).max_tokens is None
    assert FinishReason.LENGTH == "length" and FinishReason("abort") is FinishReason.ABORT


@pytest.mark.parametrize("field, value", [
    ("n", 0), ("n", 129), ("n", 1.5), ("max_tokens", 0), ("temperature", -1),
    ("temperature", float("nan")), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2), ("min_p", 1.1),
    ("seed", 2**64), ("logprobs", 21), ("logprobs", -1), ("presence_penalty", 2.5),
    ("frequency_penalty", -3), ("repetition_penalty", 0), ("min_tokens", -1),
    ("stop", [""]), ("stop", 5), ("stop_token_ids", [-1]), ("n", True),
])
def test_bad_values_name_the_parameter(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_message_says_what_was_wrong():
    with pytest.raises(ValueError, match=r"temperature must be >= 0, got -1"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="min_tokens must be <= max_tokens"):
        SamplingParams(min_tokens=5, max_tokens=4)


def test_sequence_tracks_prompt_and_output():
    request = Request("r", (5, 6, 7), SamplingParams(n=2))
    seq = Sequence(seq_id=3, request=request, index=1)
    seq.append_token(9)
    assert seq.token_ids == [5, 6, 7, 9] and seq.output_token_ids == [9]
    assert request.prompt_token_ids == [5, 6, 7]          # the prompt list is not touched
    assert (seq.num_prompt_tokens, seq.num_output_tokens, seq.num_tokens) == (3, 1, 4)
    assert seq.status is SequenceStatus.WAITING and seq.request_id == "r"
    assert not request.is_finished                         # no sequences yet
