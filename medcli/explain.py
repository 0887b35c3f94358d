"""`medcli explain`: where a trained run looks when it classifies an image.

The command: which samples to explain (`choose_samples`: the same cells for every model with
the same seed), the maps of one method of `medcli.explainers` and their ROAD faithfulness,
and the files. Output goes under the run's explain directory for the method
(`Run.explain_dir`): per sample a PNG (original | heat map | overlay), a grid per class, the
raw maps and an index, all recorded in the manifest's stage for the method
(`Run.explain_stage`). A new explanation with a method replaces the same explanation made
earlier, but one of other samples, checkpoint, target, layer, faithfulness or method options
only with `overwrite`: earlier maps are never lost without a word. On
synthetic data, whose class evidence lives in a known square (`signal_box`), each sample also
gets the share of its heat-map mass inside that square: a built-in check that the maps point
at the evidence.

torch, numpy and matplotlib are imported inside functions: the CLI imports this module for
its help text, which must stay instant.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

from medcli import console, explainers, fileio, tasks
from medcli.errors import UsageError
from medcli.names import EXPLAIN_TARGETS, SPLITS, file_names, short_names
from medcli.run import Run

__all__ = ["Explained", "choose_samples", "explain_run", "faithfulness_text", "parse_indices", "write_figures"]


# -- samples ---------------------------------------------------------------------------------------
def parse_indices(text: str | None) -> list[int] | None:
    """'3,17,42' -> [3, 17, 42] (a number given twice counts once); None stays None."""
    if text is None:
        return None
    try:
        values = list(dict.fromkeys(int(part) for part in text.split(",") if part.strip()))  # each sample once
    except ValueError:
        raise UsageError(f"--indices must be comma-separated sample numbers such as 3,17,42 (got '{text}')") from None
    if not values:
        raise UsageError("--indices is empty; give sample numbers such as 3,17,42")
    return values


def _first_per_class(order, member, per_class: int):
    """The first `per_class` entries of `order` in each class (column of the (N, K) boolean
    `member`), grouped by class, each sample at most once (a multi-label sample counts for
    the first of its labels still short of samples); returns (indices, class of each)."""
    import numpy as np

    taken: set[int] = set()
    indices, groups = [], []
    for k in range(member.shape[1]):
        picked = [int(i) for i in order[member[order, k]] if int(i) not in taken][:per_class]
        taken.update(picked)
        indices += picked
        groups += [k] * len(picked)
    return np.asarray(indices, dtype=np.int64), np.asarray(groups, dtype=np.int64)


def choose_samples(member, per_class: int, seed: int, is_wrong=None, chunk: int = 256):
    """`per_class` samples of each true class (or label: `member` is `Task.indicator` of the
    split's labels), the same ones for the same seed whatever the model; returns (sample
    indices, the class each was chosen for).

    A seeded permutation of the split, then the first `per_class` of each class. With
    `is_wrong` (indices -> mistaken or not) only misclassified samples count: the split is
    predicted chunk by chunk in that order and stops once every class has its share, so
    --only-errors costs a fraction of a full pass when errors are common.
    """
    import numpy as np

    member = np.asarray(member, dtype=bool)
    order = np.random.default_rng(seed).permutation(len(member))
    if is_wrong is None:
        return _first_per_class(order, member, per_class)
    wrong = order[:0]
    for start in range(0, len(order), chunk):
        part = order[start:start + chunk]
        wrong = np.concatenate([wrong, part[is_wrong(part)]])
        if len(_first_per_class(wrong, member, per_class)[0]) == member.shape[1] * per_class:
            break
    return _first_per_class(wrong, member, per_class)


# -- the command -----------------------------------------------------------------------------------
def explain_run(
    run: str | os.PathLike,
    method: str = "gradcam",
    split: str = "test",
    per_class: int | None = None,
    indices: Sequence[int] | None = None,
    only_errors: bool = False,
    target: str = "pred",
    layer: str | None = None,
    checkpoint: str = "best",
    seed: int = 0,
    head_fusion: str = explainers.DEFAULT_OPTIONS["head_fusion"],
    discard_ratio: float = explainers.DEFAULT_OPTIONS["discard_ratio"],
    batch_size: int = 64,
    device: str = "auto",
    root: str | os.PathLike | None = None,
    faithfulness: bool = True,
    overwrite: bool = False,
) -> dict:
    """Explain a run's predictions with `method`; returns the index written to index.json.

    Everything that can be wrong with the options, the run or its data is checked before the
    `explain:<method>` stage starts, so a usage error leaves the manifest untouched.
    """
    import numpy as np

    from medcli import datasets, inference

    options = {"head_fusion": head_fusion, "discard_ratio": discard_ratio, "batch_size": batch_size}
    _check_options(method, split, per_class, indices, only_errors, layer, options)
    chosen_method = explainers.METHODS[method]
    run = Run.open(run)
    run.require_trained()
    run.refuse_if_busy(run.explain_stage(method))
    spec = run.spec
    chosen_method.check_model(spec, run.run_id)
    dev = inference.resolve_device(device)
    model = run.load_model(checkpoint, dev)
    layer = explainers.resolve_layer(model, spec, layer) if chosen_method.uses_layer else None
    explainer = chosen_method.open(model, spec, layer, options)
    data = run.load_data(root, [split])
    images, labels = data.images[split], data.labels[split]
    task = datasets.task(run.dataset["flag"])
    names = list(task.names)
    prep = run.data["preprocess"]
    target_class = _target_class(target, names)

    def probabilities(index) -> np.ndarray:
        logits = inference.predict_logits(model, datasets.as_tensor(images[index]), prep, batch_size=batch_size,
                                          device=dev)
        return task.probs_t(logits).numpy()

    if indices is not None:
        bad = [i for i in indices if not 0 <= i < len(labels)]
        if bad:
            raise UsageError(f"--indices {', '.join(map(str, bad))} outside the {split} split (0..{len(labels) - 1})")
        chosen, groups = np.asarray(indices, dtype=np.int64), None
    else:
        is_wrong = (lambda index: task.mistaken(labels[index], probabilities(index))) if only_errors else None
        chosen, groups = choose_samples(task.indicator(labels), per_class or explainers.DEFAULT_PER_CLASS, seed, is_wrong)
    if not len(chosen):
        what = "misclassified samples" if only_errors else "samples"
        raise UsageError(f"the {split} split has no {what} to explain; choose another --split"
                         + (" or drop --only-errors" if only_errors else ""))
    selection = _selection(split, indices, per_class or explainers.DEFAULT_PER_CLASS, seed, only_errors)
    wanted = {"data_md5": data.record.get("md5"), "checkpoint": checkpoint, "target": target, "layer": layer,
              "faithfulness": faithfulness,
              **({"seed": seed} if faithfulness else {}),  # ROAD's noise: other scores of the same maps
              **{name: options[name] for name in chosen_method.options}}
    replaced = _other_maps(run, method, split, chosen, selection, wanted, names, overwrite)
    probs = probabilities(chosen)
    preds = task.explained_class(probs)
    truth = task.true_class(labels[chosen], probs) if groups is None else groups
    classes = {"pred": preds, "true": truth}.get(target, np.full(len(chosen), target_class))

    out_dir = run.explain_dir(method)
    with run.stage(run.explain_stage(method), keep_completed=True) as st:
        with explainer as active:
            maps, scores = explainers.heatmaps(active, datasets.as_tensor(images[chosen]), prep, classes, batch_size=batch_size,
                                    device=dev, progress_label=f"explain {method}" + (" + ROAD" if faithfulness else ""),
                                    scorer=explainers.road_scorer(model, seed, task, samples=chosen) if faithfulness else None)
        box = data.record.get("signal_box")
        explained = Explained(split, chosen, images[chosen], truth, preds, probs[np.arange(len(chosen)), preds],
                              classes, maps, explainers.box_mass(maps, box) if box else None, scores,
                              label_sets=task.label_sets(labels[chosen]), decided=task.decided(probs, preds))
        caption = f"{method}{f' · {layer}' if layer else ''}"
        if replaced:  # --overwrite, said when it happens (as evaluate and download say what they replace)
            console.warn(f"replacing the earlier {run.relative(out_dir)} of run {run.run_dir}: {replaced}")
        st.writing()
        samples, grids, files = write_figures(out_dir, caption, explained, names, datasets.provenance(data.record),
                                              class_specific=chosen_method.class_specific)
        # the class the maps explain, one spelling per class (a number), none for a class-agnostic method
        mapped = (None if not chosen_method.class_specific
                  else target if target_class is None else str(target_class))
        files.append(save_maps(run.maps_file(method), explained, data.record, selection, mapped))
        masses = explained.box_mass
        index = {
            "run": run.run_id, "method": method, "split": split, "data_md5": data.record.get("md5"),
            "checkpoint": checkpoint, "target": target,
            "layer": layer, "seed": seed, "only_errors": only_errors, "selection": selection,
            **{name: options[name] for name in chosen_method.options},
            "mean_box_mass": _finite(np.nanmean(masses)) if masses is not None and np.isfinite(masses).any() else None,
            "faithfulness": _spread(explained.road, task, explained.constant),
            "maps": run.maps_file(method).name, "samples": samples, "grids": grids,
        }
        fileio.write_json(run.explain_index(method), index)
        # the earlier explanation goes only now: an interruption while the maps are computed keeps
        # it whole (files and completed stage); one while the new files are written (st.writing)
        # leaves the stage interrupted
        st.forget(run.explain_prefix(method), keep=[*files, run.explain_index(method)])
        _remove_leftovers(out_dir, keep=[*files, run.explain_index(method)])
        st.add(*files, save=False)
        st.add(run.explain_index(method))
        st.summary.update(dir=run.relative(out_dir), method=method, split=split, samples=len(samples), target=target,
                          layer=layer, checkpoint=checkpoint, mean_box_mass=index["mean_box_mass"],
                          faithfulness=index["faithfulness"])
    road = index["faithfulness"]
    explained_samples = console.plural(len(samples), f"{split} sample")
    console.info(f"{method}{f' on {layer}' if layer else ''}: {explained_samples} explained"
                 + (f", mean heat-map share in the evidence box {index['mean_box_mass']:.2f}"
                    if index["mean_box_mass"] is not None else "")
                 + (f", ROAD faithfulness {faithfulness_text(road)}" if road else ""))
    index["dir"] = str(out_dir.resolve())
    return index


# explain's own files in a method's folder, and atomic_path's temporaries of them
_OWN_FILE = re.compile(r"\.?(?:(?:train|val|test)_\d+_gt-.+_(?:pred|top)-.+\.png|grid_(?:train|val|test)_.+\.png|maps\.npz|index\.json)"
                       r"(?:\..+\.tmp\.(?:png|npz|json))?")


def _remove_leftovers(folder, keep) -> None:
    """Remove the files of explain's own naming in `folder` that are not `keep` (the ones just
    written): what an attempt that failed or was stopped while writing left unrecorded, which
    the stage's forget (recorded files only) cannot see. Files of any other name stay."""
    kept = {os.path.realpath(path) for path in keep}
    for path in folder.iterdir():
        if path.is_file() and _OWN_FILE.fullmatch(path.name) and os.path.realpath(path) not in kept:
            path.unlink()


def _selection(split: str, indices, per_class: int, seed: int, only_errors: bool) -> str:
    """How the samples were chosen, as the options that choose them again."""
    if indices is not None:
        return f"--split {split} --indices {','.join(map(str, indices))}"
    return f"--split {split} --per-class {per_class} --seed {seed}" + (" --only-errors" if only_errors else "")


_SHOWN = {"data_md5": "data file md5 {}", "checkpoint": "{}.pt", "target": "target {}", "layer": "at {}",
          "seed": "ROAD scores of seed {}", "head_fusion": "head fusion {}",
          "discard_ratio": "discard ratio {}"}  # how a differing option is named in the refusal


def _other_maps(run: Run, method: str, split: str, chosen, selection: str, wanted: dict, names: Sequence[str],
                overwrite: bool) -> str | None:
    """The method's earlier explanation when it differs from this one (other samples than
    `chosen`, or another value of an option in `wanted`: checkpoint, target, layer,
    faithfulness, the method's own options), in words; without `overwrite` a one-line refusal
    instead. The same explanation again replaces it freely (None); an option an older index
    lacks is unknown and refuses nothing."""
    import json

    index = run.explain_index(method)
    if not index.is_file():  # no explanation, or one stopped before its index was written
        return None
    try:
        earlier = json.loads(index.read_text())
        earlier_samples = {int(sample["index"]) for sample in earlier["samples"]}
    except (OSError, ValueError, KeyError, TypeError) as exc:  # what its maps are cannot be told
        if overwrite:
            return f"maps whose {run.relative(index)} is unreadable ({type(exc).__name__})"
        raise UsageError(f"{run.relative(index)} of run {run.run_dir} is unreadable ({type(exc).__name__}), so "
                         "what its maps are cannot be compared with this explanation: pass --overwrite to "
                         "replace them") from None
    if "faithfulness" in earlier:  # the index holds the scores' summary, None without them
        earlier["faithfulness"] = earlier["faithfulness"] is not None
    held, asked = [], []
    if earlier.get("split") != split or earlier_samples != {int(i) for i in chosen}:
        what = console.plural(len(earlier_samples), f"{earlier.get('split')} sample")
        held.append(f"{what} ({earlier.get('selection') or 'options not recorded'})")
        asked.append(f"other samples ({selection})")
    for name, value in wanted.items():
        before = earlier.get(name, value)  # not in an older index: unknown, taken as the same
        if (_class_of(before, names) != _class_of(value, names)) if name == "target" else before != value:
            held.append(_shown(name, before))
            asked.append(_shown(name, value))
    if held and not overwrite:
        raise UsageError(f"{run.relative(run.explain_dir(method))} of run {run.run_dir} holds maps: "
                         f"{', '.join(held)}; this asks for {', '.join(asked)}: pass --overwrite to replace them")
    return f"maps of {', '.join(held)}" if held else None


def _shown(name: str, value) -> str:
    if name == "faithfulness":
        return "with ROAD scores" if value else "without ROAD scores"
    return _SHOWN[name].format(value)


def _class_of(target, names: Sequence[str]):
    """--target's class number, or the target itself (pred, true, or what names no class)."""
    try:
        chosen = _target_class(str(target), names)
    except UsageError:
        return target
    return target if chosen is None else chosen


@dataclass
class Explained:
    """The explained samples, row-aligned (row i of every array is the same sample)."""

    split: str
    indices: Any  # sample numbers in the split
    images: Any  # uint8 (N, H, W, C)
    labels: Any
    predictions: Any
    confidence: Any  # probability of the predicted class
    targets: Any  # the class each map explains
    maps: Any  # float32 (N, H, W) in [0, 1]
    box_mass: Any  # share of each map in the dataset's signal_box, or None
    road: Any = None  # ROAD faithfulness of each map (`road_scorer`), or None
    label_sets: Any = None  # multi-label: every sample's 0/1 labels (`labels` is the one it stands for)
    decided: Any = None  # whether each prediction is a decision (`Task.decided`; None: all are)
    constant: Any = field(init=False)  # maps with one value everywhere: they show nothing

    def __post_init__(self):
        import numpy as np

        self.constant = explainers.constant(self.maps)
        if self.road is not None:  # a constant map ranks its pixels by ROAD's tie noise alone: a random removal
            self.road = np.where(self.constant, np.nan, self.road)


def _decided(ex: Explained, row: int) -> bool:
    return ex.decided is None or bool(ex.decided[row])


def _called(ex: Explained, row: int) -> str:
    """What a file name and a grid tile call the explained class: "pred", or "top" for a
    multi-label image's most probable label when no label was found."""
    return "pred" if _decided(ex, row) else "top"


def write_figures(out_dir, caption: str, ex: Explained, names: Sequence[str],
                  note: str | None = None, class_specific: bool = True) -> tuple[list[dict], dict, list]:
    """One titled PNG per sample and one grid per true class; returns (index rows, grids,
    files). `caption`: the method (and layer) named in every title; `note`: what the data is
    when it is not the official file (`datasets.provenance`), under every figure;
    `class_specific`: whether the maps depend on the class explained (a map of another class
    than the prediction then says so)."""
    import numpy as np

    from medcli import reports

    slugs = file_names(names)
    # multi-label: a sample is named by its whole set of labels; one without any (no finding,
    # common in ChestMNIST) stands for no label and joins no per-label grid
    present = ([[int(ex.labels[row])] for row in range(len(ex.indices))] if ex.label_sets is None
               else [np.flatnonzero(labels).tolist() for labels in ex.label_sets])
    in_grids = [row for row in range(len(ex.indices)) if present[row]]
    # a map of another class than the prediction (--target) says which, in its name, title and tile
    other = [class_specific and int(ex.targets[row]) != int(ex.predictions[row]) for row in range(len(ex.indices))]
    classes = sorted(set(int(ex.labels[row]) for row in in_grids))
    flat = ex.constant.tolist()
    samples, grids, files = [], {}, []
    with console.progress() as bar:
        task = bar.add_task("figures", total=len(ex.indices) + len(classes), unit="fig")
        for row, index in enumerate(ex.indices):
            label, pred = (int(ex.labels[row]) if present[row] else None), int(ex.predictions[row])
            true_slug = "+".join(slugs[k] for k in present[row]) or "none"
            mapped = int(ex.targets[row])
            name = (f"{ex.split}_{index}_gt-{true_slug}_{_called(ex, row)}-{slugs[pred]}"
                    + (f"_map-{slugs[mapped]}" if other[row] else "") + ".png")
            true_text = "+".join(names[k] for k in present[row]) or "no finding"
            explained = tasks.explained_text(names[pred], ex.confidence[row], _decided(ex, row))
            title = (f"true {true_text} | {explained} | " + (f"map of {names[mapped]} | " if other[row] else "") + caption
                     + (f" | ROAD {ex.road[row]:.3f}" if ex.road is not None and not flat[row] else "")
                     + (f" | {explainers.CONSTANT_NOTE}" if flat[row] else ""))
            reports.save_sample_figure(out_dir / name, ex.images[row], ex.maps[row], title, note)
            files.append(out_dir / name)
            samples.append({
                "index": int(index), "label": label, "label_name": None if label is None else names[label],
                "prediction": pred,
                "prediction_name": names[pred], "confidence": round(float(ex.confidence[row]), 6),
                "decided": _decided(ex, row),
                "target": int(ex.targets[row]), "file": name,
                **({"box_mass": _finite(ex.box_mass[row])} if ex.box_mass is not None else {}),
                **({"road": _finite(ex.road[row])} if ex.road is not None else {}),
                **({"constant": True} if flat[row] else {}),
                **({"true_labels": [names[k] for k in present[row]]} if ex.label_sets is not None else {}),
            })
            bar.advance(task)
        for k in classes:
            rows = [row for row in in_grids if ex.labels[row] == k]
            grids[names[k]] = f"grid_{ex.split}_{slugs[k]}.png"
            reports.save_class_grid(out_dir / grids[names[k]], f"{caption} · {ex.split} · true class {names[k]}", [
                (ex.images[row], ex.maps[row],
                 f"#{ex.indices[row]} {_called(ex, row)} {slugs[ex.predictions[row]]}\n{ex.confidence[row]:.2f}"
                 + (f" map {slugs[ex.targets[row]]}" if other[row] else "") + (" (constant map)" if flat[row] else ""))
                for row in rows],
                note)
            files.append(out_dir / grids[names[k]])
            bar.advance(task)
    return samples, grids, files


def _check_options(method, split, per_class, indices, only_errors, layer, options: dict) -> None:
    known = explainers.METHODS
    own = known[method].options if method in known else explainers.DEFAULT_OPTIONS
    foreign = [name for name, value in explainers.DEFAULT_OPTIONS.items() if name not in own and options[name] != value]
    owners = ", ".join(name for name, other in known.items() if set(foreign) & set(other.options))
    batch_size = options["batch_size"]
    checks = [
        (not foreign, f"{', '.join('--' + name.replace('_', '-') for name in foreign)} "
                      f"{'applies' if len(foreign) == 1 else 'apply'} to {owners}; {method} has no such option"),
        (method in known, f"unknown --method '{method}'; choose one of {', '.join(known)}"),
        (split in SPLITS, f"unknown --split '{split}'; choose one of {', '.join(SPLITS)}"),
        (per_class is None or per_class >= 1, f"--per-class must be at least 1 (got {per_class})"),
        (indices is None or per_class is None, "--indices and --per-class both choose samples; pass one of them"),
        (indices is None or not only_errors, "--only-errors chooses samples itself; drop it or --indices"),
        (layer is None or method not in known or known[method].uses_layer,
         f"--layer applies to CAM methods; {method} does not explain through one layer"),
        (batch_size >= 1, f"--batch-size must be at least 1 (got {batch_size})"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)


def _target_class(target: str, names: Sequence[str]) -> int | None:
    """--target: pred, true, or one class (label) named by number or by name, case-insensitive:
    the full name as medmnist.INFO gives it, the name without its explanation ("immature
    granulocytes"), or its first part ("normal" for BreastMNIST's "normal, benign")."""
    if target in EXPLAIN_TARGETS:
        return None
    if target.isdigit() and int(target) < len(names):
        return int(target)
    brief = short_names(names, width=max(map(len, names)))  # uncut, so every listed name is accepted
    for spelling in (names, brief, [name.split(",", 1)[0] for name in brief]):
        lowered = [name.lower() for name in spelling]
        if target.lower() in lowered:
            return lowered.index(target.lower())
    raise UsageError(f"unknown --target '{target}'; choose pred (the predicted class), true, or a class of this "
                     f"dataset by number 0..{len(names) - 1} or name ({'; '.join(brief)})")


def save_maps(path, ex: Explained, dataset: dict, selection: str, target: str | None = "pred"):
    """The raw maps (float16, at the dataset image size) with what they explain, so comparisons
    and re-plots need no model: sample indices, labels, predictions, confidence, targets,
    faithfulness scores, the data file they were made on (`dataset`: its record), the options
    that chose the samples and `target`: pred, true, a class number, or None for maps that do
    not depend on the class."""
    import json

    import numpy as np

    labels = np.asarray(ex.labels, dtype=np.int64)
    if ex.label_sets is not None:  # a multi-label sample without any label stands for none: -1, as index.json's null
        labels = np.where(np.asarray(ex.label_sets).any(axis=1), labels, -1)
    arrays = {"indices": np.asarray(ex.indices, dtype=np.int64), "maps": np.asarray(ex.maps, dtype=np.float16),
              "labels": labels,
              "predictions": np.asarray(ex.predictions, dtype=np.int64),
              "confidence": np.asarray(ex.confidence, dtype=np.float32),
              "targets": np.asarray(ex.targets, dtype=np.int64),
              "meta": np.asarray(json.dumps({"split": ex.split, "flag": dataset.get("flag"), "size": dataset.get("size"),
                                              "md5": dataset.get("md5"), "selection": selection,
                                              "target": target}))}
    if ex.road is not None:
        arrays["road"] = np.asarray(ex.road, dtype=np.float32)
    if ex.decided is not None:  # a multi-label image's top label that no label reached the threshold: no decision
        arrays["decided"] = np.asarray(ex.decided, dtype=bool)
    with fileio.atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, **arrays)
    return path


def _spread(values, task, flat) -> dict | None:
    """{"metric", "mean", "std", "n", "constant"} of per-sample scores (None without scores):
    over the finite scores (n), the constant maps (`flat`, unscored) counted apart."""
    import numpy as np

    if values is None or not len(values):
        return None
    values = np.asarray(values, dtype=np.float64)
    scored = values[np.isfinite(values)]
    mean, std = (_finite(np.mean(scored)), _finite(np.std(scored))) if len(scored) else (None, None)
    return {"metric": explainers.road_name(task), "mean": mean, "std": std, "n": len(scored),
            "constant": int(np.sum(flat))}


def faithfulness_text(road: dict, plus_minus: str = "+-") -> str:
    """An explanation's faithfulness summary (index.json's) in words: mean and std over the
    scored maps, how many, and the constant ones left out (an index from before they were)."""
    left_out = road.get("constant", 0)
    spread = (f"{road['mean']:.3f} {plus_minus} {road['std']:.3f}" if road["n"] else "none (no map varies)")
    return (f"{spread} ({console.plural(road['n'], 'map')}"
            + (f"; {console.plural(left_out, 'constant map')} left out" if left_out else "") + ")")


def _finite(value) -> float | None:
    value = float(value)
    return round(value, 6) if value == value else None
