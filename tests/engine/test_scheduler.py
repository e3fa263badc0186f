"""Scheduler: budget, max_num_seqs, chunked prefill, preemption, abort, n > 1 forks, stops."""

import pytest

from moeserve.engine.batch import ScheduledBatch, SeqOutput, StepOutput
from moeserve.engine.scheduler import Scheduler, SchedulerConfig
from moeserve.request import FinishReason, Request, SamplingParams, SequenceStatus

EOS = 0
TOKEN = 7   # what the fake model samples unless a test says otherwise


def make_scheduler(num_kv_blocks=64, eos=(EOS,), **config) -> Scheduler:
    config = {"max_model_len": 256, "block_size": 4, "max_num_seqs": 8,
              "max_num_batched_tokens": 32} | config
    return Scheduler(SchedulerConfig(**config), num_kv_blocks, eos_token_ids=eos)


def add(scheduler, request_id, prompt_len, **sampling) -> Request:
    sampling = {"max_tokens": 1000, "ignore_eos": False} | sampling
    request = Request(request_id, list(range(1, prompt_len + 1)), SamplingParams(**sampling))
    scheduler.add_request(request)
    return request


def step(scheduler, token=lambda sched: TOKEN):
    """One engine step with a fake model; checks the scheduler's invariants after it."""
    batch = scheduler.schedule()
    assert batch.num_tokens == sum(len(s.token_ids) for s in batch.seqs)
    outputs = [SeqOutput(s.seq_id, token(s)) for s in batch.seqs if s.sample]
    updates = scheduler.update(batch, StepOutput(outputs))
    scheduler.check_invariants()
    return batch, updates


def chunks(batch: ScheduledBatch) -> list[tuple[int, int, int, bool]]:
    return [(s.seq_id, s.start_pos, len(s.token_ids), s.sample) for s in batch.seqs]


def test_budget_and_max_num_seqs_hold_every_step():
    scheduler = make_scheduler(max_num_seqs=3, max_num_batched_tokens=20)
    for i in range(6):
        add(scheduler, f"r{i}", prompt_len=13, max_tokens=5)
    for _ in range(40):
        batch, _ = step(scheduler)
        assert batch.num_tokens <= 20
        assert len(batch.seqs) <= 3 and scheduler.num_running <= 3
    assert not scheduler.has_unfinished_requests()
    assert scheduler.blocks.num_free_blocks == 64


def test_chunked_prefill_splits_a_long_prompt_and_mixes_with_decodes():
    scheduler = make_scheduler(max_num_batched_tokens=16)
    a = add(scheduler, "a", prompt_len=3)
    step(scheduler)                                   # a's prefill
    b = add(scheduler, "b", prompt_len=40)
    a0, b0 = a.seqs[0].seq_id, b.seqs[0].seq_id
    assert chunks(step(scheduler)[0]) == [(a0, 3, 1, True), (b0, 0, 15, False)]
    assert chunks(step(scheduler)[0]) == [(a0, 4, 1, True), (b0, 15, 15, False)]
    batch, _ = step(scheduler)
    assert chunks(batch) == [(a0, 5, 1, True), (b0, 30, 10, True)]
    assert batch.seqs[1].token_ids == b.prompt_token_ids[30:]
    assert b.seqs[0].output_token_ids == [TOKEN]


def test_without_chunked_prefill_prompts_run_whole():
    scheduler = make_scheduler(max_model_len=48, max_num_batched_tokens=48,
                               enable_chunked_prefill=False)
    a = add(scheduler, "a", prompt_len=10)
    step(scheduler)
    b, c = add(scheduler, "b", prompt_len=40), add(scheduler, "c", prompt_len=40)
    batch, _ = step(scheduler)                        # 1 + 40 fit; c's 40 would not
    assert chunks(batch) == [(a.seqs[0].seq_id, 10, 1, True), (b.seqs[0].seq_id, 0, 40, True)]
    assert scheduler.waiting[0] is c.seqs[0]
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        SchedulerConfig(max_model_len=64, max_num_batched_tokens=32, enable_chunked_prefill=False)


def test_preempts_newest_first_and_resumes_with_prompt_and_generated_tokens():
    # 6 blocks of 4 tokens; three sequences of 4 + up to 8 tokens need 9 blocks.
    scheduler = make_scheduler(num_kv_blocks=6, max_num_seqs=3)
    a, b, c, d = (add(scheduler, name, prompt_len=4, max_tokens=m, ignore_eos=True)
                  for name, m in (("a", 6), ("b", 6), ("c", 10), ("d", 2)))
    counter = iter(range(100, 1000))
    token = lambda sched: next(counter)               # noqa: E731 - distinct tokens, to compare
    for _ in range(5):                                # prefill, then positions 4..7: 2 blocks each
        step(scheduler, token)
    assert scheduler.num_preemptions == 0 and scheduler.blocks.num_free_blocks == 0
    seq_c = c.seqs[0]
    known_c = list(seq_c.token_ids)                   # 4 prompt + 5 generated
    batch, _ = step(scheduler, token)                 # position 8 needs a third block each
    assert [s.seq_id for s in batch.seqs] == [a.seqs[0].seq_id, b.seqs[0].seq_id]
    assert scheduler.num_preemptions == 1 and seq_c.status is SequenceStatus.PREEMPTED
    assert list(scheduler.waiting) == [seq_c, d.seqs[0]]   # ahead of requests never started
    assert seq_c.num_computed_tokens == 0 and seq_c.block_table == []
    assert a.is_finished and b.is_finished            # max_tokens=6 reached
    batch, _ = step(scheduler, token)                 # c resumes: recompute all it knows
    assert chunks(batch) == [(seq_c.seq_id, 0, 9, True), (d.seqs[0].seq_id, 0, 4, True)]
    assert batch.seqs[0].token_ids == known_c
    while scheduler.has_unfinished_requests():
        step(scheduler, token)
    assert seq_c.output_token_ids[:5] == known_c[4:] and len(seq_c.output_token_ids) == 10
    assert scheduler.blocks.num_free_blocks == 6


def test_a_lone_sequence_stops_at_kv_capacity_instead_of_looping():
    scheduler = make_scheduler(num_kv_blocks=3, max_model_len=256)   # 12 token slots
    request = add(scheduler, "a", prompt_len=4, max_tokens=None, ignore_eos=True)
    for _ in range(20):
        step(scheduler)
    seq = request.seqs[0]
    assert seq.finish_reason is FinishReason.LENGTH and seq.num_tokens == 12
    assert scheduler.num_preemptions == 0 and scheduler.blocks.num_free_blocks == 3


def test_max_num_seqs_admits_the_next_request_when_one_finishes():
    scheduler = make_scheduler(max_num_seqs=2)
    first = add(scheduler, "a", prompt_len=4, max_tokens=2)
    add(scheduler, "b", prompt_len=4, max_tokens=5)
    third = add(scheduler, "c", prompt_len=4)
    step(scheduler)
    assert scheduler.num_running == 2 and scheduler.num_waiting == 1
    step(scheduler)                                   # a finishes here
    assert first.is_finished and third.seqs[0].status is SequenceStatus.WAITING
    batch, _ = step(scheduler)
    assert third.seqs[0].seq_id in [s.seq_id for s in batch.seqs]


# ---- abort ----

def test_abort_while_waiting():
    scheduler = make_scheduler(max_num_seqs=1)
    add(scheduler, "a", prompt_len=4)
    b = add(scheduler, "b", prompt_len=4)
    step(scheduler)
    assert [s.finish_reason for s in scheduler.abort("b")] == [FinishReason.ABORT]
    assert b.is_finished and scheduler.num_waiting == 0
    assert scheduler.abort("b") == [] and scheduler.abort("nope") == []


@pytest.mark.parametrize("steps_before_abort", [1, 3])       # mid-prefill, decoding
def test_abort_frees_every_block(steps_before_abort):
    scheduler = make_scheduler(max_num_batched_tokens=8)
    request = add(scheduler, "a", prompt_len=20, n=2)
    for _ in range(steps_before_abort):
        step(scheduler)
    assert scheduler.blocks.num_free_blocks < 64
    finished = scheduler.abort("a")
    assert [s.index for s in finished] == [0, 1]
    assert all(s.finish_reason is FinishReason.ABORT for s in request.seqs)
    assert scheduler.blocks.num_free_blocks == 64 and scheduler.num_running == 0
    assert not scheduler.has_unfinished_requests()
    scheduler.check_invariants()


def test_abort_between_schedule_and_update_drops_the_output():
    scheduler = make_scheduler()
    add(scheduler, "a", prompt_len=4)
    b = add(scheduler, "b", prompt_len=4)
    batch = scheduler.schedule()
    scheduler.abort("a")
    updates = scheduler.update(batch, StepOutput([SeqOutput(s.seq_id, TOKEN) for s in batch.seqs]))
    assert [u.seq for u in updates] == [b.seqs[0]]
    scheduler.check_invariants()


def test_finish_seq_for_a_stop_string():
    scheduler = make_scheduler()
    request = add(scheduler, "a", prompt_len=4)
    step(scheduler)
    seq = scheduler.finish_seq(request.seqs[0].seq_id, FinishReason.STOP)
    assert seq.finish_reason is FinishReason.STOP and request.is_finished
    assert scheduler.blocks.num_free_blocks == 64 and scheduler.num_running == 0
    assert scheduler.finish_seq(seq.seq_id) is None
    assert step(scheduler)[0].is_empty


# ---- n > 1 ----

def test_children_fork_from_the_prompt_and_share_its_full_blocks():
    scheduler = make_scheduler()
    request = add(scheduler, "a", prompt_len=10, n=3)
    s0, s1, s2 = request.seqs
    assert chunks(step(scheduler)[0]) == [(s0.seq_id, 0, 10, True)]   # only sequence 0
    assert scheduler.running == [s0, s1, s2]
    assert s1.num_computed_tokens == s2.num_computed_tokens == 8     # 2 full blocks of 4
    shared = s0.block_table[:2]
    assert s1.block_table == s2.block_table == shared
    assert [scheduler.blocks.ref_count(b) for b in s0.block_table] == [3, 3, 1]
    batch, _ = step(scheduler)
    assert chunks(batch) == [(s0.seq_id, 10, 1, True), (s1.seq_id, 8, 2, True),
                             (s2.seq_id, 8, 2, True)]
    assert [s.seed_offset for s in batch.seqs] == [0, 1, 2]
    assert batch.seqs[1].token_ids == [9, 10]
    assert len({s0.block_table[2], s1.block_table[2], s2.block_table[2]}) == 3


def test_a_prompt_filling_whole_blocks_leaves_the_last_one_to_each_child():
    scheduler = make_scheduler()
    request = add(scheduler, "a", prompt_len=8, n=2)
    step(scheduler)
    child = request.seqs[1]
    assert child.num_computed_tokens == 4 and len(child.block_table) == 1
    assert chunks(step(scheduler)[0])[1] == (child.seq_id, 4, 4, True)


def test_children_run_even_when_the_parent_finishes_at_its_first_token():
    scheduler = make_scheduler()
    request = add(scheduler, "a", prompt_len=6, n=3, max_tokens=1)
    step(scheduler)
    assert request.seqs[0].is_finished and not request.is_finished
    step(scheduler)
    assert request.is_finished
    assert [s.output_token_ids for s in request.seqs] == [[TOKEN]] * 3
    assert scheduler.blocks.num_free_blocks == 64


def test_n_reserves_its_slots_before_forking():
    scheduler = make_scheduler(max_num_seqs=3)
    add(scheduler, "x", prompt_len=6, n=3, max_tokens=3)
    y = add(scheduler, "y", prompt_len=6)
    batch, _ = step(scheduler)
    assert len(batch.seqs) == 1 and y.seqs[0].status is SequenceStatus.WAITING
    step(scheduler)
    assert scheduler.num_running == 3 and scheduler.num_waiting == 1
    with pytest.raises(ValueError, match="max_num_seqs"):
        add(scheduler, "z", prompt_len=4, n=4)


# ---- stop conditions ----

def generate(token, **sampling) -> list:
    scheduler = make_scheduler(max_model_len=16)
    request = add(scheduler, "a", prompt_len=4, **sampling)
    for _ in range(30):
        step(scheduler, token)
    assert scheduler.blocks.num_free_blocks == 64 and request.is_finished
    return request.seqs[0].output_token_ids + [request.seqs[0].finish_reason]


def eos_at(position):
    return lambda sched: EOS if len(sched.output_token_ids) == position else TOKEN


def test_stop_conditions():
    length, stop = FinishReason.LENGTH, FinishReason.STOP
    assert generate(eos_at(99), max_tokens=3) == [TOKEN] * 3 + [length]
    assert generate(eos_at(1)) == [TOKEN, EOS, stop]
    assert generate(eos_at(1), ignore_eos=True, max_tokens=3) == [TOKEN, EOS, TOKEN, length]
    assert generate(eos_at(1), ignore_eos=True, stop_token_ids=[TOKEN]) == [TOKEN, stop]
    assert generate(lambda sched: EOS, min_tokens=3) == [EOS] * 4 + [stop]
    # max_model_len 16 with a 4-token prompt: 12 tokens, then the context is full.
    assert generate(eos_at(99), max_tokens=None) == [TOKEN] * 12 + [length]


def test_bad_requests_are_refused_with_a_reason():
    scheduler = make_scheduler(num_kv_blocks=4, max_model_len=32)
    with pytest.raises(ValueError, match="context"):
        add(scheduler, "a", prompt_len=32)
    with pytest.raises(ValueError, match="KV cache"):
        add(scheduler, "a", prompt_len=17)            # 4 blocks of 4 hold 16 tokens
    add(scheduler, "a", prompt_len=16)
    with pytest.raises(ValueError, match="already"):
        add(scheduler, "a", prompt_len=3)
    with pytest.raises(ValueError, match="prompt"):
        Request("b", [])
    with pytest.raises(ValueError, match="max_num_seqs"):
        SchedulerConfig(max_model_len=8, max_num_seqs=0)


def test_update_refuses_a_step_output_that_does_not_match_the_batch():
    scheduler = make_scheduler()
    add(scheduler, "a", prompt_len=4)
    batch = scheduler.schedule()
    with pytest.raises(ValueError, match="sampled"):
        scheduler.update(batch, StepOutput([]))


def test_children_prefill_alone_if_the_parent_ends_before_its_prompt_is_done():
    scheduler = make_scheduler(max_num_batched_tokens=8)
    request = add(scheduler, "a", prompt_len=20, n=3, max_tokens=2)
    step(scheduler)                                   # sequence 0 is mid-prefill
    scheduler.finish_seq(request.seqs[0].seq_id, FinishReason.ERROR)
    assert list(scheduler.waiting) == request.seqs[1:]
    for _ in range(30):
        step(scheduler)
    assert request.is_finished and scheduler.blocks.num_free_blocks == 64
    assert [len(s.output_token_ids) for s in request.seqs] == [0, 2, 2]
