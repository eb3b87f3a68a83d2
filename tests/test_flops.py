"""GMACs against hand counts on tiny models, fused attention included, and the `dermcompress flops` command."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml
from conftest import tiny_dinov2_config
from timm.models.vision_transformer import VisionTransformer

from dermcompress import cli
from dermcompress.learn.flops import count_gmacs, model_cost
from dermcompress.learn.weights import WeightsUnavailableError

SRC = Path(__file__).resolve().parents[1] / "src"


def macs(gmacs: float) -> int:
    return round(gmacs * 1e9)


def vit_macs(*, tokens: int, dim: int, depth: int, patch_embed: int, classes: int, attention: bool) -> int:
    """fvcore's count of a timm ViT by hand: linear layers, attention matmuls, 5 per element for each LayerNorm."""
    t, d = tokens, dim
    norm = t * d * 5
    qkv, proj, mlp = t * d * 3 * d, t * d * d, 2 * t * d * 4 * d
    attn = (
        2 * t * t * d if attention else 0
    )  # q @ k^T and attn @ v over all heads: heads x T x T x (d / heads)
    return patch_embed + depth * (2 * norm + qkv + attn + proj + mlp) + norm + d * classes


def test_tiny_vit_matches_hand_count():
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=2)
    patch_embed = 32 * 3 * 8 * 8 * 16  # conv: out x in x k x k per output position, 4x4 positions
    with_attention = vit_macs(tokens=17, dim=32, depth=2, patch_embed=patch_embed, classes=2, attention=True)
    without = vit_macs(tokens=17, dim=32, depth=2, patch_embed=patch_embed, classes=2, attention=False)
    assert with_attention == 566_752
    assert macs(count_gmacs(model, 32)) == with_attention
    # fvcore alone does not see the fused scaled_dot_product_attention: exactly the attention matmuls are missing
    assert macs(count_gmacs(model, 32, include_attention=False)) == without
    assert with_attention - without == 2 * (2 * 17 * 17 * 32)
    assert model.training  # the count runs in eval mode and restores the mode


def test_classifier_counts_what_the_vit_sees():
    cost = model_cost("tiny_vit", resolution=56)  # 56 px -> a 48 px centre crop, 3x3 patches
    assert cost["effective_input_px"] == 48
    expected = vit_macs(
        tokens=10, dim=192, depth=12, patch_embed=192 * 3 * 16 * 16 * 9, classes=2, attention=True
    )
    assert macs(cost["gmacs"]) == expected
    params = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=2, img_size=48)
    assert cost["params_m"] == pytest.approx(sum(p.numel() for p in params.parameters()) / 1e6, abs=1e-6)

    padded = model_cost(
        "tiny_vit",
        resolution=56,
        registry={
            "tiny_vit": {"source": "timm:vit_tiny_patch16_224", "pretrained": False, "pad_to_patch": True}
        },
    )
    assert padded["effective_input_px"] == 64
    expected = vit_macs(
        tokens=17, dim=192, depth=12, patch_embed=192 * 3 * 16 * 16 * 16, classes=2, attention=True
    )
    assert macs(padded["gmacs"]) == expected


def test_transformers_dinov2_attention_is_counted(tmp_path):
    config = tiny_dinov2_config()
    config.save_pretrained(tmp_path)  # a config alone: FLOPs need no weights
    from dermcompress.learn.models import build_architecture, parse_spec

    model = build_architecture(
        parse_spec("dino", {"source": f"local:{tmp_path}"}), num_classes=2, resolution=112
    )
    tokens = 1 + (112 // 14) ** 2
    attention = 2 * (2 * tokens * tokens * 32)
    assert macs(count_gmacs(model, 112)) - macs(count_gmacs(model, 112, include_attention=False)) == attention
    cost = model_cost(parse_spec("dino", {"source": f"local:{tmp_path}"}), resolution=112)
    assert cost["effective_input_px"] == 112 and macs(cost["gmacs"]) == macs(count_gmacs(model, 112))


def test_uncached_hub_config_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    with pytest.raises(WeightsUnavailableError, match=r"hf download facebook/dinov2-base config\.json"):
        model_cost("dinov2_b14", resolution=56)


def test_cli_flops_subprocess(tmp_path):
    command = (
        [shutil.which("dermcompress")]
        if shutil.which("dermcompress")
        else [sys.executable, "-m", "dermcompress.cli"]
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])),
    }
    result = subprocess.run(
        [*command, "flops", "timm:vit_tiny_patch16_224", "--res", "56"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    cost = json.loads(result.stdout)
    assert set(cost) == {"gmacs", "params_m", "effective_input_px", "feature_dim"}
    assert cost["effective_input_px"] == 48
    assert macs(cost["gmacs"]) == macs(model_cost("timm:vit_tiny_patch16_224", resolution=56)["gmacs"])


def test_cli_flops_reads_the_config_registry(tmp_path, capsys):
    config = tmp_path / "config.yaml"
    entry = {"source": "timm:resnet10t", "pretrained": False, "description": "tiny"}
    config.write_text(yaml.safe_dump({"models": {"small_cnn": entry}}))
    assert cli.main(["flops", "small_cnn", "--res", "56", "--config", str(config)]) == 0
    cost = json.loads(capsys.readouterr().out)
    assert cost["effective_input_px"] == 56
    assert cost == model_cost("small_cnn", resolution=56, registry={"small_cnn": entry})
    with pytest.raises(Exception, match=r"models\.nothing_here"):
        cli.main(["flops", "nothing_here", "--res", "56", "--config", str(config)])
