"""Randomized scheduler runs against a fake model that keeps a real paged KV cache of token ids.

The fake model writes every scheduled token into the slot its block table names, and before it
samples it reads the whole context back through the block table: a wrong table, a block shared
when it should not be, or a resumed sequence missing a token shows up as a context mismatch.
Its next token depends only on that context, so outputs must not depend on scheduling, nor on
prefix caching: prompts share prefixes, and a cached block that holds the wrong tokens (or one
handed out while still in use) also shows up as a context mismatch.
"""

import random

import pytest

from moeserve.engine.batch import ScheduledBatch, SeqOutput, StepOutput
from moeserve.engine.scheduler import Scheduler, SchedulerConfig
from moeserve.request import FinishReason, Request, SamplingParams, SequenceStatus

EOS = 0
VOCAB = 40
BLOCK_SIZE = 4


class PagedKVModel:
    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.slots: dict[tuple[int, int], int] = {}   # (block id, offset) -> token id

    def step(self, batch: ScheduledBatch) -> StepOutput:
        outputs = []
        for sched in batch.seqs:
            for i, token_id in enumerate(sched.token_ids):
                block, offset = self._slot(sched.block_table, sched.start_pos + i)
                assert self.scheduler.blocks.ref_count(block) == 1, "wrote into a shared block"
                self.slots[block, offset] = token_id
            if sched.sample:
                end = sched.start_pos + len(sched.token_ids)
                context = [self.slots.get(self._slot(sched.block_table, p)) for p in range(end)]
                assert context == sched.prompt_token_ids + sched.output_token_ids
                token = (hash(tuple(context)) + 7919 * sched.seed_offset) % VOCAB
                outputs.append(SeqOutput(sched.seq_id, token))
        return StepOutput(outputs)

    @staticmethod
    def _slot(block_table: list[int], position: int) -> tuple[int, int]:
        return block_table[position // BLOCK_SIZE], position % BLOCK_SIZE


def make(num_kv_blocks: int, max_num_batched_tokens: int = 16, prefix_caching: bool = False,
         partitions: int = 1) -> Scheduler:
    config = SchedulerConfig(max_model_len=48, max_num_seqs=6, block_size=BLOCK_SIZE,
                             max_num_batched_tokens=max_num_batched_tokens,
                             enable_prefix_caching=prefix_caching)
    return Scheduler(config, num_kv_blocks, eos_token_ids={EOS}, kv_partitions=partitions)


# Shared prefixes (a system prompt, a conversation's earlier turns): of 0, 3, 8 and 17 tokens.
PREFIXES = [[], [9, 8, 7], [11, 12, 13, 14, 15, 16, 17, 18], [(3 * i) % 37 + 1 for i in range(17)]]


def random_request(rng: random.Random, request_id: str) -> Request:
    sampling = SamplingParams(
        n=rng.choice([1, 1, 1, 2, 3]), max_tokens=rng.choice([None, 1, 5, 20]),
        ignore_eos=rng.random() < 0.3, min_tokens=rng.choice([0, 0, 1]),
        stop_token_ids=rng.choice([[], [5]]))
    prefix = rng.choice(PREFIXES)
    prompt = prefix + [rng.randrange(1, VOCAB) for _ in range(rng.randint(1, 40 - len(prefix)))]
    return Request(request_id, prompt, sampling)


def run_step(scheduler: Scheduler, model: PagedKVModel) -> None:
    batch = scheduler.schedule()
    assert batch.num_tokens == sum(len(s.token_ids) for s in batch.seqs)
    assert batch.num_tokens <= scheduler.config.max_num_batched_tokens
    assert len(batch.seqs) <= scheduler.num_running <= scheduler.config.max_num_seqs
    for sched in batch.seqs:
        assert len(sched.block_table) * BLOCK_SIZE >= sched.start_pos + len(sched.token_ids)
    scheduler.update(batch, model.step(batch))
    scheduler.check_invariants()


def drain(scheduler: Scheduler, model: PagedKVModel) -> None:
    for _ in range(5000):
        if not scheduler.has_unfinished_requests():
            break
        run_step(scheduler, model)
    assert not scheduler.has_unfinished_requests()
    assert scheduler.blocks.num_free_blocks == scheduler.blocks.num_blocks
    assert scheduler.num_running == scheduler.num_waiting == 0


def random_event(rng: random.Random, scheduler: Scheduler, requests: list[Request], step: int):
    roll = rng.random()
    if roll < 0.25 and step < 250:
        requests.append(random_request(rng, f"r{step}"))
        scheduler.add_request(requests[-1])
    elif roll < 0.30 and requests:
        scheduler.abort(rng.choice(requests).request_id)
    elif roll < 0.34 and scheduler.running:                 # a stop string matched
        scheduler.finish_seq(rng.choice(scheduler.running).seq_id, FinishReason.STOP)


@pytest.mark.parametrize("prefix_caching", [False, True], ids=["no-cache", "prefix-cache"])
@pytest.mark.parametrize("seed", range(6))
def test_random_adds_aborts_and_finishes_keep_the_books_straight(seed, prefix_caching):
    rng = random.Random(seed)
    scheduler = make(num_kv_blocks=12, prefix_caching=prefix_caching)   # 48 slots: preemption is routine
    model = PagedKVModel(scheduler)
    requests: list[Request] = []
    for step in range(300):
        random_event(rng, scheduler, requests, step)
        run_step(scheduler, model)
    drain(scheduler, model)
    assert scheduler.num_preemptions > 0
    for seq in (seq for request in requests for seq in request.seqs):
        assert seq.status is SequenceStatus.FINISHED and seq.finish_reason is not None
        if seq.finish_reason is FinishReason.LENGTH and seq.sampling.max_tokens is not None:
            assert seq.num_output_tokens == seq.sampling.max_tokens or seq.num_tokens == 48


@pytest.mark.parametrize("prefix_caching", [False, True], ids=["no-cache", "prefix-cache"])
@pytest.mark.parametrize("seed", range(3))
def test_outputs_do_not_depend_on_preemption(seed, prefix_caching):
    """The same requests through a roomy cache and a cramped one give the same tokens."""
    results = []
    for num_kv_blocks, budget in ((200, 64), (12, 8)):
        rng = random.Random(seed)
        scheduler = make(num_kv_blocks, budget, prefix_caching)
        model = PagedKVModel(scheduler)
        requests = [random_request(rng, f"r{i}") for i in range(12)]
        for request in requests:
            scheduler.add_request(request)
        drain(scheduler, model)
        results.append(([(s.output_token_ids, s.finish_reason) for r in requests for s in r.seqs],
                         scheduler.num_preemptions))
    (roomy, roomy_preemptions), (cramped, cramped_preemptions) = results
    assert roomy_preemptions == 0 and cramped_preemptions > 0
    assert roomy == cramped


def _run(requests: list[Request], prefix_caching: bool, num_kv_blocks: int, partitions: int = 1,
         arrivals_per_step: int = 2) -> tuple[list, Scheduler]:
    """Requests arrive a few per step (so later ones find earlier ones' blocks cached)."""
    scheduler = make(num_kv_blocks, 16, prefix_caching, partitions)
    model = PagedKVModel(scheduler)
    pending = list(requests)
    while pending or scheduler.has_unfinished_requests():
        for _ in range(arrivals_per_step):
            if pending:
                scheduler.add_request(pending.pop(0))
        run_step(scheduler, model)
    drain(scheduler, model)
    return [(s.output_token_ids, s.finish_reason) for r in requests for s in r.seqs], scheduler


@pytest.mark.parametrize("num_kv_blocks, partitions", [(200, 1), (14, 1), (24, 2)],
                         ids=["roomy", "cramped", "two-partitions"])
@pytest.mark.parametrize("seed", range(4))
def test_prefix_caching_hits_and_changes_no_output(seed, num_kv_blocks, partitions):
    """Caching on gives the tokens caching off gives, reuses blocks, and under KV pressure
    evicts cached blocks (the cramped cache cannot keep every prefix)."""
    make_requests = lambda: [random_request(random.Random(seed * 100 + i), f"r{i}") for i in range(30)]
    expected, plain = _run(make_requests(), False, num_kv_blocks, partitions)
    got, cached = _run(make_requests(), True, num_kv_blocks, partitions)
    assert got == expected
    assert plain.prefix_cache_queries == plain.prefix_cache_hits == 0
    assert cached.prefix_cache_hits > 0
    assert cached.prefix_cache_queries >= sum(len(r.prompt_token_ids) for r in make_requests())
