"""Where a token is: rotary position embeddings (RoPE, with the rotary scalings Hugging Face models use) and the
original Transformer's sinusoidal table. Both are derived from the config, never stored in checkpoints."""

from __future__ import annotations

import math

import torch

from model.config import ModelConfig


def rope_frequencies(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """(D/2,) inverse frequencies of the rotation and the factor cos and sin are scaled by, for the config's rotary
    scaling (`rope_scaling`), computed as transformers computes them:
    - default; dynamic (NTK), which equals default up to max_position_embeddings, the most context served;
    - linear: positions divided by `factor`;
    - llama3: low frequencies divided by `factor`, high ones kept, a smooth blend between;
    - yarn: interpolated and extrapolated frequencies blended by a ramp, cos/sin scaled by `attention_factor`."""
    dim, base, scaling = config.head_dim, config.rope_theta, config.rope_scaling or {}
    rope_type = config.rope_type
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if rope_type in ("default", "dynamic"):
        return inv_freq, 1.0
    factor = scaling.get("factor")
    if rope_type == "linear":
        return inv_freq / factor, 1.0
    original = scaling.get("original_max_position_embeddings") or config.max_position_embeddings
    if rope_type == "llama3":
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= original / high) & (wavelen <= original / low)
        return torch.where(medium, smoothed, scaled), 1.0
    # yarn
    if factor is None:
        factor = config.max_position_embeddings / original

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))
    low, high = correction_dim(scaling.get("beta_fast") or 32), correction_dim(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / ((high - low) or 0.001)).clamp(0, 1)
    extrapolated = 1 - ramp
    return inv_freq / factor * (1 - extrapolated) + inv_freq * extrapolated, float(attention_factor)


def rope_table(config: ModelConfig) -> torch.Tensor:
    """(max_positions, 2, head_dim): cos and sin of each position's rotation angles (Llama's half-split layout)."""
    inv_freq, attention_factor = rope_frequencies(config)
    angles = torch.outer(torch.arange(config.max_position_embeddings).float(), inv_freq)  # (P, D/2)
    angles = torch.cat((angles, angles), dim=-1)  # (P, D)
    return torch.stack((angles.cos(), angles.sin()), dim=1) * attention_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates x (B, H, T, D) by per-token angles cos/sin (B, T, D)."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def sinusoidal_table(max_positions: int, dim: int) -> torch.Tensor:
    """(max_positions, dim): PE(pos, 2i) = sin(pos / 10000^(2i/dim)), PE(pos, 2i+1) = cos(same)."""
    position = torch.arange(max_positions).float()[:, None]
    div = torch.exp(torch.arange(0, dim, 2).float() * (-math.log(10000.0) / dim))
    table = torch.zeros(max_positions, dim)
    table[:, 0::2] = torch.sin(position * div)
    table[:, 1::2] = torch.cos(position * div)
    return table
