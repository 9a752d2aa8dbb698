"""Hugging Face model families: tiny random models made by transformers itself (save_pretrained, safetensors) load
here with no conversion and agree with transformers, logits and greedy continuations, on the PyTorch path and on
the CPU kernels; ours of a family save so that transformers loads them unchanged; what lmserve does not compute is
refused with the field and its value."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from model.families import family_of
from service.engine.engine import Engine, EngineConfig
from service.engine.request import GenerationParams, GenerationRequest
from service.settings import Settings
from tests.support.kernels import CAN_BUILD
from tests.support.live_server import LiveServer, tokenizer
from tests.support.models import make_model

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]

SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "llama-biases": ("LlamaConfig", dict(attention_bias=True, mlp_bias=True)),
    "llama-linear": ("LlamaConfig", dict(rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "llama-dynamic": ("LlamaConfig", dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0})),
    "llama3": ("LlamaConfig", dict(rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32})),
    "llama-yarn": ("LlamaConfig", dict(rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                     "original_max_position_embeddings": 32})),
    "mistral": ("MistralConfig", dict(sliding_window=256)),  # beyond the context: no effect
    "mistral-no-window": ("MistralConfig", dict(sliding_window=None)),
    "qwen2": ("Qwen2Config", dict(rope_theta=1000000.0, tie_word_embeddings=True)),
    "qwen2-untied": ("Qwen2Config", dict(tie_word_embeddings=False)),
    "qwen3": ("Qwen3Config", dict(head_dim=32)),
    "phi3": ("Phi3Config", {}),
    "gemma": ("GemmaConfig", dict(head_dim=32, num_key_value_heads=1)),
    "gpt2": ("GPT2Config", {}),
}


def hf_model(name: str, seed: int = 0):
    """A tiny random transformers model of family `name`, every weight random (norms and biases too)."""
    class_name, extra = FAMILIES[name]
    vocab = tokenizer().vocab_size
    if class_name == "GPT2Config":
        config = transformers.GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                         bos_token_id=1, eos_token_id=2, **extra)
    else:
        config = getattr(transformers, class_name)(vocab_size=vocab, **(SMALL | extra))
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def save_hf(model, directory: Path, **kwargs) -> Path:
    model.save_pretrained(directory, **kwargs)
    tokenizer().save(directory / "tokenizer.json")
    return directory


def ids(batch: int = 2, length: int = 20, seed: int = 3) -> torch.Tensor:
    return torch.randint(3, tokenizer().vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(int(model(torch.tensor([tokens])).logits[0, -1].argmax()))
    return tokens[len(prompt):]


def engine_greedy(directory: Path, prompts: list[list[int]], n: int, cpu_kernels: bool) -> list[list[int]]:
    engine = Engine(load_checkpoint(directory), EngineConfig(max_batch_size=4, cpu_kernels=cpu_kernels))
    engine.start()
    params = GenerationParams(max_new_tokens=n, temperature=0, ignore_eos=True)

    async def one(prompt: list[int]) -> list[int]:
        return [t async for out in engine.submit(GenerationRequest(prompt, params)) for t in out.token_ids]

    async def all_of() -> list[list[int]]:
        return list(await asyncio.gather(*(one(p) for p in prompts)))
    try:
        return asyncio.run(all_of())
    finally:
        engine.shutdown()


@pytest.mark.parametrize("name", FAMILIES)
@torch.no_grad()
def test_a_transformers_checkpoint_loads_and_agrees(tmp_path, name):
    theirs = hf_model(name)
    directory = save_hf(theirs, tmp_path / name)
    ours = load_checkpoint(directory).model
    x = ids()
    assert (ours(x) - theirs(x).logits).abs().max() <= 1e-4
    prompts = [x[0, :7].tolist(), x[1, :12].tolist()]
    expected = [hf_greedy(theirs, p, 10) for p in prompts]
    assert engine_greedy(directory, prompts, 10, cpu_kernels=False) == expected
    if CAN_BUILD:  # the packed kernels and, where it applies, the fused C decode step
        assert engine_greedy(directory, prompts, 10, cpu_kernels=True) == expected


@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3", "phi3", "gemma", "gpt2", "mistral"])
@torch.no_grad()
def test_ours_of_a_family_load_in_transformers_unchanged(tmp_path, name):
    """A model of ours whose layout is a family saves as that family: AutoModelForCausalLM and AutoTokenizer load
    the directory as it is and give the same logits and token ids."""
    theirs = hf_model(name)
    loaded = load_checkpoint(save_hf(theirs, tmp_path / "theirs"))
    family = family_of(loaded.config)
    assert family == ("llama" if name == "phi3" else name)  # phi3's fused tensors are saved apart, as llama
    out = save_checkpoint(tmp_path / "ours", loaded.model, loaded.tokenizer, loaded.generation)
    assert json.loads((out / "config.json").read_text())["model_type"] == family
    again = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    x = ids()
    assert (again(x).logits - theirs(x).logits).abs().max() <= 1e-4
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tokenizer.eos_token_id == loaded.tokenizer.eos_id
    if family in ("llama", "mistral", "gpt2"):  # the layouts our trainer makes; transformers gives the others'
        text = "def add(a, b):\n    return a + b  # 你好 🚀"  # tokenizer classes their own pre-tokenizer
        assert hf_tokenizer(text, add_special_tokens=False).input_ids == loaded.tokenizer.encode(text)


@torch.no_grad()
def test_sharded_bfloat16_checkpoints_load_in_the_dtype_asked_for(tmp_path):
    theirs = hf_model("qwen2-untied").to(torch.bfloat16)
    directory = save_hf(theirs, tmp_path / "sharded", max_shard_size="40KB")
    assert (directory / "model.safetensors.index.json").is_file() and len(list(directory.glob("*.safetensors"))) > 2
    x = ids()
    as_bf16 = load_checkpoint(directory)  # the config's dtype
    assert as_bf16.model.lm_head.weight.dtype is torch.bfloat16
    assert (as_bf16.model(x) - theirs(x).logits.float()).abs().max() <= 2e-2
    as_f32 = load_checkpoint(directory, dtype="float32").model
    assert all(p.dtype is torch.float32 for p in as_f32.parameters())
    reference = hf_model("qwen2-untied").to(torch.bfloat16).float()  # the same weights, rounded, in float32
    assert (as_f32(x) - reference(x).logits).abs().max() <= 1e-4


@torch.no_grad()
def test_gpt2_checkpoints_without_the_transformer_prefix_load(tmp_path):
    theirs = hf_model("gpt2")
    directory = save_hf(theirs, tmp_path / "gpt2")
    tensors = load_file(directory / "model.safetensors")
    renamed = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    renamed["h.0.attn.bias"] = torch.ones(1, 1, 128, 128)  # the causal-mask buffer old GPT-2 files carry
    save_file(renamed, directory / "model.safetensors", metadata={"format": "pt"})
    x = ids()
    assert (load_checkpoint(directory).model(x) - theirs(x).logits).abs().max() <= 1e-4


def test_every_listed_eos_id_ends_generation(tmp_path):
    theirs = hf_model("llama")
    directory = save_hf(theirs, tmp_path / "eos")
    prompt = ids()[0, :6].tolist()
    continuation = hf_greedy(theirs, prompt, 8)
    stop_at = continuation[3]
    generation = json.loads((directory / "generation_config.json").read_text())
    generation["eos_token_id"] = [2, stop_at]
    (directory / "generation_config.json").write_text(json.dumps(generation))
    checkpoint = load_checkpoint(directory)
    assert set(checkpoint.generation.eos_token_ids) == {2, stop_at}
    engine = Engine(checkpoint, EngineConfig(max_batch_size=2))
    engine.start()

    async def run() -> tuple[list[int], str]:
        tokens, reason = [], None
        async for out in engine.submit(GenerationRequest(prompt, GenerationParams(max_new_tokens=8, temperature=0))):
            tokens += out.token_ids
            reason = out.finish_reason
        return tokens, reason.value
    try:
        tokens, reason = asyncio.run(run())
    finally:
        engine.shutdown()
    assert reason == "stop" and tokens == continuation[:continuation.index(stop_at)]


def test_tokenizer_config_names_the_special_tokens_and_bos(tmp_path):
    directory = save_hf(hf_model("llama"), tmp_path / "tok")
    tok = tokenizer()
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": tok.backend.id_to_token(2)}, "eos_token": tok.backend.id_to_token(1),
        "add_bos_token": True, "chat_template": "{{ messages }}"}))
    loaded = load_checkpoint(directory).tokenizer
    assert (loaded.bos_id, loaded.eos_id, loaded.adds_bos, loaded.chat_template) == (2, 1, True, "{{ messages }}")


def test_the_sliding_window_bounds_the_context_served(tmp_path):
    directory = save_hf(hf_model("mistral"), tmp_path / "mistral")
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(config | {"sliding_window": 48}))
    engine = Engine(load_checkpoint(directory), EngineConfig(max_batch_size=1))
    assert engine.max_seq_len == 48


@pytest.mark.parametrize(("change", "message"), [
    ({"model_type": "mamba"}, "model_type.*'mamba'"),
    ({"rope_scaling": {"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}}, "rope_type.*longrope"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor.*0.5"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config.*gptq"),
    ({"hidden_act": "relu"}, "hidden_act.*relu"),
])
def test_what_lmserve_does_not_compute_is_refused_naming_the_field(tmp_path, change, message):
    directory = save_hf(hf_model("llama"), tmp_path / "refused")
    config = json.loads((directory / "config.json").read_text())
    config.pop("rope_parameters", None) if "rope_scaling" in change or "partial_rotary_factor" in change else None
    (directory / "config.json").write_text(json.dumps(config | change))
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(directory)


def test_qwen2_sliding_windows_and_pickle_checkpoints_are_refused(tmp_path):
    directory = save_hf(hf_model("qwen2"), tmp_path / "qwen2")
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(config | {"use_sliding_window": True, "sliding_window": 16}))
    with pytest.raises(CheckpointError, match="use_sliding_window"):
        load_checkpoint(directory)
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "model.safetensors").rename(directory / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: pickle checkpoints are never loaded"):
        load_checkpoint(directory)


@torch.no_grad()
def test_the_bundled_model_and_our_gpt2_layout_load_in_transformers(tmp_path):
    bundled = ROOT / "checkpoints" / "default"
    ours = load_checkpoint(bundled)
    x = ids(length=16) % ours.config.vocab_size
    theirs = transformers.AutoModelForCausalLM.from_pretrained(bundled).eval()
    assert (theirs(x).logits - ours.model(x)).abs().max() <= 1e-4
    text = "def fibonacci(n):\n    return n"
    assert transformers.AutoTokenizer.from_pretrained(bundled)(text).input_ids == ours.tokenizer.encode(text)

    gpt2 = make_model("gpt2", vocab_size=tokenizer().vocab_size)
    assert family_of(gpt2.config) == "gpt2"
    directory = save_checkpoint(tmp_path / "gpt2", gpt2, tokenizer())
    assert json.loads((directory / "config.json").read_text())["model_type"] == "gpt2"
    theirs = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    assert (theirs(ids()).logits - gpt2(ids())).abs().max() <= 1e-4


def test_lmserve_serve_serves_a_transformers_checkpoint_as_it_is(tmp_path):
    theirs = hf_model("qwen3")
    directory = save_hf(theirs, tmp_path / "qwen3")
    server = LiveServer(Settings(model=directory, max_batch_size=2)).wait_ready()
    try:
        prompt = "def add(a, b):"
        response = server.client.post("/generate", json={"prompt": prompt, "max_new_tokens": 8, "temperature": 0,
                                                         "ignore_eos": True})
        assert response.status_code == 200, response.text
        expected = hf_greedy(theirs, tokenizer().encode(prompt), 8)
        assert response.json()["outputs"][0]["token_ids"] == expected
        info = server.client.get("/info").json()
        reason = info["backend"]["decode_fallback_reason"]  # the C decode step has no per-head q/k norms
        assert reason is not None and ("qk_norm" in reason or not CAN_BUILD)
    finally:
        server.stop()


@torch.no_grad()
def test_an_old_gemma_config_with_hidden_act_gelu_is_computed_as_transformers_does(tmp_path):
    """Gemma's first config.json files said hidden_act "gelu" and no hidden_activation; transformers computes
    tanh-GELU for them, and so does lmserve."""
    theirs = hf_model("gemma")
    directory = save_hf(theirs, tmp_path / "gemma")
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(config | {"hidden_act": "gelu", "hidden_activation": None}))
    ours = load_checkpoint(directory).model
    assert ours.config.activation == "geglu"
    assert (ours(ids()) - theirs(ids()).logits).abs().max() <= 1e-4
