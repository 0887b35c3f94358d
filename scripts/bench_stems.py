"""Cost of ResNet-18's stem choices per MedMNIST image size (a script, not a test).

For 28, 64, 128 and 224 px and each stem (small: 3x3 stride-1 conv, no max-pool; small+pool:
the same with ImageNet's max-pool; imagenet: 7x7 stride-2 conv + max-pool) it prints the map
size entering layer1 and training images/s (forward + backward + SGD step, batch 32, random
tensors, this process's threads), skipping the small stem where it would cost over 16x the 28-px step.

    .venv/bin/python scripts/bench_stems.py [--steps 4]
"""

from __future__ import annotations

import argparse
import time


def build(stem: str, size: int):
    """ResNet-18 with this stem, as a run whose spec records it is rebuilt."""
    from medcli import models

    return models.rebuild({"name": "resnet18", "num_classes": 8, "in_chans": 3, "input_size": size, "stem": stem})


def images_per_s(stem: str, size: int, steps: int, batch: int = 32) -> tuple[float, int]:
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = build(stem, size).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 8, (batch,))
    with torch.no_grad():
        layer1_in = model.maxpool(model.relu(model.bn1(model.conv1(x[:1])))).shape[-1]
    for step in range(steps + 1):  # the first step warms up oneDNN
        if step == 1:
            start = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return batch * steps / (time.perf_counter() - start), layer1_in


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    import torch

    from medcli import models, system

    torch.set_num_threads(system.usable_cpus())
    base = None
    print(f"{'size':>5} {'stem':12} {'layer1 in':>9} {'img/s':>8} {'cost vs 28 px small':>20}")
    for size in (28, 64, 128, 224):
        for stem in models.STEMS:
            expected = (size / 28) ** 2 if stem == "small" else 0
            if expected > 16:
                print(f"{size:>5} {stem:12} {'':>9} {'skipped':>8}")
                continue
            speed, layer1 = images_per_s(stem, size, args.steps)
            base = base or speed
            print(f"{size:>5} {stem:12} {layer1:>6} px {speed:8.1f} {base / speed:19.1f}x", flush=True)


if __name__ == "__main__":
    main()
