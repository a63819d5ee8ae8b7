"""`TrainArgs`: every option of classifier training, defined once.

Each field carries its type, its default (per engine where the engines' conventions differ), its
help text and its validation. The estimators (`TextClassifier`, `HFClassifier`) take these as
keyword arguments (scikit-learn style), `llmclf train` builds its options from them, the saved
`config.json` lists them under "training", and `--resume` compares the ones that change a
result. Adding an option means adding a field here (and using it in the engine loop).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llmclf import long_text
from llmclf.errors import ConfigError
from llmclf.long_text import AGGREGATES
from llmclf.models.heads import POOLINGS, Trainable
from llmclf.ngrams import BLEND_RULES
from llmclf.runtime import PRECISIONS, auto_precision_note
from llmclf.tracking import REPORT_TO
from llmclf.training.calibration import CALIBRATIONS, threshold_problem

ENGINES = ("scratch", "hf")
LR_SCHEDULES = ("constant", "linear", "cosine")
SELECT_BY = ("accuracy", "macro-f1", "loss")
ENCODER_BLEND = "tfidf+"  # --ensemble tfidf+ENCODER: the n-grams and a sentence encoder's regression


def ensemble_encoder(ensemble: str) -> str | None:
    """The sentence encoder of `--ensemble tfidf+ENCODER` (a packaged name, a directory or a Hub id), or None."""
    return ensemble[len(ENCODER_BLEND):] if ensemble.startswith(ENCODER_BLEND) else None


def _ensemble(value: Any) -> str | None:
    if value in ("none", "tfidf") or (isinstance(value, str) and ensemble_encoder(value)):
        return None
    return f"must be none, tfidf or tfidf+ENCODER (e.g. tfidf+all-minilm-l6-v2), got {value!r}"

# Named sets of option values (`--recipe NAME`); options given explicitly win over a recipe's.
# The defaults themselves are the cross-validated winner (README, "Which backbone and recipe").
RECIPES: dict[str, dict[str, Any]] = {
    # The course's chapter 6: last block + final norm + head on the last token, the text as it is,
    # AdamW (weight decay 0.1) at a constant 5e-5 for 5 epochs, batches of 8.
    "course": {"trainable": "last-block", "pooling": "last", "template": None, "epochs": 5, "lr": 5e-5,
               "weight_decay": 0.1, "lr_schedule": "constant", "warmup": 0.0, "max_grad_norm": 0.0,
               "batch_size": 8, "ensemble": "none"},
}


def option(default: Any, help: str, *, hf: Any = dataclasses.MISSING, engines: tuple[str, ...] = ENGINES,
           check: Any = None, flag: str | None = None, affects_result: bool = True, metavar: str | None = None,
           from_cli: Any = None, saved_before: Any = dataclasses.MISSING):
    """A `TrainArgs` field: `default` (the scratch engine's, and `hf`'s unless `hf=` says otherwise),
    `help` for `--help`, the engines it applies to, a `check(value) -> problem | None`, the CLI
    flag (default `--field-name`), whether changing it changes the trained model (for `--resume`),
    `from_cli(text)`, a conversion of the command-line value, and `saved_before`: the value that models
    saved before the option existed were trained with (when it is not `default`)."""
    meta = {"help": help, "engines": engines, "check": check, "flag": flag, "affects_result": affects_result,
            "defaults": {"scratch": default, "hf": default if hf is dataclasses.MISSING else hf},
            "metavar": metavar, "from_cli": from_cli, "saved_before": saved_before}
    return field(default=default, metadata=meta)


def _at_least(n: int | float, optional: bool = False):
    def check(value: Any) -> str | None:
        if value is None and optional:
            return None
        if value is None or value < n:
            return f"must be >= {n}, got {value}"
        return None
    return check


def _one_of(choices: tuple[str, ...]):
    def check(value: Any) -> str | None:
        return None if value in choices else f"must be one of {', '.join(choices)}, got {value!r}"
    return check


def _folds(value: int) -> str | None:
    return None if value == 0 or value >= 2 else f"must be 0 (fit on the validation set only) or >= 2, got {value}"


def _warmup(value: float) -> str | None:
    return None if 0.0 <= value < 1.0 else f"is a share of the optimizer steps in [0, 1), got {value}"


def _template(value: str | None) -> str | None:
    from llmclf.data.classification import template_problem

    return template_problem(value)


def _trainable(value: str) -> str | None:
    try:
        Trainable.parse(value)
    except ConfigError as exc:
        return str(exc)
    return None


def parse_class_weights(spec: str, n_classes: int | None = None) -> str | list[float] | None:
    """`none` -> None, `balanced` -> "balanced", `W1,W2,...` -> floats (all > 0; `n_classes` of them
    when given). Raises ConfigError on a malformed spec."""
    if spec in ("none", "balanced"):
        return None if spec == "none" else spec
    try:
        weights = [float(w) for w in spec.split(",")]
    except ValueError:
        raise ConfigError(f"class weights must be none, balanced or comma-separated numbers W1,W2,...; "
                          f"got {spec!r}") from None
    if any(not math.isfinite(w) or w <= 0 for w in weights):
        raise ConfigError(f"class weights must all be positive numbers, got {spec!r}")
    if n_classes is not None and len(weights) != n_classes:
        raise ConfigError(f"{len(weights)} class weight(s) given ({spec}) for {n_classes} classes; "
                          "give one per class, in the order of the labels (sorted)")
    return weights


def _parses(parse: Callable[[Any], Any]):
    """A check that runs `parse` on the value: its ConfigError's message, or None."""
    def check(value: Any) -> str | None:
        try:
            parse(value)
        except ConfigError as exc:
            return str(exc)
        return None
    return check


@dataclass
class TrainArgs:
    """Options of `llmclf train` / `TextClassifier` / `HFClassifier` (the defaults are the scratch
    engine's; `TrainArgs.for_engine("hf")` gives the hf engine's)."""

    # --- data and length
    epochs: int = option(7, "Passes over the training data.", hf=3, check=_at_least(1))
    batch_size: int = option(8, "Texts per batch (per optimizer step with --grad-accum 1).", check=_at_least(1))
    eval_batch_size: int | None = option(
        None, "Texts per batch when evaluating (default: --batch-size).",
        check=_at_least(1, optional=True), affects_result=False)
    max_length: int | None = option(
        None, "Tokens per text (default: the longest training text, capped at the model's limit).",
        check=_at_least(1, optional=True))
    template: str | None = option(
        "auto", "What the model reads per text, {text} marking the text and {labels} the class names; \\n is a "
        "newline on the command line. auto: 'Classify the following text as one of: {labels}.' in the "
        "backbone's chat format (README). Saved with the model.", hf=None, check=_template,
        from_cli=lambda text: text.replace("\\n", "\n"))
    label_sep: str | None = option(
        None, "Multi-label: each label-column value is a text's labels joined by SEP (e.g. ','); a JSON-lines label "
        "that is a list is multi-label without it. One sigmoid per label (binary cross-entropy; --class-weights gives "
        "each label's pos_weight) and a threshold per label tuned on the validation set (F1), saved with the model; "
        "--ensemble, --calibration and --tune-threshold are then off (README, Multi-label).",
        check=lambda v: None if v is None or v.strip() else "must be a non-blank separator such as ','",
        metavar="SEP")
    long_text: str = option(
        "truncate", "Texts longer than the model reads: truncate (cut to --max-length) | chunk[:LEN[:STRIDE]]: "
        "classify every window of LEN tokens (template included; default --max-length, else 512) overlapping by "
        "STRIDE tokens (default a quarter of a window's text) and aggregate them (--aggregate); in training every "
        "window is an example labelled with its text's label. Saved with the model (docs/training.md).",
        check=_parses(long_text.parse), metavar="MODE")
    aggregate: str = option(
        "mean", "With --long-text chunk, how a text's window scores (log-probabilities) combine: mean | max | "
        "logsumexp (= the mean of the windows' probabilities). Saved with the model.", check=_one_of(AGGREGATES))
    # --- optimizer and schedule
    lr: float = option(1e-3, "Peak AdamW learning rate (1e-3 suits the default head-only training; the course "
                       "fine-tunes a block at 5e-5).", hf=5e-5, check=_at_least(0.0))
    lr_schedule: str = option(
        "constant", "Learning rate after warmup: constant (the course's) | linear decay to 0 | cosine decay to 0 "
        "(Trainer's default is linear).", hf="linear", check=_one_of(LR_SCHEDULES))
    warmup: float = option(0.0, "Share of the optimizer steps over which the learning rate rises linearly "
                           "from 0 (0.1 = 10 %).", check=_warmup, metavar="RATIO")
    weight_decay: float = option(
        0.1, "AdamW weight decay, applied to weight matrices only: biases, norm weights and embeddings are "
        "never decayed (as nanoGPT and Trainer do).", hf=0.0,
        check=_at_least(0.0))
    max_grad_norm: float = option(
        0.0, "Clip gradients to this global L2 norm; 0 = no clipping (the course's).", hf=1.0,
        check=_at_least(0.0), metavar="N")
    grad_accum: int = option(1, "Batches per optimizer step (gradient accumulation).", check=_at_least(1))
    class_weights: str = option(
        "none", "Weighted cross-entropy for imbalanced data: none | balanced (n / (classes x count), "
        "scikit-learn's) | W1,W2,... (one per label, labels in sorted order).", check=_parses(parse_class_weights))
    ensemble: str = option(
        "tfidf+all-minilm-l6-v2",
        "none | tfidf | tfidf+ENCODER. tfidf: combine the language model with a logistic regression on TF-IDF word "
        "1-2-grams and character 2-5-grams, fitted on the training texts (saved beside the model as "
        "ngrams.safetensors). tfidf+ENCODER adds a logistic regression on a frozen sentence encoder's embeddings "
        "(all-minilm-l6-v2, all-mpnet-base-v2, a directory or a Hub id; encoder.safetensors), which holds "
        "better on text unlike the training set's. The members are combined after training by --blend.",
        hf="none", check=_ensemble)
    blend: str = option(
        "log", "With --ensemble, how the members' class probabilities are combined: log (weights on their "
        "log-probabilities, fitted by log-loss on held-out predictions: --ensemble-folds) | mean (their "
        "probabilities averaged with equal weights, scikit-learn's soft voting: nothing fitted, no out-of-fold "
        "refits).", check=_one_of(BLEND_RULES), saved_before="log")
    ensemble_folds: int = option(
        5, "With --ensemble and --blend log: fit the blend weights on out-of-fold predictions of the training set (K "
        "stratified folds; the head and the blend's members are refit on the rest of each) plus the validation set, "
        "pulled toward equal weights. Needs a head trained alone on cached features (the default recipe); "
        "otherwise, and with 0, the weights are fitted on the validation set only (with the same pull).",
        check=_folds, metavar="K")
    # --- calibration and decisions (fitted on the validation set after training)
    calibration: str = option(
        "temperature", "temperature: rescale the whole classifier's probabilities (after any blend) by one "
        "temperature fitted on the validation set (log-loss), saved with the model; it never changes the most "
        "probable label | none.", check=_one_of(CALIBRATIONS))
    tune_threshold: str | None = option(
        None, "Binary only: choose the decision threshold on the positive class's (calibrated) probability on the "
        "validation set for f1 | precision@R (the highest recall with precision >= R) | recall@P (the highest "
        "precision with recall >= P); saved with the model and used by predict, evaluate and serve "
        "(default: the most probable label).", check=threshold_problem, metavar="METRIC")
    positive_label: str | None = option(
        None, "The positive class of --tune-threshold (default: the second label in sorted order, as "
        "scikit-learn's classes_[1]).", metavar="LABEL")
    # --- evaluation, model selection, checkpoints
    select_by: str = option(
        "accuracy", "Validation metric that picks the best evaluation, whose weights are kept: accuracy | "
        "macro-f1 | loss; ties go to the lower validation loss.",
        hf="macro-f1", check=_one_of(SELECT_BY))
    eval_freq: int | None = option(
        None, "Evaluate on the whole validation set every N optimizer steps, each one a candidate for "
        "--select-by (default: after every epoch only).", check=_at_least(1, optional=True))
    patience: int | None = option(
        None, "Early stopping: stop after N evaluations in a row without a better --select-by score "
        "(default: train all epochs).", check=_at_least(1, optional=True))
    log_every: int = option(
        50, "Log the training loss every N optimizer steps (scratch: the course's train/validation loss "
        "estimate on --eval-iter batches).", hf=10, check=_at_least(1),
        affects_result=False)
    eval_iter: int = option(5, "Batches per loss estimate in the log lines (the course's eval_iter).",
                            engines=("scratch",), check=_at_least(1), affects_result=False)
    save_every: int | None = option(
        None, "Also write the training state every N optimizer steps (it is always written after every "
        "epoch), for --resume.", check=_at_least(1, optional=True), affects_result=False)
    report_to: str = option(
        "none", "Also send the options, the model's size, every logged metric and the final metrics to: none | "
        "tensorboard (event files in OUT/runs) | mlflow (a file store in OUT/mlruns); one run per output "
        "directory, continued by --resume. Needs pip install 'llmclf[tracking]'.",
        check=_one_of(REPORT_TO), affects_result=False)
    seed: int = option(123, "Random seed (head init, data order, dropout): the book's 123, Trainer's 42.", hf=42)
    # --- model (scratch engine)
    trainable: str = option(
        "head", "What trains: head | last-block (last block + final norm + head) | last-n:N | all | "
        "lora[:rank[:alpha]].", engines=("scratch",), check=_trainable)
    pooling: str = option("mean", "Which states feed the head: last (last real token) | mean (of the real tokens) | "
                          "mean-blocks (that mean of every block from a third of the depth on, averaged) | "
                          "last-position (the course's fixed-length padding).", engines=("scratch",),
                          check=_one_of(POOLINGS))
    pool_template: bool = option(
        False, "Mean poolings: also average the tokens the template puts before the text. Off: they are left out "
        "(a causal model's states there cannot depend on the text, so they would only dilute it, most in short "
        "texts); the template's tokens after the text, which read it, are averaged.", engines=("scratch",),
        flag="--pool-template/--no-pool-template", saved_before=True)
    head_bias: bool = option(
        True, "Give the class head a bias, as the book's. Without one (--no-head-bias) the head is Transformers' "
        "`score` layer, so that `llmclf export --format hf` is exact for every family (a bias is folded "
        "exactly only into GPT-2's final LayerNorm).", engines=("scratch",))
    bucket: bool = option(False, "Batch texts of similar length together (less padding).", engines=("scratch",))
    cache_frozen: bool = option(
        True, "Run the frozen layers once per text and cache their output (exact when they have no dropout).",
        engines=("scratch",), flag="--cache/--no-cache")
    # --- where it runs
    precision: str = option("auto", "auto = bfloat16 where the hardware runs it fast (a CPU with AMX or "
                            f"AVX512-BF16, a bf16 GPU), else float32; {auto_precision_note()}.",
                            check=_one_of(PRECISIONS))
    device: str | None = option(None, "cpu, cuda, cuda:1 ... (default: CUDA if present, else CPU).",
                                affects_result=False)

    def __post_init__(self) -> None:
        self.validate()

    # --- one definition, read many ways ----------------------------------------------------

    @classmethod
    def names(cls, engine: str | None = None) -> list[str]:
        """Field names (those that apply to `engine`, if given), in definition order."""
        return [f.name for f in dataclasses.fields(cls) if engine is None or engine in f.metadata["engines"]]

    @classmethod
    def saved_before(cls, engine: str) -> dict[str, Any]:
        """Options added since the first saved models, with the values those models were trained with."""
        return {f.name: f.metadata["saved_before"] for f in dataclasses.fields(cls)
                if engine in f.metadata["engines"] and f.metadata["saved_before"] is not dataclasses.MISSING}

    @classmethod
    def defaults(cls, engine: str) -> dict[str, Any]:
        """Default of every option that applies to `engine`."""
        return {f.name: f.metadata["defaults"][engine] for f in dataclasses.fields(cls)
                if engine in f.metadata["engines"]}

    @classmethod
    def for_engine(cls, engine: str, **values: Any) -> TrainArgs:
        """The engine's defaults, overridden by `values`; every problem is reported at once."""
        if engine not in ENGINES:
            raise ConfigError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
        cls.check_names(engine, values)
        merged = {**cls.defaults(engine), **values}
        problems = cls.problems(merged)
        if problems:
            raise ConfigError("; ".join(problems))
        return cls(**merged)

    @classmethod
    def recipe(cls, name: str, engine: str, given: dict[str, Any] | None = None) -> dict[str, Any]:
        """The option values of recipe `name` for `engine`, overridden by those `given`."""
        if name not in RECIPES:
            raise ConfigError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}")
        foreign = [cls.flag(n) for n in RECIPES[name] if n not in cls.names(engine)]
        if foreign:
            raise ConfigError(f"recipe {name!r} sets {', '.join(foreign)}, which the {engine} engine does not take; "
                              "use it with a decoder on the scratch engine")
        return {**RECIPES[name], **(given or {})}

    @classmethod
    def check_names(cls, engine: str, names: Any) -> None:
        """ConfigError for names that are no option, or no option of `engine`."""
        unknown = sorted(set(names) - set(cls.names()))
        if unknown:
            raise ConfigError(f"unknown training option(s) {', '.join(unknown)}; known: {', '.join(cls.names())}")
        foreign = [n for n in names if n not in cls.names(engine)]
        if foreign:
            raise ConfigError(f"{', '.join(cls.flag(n) for n in foreign)} do(es) not apply to the {engine} engine")

    @classmethod
    def meta(cls, name: str) -> dict[str, Any]:
        return {f.name: f.metadata for f in dataclasses.fields(cls)}[name]

    @classmethod
    def flag(cls, name: str) -> str:
        """The CLI flag of option `name` (its positive form)."""
        flag = cls.meta(name)["flag"]
        return flag.split("/")[0] if flag else "--" + name.replace("_", "-")

    @classmethod
    def problems(cls, values: dict[str, Any]) -> list[str]:
        """Every problem with these option values, as `--flag: what is wrong` lines."""
        out = []
        for f in dataclasses.fields(cls):
            if f.name in values and f.metadata["check"] is not None:
                problem = f.metadata["check"](values[f.name])
                if problem:
                    out.append(f"{cls.flag(f.name)} {problem}")
        return out

    @classmethod
    def help(cls, name: str) -> str:
        """`--help` text of option `name`: its help, the engines it applies to, its default(s)."""
        meta = cls.meta(name)
        defaults, engines = meta["defaults"], meta["engines"]
        text = meta["help"]
        if engines != ENGINES:
            text += f" ({' and '.join(engines)} engine only)"
        if defaults["scratch"] is None or isinstance(defaults["scratch"], bool):
            return text
        if defaults["scratch"] == defaults["hf"] or engines != ENGINES:
            return f"{text} [default: {defaults['scratch']}]"
        return f"{text} [default: {defaults['scratch']} scratch, {defaults['hf'] or 'none'} hf]"

    @classmethod
    def docs(cls, engine: str) -> str:
        """The options of `engine` as an `Args:`-style docstring section."""
        lines = [f"\n    Training options ({engine} engine; `llmclf train --help` shows the same):"]
        for f in dataclasses.fields(cls):
            if engine in f.metadata["engines"]:
                lines.append(f"        {f.name} = {f.metadata['defaults'][engine]!r}: {f.metadata['help']}")
        return "\n".join(lines) + "\n"

    def validate(self) -> None:
        problems = self.problems(dataclasses.asdict(self))
        if problems:
            raise ConfigError("; ".join(problems))

    def to_dict(self, engine: str | None = None) -> dict[str, Any]:
        """The options (those of `engine`, if given) as a JSON-ready dict (saved in config.json)."""
        values = dataclasses.asdict(self)
        return {n: values[n] for n in self.names(engine)}

    def result_options(self, engine: str) -> dict[str, Any]:
        """The options of `engine` that change the trained model (`--resume` requires them unchanged)."""
        return {n: v for n, v in self.to_dict(engine).items() if self.meta(n)["affects_result"]}
