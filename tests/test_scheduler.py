"""The scheduler alone: admission, chunked prefill, decode sets, row compaction, release. No tensors."""

from __future__ import annotations

import random

import pytest

from service.engine.scheduler import ScheduledSequence, Scheduler, Status


def run_step(s: Scheduler, plan) -> None:
    """Plays the runner and the engine: computes the plan, and samples one token where logits came out."""
    s.step_done(plan)
    for chunk in plan.prefill:
        if chunk.completes_prompt:
            s.append_token(chunk.seq)
    for seq in plan.decode:
        s.append_token(seq)


def test_admission_is_first_come_first_served_and_bounded_by_rows():
    s = Scheduler(max_batch_size=2, max_seq_len=64, max_prefill_tokens=100)
    seqs = [ScheduledSequence(f"r{i}", prompt_len=5, max_new_tokens=4) for i in range(3)]
    for seq in seqs:
        s.add(seq)
    plan = s.schedule()
    assert [c.seq.request_id for c in plan.prefill] == ["r0", "r1"]
    assert [c.seq.row for c in plan.prefill] == [0, 1]
    assert s.free_rows == 0 and s.num_waiting == 1 and seqs[2].status is Status.WAITING
    run_step(s, plan)
    plan = s.schedule()
    assert [q.request_id for q in plan.decode] == ["r0", "r1"] and not plan.prefill
    s.finish("r0")
    plan = s.schedule()  # r1 moves into row 0, r2 is admitted into row 1, r1 keeps decoding
    assert plan.moves == [(1, 0)] and seqs[1].row == 0
    assert [c.seq.request_id for c in plan.prefill] == ["r2"] and seqs[2].row == 1
    assert [q.request_id for q in plan.decode] == ["r1"]


def test_long_prompts_are_chunked_within_the_token_budget():
    s = Scheduler(max_batch_size=4, max_seq_len=256, max_prefill_tokens=16)
    s.add(ScheduledSequence("long", prompt_len=40, max_new_tokens=8))
    s.add(ScheduledSequence("short", prompt_len=5, max_new_tokens=8))
    spans = []
    for _ in range(4):
        plan = s.schedule()
        spans.append([(c.seq.request_id, c.start, c.end, c.completes_prompt) for c in plan.prefill])
        assert sum(c.end - c.start for c in plan.prefill) <= 16
        run_step(s, plan)
    assert spans[0] == [("long", 0, 16, False)]
    assert spans[1] == [("long", 16, 32, False)]
    assert spans[2] == [("long", 32, 40, True), ("short", 0, 5, True)]
    assert spans[3] == []  # both decoding now
    assert s.by_id["long"].num_computed == 41 and s.by_id["long"].num_tokens == 42  # one decode step done


def test_decode_plans_only_sequences_with_a_new_token():
    s = Scheduler(max_batch_size=4, max_seq_len=64, max_prefill_tokens=64)
    s.add(ScheduledSequence("a", prompt_len=3, max_new_tokens=8))
    plan = s.schedule()
    assert plan.decode == []  # its prompt is still going in
    run_step(s, plan)
    plan = s.schedule()
    assert [q.request_id for q in plan.decode] == ["a"]
    seq = plan.decode[0]
    assert seq.num_computed == seq.num_tokens - 1  # the newest token is the one to feed


def test_context_length_and_duplicates_are_refused_up_front():
    s = Scheduler(max_batch_size=2, max_seq_len=32)
    with pytest.raises(ValueError, match="exceeds the context length 32"):
        s.add(ScheduledSequence("x", prompt_len=30, max_new_tokens=3))
    with pytest.raises(ValueError, match="at least one prompt token"):
        s.add(ScheduledSequence("y", prompt_len=0, max_new_tokens=3))
    s.add(ScheduledSequence("z", prompt_len=3, max_new_tokens=3))
    with pytest.raises(ValueError, match="duplicate"):
        s.add(ScheduledSequence("z", prompt_len=3, max_new_tokens=3))


def test_aborting_waiting_and_running_sequences_frees_everything():
    s = Scheduler(max_batch_size=2, max_seq_len=64)
    for i in range(4):
        s.add(ScheduledSequence(f"r{i}", prompt_len=4, max_new_tokens=4))
    run_step(s, s.schedule())
    assert s.finish("r3").status is Status.FINISHED  # waiting
    assert s.finish("r0").status is Status.FINISHED  # running
    assert s.finish("nope") is None
    s.finish("r1")
    s.finish("r2")
    assert s.free_rows == 2 and s.num_waiting == 0 and not s.has_work and s.by_id == {}


def test_random_workload_keeps_rows_contiguous_and_returns_all_capacity():
    rng = random.Random(7)
    s = Scheduler(max_batch_size=6, max_seq_len=80, max_prefill_tokens=24)
    produced: dict[str, int] = {}
    next_id = 0
    for _ in range(400):
        if rng.random() < 0.3:
            s.add(ScheduledSequence(f"r{next_id}", prompt_len=rng.randint(1, 40), max_new_tokens=rng.randint(1, 30)))
            next_id += 1
        plan = s.schedule()
        rows = sorted(q.row for q in s.running)
        assert rows == list(range(len(rows)))  # running sequences occupy rows 0..n-1
        assert len({c.seq.request_id for c in plan.prefill} | {q.request_id for q in plan.decode}) == \
            len(plan.prefill) + len(plan.decode)  # nobody twice in one step
        run_step(s, plan)
        for seq in list(s.running):
            if not seq.prefilling:
                produced[seq.request_id] = seq.num_tokens - seq.prompt_len
                if seq.num_tokens >= seq.max_len or rng.random() < 0.05:
                    s.finish(seq.request_id)
        if rng.random() < 0.02 and s.waiting:
            s.finish(s.waiting[0].request_id)
    for request_id in list(s.by_id):
        s.finish(request_id)
    assert s.free_rows == 6 and s.cache_usage == 0 and not s.has_work
    assert len(produced) > 20
