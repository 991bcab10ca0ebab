"""Steady-state GPU throughput: predict against the backbone forward alone, after warm-up.

    python -m benchmarks.gpu_throughput --out benchmarks/results

``benchmarks.run --suite gpu`` scores each real test set once, in a fresh process: with 15
test images, the one-time costs of the first call at each new batch shape (cuDNN plan
choice, lazily loaded kernels: 40-60 ms each on an H100) weigh on its images per second.
This measures what a long scoring job sees: the model is fitted on ``--train`` random images,
every batch shape is warmed once, then ``--images`` random images are scored (predict: search,
maps, image scores, results on the host) and, separately, only pushed through the backbone.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from fedpatch import PatchCore

CONFIGS = [
    ("efficientnet_lite0", True, (256, 256)),
    ("efficientnet_lite0", True, (400, 400)),
    ("efficientnet_lite0", True, (1000, 750)),
    ("wide_resnet50_2", False, (256, 256)),
    ("wide_resnet50_2", False, (400, 400)),
    ("wide_resnet50_2", False, (1000, 750)),
]


def _images(count: int, size: tuple[int, int], seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    width, height = size
    return [torch.randint(0, 256, (3, height, width), generator=gen, dtype=torch.uint8) for _ in range(count)]


def measure(backbone: str, pretrained: bool, size: tuple[int, int], train: int, count: int) -> dict[str, object]:
    model = PatchCore(backbone, pretrained=pretrained, device="cuda")
    model.fit(_images(train, size, seed=0))
    images = _images(count, size, seed=1)
    list(model.iter_predictions(images))  # warm-up: every batch shape of the timed run
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in model.iter_predictions(images):
        pass
    predict_s = time.perf_counter() - start
    batches = [torch.stack(images[i : i + model.config.batch_size]) for i in range(0, count, model.config.batch_size)]
    with torch.no_grad():
        torch.cuda.synchronize()
        start = time.perf_counter()
        for batch in batches:
            model.extractor(batch.to("cuda").float().div_(255))
        torch.cuda.synchronize()
    backbone_s = time.perf_counter() - start
    return {
        "backbone": backbone + ("" if pretrained else " (random)"),
        "size": f"{size[0]}x{size[1]}",
        "bank_size": len(model.get_memory_bank()),
        "predict_ips": count / predict_s,
        "backbone_ips": count / backbone_s,
        "predict_vs_backbone": backbone_s / predict_s,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--train", type=int, default=8, help="random training images per model")
    parser.add_argument("--images", type=int, default=64, help="random images scored per configuration")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    torch.set_num_threads(2)
    rows = []
    for backbone, pretrained, size in CONFIGS:
        rows.append(measure(backbone, pretrained, size, args.train, args.images))
        print(rows[-1], flush=True)
    device = torch.cuda.get_device_name()
    from benchmarks.run import write_rows

    caption = f"Command: `python -m benchmarks.gpu_throughput --train {args.train} --images {args.images}`; images per second after warm-up, 2 CPU threads."
    write_rows(args.out, "gpu_throughput", f"steady-state GPU throughput ({device})", caption, rows, device=device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
