"""The streaming data path (issue 25): datasets that are not in-memory tensors are read per batch.

The streamed path must serve exactly the batches of the in-memory path (same indices, order,
keep-masks, augmentation), decode only what a subset asks for, and give the same audit results.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import Dataset

from xaudit.data.base import TensorDictDataset, eval_shard
from xaudit.ops.masking import keep_mask
from xaudit.roar.data import DeviceBatches, LazyImages, MapKeep, StreamBatches, TensorSplit
from xaudit.roar.store import AttributionStore, MapReader, ShardWriter, SplitLayout
from xaudit.tasks.audit import audit
from xaudit.tasks.train import train
from xaudit.utils.errors import ConfigError

from xaudit_testing import (
    QUIET,
    assert_store_resumed,
    compose_config,
    kill_when,
    logged_batches,
    store_logs,
    write_image_folder,
)


class Counting(Dataset):
    """A map dataset of random normalised images that counts how many items were decoded."""

    def __init__(self, n: int = 24, size: int = 8, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 3, size, size, generator=g)
        self.labels = torch.randint(0, 3, (n,), generator=g)
        self.masks = torch.rand(n, size, size, generator=g) > 0.5
        self.reads = 0
        self.seen: list[int] = []

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        self.reads += 1
        self.seen.append(int(i))
        return {"image": self.images[i], "label": self.labels[i], "mask": self.masks[i]}


def test_subset_of_a_streamed_split_decodes_only_what_it_serves() -> None:
    data = Counting(n=40)
    split = TensorSplit.from_dataset(data, (0.0,) * 3, (1.0,) * 3)
    assert split.streamed and isinstance(split.images, LazyImages) and data.reads == 1  # one item: the shape
    assert split.image_shape == (3, 8, 8) and torch.equal(split.labels, data.labels)  # labels without decoding
    head = split.subset(5)
    assert data.reads == 1 and len(head) == 5
    batches = list(StreamBatches(head, 2))
    assert data.reads == 1 + 5 and [b["index"].tolist() for b in batches] == [[0, 1], [2, 3], [4]]
    assert torch.equal(torch.cat([b["image"] for b in batches]), data.images[:5])


def test_each_rank_decodes_only_its_own_images() -> None:
    data = Counting(n=11)
    split = TensorSplit.from_dataset(data, (0.0,) * 3, (1.0,) * 3)
    data.seen.clear()
    list(StreamBatches(split, 4, rank=1, world=2))  # evaluation sharding: rank 1 takes the 2nd batch of 4
    assert data.seen == [4, 5, 6, 7]
    data.seen.clear()
    list(StreamBatches(split, 4, train=True, seed=2, rank=0, world=2))
    assert len(data.seen) == 6 and set(data.seen) == set(DeviceBatches(
        TensorSplit(data.images, data.labels, (0.0,) * 3, (1.0,) * 3), 4, train=True, seed=2,
        world=2)._indices().tolist())


@pytest.mark.parametrize(("rank", "world"), [(0, 1), (1, 2)])
def test_streamed_batches_equal_in_memory_batches(rank: int, world: int) -> None:
    """Same indices per rank, same order per epoch, same keep-mask and augmentation."""
    data = Counting(n=23)
    streamed = TensorSplit.from_dataset(data, (0.0,) * 3, (1.0,) * 3)
    memory = TensorSplit(data.images, data.labels, (0.0,) * 3, (1.0,) * 3, data.masks)
    attr = torch.rand(23, 8, 8, generator=torch.Generator().manual_seed(3))
    keep = keep_mask(attr, 0.5, "roar", tie_seed=1, offset=0)
    kw: dict[str, Any] = {"train": True, "augment": True, "seed": 4, "rank": rank, "world": world}
    a = DeviceBatches(memory, 5, keep=keep, **kw)
    b = StreamBatches(streamed, 5, keep=MapKeep(attr.half(), 0.5, "roar", 1, 0), **kw)
    for _ in range(2):  # two epochs: the order changes, and changes the same way
        got, want = list(b), list(a)
        assert len(got) == len(want) == len(a)
        for x, y in zip(got, want, strict=True):
            assert torch.equal(x["index"], y["index"]) and torch.equal(x["label"], y["label"])
            assert torch.equal(x["mask"], y["mask"])
    # float16 maps hold these values well enough that the masks agree exactly
    assert torch.equal(x["image"], y["image"])


def test_batch_keep_equals_the_whole_split_mask_in_any_order() -> None:
    attr = torch.randn(30, 6, 6, generator=torch.Generator().manual_seed(0)).round(decimals=1)  # many ties
    whole = keep_mask(attr, 0.3, "kar", tie_seed=7, offset=100)
    idx = torch.randperm(30, generator=torch.Generator().manual_seed(1))[:11]
    assert torch.equal(MapKeep(attr, 0.3, "kar", 7, 100)(idx), whole[idx])


def test_in_memory_tensor_dataset_is_not_streamed() -> None:
    images = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    ds = TensorDictDataset(images, torch.zeros(6, dtype=torch.long), (0.5,) * 3, (0.25,) * 3)
    split = TensorSplit.from_dataset(ds, (0.5,) * 3, (0.25,) * 3)
    assert not split.streamed and split.images is images


# -- end to end on a PNG ImageFolder: the streamed audit equals the decoded-once audit --------------
@pytest.fixture(scope="module")
def folder_ckpt(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    out = tmp_path_factory.mktemp("folder")
    write_image_folder(out / "data" / "imagefolder", per_class=12, size=20)
    cfg = compose_config(["data=imagefolder", "data.image_size=16", "data.num_workers=0", "data.batch_size=12",
                          "data.augment=false", "callbacks=model_checkpoint", "trainer.max_epochs=2",
                          "++model.backbone.width=8", "trainer.enable_progress_bar=false", "logger=csv",
                          "test=false"], out)
    return train(cfg)["last_ckpt_path"], out


def _audit(ckpt: str, out: Path, *overrides: str) -> list[dict[str, Any]]:
    cfg = compose_config([*QUIET, f"ckpt_path={ckpt}", f"out_dir={out / 'audit'}", *overrides], out,
                         config_name="audit")
    result = audit(cfg)
    lines = (Path(result["mode_dir"]) / "results.jsonl").read_text().splitlines()
    return sorted((json.loads(x) for x in lines if x.strip()), key=lambda r: r["cell"])


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["evaluate", "evaluate-ddp", "roar"])
def test_streamed_audit_equals_the_in_memory_audit(mode: str, folder_ckpt: tuple[str, Path],
                                                   tmp_path: Path) -> None:
    """evaluate-ddp: two ranks (ddp_sim), each reading only its own images, equal one process."""
    ckpt, _ = folder_ckpt
    extra = (["audit=roar", "explainer=[saliency]", "controls=[random]", "roar.fractions=[0.5]", "roar.epochs=1",
              "roar.seed=0"]
             if mode == "roar"
             else ["audit=evaluate", "explainer=[saliency]", "controls=[random]", "evaluate.limit=20"])
    ranks = ["trainer=ddp_sim"] if mode == "evaluate-ddp" else []
    streamed = _audit(ckpt, tmp_path / "stream", *extra, *ranks, "data_path=stream")
    memory = _audit(ckpt, tmp_path / "memory", *extra, "data_path=memory")
    assert [r["cell"] for r in streamed] == [r["cell"] for r in memory] and len(streamed) == 3
    for s, m in zip(streamed, memory, strict=True):
        for key, value in m.items():
            if key.startswith(("test_", "metrics.")) or key in ("count", "test_count", "fill"):
                assert s[key] == pytest.approx(value, abs=1e-6), (s["cell"], key)
    if mode == "roar":  # an ImageFolder normalised with ImageNet's mean: removed pixels take its own train mean
        from xaudit.data import ImageFolderDataModule

        dm = ImageFolderDataModule(data_dir=str(folder_ckpt[1] / "data" / "imagefolder"), image_size=16,
                                   augment=False)
        dm.setup("fit")
        train = torch.stack([dm.plain_train_set()[i]["image"] for i in range(len(dm.plain_train_set()))])
        want = train.double().mean(dim=(0, 2, 3)).tolist()
        masked = [r for r in streamed if r["method"] != "baseline"]
        assert len(masked) == 2 and all(r["fill"] == pytest.approx(want, abs=1e-5) for r in masked)
        assert "fill" not in next(r for r in streamed if r["method"] == "baseline")


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_ranks_each_write_their_own_shard_and_equal_one_device(folder_ckpt: tuple[str, Path],
                                                                  tmp_path: Path) -> None:
    """Streamed ROAR under ddp_sim: rank r explains and writes only its own batches (r, r+2, ...) into its own
    shard file, and the two shards hold the maps one process computes."""
    ckpt, _ = folder_ckpt
    extra = ["audit=roar", "explainer=[saliency]", "controls=[]", "roar.fractions=[0.5]", "roar.epochs=1",
             "roar.seed=0", "data_path=stream", "batch_size=4"]
    two = _audit(ckpt, tmp_path / "two", *extra, "trainer=ddp_sim")
    one = _audit(ckpt, tmp_path / "one", *extra)
    assert [r["cell"] for r in two] == [r["cell"] for r in one] and len(two) == 2
    assert [r["test_count"] for r in two] == [r["test_count"] for r in one]  # unpadded evaluation shards
    for split in ("train", "test"):
        folder = tmp_path / "two" / "audit" / "attributions" / "saliency" / split
        layout = json.loads((folder / "layout.json").read_text())
        n = layout["n"]
        assert layout["world"] == 2 and sorted(p.name for p in folder.glob("maps_*")) == [
            f"maps_r{r:04d}of0002_{n}x16x16.float16" for r in range(2)]
        for rank in range(2):
            written = torch.zeros(n, dtype=torch.bool)
            for line in (folder / f"done_r{rank:04d}of0002.txt").read_text().splitlines():
                a, b, c = (int(v) for v in line.partition("|")[0].split())
                written[a:b:c] = True
            # whole batches of 4 (the audit's batch_size), dealt round-robin
            assert n > 4 and written.nonzero().flatten().tolist() == eval_shard(n, 4, rank, 2).tolist(), (split, rank)
        one_folder = tmp_path / "one" / "audit" / "attributions" / "saliency" / split
        two_maps = MapReader(sorted(folder.glob("maps_*")), n, (16, 16), torch.float16)[torch.arange(n)]
        one_maps = MapReader(sorted(one_folder.glob("maps_*")), n, (16, 16), torch.float16)[torch.arange(n)]
        # float16 storage of per-image maps computed in differently composed batches
        torch.testing.assert_close(two_maps, one_maps, rtol=0, atol=1e-3)


@pytest.mark.slow
def test_streamed_store_killed_while_written_completes_without_recomputing(folder_ckpt: tuple[str, Path],
                                                                           tmp_path: Path) -> None:
    """SIGKILL of `python audit.py` (streamed ImageFolder ROAR) once the first batch of maps is logged
    done: the rerun keeps every finished row, writes only the rest (no sample is logged twice), and
    ends with the uninterrupted run's shard files and results."""
    ckpt, folder_out = folder_ckpt
    extra = ["audit=roar", "explainer=[saliency]", "controls=[random]", "roar.fractions=[0.5]", "roar.epochs=1",
             "roar.seed=0", "batch_size=2", "data_path=stream"]
    reference = _audit(ckpt, tmp_path / "ref", *extra)
    out = tmp_path / "killed"
    attr = out / "audit" / "attributions"
    args = [*QUIET, *extra, f"ckpt_path={ckpt}", f"out_dir={out / 'audit'}", f"paths.data_dir={folder_out / 'data'}",
            f"paths.log_dir={out / 'logs'}", f"hydra.run.dir={out / 'hydra'}"]
    kill_when("audit.py", args, tmp_path, lambda: logged_batches(attr) > 0, "no batch of maps written", poll=0.005)
    logged = store_logs(attr)
    ref_attr = tmp_path / "ref" / "audit" / "attributions"
    assert 1 <= logged_batches(attr) < logged_batches(ref_attr), "killed while the store was written"

    got = _audit(ckpt, out, *extra)
    assert_store_resumed(attr, ref_attr, logged)
    assert [r["cell"] for r in got] == [r["cell"] for r in reference] and len(got) == 3
    for g, r in zip(got, reference, strict=True):
        assert g["test_acc"] == r["test_acc"], g["cell"]


@pytest.mark.slow
def test_store_of_data_that_changed_since_is_refused(folder_ckpt: tuple[str, Path], tmp_path: Path) -> None:
    """Same folder shape and size, one train image moved to another class: the stored maps are
    refused with the fix named, not silently reused."""
    ckpt, folder_out = folder_ckpt
    data = tmp_path / "data"
    shutil.copytree(folder_out / "data", data)
    extra = ["audit=roar", "explainer=[saliency]", "controls=[]", "roar.fractions=[0.5]", "roar.epochs=1",
             "roar.seed=0", f"++data.data_dir={data / 'imagefolder'}", "data_path=stream"]
    _audit(ckpt, tmp_path, *extra)
    train = data / "imagefolder" / "train"
    moved = sorted((train / "cat").glob("*.png"))[0]
    moved.rename(train / "dog" / "moved.png")
    (tmp_path / "audit" / "roar" / "results.jsonl").unlink()  # the cells go too: only the store is left
    with pytest.raises(ConfigError, match=r"The data changed since the attributions in .*saliency were written "
                                          r"\(content\.train: .*Delete that folder"):
        _audit(ckpt, tmp_path, *extra)


def test_dataset_fingerprint_sees_labels_files_and_images() -> None:
    from xaudit.data.base import dataset_fingerprint

    images = torch.randint(0, 256, (50, 3, 4, 4), dtype=torch.uint8)
    labels = torch.arange(50) % 3
    base = dataset_fingerprint(TensorDictDataset(images, labels, (0.5,) * 3, (0.5,) * 3))
    assert base == dataset_fingerprint(TensorDictDataset(images.clone(), labels.clone(), (0.5,) * 3, (0.5,) * 3))
    changed = images.clone()
    changed[49] ^= 1  # the last image is always probed
    assert base != dataset_fingerprint(TensorDictDataset(changed, labels, (0.5,) * 3, (0.5,) * 3))
    assert base != dataset_fingerprint(TensorDictDataset(images, labels.roll(1), (0.5,) * 3, (0.5,) * 3))


# -- the shard files: O(1) reads by index, clear errors on foreign or broken stores -----------------
def _store_with_shards(root: Path, n: int = 10, size: tuple[int, int] = (4, 5),
                       dtype: torch.dtype = torch.float16, world: int = 1) -> tuple[AttributionStore, torch.Tensor]:
    """A store written the way ``predict`` writes it: ``world`` ranks, rank r taking r, r+W, ... in
    batches of 2, each into its own shard file."""
    store = AttributionStore(root, "saliency", {}, {"data": "x"})
    maps = torch.randn(n, *size, generator=torch.Generator().manual_seed(0)).to(dtype)
    layout = store.prepare("train", n, size, dtype, world)
    for rank in range(world):
        writer = ShardWriter(layout, rank, world)
        mine = torch.arange(rank, n, world)
        for first in range(0, mine.numel(), 2):
            index = mine[first:first + 2]
            writer.write(index, maps[index])
        writer.close()
    return store, maps


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("world", [1, 3])
def test_map_reader_reads_any_rows_like_the_whole_load(dtype: torch.dtype, world: int, tmp_path: Path) -> None:
    store, maps = _store_with_shards(tmp_path, dtype=dtype, world=world)
    reader = store.reader("train", 10, (4, 5), dtype)
    name = str(dtype).split(".")[-1]
    assert [p.name for p in reader.paths] == [f"maps_r{r:04d}of{world:04d}_10x4x5.{name}" for r in range(world)]
    assert sum(p.stat().st_size for p in reader.paths) == 10 * 4 * 5 * maps.element_size()  # no second copy
    index = torch.tensor([7, 0, 3, 3, 9])
    assert torch.equal(reader[index], maps[index].float())
    assert torch.equal(reader[index], store.load("train", 10, (4, 5))[index])
    assert all(torch.equal(reader.row(i), maps[i].float()) for i in range(10))  # one pread per map
    with pytest.raises(IndexError, match="outside the 10 maps"):
        reader.row(10)


def test_truncated_shard_file_is_a_clear_error(tmp_path: Path) -> None:
    store, _ = _store_with_shards(tmp_path)
    reader = store.reader("train", 10, (4, 5), torch.float16)
    reader.path.write_bytes(reader.path.read_bytes()[: 4 * 4 * 5 * 2])  # only 4 of 10 maps left
    with pytest.raises(ConfigError, match=r"ends before map 6: it is truncated\. Delete .*train"):
        MapReader(reader.path, 10, (4, 5), torch.float16).row(6)
    with pytest.raises(ConfigError, match=r"holds 160 bytes, not 400: it is truncated or corrupt\. Delete"):
        store.reader("train", 10, (4, 5), torch.float16)


def test_rows_no_done_log_names_are_missing_not_read(tmp_path: Path) -> None:
    """A kill can cut the last line of a done log: that batch counts as not written."""
    store, _ = _store_with_shards(tmp_path)
    log = store.split_dir("train") / "done_r0000of0001.txt"
    assert log.read_text().splitlines()[-1] == "8 10 1"
    log.write_text(log.read_text()[:-3])  # "8 1": a line cut short
    assert not store.complete("train", 10)
    assert store.load("train", 10, (4, 5), required=False) is None
    with pytest.raises(RuntimeError, match=r"miss 2 samples \(first \[8, 9\]\); rerun the audit"):
        store.reader("train", 10, (4, 5), torch.float16)


@pytest.mark.parametrize("workers", [0, 2])
def test_maps_read_by_loader_workers_give_the_in_memory_masks(workers: int, tmp_path: Path) -> None:
    """A MapKeep over the shard files: each worker preads its samples' maps next to their images
    (one file handle per process), the selection runs per batch; masks equal the whole-split ones."""
    data = Counting(n=10, size=5)
    store, maps = _store_with_shards(tmp_path, n=10, size=(5, 5), world=2)
    reader = store.reader("train", 10, (5, 5), torch.float16)
    memory = TensorSplit(data.images, data.labels, (0.0,) * 3, (1.0,) * 3, data.masks)
    streamed = TensorSplit.from_dataset(data, (0.0,) * 3, (1.0,) * 3)
    kw: dict[str, Any] = {"train": True, "augment": True, "seed": 1}
    want = list(DeviceBatches(memory, 4, keep=keep_mask(maps.float(), 0.4, "kar", 5, 3), **kw))
    stream = StreamBatches(streamed, 4, keep=MapKeep(reader, 0.4, "kar", 5, 3), num_workers=workers, **kw)
    got = list(stream)
    assert (stream._map_keep is not None) == (workers > 0) and len(got) == len(want) == 3
    for x, y in zip(got, want, strict=True):
        assert torch.equal(x["index"], y["index"]) and torch.equal(x["image"], y["image"])


def test_store_of_other_data_or_dtype_is_a_clear_error(tmp_path: Path) -> None:
    store, _ = _store_with_shards(tmp_path)
    with pytest.raises(ConfigError, match=r"size: stored \[4, 5\], this run \[8, 8\].*the store is from other "
                                          r"data.*Delete .*saliency"):
        store.reader("train", 10, (8, 8), torch.float16)  # other image size
    with pytest.raises(ConfigError, match=r"n: stored 10, this run 6"):
        store.reader("train", 6, (4, 5), torch.float16)  # another dataset size
    with pytest.raises(ConfigError, match=r"dtype: stored 'float16', this run 'float32'.*roar\.store_dtype"):
        store.reader("train", 10, (4, 5), torch.float32)
    with pytest.raises(ConfigError, match=r"n: stored 10, this run 12"):
        store.prepare("train", 12, (4, 5), torch.float16, 1)  # never written over
    (store.split_dir("train") / "layout.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"not a readable store layout.*Delete"):
        store.reader("train", 10, (4, 5), torch.float16)


def test_store_begun_by_more_ranks_is_finished_by_fewer(tmp_path: Path) -> None:
    """A requeued job with another GPU count keeps the store's layout: any rank can write any row."""
    store, maps = _store_with_shards(tmp_path, n=9, world=3)
    layout = store.layout("train", 9, (4, 5), torch.float16)
    assert layout is not None and layout.world == 3
    log = store.split_dir("train") / "done_r0002of0003.txt"
    log.unlink()  # rank 2 of 3 was killed before it wrote anything: samples 2, 5, 8 missing
    assert not store.complete("train", 9)
    again = store.prepare("train", 9, (4, 5), torch.float16, world=1)
    assert again.world == 3  # the layout stays
    writer = ShardWriter(again, rank=0, world=1)
    missing = (~again.done()).nonzero().flatten()
    assert missing.tolist() == [2, 5, 8]
    writer.write(missing, maps[missing])
    writer.close()
    assert store.complete("train", 9)
    assert torch.equal(store.reader("train", 9, (4, 5), torch.float16)[torch.arange(9)], maps.float())
    assert isinstance(again, SplitLayout)
