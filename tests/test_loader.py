"""Batches from the cache: every row once per epoch, seeded order per epoch, DDP shares, normalization."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from torchvision.transforms.functional import normalize as tv_normalize

from dermcompress.data.cache import ChecksumError
from dermcompress.data.cache_write import run_cache
from dermcompress.data.loader import CacheDataset, make_loader, normalize
from dermcompress.data.pixeltable import write_pixel_table
from dermcompress.learn import augment

CLASSES = ["MEL", "NV"]
H, W = 5, 7
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A cache with 30 train rows (even) and 7 val rows (odd); returns (dir, {image_id: (pixels, label)})."""
    tmp = tmp_path_factory.mktemp("loader")
    rng = np.random.default_rng(0)
    n = 37
    meta = pd.DataFrame(
        {
            "image_id": [f"ISIC_{i:07d}" for i in rng.permutation(n)],
            "split": ["train"] * 30 + ["val"] * 7,
            "label": rng.choice(CLASSES, n).tolist(),
            "degradation": ["none"] * n,
            "degradation_params": [json.dumps({})] * n,
        }
    )
    pixels = rng.integers(0, 256, (n, H, W, 3), dtype=np.uint8)
    write_pixel_table(
        tmp / "degraded.parquet", meta, pixels, metadata={"resolution": "7", "variant": "clean"}
    )
    run_cache(
        degraded=tmp / "degraded.parquet",
        out_dir=tmp / "cache",
        classes=CLASSES,
        rows_per_shard=8,
        row_group_size=4,
    )
    truth = {
        i: (pixels[k], CLASSES.index(lab))
        for k, (i, lab) in enumerate(zip(meta.image_id, meta.label, strict=True))
    }
    return tmp / "cache", truth


def epoch_order(loader):
    return torch.cat([batch["index"] for batch in loader]).tolist()


def test_dataset_items(cache):
    out, truth = cache
    ds = CacheDataset(out, "val")
    assert len(ds) == 7 and ds.classes == CLASSES and ds.image_ids == sorted(ds.image_ids)
    for i in range(len(ds)):
        image, label, index = ds[i]
        assert image.dtype == torch.uint8 and image.shape == (3, H, W) and image.is_contiguous()
        expected_pixels, expected_label = truth[ds.image_ids[i]]
        np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), expected_pixels)
        assert (label, index) == (expected_label, i)


def test_batches_cover_every_row_once_with_the_right_content(cache):
    out, truth = cache
    loader = make_loader(out, "train", batch_size=8, shuffle=True, seed=3)
    batches = list(loader)
    assert len(loader) == len(batches) == 4
    assert [len(b["index"]) for b in batches] == [8, 8, 8, 6]
    assert sorted(epoch_order(loader)) == list(range(30))
    for b in batches:
        assert b["pixels"].dtype == torch.uint8 and b["pixels"].shape == (len(b["index"]), 3, H, W)
        assert b["pixels"].is_contiguous()
        assert b["labels"].dtype == torch.int64 and b["index"].dtype == torch.int64
        for image, label, index in zip(b["pixels"], b["labels"], b["index"], strict=True):
            expected_pixels, expected_label = truth[loader.dataset.image_ids[index]]
            np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), expected_pixels)
            assert int(label) == expected_label


def test_drop_last_and_no_shuffle(cache):
    out, _ = cache
    loader = make_loader(out, "train", batch_size=8, shuffle=True, seed=0, drop_last=True)
    assert len(loader) == 3 and [len(b["index"]) for b in loader] == [8, 8, 8]
    assert len(set(epoch_order(loader))) == 24
    assert epoch_order(make_loader(out, "val", batch_size=3, shuffle=False, seed=0)) == list(range(7))


def test_order_is_deterministic_per_seed_and_epoch(cache):
    out, _ = cache
    a = make_loader(out, "train", batch_size=8, shuffle=True, seed=1)
    b = make_loader(out, "train", batch_size=8, shuffle=True, seed=1)
    first = epoch_order(a)
    assert first == epoch_order(a) == epoch_order(b)  # repeating an epoch repeats its order
    a.set_epoch(1)
    second = epoch_order(a)
    assert second != first and sorted(second) == list(range(30))
    b.set_epoch(1)
    assert epoch_order(b) == second
    assert epoch_order(make_loader(out, "train", batch_size=8, shuffle=True, seed=2)) != first
    assert first != list(range(30))


def test_no_two_seed_epoch_pairs_share_an_order(cache):
    """Seeds are independent repeats: over 5 seeds x 6 epochs, 30 distinct permutations (with `seed + epoch`,
    seed 0's epoch 1 would be seed 1's epoch 0)."""
    out, _ = cache
    orders = {}
    for seed in range(5):
        loader = make_loader(out, "train", batch_size=8, shuffle=True, seed=seed)
        for epoch in range(6):
            loader.set_epoch(epoch)
            orders[seed, epoch] = tuple(epoch_order(loader))
    assert len(set(orders.values())) == 30


def test_augmentation_draws_depend_on_seed_epoch_and_image_only():
    ops = ["hflip", "vflip", "rot90"]
    draws = augment.epoch_draws(200, seed=3, epoch=1, ops=ops)
    assert draws.shape == (200, 3) and torch.equal(draws, augment.epoch_draws(200, seed=3, epoch=1, ops=ops))
    assert set(draws[:, 0].tolist()) == set(draws[:, 1].tolist()) == {0, 1} and set(draws[:, 2].tolist()) == {
        0,
        1,
        2,
        3,
    }
    assert not torch.equal(draws, augment.epoch_draws(200, seed=3, epoch=2, ops=ops))
    assert not torch.equal(draws, augment.epoch_draws(200, seed=4, epoch=1, ops=ops))
    # Enabling one operation leaves the others' draws as they were.
    only_hflip = augment.epoch_draws(200, seed=3, epoch=1, ops=["hflip"])
    assert torch.equal(only_hflip[:, 0], draws[:, 0]) and not only_hflip[:, 1:].any()
    with pytest.raises(ValueError, match="augment"):
        augment.check(["hflip", "hflip"])


def test_augmentation_flips_and_turns_each_image_as_drawn():
    pixels = torch.arange(4 * 3 * 5 * 5, dtype=torch.int64).reshape(4, 3, 5, 5).to(torch.uint8)
    draws = torch.tensor([[0, 0, 0], [1, 0, 0], [0, 1, 1], [1, 1, 3]])
    out = augment.apply(pixels.clone(), draws)
    assert torch.equal(out[0], pixels[0])
    assert torch.equal(out[1], pixels[1].flip(-1))
    assert torch.equal(out[2], torch.rot90(pixels[2].flip(-2), 1, dims=(-2, -1)))
    assert torch.equal(out[3], torch.rot90(pixels[3].flip(-1).flip(-2), 3, dims=(-2, -1)))
    assert out.dtype == torch.uint8


@pytest.mark.parametrize(("split", "world_size"), [("train", 2), ("val", 2), ("val", 3)])
def test_ddp_ranks_share_each_epoch(cache, split, world_size):
    out, _ = cache
    n = {"train": 30, "val": 7}[split]
    for epoch in (0, 1):
        orders = []
        for rank in range(world_size):
            loader = make_loader(
                out, split, batch_size=2, shuffle=True, seed=5, rank=rank, world_size=world_size
            )
            loader.set_epoch(epoch)
            orders.append(epoch_order(loader))
            assert len(loader) == -(-len(orders[-1]) // 2)
        per_rank = -(-n // world_size)
        assert all(len(o) == per_rank for o in orders)
        union = [i for o in orders for i in o]
        assert set(union) == set(range(n))
        # Disjoint when it divides; otherwise only the wrap-around padding repeats rows.
        assert len(union) - len(set(union)) == per_rank * world_size - n


def test_verify_rejects_a_tampered_cache(cache, tmp_path):
    out, _ = cache
    copy = tmp_path / "cache"
    for path in out.rglob("*"):
        if path.is_file():
            (copy / path.relative_to(out)).parent.mkdir(parents=True, exist_ok=True)
            (copy / path.relative_to(out)).write_bytes(path.read_bytes())
    shard = copy / "val/part-00000.parquet"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=r"val/part-00000\.parquet"):
        make_loader(copy, "val", batch_size=4, shuffle=False, seed=0)


def test_bad_arguments(cache):
    out, _ = cache
    with pytest.raises(ValueError, match="rank"):
        make_loader(out, "val", batch_size=4, shuffle=False, seed=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        make_loader(out, "val", batch_size=0, shuffle=False, seed=0)


def test_normalize_matches_torchvision():
    pixels = torch.randint(0, 256, (4, 3, 9, 11), dtype=torch.uint8)
    out = normalize(pixels, MEAN, STD, device="cpu")
    expected = tv_normalize(pixels.double() / 255.0, MEAN, STD)
    assert out.dtype == torch.float32 and out.shape == pixels.shape
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5)
    # Black and white pixels land at -mean/std and (1-mean)/std.
    assert out.new_tensor([(0 - m) / s for m, s in zip(MEAN, STD, strict=True)]).allclose(
        normalize(torch.zeros(3, 1, 1, dtype=torch.uint8), MEAN, STD).flatten()
    )
    assert normalize(pixels, MEAN, STD, dtype=torch.bfloat16).dtype == torch.bfloat16
    # Into a reused buffer: the same values, in that buffer.
    buffer = torch.full((8, 3, 9, 11), float("nan"))
    into = normalize(pixels, MEAN, STD, out=buffer[:4])
    assert into.data_ptr() == buffer.data_ptr() and torch.equal(into, out) and buffer[4:].isnan().all()
    with pytest.raises(ValueError, match="shape"):
        normalize(pixels[:1], MEAN, STD, out=buffer[:4])
    with pytest.raises(TypeError, match="uint8"):
        normalize(pixels.float(), MEAN, STD)
