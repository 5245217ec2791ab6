"""ROAR building blocks: pixel removal, tensor batches, crash-safe results log, attribution shards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from xaudit.ops.masking import check_fractions, keep_mask, removal_order
from xaudit.roar.data import DeviceBatches, TensorSplit, augment_batch
from xaudit.roar.results import ConfigMismatchError, ResultsLog
from xaudit.utils.errors import ConfigError


def test_roar_removes_exactly_the_top_pixels_and_kar_the_bottom() -> None:
    attr = torch.arange(16.0).view(1, 4, 4)  # pixel 15 most important
    roar = keep_mask(attr, 0.25, "roar")
    kar = keep_mask(attr, 0.25, "kar")
    assert int((~roar).sum()) == 4 and int((~kar).sum()) == 4
    assert (~roar).flatten().nonzero().flatten().tolist() == [12, 13, 14, 15]
    assert (~kar).flatten().nonzero().flatten().tolist() == [0, 1, 2, 3]


def test_ties_are_broken_by_seeded_priority_not_position() -> None:
    flat = torch.zeros(64, 8, 8)  # every pixel tied
    removed = ~keep_mask(flat, 0.25, "roar", tie_seed=0)
    assert (removed.flatten(1).sum(1) == 16).all()
    # a position tie-break would always remove pixels 0..15; a random one spreads over the image
    assert removed.float().mean(0).max() < 0.6
    assert torch.equal(removed, ~keep_mask(flat, 0.25, "roar", tie_seed=0))
    assert not torch.equal(removed, ~keep_mask(flat, 0.25, "roar", tie_seed=1))
    # the rank of an image does not depend on how the data is chunked
    assert torch.equal(removal_order(flat[3:5], offset=3), removal_order(flat)[3:5])


@pytest.mark.parametrize("kind", ["random", "flat", "few_levels", "half", "nan"])
@pytest.mark.parametrize("mode", ["roar", "kar"])
def test_keep_mask_selection_equals_thresholding_the_full_ranking(kind: str, mode: str) -> None:
    """keep_mask selects with kthvalue; it must equal ``removal_order``'s ranks cut at k, ties included."""
    g = torch.Generator().manual_seed(0)
    attr = {"random": torch.rand(40, 9, 7, generator=g), "flat": torch.zeros(40, 9, 7),
            "few_levels": torch.randint(-1, 2, (40, 9, 7), generator=g).float(),
            "half": torch.randn(40, 9, 7, generator=g).half().float(),
            "nan": torch.rand(40, 9, 7, generator=g).index_put_((torch.tensor([3, 3, 17]), torch.tensor([0, 4, 8]),
                                                                torch.tensor([1, 2, 6])),
                                                               torch.tensor(float("nan")))}[kind]
    pos = torch.arange(40) * 3 + 11
    rank = removal_order(attr, tie_seed=4, positions=pos)
    for fraction in (0.01, 0.3, 0.5, 0.99):
        k = round(fraction * 63)
        want = (rank >= k if mode == "roar" else rank < 63 - k).view(40, 9, 7)
        got = keep_mask(attr, fraction, mode, tie_seed=4, positions=pos, chunk=16)
        assert torch.equal(got, want) and bool(((~got).flatten(1).sum(1) == k).all())


@pytest.mark.parametrize("bad", [[0.0], [1.0], [-0.1, 0.5], [1.5], [], "half"])
def test_fractions_outside_the_open_unit_interval_are_refused(bad: object) -> None:
    with pytest.raises(ConfigError, match=r"roar\.fractions"):
        check_fractions(bad)


def test_fractions_are_sorted_and_deduplicated() -> None:
    assert check_fractions([0.5, 0.1, 0.5]) == [0.1, 0.5]


def _split(n: int = 10) -> TensorSplit:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 6, 6), dtype=torch.uint8, generator=g)
    return TensorSplit(images, torch.arange(n) % 3, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3),
                       masks=torch.zeros(n, 6, 6, dtype=torch.bool))


def test_eval_batches_shard_without_padding_and_normalise_like_the_datasets() -> None:
    split = _split(11)
    seen = []
    for rank in range(2):
        for batch in DeviceBatches(split, 4, rank=rank, world=2):
            seen += batch["index"].tolist()
            ref = split.images[batch["index"]].float() / 255
            mean = torch.tensor(split.mean).view(1, -1, 1, 1)
            std = torch.tensor(split.std).view(1, -1, 1, 1)
            torch.testing.assert_close(batch["image"], (ref - mean) / std)
            assert "mask" in batch
    assert sorted(seen) == list(range(11))


def test_train_batches_pad_ranks_equally_and_mask_with_the_channel_mean() -> None:
    split = _split(11)
    keep = torch.ones(11, 6, 6, dtype=torch.bool)
    keep[:, :3] = False
    lengths = []
    for rank in range(2):
        batches = list(DeviceBatches(split, 4, train=True, keep=keep, rank=rank, world=2, seed=3))
        lengths.append(sum(b["index"].numel() for b in batches))
        for b in batches:
            assert (b["image"][:, :, :3] == 0).all()  # removed = 0 in normalised units = dataset mean
    assert lengths == [6, 6]
    a = [b["index"].tolist() for b in DeviceBatches(split, 4, train=True, seed=3)]
    b2 = [b["index"].tolist() for b in DeviceBatches(split, 4, train=True, seed=3)]
    assert a == b2  # seeded order
    fill = torch.tensor([0.5, -1.0, 2.0])  # a computed training mean, in normalised units
    plain = list(DeviceBatches(split, 4, keep=None))
    for b, p in zip(DeviceBatches(split, 4, keep=keep, fill=fill), plain, strict=True):
        assert bool((b["image"][:, :, :3] == fill.view(1, 3, 1, 1)).all())
        assert torch.equal(b["image"][:, :, 3:], p["image"][:, :, 3:])  # kept pixels untouched


def test_batch_augmentation_is_a_crop_of_the_reflect_padded_image() -> None:
    x = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).view(2, 1, 8, 8)
    out = augment_batch(x, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4), mode="reflect")
    for i in range(2):
        crops = [padded[i, :, r:r + 8, c:c + 8] for r in range(9) for c in range(9)]
        crops += [c.flip(-1) for c in crops]
        assert any(torch.equal(out[i], c) for c in crops)


def test_results_log_is_idempotent_and_refuses_a_changed_setup(tmp_path: Path) -> None:
    log = ResultsLog(tmp_path)
    log.check_config({"ckpt": "abc", "recipe": {"epochs": 2}})
    log.append({"cell": "a", "acc": 0.5})
    log.append({"cell": "a", "acc": 0.9})  # already finished: not written twice
    log.append({"cell": "b", "acc": 0.7})
    assert {k: v["acc"] for k, v in log.read().items()} == {"a": 0.5, "b": 0.7}
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 2
    log.check_config({"ckpt": "abc", "recipe": {"epochs": 2}})  # same setup: fine
    with pytest.raises(ConfigMismatchError, match=r"recipe.epochs: 2 → 3.*out_dir"):
        log.check_config({"ckpt": "abc", "recipe": {"epochs": 3}})
    assert not list(tmp_path.glob(".*.tmp"))
    assert all(json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines())


def test_attribution_store_writes_each_row_once_and_reassembles_them(tmp_path: Path) -> None:
    import pytorch_lightning as pl

    from xaudit.explainers import create
    from xaudit.models import build_backbone
    from xaudit.roar.store import AttributionStore

    torch.manual_seed(0)
    net = build_backbone(name="small_cnn", num_classes=3, in_chans=3, image_size=16, width=4).eval()
    g = torch.Generator().manual_seed(1)
    split = TensorSplit(torch.randint(0, 256, (10, 3, 16, 16), dtype=torch.uint8, generator=g),
                        torch.arange(10) % 3, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    store = AttributionStore(tmp_path, "saliency", {}, {"ckpt": "x"})
    assert store.load("test", 10, (16, 16), required=False) is None

    def trainer() -> pl.Trainer:
        return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                          enable_model_summary=False)

    store.compute("test", split, net, trainer(), batch_size=4, target="label", dtype=torch.float16)
    folder = tmp_path / "saliency" / "test"
    shard = folder / "maps_r0000of0001_10x16x16.float16"  # one raw shard per rank, fixed shape
    assert sorted(p.name for p in folder.iterdir()) == ["done_r0000of0001.txt", "layout.json", shard.name]
    assert shard.stat().st_size == 10 * 16 * 16 * 2
    log = (folder / "done_r0000of0001.txt").read_text()
    # one line per finished batch of 4, with its images' per-channel sums (the ROAR fill, for free)
    assert [line.split(" | ")[0] for line in log.splitlines()] == ["0 4 1", "4 8 1", "8 10 1"]
    x = split.normalise(split.images)
    layout = store.layout("test", 10, (16, 16), torch.float16)
    assert layout is not None
    torch.testing.assert_close(layout.channel_mean(), x.double().mean(dim=(0, 2, 3)).float(), rtol=0, atol=1e-6)
    attr = store.load("test", 10, (16, 16))
    ref = create("saliency", net).attribute(x, split.labels)
    ref = ref / ref.flatten(1).abs().amax(1).view(-1, 1, 1)
    torch.testing.assert_close(attr, ref, atol=1e-3, rtol=1e-3)  # float16 storage: ~3 decimal digits
    stamp = shard.stat().st_mtime_ns
    store.compute("test", split, net, trainer(), batch_size=4, target="label", dtype=torch.float16)
    assert shard.stat().st_mtime_ns == stamp and (folder / "done_r0000of0001.txt").read_text() == log, \
        "finished rows are not recomputed"
    with pytest.raises(ConfigError, match="different setup"):
        AttributionStore(tmp_path, "saliency", {}, {"ckpt": "y"})


@pytest.mark.parametrize("mode", ["roar", "kar"])
def test_numpy_cut_on_the_cpu_equals_the_torch_cut_used_on_gpus(mode: str) -> None:
    from xaudit.ops.masking import _cut  # the private helper under test, at its home

    g = torch.Generator().manual_seed(3)
    flat = torch.cat([torch.rand(20, 64, generator=g),
                      torch.rand(20, 64, generator=g).mul(4).round(),  # heavy ties at the cut
                      torch.zeros(4, 64)]) + 0.0  # flat rows: everything ties
    for k in (1, 13, 32, 63):
        kk = 64 - k if mode == "roar" else k - 1
        a = _cut(flat, kk, k, mode == "roar", numpy=True)
        b = _cut(flat, kk, k, mode == "roar", numpy=False)
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y), k
        beyond, eq, ties, need = a
        assert (eq.sum(1) == ties).all()
        assert bool(((need >= 1) & (need <= ties)).all())
        assert (beyond.sum(1) + need).tolist() == [k] * flat.shape[0]
