"""Do medcli's defaults hold on small datasets? A script, not a test; prints its numbers.

Small sets cut from the real PBC BloodMNIST (`subsets.make_subset`, stratified, validation
and test in MedMNIST's proportions for the dataset they imitate):

  blood546    8 classes, RGB, 546 / 78 / 156 images (BreastMNIST's split sizes)
  blood1080   8 classes, RGB, 1,080 / 120 / 400 (RetinaMNIST's split sizes)
  gray2       2 classes (eosinophil vs neutrophil), one grayscale channel, 546 / 78 / 156,
              written in BreastMNIST's layout (binary-class, 1 channel)

and the hard proxies, made of the classes a full BloodMNIST run confuses most
(`subsets.CONFUSED`), so that they are nearer BreastMNIST and RetinaMNIST than the easy ones:

  hard2       immature granulocyte vs monocyte, grayscale, 546 / 78 / 156, BreastMNIST's layout
              (binary-class, 1 channel: the BreastMNIST defaults and augmentation apply)
  hard5       lymphocyte, monocyte, immature granulocyte, neutrophil, basophil as grades 0-4, RGB,
              1,080 / 120 / 400, RetinaMNIST's layout (ordinal-regression, 3 channels), each
              class next to the ones it is confused with

For each set and seed it trains:

  reference   MedMNIST v2's ResNet-18 (28) recipe, reimplemented here: the CIFAR-style
              ResNet-18 (3x3 stride-1 stem, no max-pool), Adam lr 1e-3, batch 128, 100
              epochs, lr x0.1 at epochs 50 and 75, no augmentation, inputs scaled to [-1, 1],
              the model of the epoch with the best validation AUC (as their training script).
  medcli      `medcli train --dataset FLAG --size 28` with every other option at its default,
              then `medcli evaluate` (best.pt, no TTA).

and prints test accuracy and AUC (medmnist's definitions) as mean +- std over the seeds, wall
time (for both: loading the data, building the model and training; not the test evaluation),
and for medcli the share of the training stage spent outside the training steps (the stage's
set-up of model, data, optimizer and EMA, validation, BatchNorm re-estimation, checkpoints,
history and curves), and for both the epoch best.pt (the best model) came from.

    .venv/bin/python scripts/bench_small.py [--sets blood546,gray2] [--seeds 0,1,2] [--only medcli]
                                            [--results bench_small.jsonl [--table]]

Hours of CPU time at the full settings (each 546-image run is about 55k training images for the
reference and 33k for medcli); --reference-epochs shortens the reference, which then is no
longer the published recipe (the table says so). With --results, every finished run is appended
to a JSON-lines file (with the commit, threads and date it ran with) and runs already there are
not repeated, so the benchmark can be spread over several sittings; the table covers the file.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from subsets import CONFUSED, class_ids  # scripts/subsets.py, beside this script

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "bloodmnist_pbc_28.npz"
SETS = {  # name -> (flag whose layout it takes, split sizes, classes kept, grayscale)
    "blood546": ("bloodmnist", (546, 78, 156), None, False),
    "blood1080": ("bloodmnist", (1080, 120, 400), None, False),
    "gray2": ("breastmnist", (546, 78, 156), (1, 6), True),
    "hard2": ("breastmnist", (546, 78, 156), class_ids(("immature granulocyte", "monocyte")), True),
    "hard5": ("retinamnist", (1080, 120, 400), class_ids(CONFUSED), False),
}


def make_set(name: str, source: Path, directory: Path) -> Path:
    from medcli import datasets
    from subsets import make_subset  # scripts/subsets.py, beside this script

    flag, counts, classes, gray = SETS[name]
    root = directory / name
    root.mkdir(parents=True, exist_ok=True)
    make_subset(source, root / datasets.filename(flag, 28), flag, counts, seed=0, classes=classes, grayscale=gray)
    return root


def cifar_resnet18(in_chans: int, classes: int):
    """MedMNIST v2's ResNet-18 for 28 px: torchvision's BasicBlock ResNet-18 with a 3x3
    stride-1 first convolution and no max-pool (the CIFAR variant their code defines)."""
    import torch.nn as nn
    from torchvision.models import resnet18

    net = resnet18(num_classes=classes)
    net.conv1 = nn.Conv2d(in_chans, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return net


def reference(root: Path, flag: str, seed: int, epochs: int) -> dict:
    """The published recipe on one set; test accuracy and AUC of the best-val-AUC epoch."""
    import copy

    import torch
    import torch.nn.functional as F

    from medcli import datasets, system

    torch.set_num_threads(system.usable_cpus())
    start = time.perf_counter()  # as medcli's: data loading, the model and the training, not the test
    torch.manual_seed(seed)
    splits = datasets.load(root, flag, 28)
    task = datasets.task(flag)

    def tensors(split):
        x = datasets.as_tensor(splits.images[split]).float().div(255).sub(0.5).div(0.5)
        return x, torch.from_numpy(splits.labels[split])

    (xtr, ytr), (xva, yva), (xte, yte) = (tensors(s) for s in ("train", "val", "test"))
    net = cifar_resnet18(xtr.shape[1], task.outputs)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [epochs // 2, epochs * 3 // 4], gamma=0.1)
    generator = torch.Generator().manual_seed(seed)

    def scores(x):
        net.eval()
        with torch.inference_mode():
            out = torch.cat([net(x[i:i + 512]) for i in range(0, len(x), 512)])
        return task.probs_t(out.double()).numpy()

    best, best_auc, best_epoch = None, -1.0, None
    for epoch in range(1, epochs + 1):
        net.train()
        order = torch.randperm(len(xtr), generator=generator)
        for i in range(0, len(order), 128):  # their DataLoader keeps the last, smaller batch
            index = order[i:i + 128]
            loss = F.cross_entropy(net(xtr[index]), ytr[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        scheduler.step()
        auc = task.metrics(yva.numpy(), scores(xva))["auc"] or 0.0
        if auc > best_auc:
            best_auc, best, best_epoch = auc, copy.deepcopy(net.state_dict()), epoch
    seconds = time.perf_counter() - start
    net.load_state_dict(best)
    m = task.metrics(yte.numpy(), scores(xte))
    return {"accuracy": m["accuracy"], "auc": m["auc"], "seconds": seconds, "best_epoch": best_epoch}


def medcli_defaults(root: Path, flag: str, seed: int, runs: Path) -> dict:
    from medcli import evaluate, train

    start = time.perf_counter()
    run = train.train(dataset=flag, size=28, root=root, runs_dir=runs, seed=seed)
    seconds = time.perf_counter() - start
    stage = run.stages["train"]
    m = evaluate.evaluate_run(run.run_dir)["splits"]["test"]["metrics"]
    return {"accuracy": m["accuracy"], "auc": m["auc"], "seconds": seconds,
            "outside_steps": 1 - stage["summary"]["train_seconds"] / stage["duration_s"],
            "epochs": stage["summary"]["epochs_run"], "batch": run.config["batch_size"], "lr": run.config["lr"],
            "best_epoch": stage["summary"]["best_epoch"], "select": run.config.get("select"),
            "augment": run.config["augment"], "streams": STREAMS}


def std(values) -> float:
    """The sample standard deviation over seeds (ddof=1, as `medcli aggregate`); 0 for one seed."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def spread(values) -> str:
    values = [v for v in values if v is not None]
    return f"{np.mean(values):.4f} +- {std(values):.4f}" if values else "n/a"


def provenance() -> dict:
    """The commit checked out when the benchmark started ("+dirty" when medcli/ or scripts/
    differed from it), taken once: the code a long benchmark runs is the code it started with,
    whatever is committed meanwhile. And the threads it runs with."""
    from medcli import system

    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=Path(__file__).parent)

    commit = git("rev-parse", "--short", "HEAD").stdout.strip() or None
    if commit and git("diff", "--quiet", "HEAD", "--", ":/medcli", ":/scripts").returncode == 1:
        commit += "+dirty"
    return {"commit": commit, "threads": system.usable_cpus()}


def load_results(path: Path | None) -> list[dict]:
    if path is None or not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# medcli runs from before a change of the defaults: kept and shown apart, never counted as done.
# A run is current when its result has each field below (the newest change last); otherwise it
# belongs to the first change it lacks.
CHANGES = (("select", "medcli-before-ema", "medcli defaults before the EMA rule"),  # issue 28's selection rules
           ("streams", "medcli-before-streams", "medcli defaults before the streams were seeded apart"))
STREAMS = "sha256(purpose, seed)"  # train.generators since 943661a: data order and augmentation apart from the model


def recipe_of(result: dict) -> str:
    """`reference`, `medcli` (today's defaults) or the earlier medcli defaults it ran with
    (`CHANGES`)."""
    if result["recipe"] == "medcli":
        return next((recipe for key, recipe, _ in CHANGES if key not in result), "medcli")
    return result["recipe"]


def rows_of(results: list[dict], name: str, recipe: str, reference_epochs: int) -> list[dict]:
    """One row per seed, in seed order: the last one recorded where a seed was run twice (two
    sittings that overlapped)."""
    by_seed = {r["seed"]: r for r in results if r["set"] == name and recipe_of(r) == recipe
               and (recipe != "reference" or r["reference_epochs"] == reference_epochs)}
    return [by_seed[seed] for seed in sorted(by_seed)]


def label(recipe: str, reference_epochs: int) -> str:
    earlier = {recipe: text for _, recipe, text in CHANGES}
    return ("medcli defaults" if recipe == "medcli" else earlier[recipe] if recipe in earlier
            else "reference" if reference_epochs == 100
            else f"reference, {reference_epochs} epochs (NOT the published 100)")


def table(results: list[dict], sets: list[str], recipes: list[str], reference_epochs: int) -> None:
    for name in sets:
        for recipe in [*recipes, *([recipe for _, recipe, _ in CHANGES] if "medcli" in recipes else [])]:
            rows = rows_of(results, name, recipe, reference_epochs)
            if not rows:
                continue
            extra = f"  outside steps {np.mean([r['outside_steps'] for r in rows]):.1%}" if recipe != "reference" else ""
            print(f"{name:10s} {label(recipe, reference_epochs):52s} seeds {','.join(str(r['seed']) for r in rows):6s} "
                  f"acc {spread([r['accuracy'] for r in rows])}  auc {spread([r['auc'] for r in rows])}  "
                  f"{np.mean([r['seconds'] for r in rows]) / 60:.1f} min/run{extra}  "
                  f"best epoch {','.join(str(r.get('best_epoch', '?')) for r in rows)}  "
                  f"commits {','.join(sorted({str(r.get('commit')) for r in rows}))}", flush=True)
        verdict(results, name, reference_epochs)


def shown_medcli(results: list[dict], name: str) -> str:
    """The medcli recipe a set's table rows and verdict show: today's defaults where they ran,
    else the newest earlier defaults that did (labelled as such)."""
    return next((recipe for recipe in ("medcli", *(r for _, r, _ in reversed(CHANGES)))
                 if any(r["set"] == name and recipe_of(r) == recipe for r in results)), "medcli")


def markdown(results: list[dict], sets: list[str], reference_epochs: int) -> None:
    """The table of the README's small-data section: per set, each recipe's accuracy and AUC
    per seed and as mean ± std, the epoch best.pt came from and the wall time per run; under
    it, issue 28's verdict per set (`shown_medcli`: a set not run with today's defaults yet
    shows the newest earlier ones)."""
    print("| set | recipe | seeds | test accuracy per seed | mean ± std | test AUC per seed | mean ± std "
          "| best.pt from epoch | min per run |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in sets:
        for recipe in ("reference", shown_medcli(results, name)):
            rows = rows_of(results, name, recipe, reference_epochs)
            if rows:
                acc, auc = ([r[key] for r in rows] for key in ("accuracy", "auc"))
                minutes = [r["seconds"] / 60 for r in rows]
                print(f"| {name} | {label(recipe, reference_epochs)} "
                      f"| {','.join(str(r['seed']) for r in rows)} | {', '.join(f'{a:.1%}' for a in acc)} "
                      f"| {np.mean(acc):.1%} ± {std(acc) * 100:.1f} | {', '.join(f'{a:.4f}' for a in auc)} "
                      f"| {np.mean(auc):.4f} ± {std(auc):.4f} | {', '.join(str(r.get('best_epoch', '?')) for r in rows)} "
                      f"| {min(minutes):.0f}-{max(minutes):.0f} |")
    print()
    for name in sets:
        verdict(results, name, reference_epochs, prefix="- ", medcli=shown_medcli(results, name))


def verdict(results: list[dict], name: str, reference_epochs: int, prefix: str = "", medcli: str = "medcli") -> None:
    """Issue 28's test on the seeds both recipes have finished: today's defaults (or the
    earlier `medcli` recipe, said) beat the reference on accuracy and AUC in every seed, and on
    the mean by more than the seeds' spread (the larger standard deviation of the two recipes).
    One seed has no spread: its gap is shown, and the test waits for more seeds."""
    by = {recipe: {r["seed"]: r for r in rows_of(results, name, recipe if recipe == "reference" else medcli,
                                                  reference_epochs)}
          for recipe in ("reference", "medcli")}
    seeds = sorted(set(by["reference"]) & set(by["medcli"]))
    if not seeds:
        return
    said = []
    for key in ("accuracy", "auc"):
        gaps = [by["medcli"][s][key] - by["reference"][s][key] for s in seeds]
        spread_ = max(std([by[recipe][s][key] for s in seeds]) for recipe in by)
        met = min(gaps) > 0 and np.mean(gaps) > spread_ and len(seeds) > 1
        behind = ", ".join(f"seed {s}: " + (f"tie at {by['medcli'][s][key]:.4f}" if abs(gap) < 1e-9 else f"{gap:+.4f}")
                           for s, gap in zip(seeds, gaps) if gap <= 0)  # a tie is no win: the numbers say which
        said.append(f"{key} {np.mean(gaps):+.4f} (every seed: {'yes' if min(gaps) > 0 else f'NO, {behind}'}; "
                    + (f"mean gap > spread {spread_:.4f}: {'yes' if np.mean(gaps) > spread_ else 'NO'})"
                       if len(seeds) > 1 else "no spread of one seed: not judged yet)"))
        said[-1] += "" if met or len(seeds) == 1 and min(gaps) > 0 else " NOT MET"
    before = "" if medcli == "medcli" else f" ({label(medcli, reference_epochs).replace('medcli defaults ', '')})"
    print(f"{prefix}{name:10s} medcli{before} - reference on seeds {','.join(map(str, seeds))}: " + "; ".join(said),
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--sets", default=",".join(SETS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--only", choices=("reference", "medcli"))
    parser.add_argument("--reference-epochs", type=int, default=100)
    parser.add_argument("--results", type=Path, help="JSON-lines file: runs found there are reused, new ones appended")
    parser.add_argument("--table", action="store_true", help="only print the table of the runs in --results")
    parser.add_argument("--markdown", action="store_true", help="with --table: the README's Markdown table")
    args = parser.parse_args()
    from medcli import console

    console.configure(quiet=True, verbose=False)
    sets = args.sets.split(",")
    if unknown := [name for name in sets if name not in SETS]:
        parser.error(f"unknown --sets {', '.join(unknown)}; choose from {', '.join(SETS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    recipes = [args.only] if args.only else ["reference", "medcli"]
    results = load_results(args.results)
    if not args.table:
        run_missing(args, sets, seeds, recipes, results)
    shown = [r for r in results if r["seed"] in seeds]
    (markdown if args.markdown else table)(shown, sets, *([] if args.markdown else [recipes]), args.reference_epochs)


def run_missing(args, sets: list[str], seeds: list[int], recipes: list[str], results: list[dict]) -> None:
    """Train every (set, seed, recipe) not in `results` yet; append each to `results` (and
    to the --results file) as it finishes."""
    done = {(r["set"], recipe_of(r), r["seed"], r.get("reference_epochs")) for r in results}
    started = provenance()
    with tempfile.TemporaryDirectory() as tmp:
        for name in sets:
            root, flag = None, SETS[name][0]
            for seed in seeds:  # seed-major, so a stopped benchmark leaves both recipes with equal seeds
                for recipe in recipes:
                    epochs = args.reference_epochs if recipe == "reference" else None
                    if (name, recipe, seed, epochs) in done:
                        continue
                    root = root or make_set(name, args.data, Path(tmp))
                    if recipe == "reference":
                        result = reference(root, flag, seed, epochs)
                    else:
                        result = medcli_defaults(root, flag, seed, Path(tmp) / "runs")
                    result = {"set": name, "recipe": recipe, "seed": seed, "reference_epochs": epochs,
                              **result, **started, "date": time.strftime("%Y-%m-%d %H:%M")}
                    results.append(result)
                    if args.results:
                        with args.results.open("a") as out:
                            out.write(json.dumps(result) + "\n")
                    print(f"  {name} {recipe} seed {seed}: {result}", flush=True)

if __name__ == "__main__":
    main()
