"""The sampler's contracts: validation, exact greedy, statistically correct filtered sampling, batch-invariant seeds,
penalties as specified, raw-model logprobs, and the /next-token-probs distribution."""

from __future__ import annotations

import math

import pytest
import torch

from service.engine.limits import Limits
from service.engine.request import GenerationParams
from service.engine.sampling import (
    RowState,
    SamplingParams,
    apply_penalties,
    make_generator,
    sample,
    top_k_distribution,
)

# a fixed, non-trivial 12-token distribution with no near-ties at the top-p boundaries used below
LOGITS = [1.5, -0.3, 0.8, 2.1, -1.2, 0.0, 1.1, -2.0, 0.4, -0.7, 1.8, -1.5]
N_DRAWS = 20_000


def rows_of(*params: SamplingParams, prompt: tuple[int, ...] = (), output: tuple[int, ...] = ()) -> list[RowState]:
    return [RowState(p, make_generator(p.seed, "cpu"), prompt, output) for p in params]


def reference_distribution(logits: list[float], p: SamplingParams) -> list[float]:
    """softmax(logits / T) filtered by top-k, then top-p, then min-p, written out plainly in float64."""
    scaled = [x / p.temperature for x in logits]
    order = sorted(range(len(logits)), key=lambda i: -scaled[i])
    kept = order[:p.top_k] if p.top_k > 0 else order

    def normalised(ids: list[int]) -> dict[int, float]:
        z = sum(math.exp(scaled[i]) for i in ids)
        return {i: math.exp(scaled[i]) / z for i in ids}

    if p.top_p < 1.0:
        probs, nucleus, mass = normalised(kept), [], 0.0
        for i in kept:  # smallest prefix whose mass reaches top_p
            nucleus.append(i)
            mass += probs[i]
            if mass >= p.top_p:
                break
        kept = nucleus
    if p.min_p > 0.0:
        probs = normalised(kept)
        kept = [i for i in kept if probs[i] >= p.min_p * max(probs.values())]
    probs = normalised(kept)
    return [probs.get(i, 0.0) for i in range(len(logits))]


# ---------------------------------------------------------------------------------------------------------------------
# validation


@pytest.mark.parametrize("field, bad", [
    ("temperature", -0.1), ("temperature", 101.0), ("temperature", float("nan")),
    ("top_k", -1),
    ("top_p", 0.0), ("top_p", 1.1),
    ("min_p", -0.1), ("min_p", 1.5),
    ("repetition_penalty", 0.0), ("repetition_penalty", 11.0),
    ("presence_penalty", -2.5), ("presence_penalty", 2.5),
    ("frequency_penalty", -2.5), ("frequency_penalty", 2.5),
    ("logprobs", -1), ("logprobs", 21),
    ("seed", -1), ("seed", 2**63),
])
def test_validate_rejects_each_bad_field_by_name(field, bad):
    with pytest.raises(ValueError, match=f"^{field} "):
        SamplingParams(**{field: bad}).validate()


def test_limits_admit_and_state_their_range():
    top_p = Limits(gt=0, le=1)
    assert top_p.admits(1) and top_p.admits(0.5) and not top_p.admits(0) and not top_p.admits(float("nan"))
    assert str(top_p) == "in (0, 1]" and str(Limits(ge=0, lt=8)) == "in [0, 8)" and str(Limits(ge=0)) == ">= 0"
    assert top_p.constraints() == {"gt": 0, "le": 1}
    with pytest.raises(ValueError, match="^max_new_tokens must be an integer >= 1, got 1.5"):
        GenerationParams(max_new_tokens=1.5).validate()
    with pytest.raises(ValueError, match=r"^top_k must be an integer in \[0, 9223372036854775808\)"):
        SamplingParams(top_k=2.0).validate()


def test_validate_accepts_the_edges():
    SamplingParams().validate()
    SamplingParams(temperature=0.0, top_k=0, top_p=1.0, min_p=1.0, repetition_penalty=10.0, presence_penalty=-2.0,
                   frequency_penalty=2.0, seed=2**63 - 1, logprobs=20).validate()
    SamplingParams(temperature=100.0, seed=0, logprobs=0).validate()
    assert SamplingParams(temperature=0.0).greedy and not SamplingParams(temperature=0.1).greedy


# ---------------------------------------------------------------------------------------------------------------------
# greedy


def test_greedy_rows_equal_argmax_and_break_ties_like_torch():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(3))
    logits[0, [7, 20, 41]] = 10.0  # a three-way tie at the top
    logits[1, [2, 3]] = 9.0
    greedy = SamplingParams(temperature=0.0)
    rows = rows_of(greedy, SamplingParams(temperature=0.0, top_k=1), greedy,
                   SamplingParams(temperature=0.9, seed=1), greedy, SamplingParams(temperature=1.5))
    result = sample(logits, rows, torch.Generator().manual_seed(0))
    expected = logits.argmax(dim=-1).tolist()
    assert result.token_ids[0] == expected[0] == 7 and result.token_ids[1] == expected[1] == 2
    for i in (0, 1, 2, 4):
        assert result.token_ids[i] == expected[i]


def test_all_greedy_batch():
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(4))
    result = sample(logits, rows_of(*[SamplingParams(temperature=0.0)] * 4))
    assert result.token_ids == logits.argmax(dim=-1).tolist()


# ---------------------------------------------------------------------------------------------------------------------
# statistical correctness


@pytest.mark.parametrize("params", [
    SamplingParams(),
    SamplingParams(temperature=0.7),
    SamplingParams(top_k=4),
    SamplingParams(top_p=0.8),
    SamplingParams(min_p=0.1),
    SamplingParams(temperature=1.3, top_k=8, top_p=0.9, min_p=0.15),
], ids=["plain", "T=0.7", "top_k=4", "top_p=0.8", "min_p=0.1", "combined"])
def test_sampled_frequencies_match_the_filtered_softmax(params):
    expected = reference_distribution(LOGITS, params)
    logits = torch.tensor(LOGITS).expand(N_DRAWS, -1).contiguous()  # (N, V): one batched draw of N samples
    result = sample(logits, [RowState(params, None)] * N_DRAWS, torch.Generator().manual_seed(1234))
    observed = torch.bincount(torch.tensor(result.token_ids), minlength=len(LOGITS)).double()  # (V,)

    kept = [i for i, p in enumerate(expected) if p > 0]
    assert all(observed[i] == 0 for i in range(len(LOGITS)) if i not in kept), "a filtered-out token was sampled"
    assert len(kept) > 1
    counts = torch.tensor([expected[i] for i in kept], dtype=torch.float64) * N_DRAWS
    chi2 = ((observed[kept] - counts) ** 2 / counts).sum()
    p_value = 1.0 - torch.distributions.Chi2(torch.tensor(len(kept) - 1.0, dtype=torch.float64)).cdf(chi2).item()
    assert p_value > 1e-3, f"chi2={chi2.item():.1f} over {len(kept)} tokens: p={p_value:.2g}"


def test_reference_filters_actually_filter():
    """Guard the test above against vacuous cases: each filter removes something from LOGITS."""
    for params in (SamplingParams(top_k=4), SamplingParams(top_p=0.8), SamplingParams(min_p=0.1)):
        assert 1 < sum(p > 0 for p in reference_distribution(LOGITS, params)) < len(LOGITS)


def test_top_k_ge_vocab_and_top_p_one_are_unfiltered():
    """Same generator stream, same tokens: the no-op settings change nothing even when filtering runs for others."""
    vocab = 40
    logits = torch.randn(25, vocab, generator=torch.Generator().manual_seed(5))
    for noop in (SamplingParams(seed=9, top_k=vocab), SamplingParams(seed=9, top_k=10 * vocab),
                 SamplingParams(seed=9, top_p=1.0), SamplingParams(seed=9, top_k=vocab, top_p=1.0)):
        plain_row = rows_of(SamplingParams(seed=9))[0]
        noop_row = rows_of(noop)[0]
        other = rows_of(SamplingParams(top_k=2, top_p=0.5))[0]  # makes the batch run the top-k/top-p path
        for step in range(len(logits)):
            alone = sample(logits[step:step + 1], [plain_row]).token_ids[0]
            batched = sample(torch.stack([logits[step], logits[step]]), [other, noop_row]).token_ids[1]
            assert alone == batched


def test_tiny_temperature_is_greedy_without_overflow():
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(6))
    rows = rows_of(*[SamplingParams(temperature=1e-8)] * 3)
    assert sample(logits, rows).token_ids == logits.argmax(dim=-1).tolist()


# ---------------------------------------------------------------------------------------------------------------------
# seeds


def run_steps(step_logits: torch.Tensor, row_index: int, batch_params: list[SamplingParams]) -> list[int]:
    """Decode len(step_logits) steps with a batch and return the tokens of row `row_index`."""
    rows = rows_of(*batch_params)
    generator = torch.Generator().manual_seed(77)
    tokens = []
    for logits in step_logits:  # (B, V) per step
        result = sample(logits, rows, generator)
        for row, token in zip(rows, result.token_ids):
            row.output_ids = [*row.output_ids, token]
        tokens.append(result.token_ids[row_index])
    return tokens


def test_seeded_row_is_batch_invariant():
    steps, vocab = 30, 64
    g = torch.Generator().manual_seed(8)
    mine = torch.randn(steps, 1, vocab, generator=g)  # (steps, 1, V) the seeded row's logits at every step
    others = torch.randn(steps, 4, vocab, generator=g) * 2  # (steps, 4, V)
    seeded = SamplingParams(seed=42, temperature=0.8, top_p=0.95, presence_penalty=0.3)
    neighbours = [SamplingParams(), SamplingParams(seed=7, top_k=5), SamplingParams(temperature=0.0),
                  SamplingParams(min_p=0.2, repetition_penalty=1.3)]

    alone = run_steps(mine, 0, [seeded])
    first = run_steps(torch.cat([mine, others], dim=1), 0, [seeded, *neighbours])
    middle = run_steps(torch.cat([others[:, :2], mine, others[:, 2:]], dim=1), 2, [*neighbours[:2], seeded,
                                                                                 *neighbours[2:]])
    assert alone == first == middle
    different_seed = run_steps(mine, 0, [SamplingParams(seed=43, temperature=0.8, top_p=0.95, presence_penalty=0.3)])
    assert different_seed != alone


def test_make_generator():
    assert make_generator(None, "cpu") is None
    a, b = make_generator(5, "cpu"), make_generator(5, torch.device("cpu"))
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))


# ---------------------------------------------------------------------------------------------------------------------
# penalties


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -0.5]])
    row = rows_of(SamplingParams(repetition_penalty=2.0), prompt=(0,), output=(1, 1))
    assert torch.equal(apply_penalties(logits, row), torch.tensor([[1.0, -2.0, 0.5, 3.0, -0.5]]))


def test_presence_and_frequency_subtract_per_generated_token():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    row = rows_of(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), prompt=(3,), output=(1, 1, 2))
    # token 1: -1 - 0.5 - 2 * 0.25; token 2: 0.5 - 0.5 - 0.25; the prompt-only token 3 is untouched
    assert torch.equal(apply_penalties(logits, row), torch.tensor([[2.0, -2.0, -0.25, 3.0]]))


def test_penalties_are_per_row_and_leave_the_input_alone():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]] * 3)
    original = logits.clone()
    rows = [RowState(SamplingParams(), None, (0,), (1, 3)),
            RowState(SamplingParams(repetition_penalty=1.5), None, (0,), (3,)),
            RowState(SamplingParams(frequency_penalty=-1.0), None, (0,), (2, 2))]
    penalised = apply_penalties(logits, rows)
    assert torch.equal(logits, original)
    assert torch.equal(penalised[0], original[0])
    assert torch.allclose(penalised[1], torch.tensor([2.0 / 1.5, -1.0, 0.5, 3.0 / 1.5]))
    assert torch.equal(penalised[2], torch.tensor([2.0, -1.0, 2.5, 3.0]))
    assert apply_penalties(logits, rows[:1]) is logits  # nothing to do: no copy


def test_penalties_flip_the_greedy_choice():
    logits = torch.tensor([[3.0, 2.5, 0.0]] * 3)
    rows = [RowState(SamplingParams(temperature=0.0), None, (), (0,)),
            RowState(SamplingParams(temperature=0.0, frequency_penalty=0.3), None, (), (0, 0)),
            RowState(SamplingParams(temperature=0.0, repetition_penalty=1.3), None, (0,), ())]
    assert sample(logits, rows).token_ids == [0, 1, 1]


# ---------------------------------------------------------------------------------------------------------------------
# logprobs


def test_logprobs_are_of_the_raw_distribution():
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(10))
    rows = rows_of(SamplingParams(temperature=0.5, logprobs=5, repetition_penalty=2.0),
                   SamplingParams(logprobs=0, seed=3), SamplingParams(temperature=0.0),
                   SamplingParams(top_k=3, logprobs=20, presence_penalty=1.0), output=(1, 2, 3))
    result = sample(logits, rows, torch.Generator().manual_seed(0))
    raw = torch.log_softmax(logits, dim=-1)  # (B, V)
    for i, token in enumerate(result.token_ids):
        assert result.logprobs[i] == (None if i == 2 else raw[i, token].item())  # row 2 did not ask
    assert [None if t is None else len(t) for t in result.top_logprobs] == [5, 0, None, 20]
    everyone = sample(logits, rows_of(*[SamplingParams(temperature=0.0, logprobs=2)] * 4))
    assert everyone.logprobs == raw.max(-1).values.tolist() and all(len(t) == 2 for t in everyone.top_logprobs)
    for i in (0, 3):
        top = result.top_logprobs[i]
        assert [lp for _, lp in top] == sorted((lp for _, lp in top), reverse=True)
        values, ids = raw[i].topk(len(top))
        assert [t for t, _ in top] == ids.tolist() and [lp for _, lp in top] == values.tolist()


# ---------------------------------------------------------------------------------------------------------------------
# top_k_distribution


@pytest.mark.parametrize("temperature", [1.0, 0.6, 2.5])
def test_top_k_distribution_matches_a_float64_reference(temperature):
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(11)) * 3
    logits[1, :10] = float("-inf")  # masked tokens must not break probs or entropy
    reference = torch.softmax(logits.double() / temperature, dim=-1)  # (B, V)
    ref_entropy = -torch.where(reference > 0, reference * reference.log(), 0.0).sum(-1)  # (B,)

    for k in (5, 50):
        ids, probs, logprobs, ent = top_k_distribution(logits, k, temperature)
        assert ids.shape == probs.shape == logprobs.shape == (3, k) and ent.shape == (3,)
        assert probs.dtype == logprobs.dtype == ent.dtype == torch.float32
        assert torch.all(probs[:, :-1] >= probs[:, 1:])
        torch.testing.assert_close(probs.double(), reference.gather(-1, ids), atol=1e-6, rtol=0)
        torch.testing.assert_close(logprobs.exp(), probs)
        torch.testing.assert_close(ent.double(), ref_entropy, atol=1e-5, rtol=1e-6)
        assert torch.isfinite(ent).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(3), atol=1e-5, rtol=0)  # k == V
    assert (probs[1, -10:] == 0).all() and set(ids[1, -10:].tolist()) == set(range(10))


def test_top_k_distribution_rejects_bad_arguments():
    logits = torch.zeros(1, 8)
    with pytest.raises(ValueError, match="^k "):
        top_k_distribution(logits, 9, 1.0)
    with pytest.raises(ValueError, match="^temperature "):
        top_k_distribution(logits, 3, 0.0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_seeded_rows_match_alone_and_stay_on_device():
    logits = torch.randn(5, 1000, generator=torch.Generator().manual_seed(12)).cuda()
    params = [SamplingParams(seed=s, top_p=0.9, logprobs=3) for s in range(5)]
    batched = sample(logits, [RowState(p, make_generator(p.seed, "cuda")) for p in params])
    for i, p in enumerate(params):
        alone = sample(logits[i:i + 1], [RowState(p, make_generator(p.seed, "cuda"))])
        assert alone.token_ids[0] == batched.token_ids[i]
        assert alone.top_logprobs[0] == batched.top_logprobs[i]
