"""Model registry and loading: real timm / transformers code paths on tiny models saved to tmp_path."""

from __future__ import annotations

import copy
import time

import pytest
import timm
import torch
from conftest import REPO, tiny_dinov2_config
from safetensors.torch import save_file

from dermcompress.errors import ConfigError
from dermcompress.learn.models import Classifier, LoraUnsupportedError, build_architecture, build_model
from dermcompress.learn.registry import DEFAULT_MODELS, effective_input, parse_spec
from dermcompress.learn.weights import (
    UnsafeCheckpointError,
    WeightsMismatchError,
    WeightsUnavailableError,
    convert_simclr_checkpoint,
)

TINY_VIT = "vit_tiny_patch16_224"


class Payload:
    """A non-tensor object that a pickled checkpoint might carry (and that unpickling would construct)."""

    def __init__(self) -> None:
        self.note = "not a tensor"


def tensors_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def tiny_vit_with_head() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(TINY_VIT, pretrained=False, num_classes=1000)


@pytest.fixture(scope="module")
def dinov2_folder(tmp_path_factory) -> tuple:
    from transformers import BitImageProcessor, Dinov2Model

    folder = tmp_path_factory.mktemp("dinov2_tiny")
    config = tiny_dinov2_config()
    torch.manual_seed(0)
    model = Dinov2Model(config).eval()
    model.save_pretrained(folder)
    BitImageProcessor(image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6]).save_pretrained(folder)
    return folder, model


# -- registry entries ---------------------------------------------------------------------------------------------


def test_default_models_parse():
    specs = {name: parse_spec(name, entry) for name, entry in DEFAULT_MODELS.items()}
    assert specs["simclr_r50"].is_weight_file and specs["simclr_r50"].arch == "timm:resnet50"
    assert specs["simclr_r50"].mean == (0.0, 0.0, 0.0)
    assert specs["dinov2_b14"].kind == "hf" and specs["dinov2_b14"].ref == "facebook/dinov2-base"
    assert not specs["resnet18_scratch"].pretrained


@pytest.mark.parametrize(
    ("entry", "key", "words"),
    [
        ({"source": "timm:resnet18", "lr": 1}, "models.m.lr", "unknown key"),
        ({"arch": "timm:resnet50"}, "models.m.source", "required"),
        ({"source": "torchhub:resnet50"}, "models.m.source", "unknown source kind"),
        ({"source": "timm:"}, "models.m.source", "names nothing"),
        ({"source": "local:w.safetensors"}, "models.m.arch", "required"),
        ({"source": "local:w.safetensors", "arch": "hf:x/y"}, "models.m.arch", "unknown source kind"),
        ({"source": "timm:resnet18", "arch": "timm:resnet18"}, "models.m.arch", "only a local weights file"),
        (
            {"source": "local:w.pt", "arch": "timm:resnet18", "pretrained": False},
            "models.m.pretrained",
            "local",
        ),
        ({"source": "timm:resnet18", "pretrained": "yes"}, "models.m.pretrained", "true or false"),
        ({"source": "timm:resnet18", "mean": [0.5, 0.5]}, "models.m.mean", "3 numbers"),
        ({"source": "timm:resnet18", "std": [0.5, 0.0, 0.5]}, "models.m.std", "> 0"),
    ],
)
def test_parse_spec_errors_name_the_key(entry, key, words):
    with pytest.raises(ConfigError) as error:
        parse_spec("m", entry)
    assert error.value.key == key
    assert key in str(error.value) and words in str(error.value)


def test_unknown_timm_model_names_the_key():
    with pytest.raises(ConfigError, match=r"models\.m\.source.*no model 'vit_nonexistent'"):
        build_architecture(parse_spec("m", {"source": "timm:vit_nonexistent"}), num_classes=2, resolution=56)


# -- effective input ----------------------------------------------------------------------------------------------


def test_effective_input_rule():
    assert effective_input(56, 16, pad=False) == (48, "crop")
    assert effective_input(56, 16, pad=True) == (64, "pad")
    assert effective_input(112, 16, pad=False) == (112, "identity")
    assert effective_input(56, 14, pad=False) == (56, "identity")
    assert effective_input(56, None, pad=True) == (56, "identity")
    with pytest.raises(ValueError, match="pad_to_patch"):
        effective_input(8, 16, pad=False)


def test_vit_centre_crops_or_pads_and_resnet_sees_everything():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 56, 56)
    crop = build_model(parse_spec("tiny_vit", DEFAULT_MODELS["tiny_vit"]), num_classes=2, resolution=56)
    assert (crop.effective_input_px, crop.input_mode) == (48, "crop")
    assert torch.equal(crop.input_adapter(x), x[..., 4:52, 4:52])
    assert crop(x).shape == (2, 2)

    pad_entry = {**DEFAULT_MODELS["tiny_vit"], "pad_to_patch": True}
    pad = build_model(parse_spec("tiny_vit", pad_entry), num_classes=2, resolution=56)
    padded = pad.input_adapter(x)
    assert pad.effective_input_px == 64 and padded.shape[-2:] == (64, 64)
    assert torch.equal(padded[..., 4:60, 4:60], x) and padded[..., :4, :].abs().sum() == 0
    assert pad.backbone.pos_embed.shape[1] == 1 + 4 * 4  # built for a 4x4 patch grid
    assert pad(x).shape == (2, 2)

    cnn = build_model(parse_spec("tiny_cnn", DEFAULT_MODELS["tiny_cnn"]), num_classes=3, resolution=56)
    assert (cnn.effective_input_px, cnn.input_mode) == (56, "identity")
    assert cnn(x).shape == (2, 3)
    with pytest.raises(ValueError, match="built for 56x56 input, got 64x64"):
        cnn(torch.zeros(1, 3, 64, 64))


def test_normalize_uses_the_model_statistics():
    model = build_model(parse_spec("tiny_cnn", DEFAULT_MODELS["tiny_cnn"]), num_classes=2, resolution=56)
    assert model.mean == (0.485, 0.456, 0.406)  # timm's pretrained_cfg for resnet10t
    images = torch.full((1, 3, 56, 56), 255, dtype=torch.uint8)
    out = model.normalize(images)
    expected = [(1 - m) / s for m, s in zip(model.mean, model.std, strict=True)]
    assert out.dtype == torch.float32
    assert torch.allclose(out[0, :, 0, 0], torch.tensor(expected))


# -- local weights through timm ----------------------------------------------------------------------------------


def test_local_safetensors_loads_into_timm_vit_and_resamples_positions(tmp_path, tiny_vit_with_head):
    saved = {k: v.clone() for k, v in tiny_vit_with_head.state_dict().items()}
    path = tmp_path / "vit_tiny.safetensors"
    save_file(saved, str(path))
    spec = parse_spec("mine", {"source": f"local:{path}", "arch": f"timm:{TINY_VIT}"})

    full = build_model(spec, num_classes=2, resolution=224)
    backbone_keys = {k: v for k, v in saved.items() if not k.startswith("head.")}
    tensors_equal(full.backbone.state_dict(), backbone_keys)

    small = build_model(spec, num_classes=2, resolution=56)  # sees 48 px: a 3x3 grid
    loaded = small.backbone.state_dict()
    expected_pos = timm.layers.resample_abs_pos_embed(
        saved["pos_embed"], new_size=(3, 3), num_prefix_tokens=1
    )
    assert loaded["pos_embed"].shape == (1, 10, 192)
    assert torch.allclose(loaded["pos_embed"], expected_pos)
    for key in ("cls_token", "patch_embed.proj.weight", "blocks.11.mlp.fc2.weight", "norm.bias"):
        assert torch.equal(loaded[key], saved[key]), key
    for res in (56, 112, 224):
        assert build_model(spec, num_classes=2, resolution=res)(torch.zeros(1, 3, res, res)).shape == (1, 2)


def test_local_timm_folder(tmp_path, tiny_vit_with_head):
    from timm.models import save_for_hf

    folder = tmp_path / "timm_folder"
    save_for_hf(tiny_vit_with_head, str(folder), safe_serialization=True)
    model = build_model(parse_spec("mine", {"source": f"local:{folder}"}), num_classes=2, resolution=112)
    expected = {k: v for k, v in tiny_vit_with_head.state_dict().items() if not k.startswith("head.")}
    expected["pos_embed"] = model.backbone.state_dict()["pos_embed"]  # resampled 14x14 -> 7x7, checked above
    tensors_equal(model.backbone.state_dict(), expected)
    assert model.mean == (0.5, 0.5, 0.5)


def test_checkpoint_that_does_not_fit_is_reported(tmp_path, tiny_vit_with_head):
    state = {k: v for k, v in tiny_vit_with_head.state_dict().items() if k != "blocks.3.attn.qkv.weight"}
    state["extra.weight"] = torch.zeros(3)
    path = tmp_path / "partial.safetensors"
    save_file(state, str(path))
    spec = parse_spec("mine", {"source": f"local:{path}", "arch": f"timm:{TINY_VIT}"})
    with pytest.raises(
        WeightsMismatchError, match=r"missing keys \[blocks\.3\.attn\.qkv\.weight\].*extra\.weight"
    ):
        build_model(spec, num_classes=2, resolution=224)


def test_pickled_checkpoints_are_refused_tensor_only_ones_load(tmp_path):
    torch.manual_seed(0)
    weights = timm.create_model("resnet10t", pretrained=False, num_classes=0).state_dict()
    for suffix in (".pt", ".bin"):
        path = tmp_path / f"unsafe{suffix}"
        torch.save({"state_dict": weights, "trainer": Payload()}, path)
        spec = parse_spec("mine", {"source": f"local:{path}", "arch": "timm:resnet10t"})
        with pytest.raises(UnsafeCheckpointError, match="refusing to load"):
            build_model(spec, num_classes=2, resolution=56)

    safe = tmp_path / "safe.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in weights.items()}, "epoch": 3}, safe)
    model = build_model(
        parse_spec("mine", {"source": f"local:{safe}", "arch": "timm:resnet10t"}),
        num_classes=2,
        resolution=56,
    )
    tensors_equal(model.backbone.state_dict(), weights)


def test_convert_simclr_checkpoint_roundtrip(tmp_path):
    torch.manual_seed(0)
    torchvision_style = timm.create_model("resnet18", pretrained=False, num_classes=1000).state_dict()
    src = (
        tmp_path / "resnet18-1x.pth"
    )  # tonylins/simclr-converter's layout: {'state_dict': torchvision names}
    torch.save({"state_dict": {f"module.{k}": v for k, v in torchvision_style.items()}}, src)
    dst = convert_simclr_checkpoint(src, tmp_path / "models" / "simclr_r18.safetensors", arch="timm:resnet18")

    entry = {"source": f"local:{dst}", "arch": "timm:resnet18", "mean": [0, 0, 0], "std": [1, 1, 1]}
    model = build_model(parse_spec("simclr", entry), num_classes=2, resolution=56)
    tensors_equal(
        model.backbone.state_dict(), {k: v for k, v in torchvision_style.items() if not k.startswith("fc.")}
    )
    assert model.mean == (0.0, 0.0, 0.0) and model.std == (1.0, 1.0, 1.0)

    with pytest.raises(WeightsMismatchError, match="does not map onto timm's resnet34"):
        convert_simclr_checkpoint(src, tmp_path / "wrong.safetensors", arch="timm:resnet34")


# -- transformers ------------------------------------------------------------------------------------------------


def test_local_hf_dinov2_folder(dinov2_folder):
    folder, original = dinov2_folder
    spec = parse_spec("dino", {"source": f"local:{folder}"})
    for res in (56, 112, 224):
        model = build_model(spec, num_classes=2, resolution=res).eval()
        assert model.effective_input_px == res  # multiples of the 14 px patch
        tensors_equal(model.backbone.model.state_dict(), original.state_dict())
        x = torch.randn(2, 3, res, res)
        with torch.no_grad():
            tokens = original(pixel_values=x).last_hidden_state  # DINOv2 interpolates positions itself
            expected = torch.cat([tokens[:, 0], tokens[:, 1:].mean(dim=1)], dim=1)
            assert torch.allclose(model.forward_features(x), expected, atol=1e-6)
            assert model(x).shape == (2, 2)
    assert model.feature_dim == 64 and model.pooling == "cls+mean_patch"
    assert model.mean == (0.1, 0.2, 0.3) and model.std == (0.4, 0.5, 0.6)  # from preprocessor_config.json
    assert model.lora_targets == ["q_proj", "v_proj"] and len(model.blocks) == 2


def test_half_precision_checkpoint_trains_in_float32(dinov2_folder, tmp_path):
    """A DINOv2 saved in bf16 (transformers 5 would load it as bf16: dtype="auto") loads as float32 master
    weights, the same values, and takes a training step on the CPU; so does the bare architecture (FLOPs)."""
    _, original = dinov2_folder
    half = copy.deepcopy(original).to(torch.bfloat16)
    half.save_pretrained(tmp_path / "bf16")
    spec = parse_spec("dino", {"source": f"local:{tmp_path / 'bf16'}"})
    for model in (
        build_model(spec, num_classes=2, resolution=56),
        build_architecture(spec, num_classes=2, resolution=56),
    ):
        assert {p.dtype for p in model.parameters()} == {torch.float32}
    model = build_model(spec, num_classes=2, resolution=56)
    tensors_equal(model.backbone.model.state_dict(), {k: v.float() for k, v in half.state_dict().items()})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = torch.nn.functional.cross_entropy(model(torch.randn(2, 3, 56, 56)), torch.tensor([0, 1]))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and {p.grad.dtype for p in model.parameters() if p.grad is not None} == {
        torch.float32
    }


def test_dinov2_at_a_non_multiple_resolution_crops(dinov2_folder):
    folder, _ = dinov2_folder
    model = build_model(parse_spec("dino", {"source": f"local:{folder}"}), num_classes=2, resolution=60)
    assert (model.effective_input_px, model.input_mode) == (56, "crop")
    assert model(torch.zeros(1, 3, 60, 60)).shape == (1, 2)


# -- freezing and LoRA -------------------------------------------------------------------------------------------


def test_freeze_first_blocks_and_lora_targets():
    model = build_model(parse_spec("tiny_vit", DEFAULT_MODELS["tiny_vit"]), num_classes=2, resolution=56)
    assert len(model.blocks) == 12 and model.blocks[0] is model.backbone.blocks[0]
    model.freeze(2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(
        n.startswith(("backbone.patch_embed", "backbone.blocks.0.", "backbone.blocks.1.")) for n in trainable
    )
    assert {"backbone.cls_token", "backbone.pos_embed"}.isdisjoint(trainable)
    assert {"backbone.blocks.2.attn.qkv.weight", "backbone.norm.weight", "head.weight"} <= trainable
    model.freeze(None)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"head.weight", "head.bias"}

    from peft import LoraConfig, get_peft_model

    assert model.lora_targets == ["qkv"]
    peft_model = get_peft_model(
        model, LoraConfig(r=2, target_modules=model.lora_targets, modules_to_save=["head"])
    )
    assert peft_model(torch.zeros(1, 3, 56, 56)).shape == (1, 2)
    assert any("lora_A" in n for n, _ in peft_model.named_parameters())

    cnn = build_model(parse_spec("tiny_cnn", DEFAULT_MODELS["tiny_cnn"]), num_classes=2, resolution=56)
    assert isinstance(cnn, Classifier) and len(cnn.blocks) == 4
    with pytest.raises(LoraUnsupportedError, match="LoRA is not supported for model 'tiny_cnn'"):
        _ = cnn.lora_targets


# -- offline ------------------------------------------------------------------------------------------------------


@pytest.fixture
def offline_empty_cache(tmp_path, monkeypatch):
    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return home


@pytest.mark.parametrize(
    ("name", "command"),
    [
        ("vit_b16", "timm.create_model('vit_base_patch16_224.orig_in21k_ft_in1k', pretrained=True)"),
        ("dinov2_b14", "hf download facebook/dinov2-base"),
    ],
)
def test_offline_missing_weights_fail_fast_with_the_fetch_command(offline_empty_cache, name, command):
    spec = parse_spec(name, DEFAULT_MODELS[name])
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError) as error:
        build_model(spec, num_classes=2, resolution=224)
    assert time.monotonic() - start < 5
    message = str(error.value)
    assert command in message
    assert "HF_HUB_OFFLINE is set" in message
    assert str(offline_empty_cache / "hub") in message


def test_cached_timm_hub_weights_load_offline(offline_empty_cache, tiny_vit_with_head):
    """Weights already in the hub cache (as a login-node fetch leaves them) load offline through timm."""
    from timm.models import get_pretrained_cfg

    repo = get_pretrained_cfg(TINY_VIT).hf_hub_id
    cache = offline_empty_cache / "hub" / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    (cache / "refs").mkdir(parents=True)
    (cache / "refs" / "main").write_text(commit)
    (cache / "snapshots" / commit).mkdir(parents=True)
    save_file(tiny_vit_with_head.state_dict(), str(cache / "snapshots" / commit / "model.safetensors"))

    spec = parse_spec("tiny_vit", {**DEFAULT_MODELS["tiny_vit"], "pretrained": True})
    model = build_model(spec, num_classes=2, resolution=56)
    saved = tiny_vit_with_head.state_dict()
    loaded = model.backbone.state_dict()
    for key in ("cls_token", "patch_embed.proj.weight", "blocks.5.attn.qkv.weight", "norm.weight"):
        assert torch.equal(loaded[key], saved[key]), key
    assert torch.allclose(
        loaded["pos_embed"],
        timm.layers.resample_abs_pos_embed(saved["pos_embed"], new_size=(3, 3), num_prefix_tokens=1),
    )


def test_missing_local_file_is_named(tmp_path):
    spec = parse_spec(
        "simclr_r50", {**DEFAULT_MODELS["simclr_r50"], "source": f"local:{tmp_path}/none.safetensors"}
    )
    with pytest.raises(FileNotFoundError, match=r"models\.simclr_r50\.source: no weights file"):
        build_model(spec, num_classes=2, resolution=56)


def test_config_yaml_registry_matches_the_documented_defaults():
    """config.yaml's study models are DEFAULT_MODELS, so the docs, the registry and the study agree; besides them
    only the pretraining stage's: DINOv2 through timm (the init a pretraining can adapt: README "Domain
    pretraining"; outside DEFAULT_MODELS, whose code is part of every training's fingerprint) and the models
    that load a pretraining's backbone."""
    import yaml

    study = yaml.safe_load((REPO / "config.yaml").read_text())["models"]
    base = {name: entry for name, entry in study.items() if not entry["source"].startswith("pretrain:")}
    defaults = {name: entry for name, entry in base.items() if name in DEFAULT_MODELS}
    assert defaults == {name: DEFAULT_MODELS[name] for name in defaults}
    assert set(base) - set(DEFAULT_MODELS) == {"dinov2_b14_timm"}
    assert base["dinov2_b14_timm"]["source"] == "timm:vit_base_patch14_dinov2.lvd142m"
    assert set(study) == {"vit_b16", "dinov2_b14", "simclr_r50", "resnet18_scratch", "dinov2_b14_timm"} | {
        "vit_b16_derm",
        "dinov2_b14_derm",
        "vit_b16_derm_codecs",
    }
