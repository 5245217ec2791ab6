"""Memory and time of the streamed audit as the dataset grows: N, 4N, 16N images of one PNG ImageFolder.

    python benchmarks/scale.py                    # N=1000, sizes 1,4,16, 32 px, small CNN
    python benchmarks/scale.py --n 2000 --image-size 64 --workers 4

Per size k·N (train k·N, val = test k·N/4 images, 4 classes) it runs, each in a fresh process:
``audit.py audit=evaluate`` with ``evaluate.limit`` fixed, and a one-cell ROAR
(``explainer=[saliency] controls=[random] roar.fractions=[0.5] roar.epochs=1``: attributions of
both splits for both methods, the baseline and two masked cells). It reports each run's peak RSS
(``wait4`` of that process) and its wall time per image. The audited model is trained once on
the N folder. Then, side by side in this process on the 16N train split and its stored saliency
maps: one epoch of a plain torchvision ``ImageFolder`` ``DataLoader`` against one epoch of the
audit's streamed retraining batches (same dataset, workers and batch size, plus keep-mask and
crop/flip), with their ratio. Last, the per-image CPU costs at 224 px (store write, map read,
keep-mask, JPEG decode) and the ImageNet ROAR projection built from them
(``--imagenet-only`` runs just that part; ``--node-img-s`` is the one assumed figure).
On a GPU each cell also records its peak GPU memory (``gpu_peak_mib``), reported per size.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from xaudit.data import ImageFolderDataModule  # noqa: E402
from xaudit.roar.data import MapKeep, StreamBatches, TensorSplit, augment_batch  # noqa: E402
from xaudit.roar.store import MapReader  # noqa: E402

CLASSES = ("circle", "square", "cross", "stripe")


def write_folder(root: Path, n_train: int, n_val: int, size: int, seed: int = 0) -> Path:
    """A PNG ImageFolder whose classes differ by a drawn pattern (so a model learns something)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    patterns = [((yy - .5) ** 2 + (xx - .5) ** 2 < .08), (abs(yy - .5) < .25) & (abs(xx - .5) < .25),
                (abs(yy - xx) < .1) | (abs(yy + xx - 1) < .1), (np.sin(xx * 25) > 0)]
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            c = i % len(CLASSES)
            d = root / split / CLASSES[c]
            d.mkdir(parents=True, exist_ok=True)
            img = rng.integers(0, 90, (size, size, 3)).astype(np.uint8)
            img[patterns[c]] += np.uint8(150)
            Image.fromarray(img).save(d / f"{i:07d}.png")
    return root


def measured(args: list[str], cwd: Path) -> tuple[float, float]:
    """Run ``python <args>`` in a fresh process: (wall seconds, peak RSS MiB of that process)."""
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}"}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        print(out[-4000:])
        raise SystemExit(f"failed: {' '.join(args)}")
    return wall, usage.ru_maxrss / 1024  # Linux: KiB


def cell_seconds(mode_dir: Path) -> tuple[float, float | None]:
    """The summed ``seconds`` of every cell in a mode's results.jsonl, and the largest
    ``gpu_peak_mib`` a cell recorded (None on a CPU run)."""
    records = [json.loads(line) for line in (mode_dir / "results.jsonl").read_text().splitlines() if line.strip()]
    peaks = [float(r["gpu_peak_mib"]) for r in records if "gpu_peak_mib" in r]
    return sum(float(r["seconds"]) for r in records), (max(peaks) if peaks else None)


def throughput(folder: Path, audit_dir: Path, image_size: int, batch_size: int, workers: int,
               repeats: int = 5) -> float:
    """One retraining epoch, side by side: plain ImageFolder DataLoader vs the streamed ROAR batches.

    Both arms read the same ImageFolder with the same workers and batch size, move each batch to the
    device and apply the same batch crop/flip (``augment_batch``, the ROAR recipe); the streamed arm
    adds only the keep-mask (maps read by the workers, selection per batch). A third arm is the
    folder as a user trains on it (PIL RandomHorizontalFlip, no crop). Best of ``repeats``, interleaved.
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dm = ImageFolderDataModule(data_dir=str(folder), image_size=image_size, augment=True)
    dm.setup("fit")
    dataset = dm.plain_train_set()  # what ROAR reads: the eval transform, augmented per batch
    maps = sorted((audit_dir / "attributions" / "saliency" / "train").glob("maps_r*"))  # shard files, rank order
    source = "the ROAR run's stored saliency maps"
    if not maps:  # --throughput-only on a fresh folder: seeded random maps in the store's format
        source = "seeded random float16 maps (no ROAR run at this size)"
        path = audit_dir / "synthetic" / f"maps_{len(dataset)}x{image_size}x{image_size}.float16"
        path.parent.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        with path.open("wb") as f:
            for start in range(0, len(dataset), 1024):
                rows = min(1024, len(dataset) - start)
                f.write(rng.random((rows, image_size, image_size), dtype=np.float32).astype(np.float16).tobytes())
        maps = [path]
    reader = MapReader(maps, len(dataset), (image_size, image_size), torch.float16)
    split = TensorSplit.from_dataset(dataset, dm.mean, dm.std)
    pin = device.type == "cuda"

    def loader_epoch(data: object, augment: bool) -> int:
        g, count = torch.Generator().manual_seed(0), 0
        for b in DataLoader(data, batch_size=batch_size, shuffle=True, num_workers=workers, pin_memory=pin):
            x = b["image"].to(device, non_blocking=pin).float()
            x = augment_batch(x, g) if augment else x
            count += int(x.shape[0])
        return count

    def streamed() -> int:
        # fill: the per-channel value the audit gives removed pixels of an ImageFolder (roar.fill=auto)
        batches = StreamBatches(split, batch_size, train=True, augment=True, num_workers=workers, pin_memory=pin,
                                device=device, keep=MapKeep(reader, 0.5, "roar", 0, 0),
                                fill=torch.zeros(split.image_shape[0]))
        return sum(int(b["image"].shape[0]) for b in batches)

    arms = {"plain": lambda: loader_epoch(dataset, True), "streamed": streamed,
            "user": lambda: loader_epoch(dm.train_set, False)}
    times: dict[str, list[float]] = {}
    for _ in range(repeats):
        for name, fn in arms.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            count = fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.setdefault(name, []).append(time.perf_counter() - start)
            assert count == len(dataset), (name, count)
    best = {n: min(v) for n, v in times.items()}
    ratio = best["plain"] / best["streamed"]
    # per-repeat ratios: the two arms of one repeat ran back to back, under the same machine load
    ratios = sorted(p / s for p, s in zip(times["plain"], times["streamed"], strict=True))
    median = ratios[len(ratios) // 2]
    print(f"\none epoch of {len(dataset)} train images of {image_size} px on {device}, batch {batch_size}, "
          f"{workers} workers, keep-mask from {source} "
          f"(best of {repeats}, interleaved):\n  plain ImageFolder DataLoader + batch crop/flip   {best['plain']:.2f} s"
          f"\n  streamed ROAR batches (+ keep-mask)             {best['streamed']:.2f} s"
          f"\n  ImageFolder as a user trains it (PIL flip only) {best['user']:.2f} s"
          f"\n  → streamed throughput {ratio:.3f}× the plain loader (best vs best; masking costs "
          f"{100 * (1 / ratio - 1):.1f} %), median of the per-repeat ratios {median:.3f}× "
          f"(range {ratios[0]:.3f}–{ratios[-1]:.3f}); {best['user'] / best['streamed']:.3f}× the PIL-flip loader",
          flush=True)
    return ratio


def imagenet_costs(out: Path, size: int = 224, n_maps: int = 2048, batch: int = 64) -> dict[str, float]:
    """The per-image costs at ImageNet size that the CPU side of a ROAR cell pays, measured here on one
    thread: writing maps into a store shard (with the per-batch sync), reading one map back (``pread``,
    page-cached), the keep-mask selection, and decoding an ImageNet-sized JPEG with the usual
    resize-256 / centre-crop-224 transform. ms per image (write also MB/s)."""
    from PIL import Image
    from torchvision.transforms import v2

    from xaudit.ops.masking import keep_mask
    from xaudit.roar.store import AttributionStore, ShardWriter

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    store = AttributionStore(out / "costs", "saliency", {}, {"benchmark": "imagenet_costs"})
    layout = store.prepare("train", n_maps, (size, size), torch.float16, 1)
    writer = ShardWriter(layout, 0, 1)
    maps = torch.from_numpy(rng.random((batch, size, size), dtype=np.float32)).half()
    start = time.perf_counter()
    for first in range(0, n_maps, batch):
        writer.write(torch.arange(first, first + batch), maps)
    write_s = time.perf_counter() - start
    writer.close()
    reader = store.reader("train", n_maps, (size, size), torch.float16)
    order = torch.randperm(n_maps, generator=torch.Generator().manual_seed(0)).tolist()
    start = time.perf_counter()
    for i in order:
        reader.row(i)
    read_s = time.perf_counter() - start
    floats = maps.float()
    keep_mask(floats, 0.5, "roar", 0)
    start = time.perf_counter()
    for _ in range(5):
        keep_mask(floats, 0.5, "roar", 0)
    mask_s = (time.perf_counter() - start) / 5
    yy, xx = np.mgrid[:375, :500]
    img = np.stack([np.sin(xx / 17.0 + c) * 60 + np.cos(yy / 23.0) * 50 + 128 for c in range(3)], -1)
    img = (img + rng.normal(0, 12, img.shape)).clip(0, 255).astype(np.uint8)
    jpeg = out / "costs" / "imagenet_like.jpg"
    Image.fromarray(img).save(jpeg, quality=90)  # 500×375 at quality 90: an ImageNet-sized JPEG
    transform = v2.Compose([v2.PILToTensor(), v2.Resize(256, antialias=True), v2.CenterCrop(224),
                            v2.ToDtype(torch.float32, scale=True)])
    start = time.perf_counter()
    for _ in range(200):
        with Image.open(jpeg) as im:
            transform(im.convert("RGB"))
    decode_s = (time.perf_counter() - start) / 200
    mib = n_maps * size * size * 2 / 2**20
    costs = {"write_ms": write_s / n_maps * 1e3, "write_mib_s": mib / write_s, "read_ms": read_s / n_maps * 1e3,
             "mask_ms": mask_s / batch * 1e3, "decode_ms": decode_s * 1e3, "jpeg_kib": jpeg.stat().st_size / 1024}
    print(f"\nper-image CPU costs at {size} px, one thread ({n_maps} float16 maps, batches of {batch}):"
          f"\n  store write (incl. per-batch sync) {costs['write_ms']:.3f} ms ({costs['write_mib_s']:.0f} MiB/s)"
          f"\n  map read (one pread, page-cached)   {costs['read_ms']:.3f} ms"
          f"\n  keep-mask selection                 {costs['mask_ms']:.3f} ms"
          f"\n  JPEG decode + resize/crop ({costs['jpeg_kib']:.0f} KiB)  {costs['decode_ms']:.3f} ms", flush=True)
    return costs


def imagenet_projection(costs: dict[str, float], node_img_s: float, epochs: int, nodes: int) -> None:
    """The ImageNet ROAR sweep of the issue (ResNet-50, 3 methods × 5 fractions × 3 seeds + 3 baselines)
    projected from the measured per-image CPU costs and an assumed training throughput per 8-GPU node."""
    train, val = 1_281_167, 50_000
    cells = 3 * (1 + 3 * 5)
    store_gb = (train + val) * 224 * 224 * 2 / 1e9
    map_kb, jpeg_kb = 224 * 224 * 2 / 1e3, 110.0  # ImageNet's train JPEGs average ≈ 110 KB
    cpu_ms = costs["decode_ms"] + costs["read_ms"] + costs["mask_ms"]
    train_h = cells * epochs * train / node_img_s / 3600
    # attributions: grad_cam and saliency ≈ one forward+backward per image, integrated_gradients 50
    attr_h = (1 + 1 + 50) * (train + val) / node_img_s / 3600
    print(f"\nImageNet ROAR projection ({cells} cells × {epochs} epochs; "
          f"ASSUMED {node_img_s:.0f} img/s per 8-GPU node):"
          f"\n  store per method: {store_gb:.0f} GB float16 (one copy), written at "
          f"{costs['write_ms'] * (train + val) / 3.6e6:.2f} core-hours"
          f"\n  read bandwidth per node in a masked epoch: {node_img_s * (jpeg_kb + map_kb) / 1e6:.2f} GB/s "
          f"({node_img_s * jpeg_kb / 1e6:.2f} images + {node_img_s * map_kb / 1e6:.2f} maps)"
          f"\n  loader CPU per node: {cpu_ms:.2f} ms/image (decode {costs['decode_ms']:.2f}, map read "
          f"{costs['read_ms']:.3f}, keep-mask {costs['mask_ms']:.2f}) → {node_img_s * cpu_ms / 1e3:.0f} cores busy "
          f"(the masking alone {node_img_s * costs['mask_ms'] / 1e3:.1f})"
          f"\n  attributions: {attr_h:.1f} node-hours; retraining: {train_h:.0f} node-hours"
          f"\n  one 8-GPU node: {(attr_h + train_h) / 24:.1f} days; a Slurm array over {nodes} nodes: "
          f"{(attr_h + train_h) / nodes:.1f} h", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000, help="N: train images of the smallest size")
    parser.add_argument("--sizes", default="1,4,16", help="multiples of N")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--limit", type=int, default=256, help="evaluate.limit at every size")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--out", default=None)
    parser.add_argument("--throughput-only", action="store_true",
                        help="only the side-by-side epoch, on the folders and maps an earlier run left in --out")
    parser.add_argument("--imagenet-only", action="store_true",
                        help="only the per-image costs at 224 px and the ImageNet projection")
    parser.add_argument("--node-img-s", type=float, default=3000.0,
                        help="ASSUMED ResNet-50 training images/s of one 8-GPU node (put your measured figure in)")
    parser.add_argument("--epochs", type=int, default=90, help="epochs per ROAR cell in the projection")
    parser.add_argument("--nodes", type=int, default=16, help="nodes of the Slurm array in the projection")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="xaudit_scale_"))
    if args.imagenet_only:
        imagenet_projection(imagenet_costs(out), args.node_img_s, args.epochs, args.nodes)
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.throughput_only:
        folder = out / f"data_{sizes[-1]}N"
        if not folder.is_dir():
            write_folder(folder, sizes[-1] * args.n, max(args.limit, sizes[-1] * args.n // 4), args.image_size)
        for workers in sorted({0, args.workers}):
            throughput(out / f"data_{sizes[-1]}N", out / f"audit_{sizes[-1]}N", args.image_size, args.batch_size,
                       workers)
        return
    common = ["trainer=cpu" if not torch.cuda.is_available() else "trainer=gpu", "trainer.enable_progress_bar=false",
              "logger=csv", f"paths.log_dir={out / 'logs'}"]
    folders = {}
    for k in sizes:
        start = time.perf_counter()
        folders[k] = write_folder(out / f"data_{k}N", k * args.n, max(args.limit, k * args.n // 4), args.image_size)
        print(f"wrote {k}N = {k * args.n} train PNGs in {time.perf_counter() - start:.1f} s")
    data = ["data=imagefolder", f"data.image_size={args.image_size}", f"data.batch_size={args.batch_size}",
            "data.augment=false"]
    measured([str(ROOT / "train.py"), *data, f"data.data_dir={folders[sizes[0]]}", f"data.num_workers={args.workers}",
              *common,
              "callbacks=model_checkpoint", "trainer.max_epochs=2", "test=false",
              f"hydra.run.dir={out / 'train'}"], out)
    ckpt = out / "train" / "checkpoints" / "last.ckpt"
    rows = []
    for k in sizes:
        n_train, n_test = k * args.n, max(args.limit, k * args.n // 4)
        base = [str(ROOT / "audit.py"), f"ckpt_path={ckpt}", f"++data.data_dir={folders[k]}",
                f"++data.num_workers={args.workers}", *common,
                "explainer=[saliency]", "controls=[random]"]
        ev_wall, ev_rss = measured([*base, "audit=evaluate", f"evaluate.limit={args.limit}",
                                    f"out_dir={out / f'audit_{k}N'}", f"hydra.run.dir={out / f'ev_{k}N'}"], out)
        ro_wall, ro_rss = measured([*base, "audit=roar", "roar.fractions=[0.5]", "roar.epochs=1", "roar.seed=0",
                                    f"out_dir={out / f'audit_{k}N'}", f"hydra.run.dir={out / f'roar_{k}N'}"], out)
        # per image: the cells' own recorded seconds (process start-up and imports excluded)
        (ev_s, ev_gpu), (ro_s, ro_gpu) = (cell_seconds(out / f"audit_{k}N" / mode) for mode in ("evaluate", "roar"))
        rows.append((k, n_train, n_test, ev_rss, ev_s / args.limit * 1e3, ro_rss, ro_s / (n_train + n_test) * 1e3))
        gpu = "" if ev_gpu is None else f"; peak GPU memory evaluate {ev_gpu:.0f} MiB, roar {ro_gpu:.0f} MiB"
        print(f"{k}N: evaluate {ev_wall:.1f} s, peak RSS {ev_rss:.0f} MiB; "
              f"roar {ro_wall:.1f} s, peak RSS {ro_rss:.0f} MiB"
              f"{gpu}", flush=True)

    print("\n| size | train / test images | evaluate peak RSS (MiB) | evaluate ms / image (3 cells) | "
          "ROAR peak RSS (MiB) | ROAR ms / image (3 cells, train+test) |")
    print("|---|---|---|---|---|---|")
    for k, n_train, n_test, ev_rss, ev_ms, ro_rss, ro_ms in rows:
        print(f"| {k}N | {n_train} / {n_test} | {ev_rss:.0f} | {ev_ms:.2f} | {ro_rss:.0f} | {ro_ms:.2f} |")
    first, last = rows[0], rows[-1]
    print(f"peak RSS {last[0]}N / {first[0]}N: evaluate {last[3] / first[3]:.3f}×, ROAR {last[5] / first[5]:.3f}×")

    for workers in sorted({0, args.workers}):
        throughput(folders[sizes[-1]], out / f"audit_{sizes[-1]}N", args.image_size, args.batch_size, workers)
    imagenet_projection(imagenet_costs(out), args.node_img_s, args.epochs, args.nodes)
    print(f"runs under {out}")


if __name__ == "__main__":
    main()
