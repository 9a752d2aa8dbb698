"""lmserve's own API: /generate (batch prompts, SSE streaming), /next-token-probs, /tokenize, /detokenize."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Annotated, Any

from fastapi import APIRouter, Body, Request
from fastapi.responses import JSONResponse, Response

from service.api.deps import DONE, EventStream, ServingDep, check_count, request_id, sse
from service.api.errors import APIError, error_body
from service.api.generation import (
    LONG_TEXT,
    Generation,
    Serving,
    collect,
    engine_error,
    log_fields,
    unless_disconnected,
    usage,
)
from service.api.schemas import (
    ERROR_RESPONSES,
    GENERATE_EXAMPLES,
    GENERATE_SSE,
    NEXT_TOKEN_EXAMPLES,
    DetokenizeRequest,
    DetokenizeResponse,
    GenerateRequest,
    GenerateResponse,
    NextTokenProbsRequest,
    NextTokenProbsResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from service.engine.admission import EngineError
from service.engine.request import RequestOutput, TokenLogprob

router = APIRouter(tags=["lmserve"])
LONG_IDS = 20_000  # token ids; more are decoded in a worker thread
def logprobs_json(serving: Serving, logprobs: list[TokenLogprob]) -> list[dict[str, Any]]:
    text = serving.token_text
    return [{"token_id": lp.token_id, "token": text(lp.token_id), "logprob": lp.logprob,
             "top_logprobs": [{"token_id": i, "token": text(i), "logprob": v} for i, v in (lp.top or [])]}
            for lp in logprobs]


@router.post("/generate", summary="Generate text for one prompt or a batch (optionally streamed)",
             responses={200: {"model": GenerateResponse, "content": GENERATE_SSE}, **ERROR_RESPONSES})
async def generate(request: Request, body: Annotated[GenerateRequest, Body(openapi_examples=GENERATE_EXAMPLES)],
                   serving: ServingDep) -> Response:
    """Continues each prompt. With `stream: true` the answer is Server-Sent Events: one `data: {json}` per new
    piece of text (`index`, `text`, `token_id`, `logprobs`), a last event per prompt with `finish_reason` and
    `usage`, then `data: [DONE]`. A request still running at the server's request timeout ends with
    `finish_reason: "abort"` and the text so far."""
    texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    check_count(len(texts), serving.settings.max_prompts)
    prompts = await serving.prompts(texts)
    generation = serving.generation(serving.requests(prompts, body), [p.num_tokens for p in prompts],
                                    request_id(request))
    await unless_disconnected(request, generation.start())
    if body.stream:
        return EventStream(_events(serving, generation, request), request, on_close=generation.close)
    results = await unless_disconnected(request, collect(generation))
    outputs = []
    for index, r in enumerate(results):
        output: dict[str, Any] = {"index": index, "text": r.text, "token_ids": r.token_ids or [],
                                  "finish_reason": r.finish_reason.value if r.finish_reason else None}
        if body.logprobs is not None:
            output["logprobs"] = logprobs_json(serving, r.logprobs or [])
        outputs.append(output)
    prompt_tokens = sum(r.prompt_tokens for r in results)
    completion_tokens = sum(r.completion_tokens for r in results)
    log_fields(request, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
               finish_reason=[o["finish_reason"] for o in outputs], timed_out=generation.timed_out or None)
    return JSONResponse({"id": request_id(request), "model": serving.name, "outputs": outputs,
                         "usage": usage(prompt_tokens, completion_tokens)})


async def _events(serving: Serving, generation: Generation, request: Request) -> AsyncGenerator[bytes, None]:
    totals = [0, 0]
    reasons: list[str | None] = [None] * len(generation.requests)
    try:
        async for index, out in generation.events():
            yield sse(_event(serving, index, out, generation.prompt_tokens[index]))
            if out.finished:
                totals[0] += generation.prompt_tokens[index]
                totals[1] += out.completion_tokens
                reasons[index] = out.finish_reason.value if out.finish_reason else None
        yield DONE
    finally:
        log_fields(request, prompt_tokens=totals[0], completion_tokens=totals[1], finish_reason=reasons,
                   stream=True, timed_out=generation.timed_out or None)


def _event(serving: Serving, index: int, out: RequestOutput, prompt_tokens: int) -> dict[str, Any]:
    event: dict[str, Any] = {"index": index, "text": out.text, "token_id": out.token_ids[-1] if out.token_ids else None}
    if len(out.token_ids) > 1:
        event["token_ids"] = out.token_ids
    if out.logprobs is not None:
        event["logprobs"] = logprobs_json(serving, out.logprobs)
    if out.finished:
        event["finish_reason"] = out.finish_reason.value if out.finish_reason else None
        event["usage"] = usage(prompt_tokens, out.completion_tokens)
        if out.error:
            event["error"] = error_body(out.error, "internal_error", code="engine_error")["error"]
    return event


@router.post("/next-token-probs", summary="The most likely next tokens and the distribution's entropy",
             response_model=NextTokenProbsResponse, responses=ERROR_RESPONSES)
async def next_token_probs(
        request: Request, body: Annotated[NextTokenProbsRequest, Body(openapi_examples=NEXT_TOKEN_EXAMPLES)],
        serving: ServingDep) -> JSONResponse:
    """For each prompt: the `top_k` most likely next tokens under softmax(logits / temperature), sorted by
    probability, and the entropy (nats) of the whole distribution. For an encoder-decoder model `prompt` is the
    source and `decoder_prefix` the output so far (default: empty)."""
    engine = serving.engine
    texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    check_count(len(texts), serving.settings.max_prompts)
    if not 1 <= body.top_k <= engine.vocab_size:
        raise APIError(400, f"top_k: must be in [1, {engine.vocab_size}] (the vocabulary size), got {body.top_k}",
                       param="top_k", code="invalid_value")
    prompts = await serving.prompts(texts)
    sources = None
    if engine.is_encoder_decoder:
        prefix = body.decoder_prefix
        prefixes = prefix if isinstance(prefix, list) else [prefix or ""] * len(texts)
        if len(prefixes) != len(texts):
            raise APIError(400, f"decoder_prefix: {len(prefixes)} prefixes for {len(texts)} prompts",
                           param="decoder_prefix", code="invalid_value")
        sources = [p.source_ids for p in prompts]
        decoder = [[serving.start_id, *serving.tokenizer.encode(s, allow_special=False)] for s in prefixes]
    elif body.decoder_prefix is not None:
        raise APIError(400, "decoder_prefix: only encoder-decoder models take one", param="decoder_prefix",
                       code="invalid_value")
    else:
        decoder = [p.prompt_ids for p in prompts]
    for i, ids in enumerate(decoder):
        if len(ids) > serving.max_seq_len:
            param = "decoder_prefix" if sources is not None else "prompt"
            raise APIError(400, f"{param}: {len(ids)} tokens, more than the context length {serving.max_seq_len}"
                                + (f" (prompt {i})" if len(decoder) > 1 else ""), param=param,
                           code="context_length_exceeded")
    try:
        results = await unless_disconnected(request, engine.next_token_probs(decoder, body.top_k, body.temperature,
                                                                             sources=sources))
    except (EngineError, ValueError) as e:
        raise engine_error(e) from e
    log_fields(request, prompt_tokens=sum(len(d) for d in decoder))
    return JSONResponse({"model": serving.name, "results": results})


@router.post("/tokenize", summary="Text to token ids, as a prompt would be encoded", response_model=TokenizeResponse,
             responses=ERROR_RESPONSES)
async def tokenize(body: TokenizeRequest, serving: ServingDep) -> JSONResponse:
    """Special-token strings in the text are plain text here too; for an encoder-decoder model the source gets
    its end-of-sequence token, as in generation."""
    tok = serving.tokenizer
    add_eos = serving.engine.is_encoder_decoder and tok.eos_id is not None
    add_bos = tok.adds_bos and not serving.engine.is_encoder_decoder
    if len(body.prompt) > LONG_TEXT:  # off the event loop, as prompts are
        ids = await asyncio.to_thread(tok.encode, body.prompt, add_bos, add_eos, False)
    else:
        ids = tok.encode(body.prompt, add_bos=add_bos, add_eos=add_eos, allow_special=False)
    return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": serving.max_seq_len})


@router.post("/detokenize", summary="Token ids to text", response_model=DetokenizeResponse,
             responses=ERROR_RESPONSES)
async def detokenize(body: DetokenizeRequest, serving: ServingDep) -> JSONResponse:
    vocab = serving.engine.vocab_size
    for i, t in enumerate(body.tokens):
        if not 0 <= t < vocab:
            raise APIError(400, f"tokens[{i}]: {t} is not a token id (vocabulary size {vocab})", param=f"tokens[{i}]",
                           code="invalid_value")
    if len(body.tokens) > LONG_IDS:  # off the event loop: the other requests go on meanwhile
        return JSONResponse({"text": await asyncio.to_thread(serving.tokenizer.decode, body.tokens)})
    return JSONResponse({"text": serving.tokenizer.decode(body.tokens)})
