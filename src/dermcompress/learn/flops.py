"""Inference cost of a model at the input size it really sees: GMACs (fvcore) and parameters.

Convention (fvcore's): one multiply-add counts 1, so "GMACs" here is what fvcore, and the study's Table 1, call
GFLOPs. fvcore counts convolutions, linear layers and explicit matmuls, plus a small per-element cost for norm
layers; it does not see `torch.nn.functional.scaled_dot_product_attention`, the fused attention that timm and
transformers use, and would silently leave out the attention matmuls. `ATTENTION_HANDLES` counts them:
q @ k^T and softmax(.) @ v cost batch x heads x N_q x N_k x (d_k + d_v) multiply-adds.

For ViT-B/16 at 224 px: 16.87 GMACs without attention (the study's 16.86) and 17.58 with it.
"""

from __future__ import annotations

import logging
import warnings
from math import prod
from typing import Any

import torch
from torch import nn

from dermcompress.errors import ConfigError
from dermcompress.learn.models import build_architecture
from dermcompress.learn.registry import DEFAULT_MODELS, ModelSpec, parse_spec

log = logging.getLogger(__name__)


def sdpa_macs(inputs: list[Any], outputs: list[Any]) -> int:
    """fvcore handle: multiply-adds of scaled dot-product attention from its traced q, k, v shapes.

    q: (..., N_q, d_k), k: (..., N_k, d_k), v: (..., N_k, d_v); the leading dims (batch, heads) are q's (with
    grouped-query attention k and v have fewer heads, and each query head still does the full work).
    """
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(inputs[i]) for i in range(3))
    *lead, n_q, d_k = q
    n_k, d_v = k[-2], v[-1]
    return prod(lead) * n_q * n_k * (d_k + d_v)


# What fused attention traces as: the public op, and the backends it dispatches to (seen when tracing below the
# dispatcher, e.g. on GPU or under torch.export); all take (query, key, value, ...) first.
ATTENTION_OPS = (
    "aten::scaled_dot_product_attention",
    "aten::_scaled_dot_product_flash_attention",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_efficient_attention",
    "aten::_scaled_dot_product_cudnn_attention",
)
ATTENTION_HANDLES = dict.fromkeys(ATTENTION_OPS, sdpa_macs)


def count_gmacs(model: nn.Module, resolution: int, *, include_attention: bool = True) -> float:
    """GMACs of one (1, 3, resolution, resolution) image through `model`, in eval mode (inference cost).

    A `Classifier` crops or pads to its effective input itself, so pass the resolution it was built for.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # fvcore uses torch.jit.script at import
        from fvcore.nn import FlopCountAnalysis

    parameter = next(model.parameters())
    image = torch.zeros(1, 3, resolution, resolution, device=parameter.device, dtype=parameter.dtype)
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings from data-dependent branches in transformers
            analysis = FlopCountAnalysis(model, image)
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            if include_attention:
                analysis.set_op_handle(**ATTENTION_HANDLES)
            total = analysis.total()
            skipped = analysis.unsupported_ops()
    finally:
        model.train(was_training)
    uncounted = sorted(op for op in skipped if "attention" in op)
    if uncounted and include_attention:
        log.warning("attention ops without a FLOP handle, not counted: %s", ", ".join(uncounted))
    log.debug("ops fvcore does not count (elementwise, cheap): %s", dict(skipped))
    return total / 1e9


def resolve_spec(spec_or_name: ModelSpec | str, registry: dict[str, dict] | None = None) -> ModelSpec:
    """A ModelSpec from a spec, a registry name (in `registry`, else DEFAULT_MODELS) or a source like timm:NAME."""
    if isinstance(spec_or_name, ModelSpec):
        return spec_or_name
    name = spec_or_name
    if registry and name in registry:
        return parse_spec(name, registry[name])
    if name in DEFAULT_MODELS:
        if registry is not None:
            log.info("%s is not in the config's models:, using the built-in default entry", name)
        return parse_spec(name, DEFAULT_MODELS[name])
    if ":" in name:
        return parse_spec(name, {"source": name, "pretrained": False})
    known = sorted(set(registry or {}) | set(DEFAULT_MODELS))
    raise ConfigError(
        f"models.{name}", f"no such model; known: {', '.join(known)} (or give timm:NAME / hf:ID)"
    )


def model_cost(
    spec_or_name: ModelSpec | str,
    *,
    resolution: int,
    registry: dict[str, dict] | None = None,
    num_classes: int = 2,
) -> dict[str, float | int]:
    """{"gmacs", "params_m", "effective_input_px", "feature_dim"} of the classifier at `resolution`, built
    without weights."""
    spec = resolve_spec(spec_or_name, registry)
    model = build_architecture(spec, num_classes=num_classes, resolution=resolution)
    return {
        "gmacs": round(count_gmacs(model, resolution), 9),  # exact to one MAC
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 6),
        "effective_input_px": model.effective_input_px,
        "feature_dim": model.feature_dim,
    }
