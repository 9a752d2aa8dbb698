"""Per-row token sampling for a decode step where every row (request) brings its own settings.

The engine calls `sample` once per step with the logits of all running sequences. The pipeline is

    penalties -> greedy rows: argmax -> sampled rows: / temperature -> top-k -> top-p -> min-p -> draw

and the draw uses the exponential race (argmax p_i / E_i with E_i ~ Exp(1)), an exact categorical sample. A seeded
row draws its own V exponentials from its own generator on every step, so the tokens it gets depend only on its
seed and its logits, never on which other requests share the batch. Logprobs returned to clients are those of the
raw model distribution (before penalties and temperature), as vLLM returns them by default.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from model.model import entropy, log_probs
from service.backends.cpu.layers import argmax
from service.engine.limits import Limits, check_limits, setting

MAX_LOGPROBS = 20
# temperatures below this are sampled greedily: logits / T would overflow and the distribution is one-hot anyway
MIN_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """The per-request generation settings that affect which token is chosen, each with its limits (see limits.py:
    the API's request schemas are built from these declarations)."""

    temperature: float = setting(1.0, Limits(ge=0, le=100), "0 = greedy")
    top_k: int = setting(0, Limits(ge=0, lt=2**63), "0 = off; above the vocabulary size: off")
    top_p: float = setting(1.0, Limits(gt=0, le=1), "1 = off")
    min_p: float = setting(0.0, Limits(ge=0, le=1), "0 = off; keeps tokens with prob >= min_p * the top prob")
    repetition_penalty: float = setting(1.0, Limits(gt=0, le=10), "1 = off; over prompt and output tokens")
    presence_penalty: float = setting(0.0, Limits(ge=-2, le=2), "0 = off; OpenAI style, over output tokens")
    frequency_penalty: float = setting(0.0, Limits(ge=-2, le=2), "0 = off; OpenAI style, over output tokens")
    seed: int | None = setting(None, Limits(ge=0, lt=2**63), "same seed, same settings: same tokens")
    logprobs: int | None = setting(None, Limits(ge=0, le=MAX_LOGPROBS),
                                   "return each token's logprob and this many top alternatives")

    def validate(self) -> None:
        """Raise ValueError naming the first bad field, so the API can answer 400 with a useful message."""
        check_limits(self)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def uses_repetition_penalty(self) -> bool:
        return self.repetition_penalty != 1.0

    @property
    def uses_count_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


@dataclass
class RowState:
    """What the sampler needs to know about one row besides its logits."""

    params: SamplingParams
    generator: torch.Generator | None = None  # the request's own generator when it is seeded (see make_generator)
    prompt_ids: Sequence[int] = ()  # for repetition_penalty
    output_ids: Sequence[int] = ()  # generated so far, for all penalties


@dataclass
class SampleResult:
    token_ids: list[int]  # chosen token per row
    logprobs: list[float | None]  # log-prob of the chosen token under the raw model distribution; None if not asked
    top_logprobs: list[list[tuple[int, float]] | None]  # per row: top-N (id, logprob), descending; None if not asked


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """A generator on `device` seeded with `seed` (None when unseeded), created once per request."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


# ---------------------------------------------------------------------------------------------------------------------
# penalties


def _token_counts(token_lists: Sequence[Sequence[int]], rows: Sequence[int], shape: torch.Size,
                  device: torch.device) -> torch.Tensor:
    """(B, V) fp32 counts of each token in token_lists[i] for row rows[i]; zeros elsewhere.

    The (row, token) pairs go over in one flat index tensor and one scatter_add_, not one transfer per row.
    """
    counts = torch.zeros(shape, dtype=torch.float32, device=device)  # (B, V)
    flat = [row * shape[1] + token for row, tokens in zip(rows, token_lists) for token in tokens]
    if flat:
        index = torch.tensor(flat, dtype=torch.long, device=device)  # (N,)
        counts.view(-1).scatter_add_(0, index, torch.ones(len(flat), dtype=torch.float32, device=device))
    return counts


def _per_row(values: Sequence[float], device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B,) tensor of one setting per row, so the filters run on the whole batch at once."""
    return torch.tensor(values, dtype=dtype, device=device)


def apply_penalties(logits: torch.Tensor, rows: Sequence[RowState]) -> torch.Tensor:
    """Repetition, presence and frequency penalties; returns `logits` itself when no row uses any.

    repetition (prompt + generated tokens): logit / p if logit > 0 else logit * p
    presence / frequency (generated tokens): logit -= presence * (count > 0) + frequency * count
    """
    params = [row.params for row in rows]
    rep_rows = [i for i, p in enumerate(params) if p.uses_repetition_penalty]
    count_rows = [i for i, p in enumerate(params) if p.uses_count_penalties]
    if not rep_rows and not count_rows:
        return logits
    logits = logits.clone()  # (B, V); the raw logits are still needed for logprobs
    if rep_rows:
        seen_lists = [list(rows[i].prompt_ids) + list(rows[i].output_ids) for i in rep_rows]
        seen = _token_counts(seen_lists, rep_rows, logits.shape, logits.device) > 0  # (B, V)
        penalty = _per_row([p.repetition_penalty for p in params], logits.device)[:, None]  # (B, 1)
        penalised = torch.where(logits > 0, logits / penalty, logits * penalty)  # (B, V)
        logits = torch.where(seen, penalised, logits)
    if count_rows:
        counts = _token_counts([rows[i].output_ids for i in count_rows], count_rows, logits.shape, logits.device)
        presence = _per_row([p.presence_penalty for p in params], logits.device)[:, None]  # (B, 1)
        frequency = _per_row([p.frequency_penalty for p in params], logits.device)[:, None]  # (B, 1)
        logits = logits - presence * (counts > 0) - frequency * counts  # (B, V)
    return logits


# ---------------------------------------------------------------------------------------------------------------------
# filters, applied to temperature-scaled logits; a removed token's logit becomes -inf


def _top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep each row's top_k tokens, then the smallest prefix of those whose cumulative prob reaches top_p.

    top_k: (S,) long with 0 meaning off; top_p: (S,) fp32 with 1 meaning off. Both work on one stable descending
    sort, so ties are resolved by token id the same way whatever the batch.
    """
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)  # (S, V)
    rank = torch.arange(vocab, device=logits.device)  # (V,)
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)  # (S,)
    sorted_logits = sorted_logits.masked_fill(rank >= k[:, None], float("-inf"))  # (S, V)

    probs = sorted_logits.softmax(dim=-1)  # (S, V) renormalised over the top-k
    mass_before = probs.cumsum(dim=-1) - probs  # (S, V) prob of the strictly better tokens; 0 for the top token
    outside_nucleus = (mass_before >= top_p[:, None]) & (top_p[:, None] < 1.0)  # top_p == 1 exactly: rounding-proof
    sorted_logits = sorted_logits.masked_fill(outside_nucleus, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)  # (S, V) back in vocabulary order


def _min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens with prob < min_p * max prob; the ratio is the same before and after renormalisation."""
    probs = logits.softmax(dim=-1)  # (S, V)
    threshold = min_p[:, None] * probs.amax(dim=-1, keepdim=True)  # (S, 1)
    return logits.masked_fill(probs < threshold, float("-inf"))


def _exponential_noise(rows: Sequence[RowState], vocab: int, device: torch.device,
                       default_generator: torch.Generator | None) -> torch.Tensor:
    """(S, V) iid Exp(1) noise: V draws from each seeded row's own generator, one batched draw for the rest."""
    noise = torch.empty(len(rows), vocab, dtype=torch.float32, device=device)  # (S, V)
    unseeded = [i for i, row in enumerate(rows) if row.generator is None]
    if len(unseeded) == len(rows):
        noise.exponential_(generator=default_generator)
    elif unseeded:
        draw = torch.empty(len(unseeded), vocab, dtype=torch.float32, device=device)  # (U, V)
        noise[torch.tensor(unseeded, device=device)] = draw.exponential_(generator=default_generator)
    for i, row in enumerate(rows):
        if row.generator is not None:
            noise[i].exponential_(generator=row.generator)  # (V,) the same numbers whatever the batch
    return noise.clamp_min_(torch.finfo(torch.float32).tiny)  # never 0, so log(noise) stays finite


def _sample_rows(logits: torch.Tensor, rows: Sequence[RowState],
                 default_generator: torch.Generator | None) -> torch.Tensor:
    """(S,) sampled token ids for penalised logits (S, V) of non-greedy rows."""
    device = logits.device
    params = [row.params for row in rows]
    logits = logits / _per_row([p.temperature for p in params], device)[:, None]  # (S, V)
    if any(0 < p.top_k < logits.shape[-1] or p.top_p < 1.0 for p in params):
        top_k = _per_row([p.top_k for p in params], device, torch.long)  # (S,)
        top_p = _per_row([p.top_p for p in params], device)  # (S,)
        logits = _top_k_top_p(logits, top_k, top_p)
    if any(p.min_p > 0.0 for p in params):
        logits = _min_p(logits, _per_row([p.min_p for p in params], device))
    # exponential race: argmax p_i / E_i, taken in log space so the softmax's normaliser is not even needed
    noise = _exponential_noise(rows, logits.shape[-1], device, default_generator)  # (S, V)
    return argmax(logits - noise.log())  # (S,)


# ---------------------------------------------------------------------------------------------------------------------
# entry points


def sample(logits: torch.Tensor, rows: Sequence[RowState],
           default_generator: torch.Generator | None = None) -> SampleResult:
    """Choose one token per row of `logits` (B, V) under that row's settings, and report raw-model logprobs.

    Everything stays on logits.device; the results cross to the host in a single .tolist(). Logprobs are computed
    only for the rows that ask for them: a log-softmax over the whole vocabulary is a sizeable part of a CPU step.
    """
    if logits.dim() != 2 or logits.shape[0] != len(rows):
        raise ValueError(f"logits must be (B, V) with B = len(rows) = {len(rows)}, got {tuple(logits.shape)}")
    device = logits.device
    asking = [i for i, row in enumerate(rows) if row.params.logprobs is not None]
    penalised = apply_penalties(logits.float(), rows)  # (B, V)

    greedy = [i for i, row in enumerate(rows) if row.params.temperature < MIN_TEMPERATURE]
    sampled = [i for i, row in enumerate(rows) if row.params.temperature >= MIN_TEMPERATURE]
    if not sampled:
        token_ids = argmax(penalised)  # (B,)
    else:
        token_ids = torch.empty(len(rows), dtype=torch.long, device=device)  # (B,)
        if greedy:
            greedy_index = torch.tensor(greedy, device=device)
            token_ids[greedy_index] = argmax(penalised[greedy_index])
        sampled_index = torch.tensor(sampled, device=device)
        token_ids[sampled_index] = _sample_rows(penalised[sampled_index], [rows[i] for i in sampled],
                                                default_generator)
    # one host transfer: per row [token, logprob, top ids..., top logprobs...] as float64 (ids are exact), the
    # logprob columns NaN for rows that did not ask
    n_top = max((row.params.logprobs or 0 for row in rows), default=0)
    table = token_ids[:, None].double()  # (B, 1)
    if asking:
        index = torch.tensor(asking, device=device)
        raw_logprobs = log_probs(logits[index])  # (A, V) fp32, before penalties and temperature
        columns = [raw_logprobs.gather(-1, token_ids[index][:, None])]  # (A, 1)
        if n_top > 0:
            top_values, top_ids = raw_logprobs.topk(n_top, dim=-1)  # (A, N) each, sorted descending
            columns += [top_ids, top_values]
        asked = torch.cat([c.double() for c in columns], dim=-1)  # (A, 1 + 2N)
        table = torch.cat([table, table.new_full((len(rows), asked.shape[1]), math.nan).index_copy_(0, index, asked)],
                          dim=-1)
    table = table.tolist()  # B lists of 1 or 2 + 2N floats

    result = SampleResult(token_ids=[], logprobs=[], top_logprobs=[])
    for row, values in zip(rows, table):
        result.token_ids.append(int(values[0]))
        n = row.params.logprobs
        result.logprobs.append(None if n is None else values[1])
        if n is None:
            result.top_logprobs.append(None)
        else:
            ids, lps = values[2:2 + n], values[2 + n_top:2 + n_top + n]
            result.top_logprobs.append([(int(i), lp) for i, lp in zip(ids, lps)])
    return result


def top_k_distribution(logits: torch.Tensor, k: int,
                       temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k most likely next tokens of softmax(logits / T), for the /next-token-probs endpoint.

    Returns (ids (B, k), probs (B, k), logprobs (B, k), entropy (B,)), sorted by probability descending, fp32;
    the entropy (nats) is over the full distribution, not just the top k.
    """
    vocab = logits.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"k must be in [1, {vocab}], got {k}")
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    temperature = max(temperature, MIN_TEMPERATURE)  # below it logits / T overflow: the distribution is one-hot
    logprobs = log_probs(logits, temperature)  # (B, V) fp32
    top_logprobs, ids = logprobs.topk(k, dim=-1)  # (B, k) each
    return ids, top_logprobs.exp(), top_logprobs, entropy(logits, temperature)
