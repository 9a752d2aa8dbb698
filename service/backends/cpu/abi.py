"""What Python and the C kernels (kernels/*.c) must agree on: constants, and the decode step's structs as a
ctypes mirror.

The library reports its side (`lmserve_abi`, in decode_step.c) and library.py refuses to load a library that
disagrees with `expected()`, so an edit to one side alone makes the engine fall back to PyTorch, with a log line
naming the value, instead of reading memory wrongly.
"""

from __future__ import annotations

import ctypes

PANEL = 16  # outputs per packed panel of a linear layer's weights (cpu.h)
HEADS_AT_ONCE = 4  # heads a thread attends side by side, each needing its own row of scores (cpu.h)
# ModelConfig.activation -> the kernels' ACT_ kind (cpu.h); geglu is tanh-GELU on the gate
ACTIVATIONS = {"gelu_tanh": 1, "swiglu": 2, "relu": 3, "geglu": 1}

_int64, _float, _int32, _pointer = ctypes.c_int64, ctypes.c_float, ctypes.c_int32, ctypes.c_void_p


class StepLayer(ctypes.Structure):
    """decode_step.c's StepLayer: one layer's norms, packed weights, biases and KV cache."""

    _fields_ = [(name, _pointer) for name in (
        "attn_norm_weight", "attn_norm_bias", "qkv", "qkv_bias", "o", "o_bias", "mlp_norm_weight", "mlp_norm_bias",
        "gate", "gate_bias", "up", "up_bias", "down", "down_bias", "k_cache", "v_cache")]


class StepModel(ctypes.Structure):
    """decode_step.c's StepModel: the sizes, the model's other weights, the layers and the work buffers."""

    _fields_ = ([(name, _int64) for name in ("layers", "hidden", "heads", "kv_heads", "head_dim", "intermediate",
                                             "vocab", "sink_slot", "kv_stride_b", "kv_stride_h", "kv_stride_s")]
                + [("norm_eps", _float), ("attn_scale", _float), ("embed_scale", _float), ("rms", _int32),
                   ("act", _int32)]
                + [(name, _pointer) for name in ("token_embedding", "position_embedding", "rope", "norm_weight",
                                                 "norm_bias", "lm_head", "lm_head_bias")]
                + [("layer", ctypes.POINTER(StepLayer))]
                + [(name, _pointer) for name in ("x", "mid", "h", "qkv", "attn", "ff", "gated", "packed", "mask")])


def expected() -> dict[str, int]:
    """The values `lmserve_abi` reports, in its order: the constants, the structs' sizes, and the offsets of the
    fields where StepLayer or StepModel change type or purpose."""
    return {
        "PANEL": PANEL, "HEADS_AT_ONCE": HEADS_AT_ONCE, "ACT_GELU_TANH": ACTIVATIONS["gelu_tanh"],
        "ACT_SILU": ACTIVATIONS["swiglu"], "ACT_RELU": ACTIVATIONS["relu"],
        "sizeof(StepLayer)": ctypes.sizeof(StepLayer), "offsetof(StepLayer, k_cache)": StepLayer.k_cache.offset,
        "sizeof(StepModel)": ctypes.sizeof(StepModel),
        **{f"offsetof(StepModel, {name})": getattr(StepModel, name).offset
           for name in ("sink_slot", "norm_eps", "rms", "token_embedding", "layer", "x", "mask")},
    }
