"""The one prediction path: photos (bytes, files, folders, a manifest) -> the predictions table.

`predict` is the one prediction function: a loaded counter (counters.BinCounter or counters.Ensemble), image bytes
and how it answers (counters.Settings) -> THE predictions table, one row per image in their order: `count` (Int64), `confidence`
(Float64), `review` (boolean), `p_<c>` per count (Float64), all null where the image could not be read or
decoded, and `error` (string, null where it was). The served model (and through it the Spark scorer), evaluate,
ensemble, `bincounter predict` and `bincounter reconcile` all call it. The front ends here put what names each
photo in front: `predict_files` (`image`: files, found in folders by `find_images`), `predict_bins` (`image_id`,
`path`: the photos of an inventory check) and `predict_manifest` (`image_id`: a manifest's rows).

How a model answers is said explicitly, in a counters.Settings, never set on a loaded model: test-time
augmentation, the temperature on or off, the mix of counts the answers are moved to, the decision rule and the
images per forward pass. What it leaves open (None) is the model's own, as logged; an ensemble passes them to
every member.
"""
from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from bincounter.counters import BaseCounter, Settings
from bincounter.layouts import PHOTO_SUFFIXES

READ_CHUNK = 256  # files read per model call: bounds memory for large folders


def predict(counter: BaseCounter, images: list[bytes], names: list[str] | None = None,
            settings: Settings | None = None) -> pd.DataFrame:
    """Image bytes (and a name for each, for the messages) -> THE predictions table (module docstring). A bad
    image gets its error and nulls; it never stops the others. `settings`: counters.Settings (None: as the served
    model answers, the model's own way in forward passes of counters.MAX_BATCH)."""
    settings = counter.settings(settings)
    probs, errors = counter.probabilities(images, names, settings)
    table = counter.table(probs, settings)
    bad = pd.Series([e is not None for e in errors], index=table.index)
    table["count"] = table["count"].astype("Int64").mask(bad)
    table["review"] = table["review"].astype("boolean").mask(bad)
    for c in ["confidence", *[c for c in table.columns if c.startswith("p_")]]:
        table[c] = table[c].astype("Float64").mask(bad)
    table["error"] = pd.array(errors, dtype="string")
    return table


# A predictor: (image bytes, names) -> (count, confidence, p_<c>... per image; an error or None per image).
# local_predictor's runs `predict`; deploy.endpoint_predictor's asks a SageMaker endpoint.
Predictor = Callable[[list[bytes], list[str]], tuple[pd.DataFrame, list]]


def local_predictor(counter: BaseCounter, settings: Settings | None = None) -> Predictor:
    """A loaded counter and how it answers -> a Predictor running `predict` (a target mix the model cannot take
    is refused here, before any photo is read)."""
    settings = counter.settings(settings)

    def run(images: list[bytes], names: list[str]):
        table = predict(counter, images, names, settings)
        return table.drop(columns="error"), [None if pd.isna(e) else e for e in table["error"]]
    return run


def find_images(paths: list[str | Path]) -> list[Path]:
    """Files as given (whatever their name) and the images (.jpg/.jpeg/.png, in any case) under folders, sorted."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in PHOTO_SUFFIXES)
        else:
            out.append(p)  # a missing file becomes an error row, not a crash
    return out


def read_file(path: str | Path) -> tuple[bytes, str | None]:
    """A photo's file -> (its bytes, None), or (b"", why it cannot be read, naming it)."""
    try:
        return Path(path).read_bytes(), None
    except OSError as e:
        return b"", f"{path}: cannot read ({e.strerror or e})"


def predict_files(paths: list[str | Path], predictor: Predictor, names: list[str] | None = None, workers: int = 1,
                  progress: str | None = None) -> pd.DataFrame:
    """Image files -> one row each, in their order: `image` (the path), then the predictions table's columns
    (count empty where `error`). `names` (default: the paths) name the photos in the model's messages; files
    are read by `workers` threads, READ_CHUNK per model call; `progress`: a progress bar with this label."""
    paths = [str(p) for p in paths]
    names = paths if names is None else [str(n) for n in names]
    tables = []
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for start in tqdm(range(0, len(paths), READ_CHUNK), desc=progress, disable=progress is None, mininterval=5):
            part = paths[start:start + READ_CHUNK]
            data, read_errors = zip(*pool.map(read_file, part))
            table, errors = predictor(list(data), names[start:start + READ_CHUNK])
            table = table.reset_index(drop=True).drop(columns="error", errors="ignore")  # `errors` says it
            first = ["count", "confidence"]
            table = table.reindex(columns=[*first, *[c for c in table.columns if c not in first]])
            table.insert(0, "image", part)
            table["error"] = pd.array([r or e for r, e in zip(read_errors, errors)], dtype="string")
            table["count"] = table["count"].astype("Float64").astype("Int64").mask(table["error"].notna())
            tables.append(table)
    if not tables:
        return pd.DataFrame(columns=["image", "count", "confidence", "error"])
    return pd.concat(tables, ignore_index=True)


def predict_bins(paths: list[Path], wanted, predictor: Predictor) -> pd.DataFrame:
    """Photos named `<image_id>.<ext>` -> one row per bin, sorted by id: image_id, path, and for the ids in
    `wanted` the predictions (predict_files; the others' left empty: the model sees only the bins asked about).
    ValueError naming both files when two photos are of one bin."""
    by_id: dict[str, Path] = {}
    for p in paths:
        if p.stem in by_id:
            raise ValueError(f"two photos of bin {p.stem}: {by_id[p.stem]} and {p}")
        by_id[p.stem] = p
    asked = [i for i in sorted(by_id) if i in wanted]
    preds = predict_files([by_id[i] for i in asked], predictor).rename(columns={"image": "path"})
    preds.insert(0, "image_id", asked)
    others = pd.DataFrame({"image_id": [i for i in sorted(by_id) if i not in wanted]})
    others["path"] = [str(by_id[i]) for i in others["image_id"]]
    return pd.concat([preds, others], ignore_index=True)


def predict_manifest(counter: BaseCounter, df: pd.DataFrame, settings: Settings | None = None,
                     workers: int = 1) -> pd.DataFrame:
    """Manifest rows (image_id, path) -> image_id and the predictions table, one row per manifest row in its
    order (the photos named by image_id in the messages; `workers` threads read the files)."""
    preds = predict_files(df["path"], local_predictor(counter, settings), names=df["image_id"].tolist(),
                          workers=workers, progress="predict")
    preds.insert(0, "image_id", df["image_id"].to_numpy())
    return preds.drop(columns="image")
