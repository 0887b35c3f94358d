"""Build the embedded BloodMNIST sample (`medcli/data/bloodmnist_pbc_sample_28.npz`) from the
PBC-derived BloodMNIST file: a seeded, class-stratified subset of each split, small enough to
ship inside the package (at most 6 MB) and real enough that the offline main job means
something.

Source: the peripheral-blood-cell images of Acevedo et al., "A dataset of microscopic
peripheral blood cell images for development of automatic recognition systems", Data in
Brief 30 (2020), Mendeley Data snkd93bnjr, CC BY 4.0, prepared the way MedMNIST describes
(centre crop, bicubic resize to 28 px); not the official BloodMNIST split or pixels.

    .venv/bin/python scripts/make_sample.py [--source ../shared/data/bloodmnist_pbc_28.npz]

Prints the file's size and md5: put the md5 into `medcli.download.SAMPLE_MD5`.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from subsets import make_subset  # scripts/subsets.py, beside this script

from medcli import download, fileio

DEFAULT_SOURCE = Path(__file__).resolve().parents[2] / "shared" / "data" / "bloodmnist_pbc_28.npz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        made = make_subset(args.source, Path(tmp) / "bloodmnist.npz", "bloodmnist", download.SAMPLE_SPLITS, seed=0)
        target = download.SAMPLE_FILE
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(made, target)
    print(f"{target}: {target.stat().st_size / 2**20:.2f} MiB, md5 {fileio.md5_file(target)}, "
          f"{'/'.join(map(str, download.SAMPLE_SPLITS))} train/val/test images")


if __name__ == "__main__":
    main()
