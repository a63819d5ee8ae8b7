"""`llmclf tune`: the best backbone and recipe for *this* data, chosen by cross-validation in a time budget.

Candidates are backbones (every installed packaged one, both engines, or those given) x recipes
(`Recipe`: what is trained, pooling, learning rate, epochs, n-gram blend or not). Each scratch-engine
backbone reads every text of train + validation once through its frozen layers (`FrozenFeatures`);
all its recipes and folds continue from those states, so a head-only recipe costs seconds once they
exist. A candidate is scored after every epoch by k-fold cross-validated accuracy and macro-F1 on
train + validation (scikit-learn's `StratifiedKFold`, seeded), and its epoch count is the best mean
over the folds (constant learning rate: the first E epochs of a longer run are an E-epoch run).
Transformers-engine encoders are fine-tuned per fold (`llmclf train`'s own `fit`), scored at their last
epoch. The n-gram model alone (`llmclf.ngrams`, TF-IDF logistic regression) is scored on the same
folds as a reference.

Cheap candidates run first; one whose estimated time does not fit in what is left of the budget (less
the time the winner's final training needs) is skipped and listed as such. The winner is trained as
`llmclf train` trains it (on train, best epoch by validation) and saved as a normal model directory,
`OUT/model`, with the search in its config.json under "tune". `OUT/tune.json` keeps every fold's
scores as the search goes, so an interrupted search keeps its leaderboard and `resume=True` continues it.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re
import signal
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmclf.data.classification import (
    EncodedTexts,
    LabelledTexts,
    encode_texts,
    label_order,
    resolve_template,
    template_prefix_tokens,
    template_suffix_tokens,
)
from llmclf.errors import ConfigError, DataError
from llmclf.loaders.tensors import atomic_path, atomic_write_json
from llmclf.training.state import Interrupted, TrainingInterruptedError, texts_checksum

log = logging.getLogger(__name__)

STATE_FILE = "tune.json"
LEADERBOARD_CSV = "leaderboard.csv"
LEADERBOARD_PNG = "leaderboard.png"
MODEL_DIR = "model"
NGRAM_REFERENCE = "tfidf"  # the n-gram model alone: scored as a reference, not a saved model
ENCODER_REFERENCE = "frozen+lr"  # a blend's sentence encoder alone (`llmclf.sentence_encoder`): a reference too
REFERENCE_ENGINES = ("ngrams", "sentence-encoder")  # candidates scored for comparison, never the winner
REFERENCE_RECIPES = {"ngrams": "TF-IDF logistic regression (reference, not saved)",
                     "sentence-encoder": "logistic regression on its frozen embeddings (reference, not saved)"}
# mpnet's blend is not among them: its reference embeds every text first (323 s of a 10-minute IMDB search on
# 2 CPU cores, 93 s of AG News's, which then had no room for MiniLM's blend); give it with --recipes.
DEFAULT_RECIPES = ("head:mean:1e-3:8", "head:mean:1e-3:8+tfidf", "head:mean:1e-3:8+tfidf+all-minilm-l6-v2",
                   "head:mean-blocks:1e-3:8+tfidf", "head:last:1e-3:8", "last-block:last:1e-4:4")
HF_RECIPES = ("5e-5:3",)  # the Transformers engine's own defaults: LR:EPOCHS, the whole encoder trained
HF_POOLING = "encoder"  # a Transformers-engine recipe pools as its encoder does
METRICS = ("accuracy", "macro_f1")
PROBE_TEXTS = 32  # texts timed through the frozen layers to estimate a backbone's whole pass
PROBE_GROUP = 8  # probe texts per forward pass, of similar length (as the whole pass groups them)
TRAIN_COST = 3.0  # forward + backward of a block, in forward passes (for time estimates)
HEAD_COST = 0.005  # an epoch of a head on cached states, in frozen passes (a deliberate overestimate)


# --- what is searched ----------------------------------------------------------------------------

def parse_budget(text: str | float | int) -> float:
    """Seconds of a budget such as "30m", "1h", "90s", "1h30m" or a number of seconds."""
    if isinstance(text, int | float):
        seconds = float(text)
    else:
        spec = str(text).strip().lower()
        parts = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?", spec)
        if not spec or parts is None:
            raise ConfigError(f"budget {text!r} is not a duration; write e.g. 30m, 1h, 90s or 1h30m")
        hours, minutes, secs = (float(p) if p else 0.0 for p in parts.groups())
        seconds = hours * 3600 + minutes * 60 + secs
    if not seconds > 0:
        raise ConfigError(f"budget must be positive, got {text!r}")
    return seconds


@dataclass(frozen=True)
class Recipe:
    """TRAINABLE:POOLING:LR:EPOCHS[+ENSEMBLE], e.g. `head:mean:1e-3:8+tfidf`, `last-n:2:last:1e-4:4` or
    `head:mean:1e-3:8+tfidf+all-minilm-l6-v2` (ENSEMBLE: a value of `--ensemble`)."""

    trainable: str
    pooling: str
    lr: float
    epochs: int
    ensemble: str = "none"

    @property
    def blended(self) -> bool:
        return self.ensemble != "none"

    @property
    def encoder(self) -> str | None:
        """The sentence encoder of its blend, if any."""
        from llmclf.training.args import ensemble_encoder

        return ensemble_encoder(self.ensemble)

    @classmethod
    def parse(cls, text: str, engine: str = "scratch") -> Recipe:
        """A scratch-engine recipe TRAINABLE:POOLING:LR:EPOCHS[+ENSEMBLE]; for the Transformers engine,
        LR:EPOCHS[+ENSEMBLE] (it trains the whole encoder and pools as the encoder does)."""
        from llmclf.models.heads import Trainable

        spec, _, ensemble = text.strip().partition("+")
        fields = spec.split(":")
        form = "LR:EPOCHS[+tfidf], e.g. 5e-5:3" if engine == "hf" else \
            "TRAINABLE:POOLING:LR:EPOCHS[+tfidf], e.g. head:mean:1e-3:8"
        if len(fields) < (2 if engine == "hf" else 4) or (engine == "hf" and len(fields) != 2):
            raise ConfigError(f"{engine}-engine recipe {text!r}: write {form}")
        *trainable, pooling, lr, epochs = ["all", HF_POOLING, *fields] if engine == "hf" else fields
        try:
            recipe = cls(":".join(trainable), pooling, float(lr), int(epochs), ensemble or "none")
        except ValueError:
            raise ConfigError(f"recipe {text!r}: LR must be a number and EPOCHS a whole number ({form})") from None
        if engine != "hf" and Trainable.parse(recipe.trainable).kind != "head" and recipe.pooling == "mean-blocks":
            raise ConfigError(f"recipe {text!r}: tune trains mean-blocks pooling with a head alone "
                              "(head:mean-blocks:...), whose features come from the one frozen pass; train other "
                              "layers with it by llmclf train")
        problems = _problems(recipe.options(recipe.epochs, engine), engine)
        if problems or recipe.epochs < 1:
            raise ConfigError(f"recipe {text!r}: " + "; ".join(problems or ["EPOCHS must be at least 1"]))
        return recipe

    def __str__(self) -> str:
        head = "" if self.pooling == HF_POOLING else f"{self.trainable}:{self.pooling}:"
        mantissa, exponent = f"{self.lr:e}".split("e")
        lr = f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"  # 1e-3, 5e-5
        return f"{head}{lr}:{self.epochs}" + (f"+{self.ensemble}" if self.blended else "")

    def options(self, epochs: int, engine: str = "scratch") -> dict[str, Any]:
        """The `TrainArgs` options of this recipe trained for `epochs` on `engine`."""
        options = {"lr": self.lr, "epochs": epochs, "ensemble": self.ensemble}
        return options if engine == "hf" else {"trainable": self.trainable, "pooling": self.pooling, **options}


def _problems(options: dict[str, Any], engine: str) -> list[str]:
    from llmclf.training.args import TrainArgs

    return TrainArgs.problems({**TrainArgs.defaults(engine), **options})


@dataclass(frozen=True)
class Candidate:
    """One backbone trained one way."""

    backbone: str
    engine: str  # "scratch", "hf", or a reference's: "ngrams", "sentence-encoder" (`REFERENCE_ENGINES`)
    recipe: Recipe | None  # None: a reference

    @property
    def key(self) -> str:
        if self.engine == "ngrams":
            return NGRAM_REFERENCE
        return f"{self.backbone}|{ENCODER_REFERENCE if self.recipe is None else self.recipe}"

    def train_options(self, epochs: int, seed: int) -> dict[str, Any]:
        """What `make_classifier` takes to train this candidate as `llmclf train` would."""
        assert self.recipe is not None
        return {**self.recipe.options(epochs, self.engine), "seed": seed}


def installed_backbones() -> list[str]:
    """Packaged backbones whose packages are installed: the scratch engine's GGUFs (`llmclf.families`),
    then the Transformers engine's encoders (`llmclf.engines.hf`), each smallest download first."""
    from llmclf.families import FAMILIES
    from llmclf.loaders.encoders import PACKAGED_HF_MODELS

    def installed(models: dict) -> list[str]:
        found = [(model.size or 0, name) for name, model in models.items() if model.installed()]
        return [name for _, name in sorted(found)]

    return installed({n: m for fam in FAMILIES.values() for n, m in fam.packaged.items()}) + \
        installed(PACKAGED_HF_MODELS)


def default_recipes() -> list[str]:
    """`DEFAULT_RECIPES`, less those blending a packaged sentence encoder that is not installed."""
    from llmclf.loaders.encoders import PACKAGED_HF_MODELS

    def available(text: str) -> bool:
        encoder = Recipe.parse(text).encoder
        return encoder not in PACKAGED_HF_MODELS or PACKAGED_HF_MODELS[encoder].installed()

    return [r for r in DEFAULT_RECIPES if available(r)]


def plan(backbones: Sequence[str], recipes: Sequence[str] | None = None,
         hf_recipes: Sequence[str] | None = None) -> list[Candidate]:
    """The candidates in the order they run, cheapest first: the n-gram reference, the sentence
    encoder of any recipe's blend alone (a reference too, whose embeddings its blends reuse), then every
    backbone's head-only recipes (seconds once its frozen states exist), then its recipes that train
    blocks (the fewest first), then the encoders fine-tuned whole (hf engine); backbones in the given order."""
    from llmclf.engines import choose_engine
    from llmclf.models.heads import Trainable

    def cost_class(candidate: Candidate) -> tuple[int, int]:
        if candidate.engine == "hf":
            return 2, 0
        trainable = Trainable.parse(candidate.recipe.trainable)
        return (0, 0) if trainable.kind == "head" else (1, -trainable.first_trainable_block(10**6))

    candidates = []
    for backbone in backbones:
        engine = choose_engine(backbone)
        texts = (hf_recipes or HF_RECIPES) if engine == "hf" else (recipes or default_recipes())
        candidates += [Candidate(backbone, engine, Recipe.parse(r, engine)) for r in texts]
    encoders = dict.fromkeys(c.recipe.encoder for c in candidates if c.recipe.encoder is not None)
    return [Candidate("", "ngrams", None), *(Candidate(name, "sentence-encoder", None) for name in encoders),
            *sorted(candidates, key=cost_class)]  # stable: backbone order kept


# --- scores --------------------------------------------------------------------------------------

@dataclass
class Scores:
    """One candidate's cross-validation: per fold, per epoch, accuracy and macro-F1 on the held-out fold."""

    accuracy: list[list[float]] = field(default_factory=list)  # [fold][epoch]; NaN where not scored
    macro_f1: list[list[float]] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, probs_per_epoch: Sequence[np.ndarray], gold: np.ndarray) -> None:
        from llmclf.training.metrics import classification_scores

        scored = [classification_scores(p, gold) for p in probs_per_epoch]
        self.accuracy.append([s["accuracy"] for s in scored])
        self.macro_f1.append([s["macro_f1"] for s in scored])

    def best(self, metric: str = "accuracy") -> dict[str, Any]:
        """The best epoch by the mean over folds of `metric` (ties: fewer epochs), with means and stds."""
        means = np.array(getattr(self, metric), dtype=float).mean(axis=0)  # NaN: an epoch not scored
        epoch = int(np.argmax(np.where(np.isnan(means), -np.inf, means)))  # the first (fewest epochs) of ties
        acc, f1 = np.array(self.accuracy)[:, epoch], np.array(self.macro_f1)[:, epoch]
        return {"epochs": epoch + 1, "accuracy": float(acc.mean()), "accuracy_std": float(acc.std()),
                "macro_f1": float(f1.mean()), "macro_f1_std": float(f1.std())}


# --- the frozen pass, shared by a backbone's recipes and folds ------------------------------------

class FrozenFeatures:
    """One backbone's states for `texts`, computed once up to block `n_layers - 2` (in the precision
    `llmclf train` would use); `at(k)` continues them to block k, `head_inputs(classifier)` pools them
    into what a head trained alone reads (`mean_blocks`: the pass also keeps the `mean-blocks` features,
    which need blocks from a third of the depth on). The class head is initialised as
    `fit` initialises it (seeded), so every recipe starts from the same weights. `loaded`: the
    (model, tokenizer) of `backbone_spec`, if already loaded; `defer`: compute the states later, with
    `compute()` (after `estimate_seconds()`, say). `load_seconds`: the time loading it took;
    `block_params` x `padded_tokens`: the size of its frozen pass (parameters each token multiplies by,
    token positions it computes)."""

    def __init__(self, backbone_spec: str, texts: list[str], labels: list[int], classes: list[str],
                 max_length: int | None = None, batch_size: int = 8, seed: int = 123, progress: bool = True,
                 template: str | None = "auto", device: torch.device | None = None,
                 loaded: tuple[Any, Any] | None = None, precision: str = "auto", defer: bool = False,
                 mean_blocks: bool = False) -> None:
        from llmclf.loaders.spec import chat_template_for, load_model
        from llmclf.models.heads import replace_head
        from llmclf.runtime import resolve_device, resolve_precision
        from llmclf.training.classifier import padded_tokens, state_chunk

        self.spec, self.precision, self.batch_size, self.progress = backbone_spec, precision, batch_size, progress
        self.mean_blocks = mean_blocks
        start = time.perf_counter()
        self.backbone, self.tokenizer = loaded or load_model(backbone_spec)
        self.load_seconds = time.perf_counter() - start
        self.block_params = sum(p.numel() for p in self.backbone.trf_blocks.parameters())
        self.classes, self.texts, self.labels = classes, texts, labels
        chat = chat_template_for(backbone_spec) if template == "auto" else None
        self.template = resolve_template(template, chat, classes)
        self.prefix_tokens = template_prefix_tokens(self.template, self.tokenizer)  # left out of mean poolings
        templated = [t if self.template is None else self.template.replace("{text}", t) for t in texts]
        self.max_length = min(max_length or self.backbone.context_length, self.backbone.context_length)
        self.encoded = encode_texts(templated, self.tokenizer, self.max_length, labels,
                                    keep_last=template_suffix_tokens(self.template, self.tokenizer))
        self.device = device or resolve_device(None)
        self.dtype = resolve_precision(precision, self.device)
        self.backbone.to(self.device)
        torch.manual_seed(seed)
        replace_head(self.backbone, len(classes))
        self.initial = {name: t.clone() for name, t in self.backbone.state_dict().items()}
        self.n_layers = len(self.backbone.trf_blocks)
        self.first_cached = max(self.n_layers - 2, 0)
        self.cached: dict[int, Any] = {}
        self.pooled: dict[str, Any] = {}  # pooling -> head inputs
        self.seconds = 0.0
        self.truncated = self.encoded.truncated
        self.padded_tokens = padded_tokens([len(i) for i in self.encoded.ids], state_chunk(batch_size))
        if not defer:
            self.compute()

    def _batches(self, encoded: EncodedTexts, progress: bool):
        from llmclf.models.heads import SequenceClassifier
        from llmclf.training.classifier import Batches

        classifier = SequenceClassifier(self.backbone, "mean-blocks" if self.mean_blocks else "last",
                                        self.prefix_tokens)
        return Batches(classifier, encoded, self.batch_size, self.tokenizer.pad_id, None, self.device, self.dtype,
                       cache_from=self.first_cached, progress=progress, name=f"({self.spec})",
                       keep_features=self.mean_blocks)

    def estimate_seconds(self, sample: int = PROBE_TEXTS) -> float:
        """Seconds `compute()` will take, from the same pass over `sample` texts spread evenly over the
        lengths, after a warm-up, scaled by the padded token count. They run `PROBE_GROUP` at a time, each
        group of similar lengths, as the whole pass groups them: one chunk of mixed lengths would pad to
        the longest and cost several times its share of the pass."""
        from llmclf.training.classifier import padded_tokens

        ids = sorted(self.encoded.ids, key=len)
        picked = [ids[i] for i in np.linspace(0, len(ids) - 1, min(sample, len(ids))).round().astype(int)]
        self._batches(EncodedTexts(picked[:2], None, 0), progress=False)  # warm-up: weight copies, allocations
        start = time.perf_counter()
        for begin in range(0, len(picked), PROBE_GROUP):
            self._batches(EncodedTexts(picked[begin:begin + PROBE_GROUP], None, 0), progress=False)
        seconds = time.perf_counter() - start
        return seconds * self.padded_tokens / max(padded_tokens([len(i) for i in picked], PROBE_GROUP), 1)

    def compute(self) -> None:
        """The states of every text up to block `n_layers - 2` (once)."""
        if self.first_cached not in self.cached:
            start = time.perf_counter()
            self.cached[self.first_cached] = self._batches(self.encoded, self.progress)
            self.seconds = time.perf_counter() - start

    @torch.no_grad()
    def at(self, block: int):
        """The states after block `block` (continued from the deepest cached ones before it)."""
        if block not in self.cached:
            source = self.cached[max(b for b in self.cached if b <= block)]
            out = copy.copy(source)
            out.states = self._continued(source, lambda x, mask: self.backbone.run_blocks(
                x, self.backbone.attention_inputs(mask, x.shape[1]), start=source.cache_from, stop=block))
            out.cache_from = block
            self.cached[block] = out
        return self.cached[block]

    def head_inputs(self, classifier: Any):
        """What `classifier`'s head reads when trained alone, one vector per text (pooled once per pooling)."""
        if classifier.pooling not in self.pooled:
            if classifier.pooling == "mean-blocks":
                if not self.mean_blocks:
                    raise ValueError("mean-blocks features were not kept (FrozenFeatures(mean_blocks=True))")
                self.pooled[classifier.pooling] = self.cached[self.first_cached].as_features()
            else:
                source = self.at(self.n_layers)
                out = copy.copy(source)
                out.states = self._continued(source, lambda x, mask: classifier.features(x, mask, None,
                                                                                         self.n_layers)[:, None])
                out.lengths, out.cache_from = [1] * len(out.states), classifier.features_start
                self.pooled[classifier.pooling] = out
        return self.pooled[classifier.pooling]

    @torch.no_grad()
    def _continued(self, source: Any, compute: Any) -> list[torch.Tensor]:
        """`compute(x, mask)` on the cached states of `source`, 32 texts at a time (longest first): each
        text's rows of the result."""
        from llmclf.runtime import autocast

        states: list[torch.Tensor] = [torch.empty(0)] * len(source.states)
        order = sorted(range(len(states)), key=lambda i: -source.lengths[i])
        for begin in range(0, len(order), 32):
            idx = order[begin:begin + 32]
            x, mask, _ = source.make(idx)
            with autocast(source.device, self.dtype):
                x = compute(x, mask)
            for row, i in enumerate(idx):
                states[i] = x[row, : source.lengths[i]].clone()
        return states

    def probabilities_per_epoch(self, recipe: Recipe, train_idx: list[int], val_idx: list[int],
                                watch_idx: list[int], seed: int) -> list[np.ndarray]:
        """Train `recipe` on `train_idx` (validation `val_idx`) from the seeded initial weights; the class
        probabilities of `watch_idx` after every epoch."""
        from llmclf.models.heads import SequenceClassifier, Trainable, apply_trainable
        from llmclf.training.args import TrainArgs
        from llmclf.training.classifier import ClassifierTraining, iter_logits

        trainable = Trainable.parse(recipe.trainable)
        self.backbone.load_state_dict(self.initial)
        classifier = SequenceClassifier(self.backbone, recipe.pooling, self.prefix_tokens)
        apply_trainable(classifier, trainable)
        start = classifier.cache_point(trainable.first_trainable_block(self.n_layers))
        batches = self.head_inputs(classifier) if start == classifier.features_start else self.at(start)
        watch = batches.subset(watch_idx, bucket=False)
        watched: list[np.ndarray] = []

        def probabilities() -> np.ndarray:
            return torch.cat([torch.softmax(logits, -1) for logits, _ in iter_logits(classifier, watch)]).numpy()

        class Recording(ClassifierTraining):
            def _evaluate(self) -> bool:
                stop = super()._evaluate()
                watched.append(probabilities())
                return stop

        args = TrainArgs.for_engine("scratch", **recipe.options(recipe.epochs), seed=seed, log_every=10**9,
                                    eval_iter=1, precision=self.precision)
        Recording(classifier, batches.subset(train_idx, bucket=args.bucket), batches.subset(val_idx, bucket=False),
                  args, progress=False, say=lambda _: None).run()
        return watched


# --- cross-validation ----------------------------------------------------------------------------

def fold_indices(labels: list[int], folds: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """(training part, held-out fold) positions of `StratifiedKFold(folds, shuffle=True, random_state=seed)`."""
    from sklearn.model_selection import StratifiedKFold

    splitter = StratifiedKFold(folds, shuffle=True, random_state=seed)
    return [(a.tolist(), b.tolist()) for a, b in splitter.split(np.zeros(len(labels)), labels)]


def _inner_split(train_idx: list[int], labels: list[int], seed: int) -> tuple[list[int], list[int]]:
    """80 / 20 of a fold's training part, stratified: where the blend weights of an ensemble are fitted
    (as `llmclf train` fits them on its validation set)."""
    from sklearn.model_selection import train_test_split

    inner_train, inner_val = train_test_split(train_idx, test_size=0.2, random_state=seed,
                                              stratify=[labels[i] for i in train_idx])
    return list(inner_train), list(inner_val)


def cross_validate_cached(features: FrozenFeatures, recipe: Recipe, folds: list[tuple[list[int], list[int]]],
                          seed: int, embeddings: np.ndarray | None = None, blend: str | None = None) -> Scores:
    """`recipe` on `features`, k-fold: held-out scores after every epoch. An ensemble's head and its
    members (the n-gram model, and the regression on the texts' sentence-encoder `embeddings` if the
    recipe blends one) train on 80 % of each fold's training part and the weights are fitted on the
    other 20 %, as `llmclf train` fits them on the validation set, when the rule (`blend`, default:
    `train`'s `--blend`) is log; with mean (equal weights) they train on the whole training part."""
    from llmclf.ngrams import NgramModel, fit_blend_weights
    from llmclf.sentence_encoder import SentenceEncoderModel
    from llmclf.training.args import TrainArgs

    scores, labels, n_classes = Scores(), features.labels, len(features.classes)
    rule = blend or TrainArgs.defaults("scratch")["blend"]
    if recipe.encoder is not None and embeddings is None:
        raise ValueError(f"recipe {recipe} blends {recipe.encoder}: give the texts' embeddings")
    for train_idx, held_idx in folds:
        gold = np.array([labels[i] for i in held_idx])
        if not recipe.blended:
            scores.add(features.probabilities_per_epoch(recipe, train_idx, held_idx, held_idx, seed), gold)
            continue
        if rule == "log":
            inner_train, inner_val = _inner_split(train_idx, labels, seed)
            watched = features.probabilities_per_epoch(recipe, inner_train, inner_val, inner_val + held_idx, seed)
        else:  # nothing to fit on held-out texts: the head and the members train on the fold's whole training part
            inner_train, inner_val = train_idx, []
            watched = features.probabilities_per_epoch(recipe, train_idx, held_idx, held_idx, seed)
        texts = lambda idx: [features.texts[i] for i in idx]  # noqa: E731
        y_inner = np.array([labels[i] for i in inner_train])
        ngrams = NgramModel.fit(texts(inner_train), y_inner.tolist(), n_classes)
        ngrams.rule = rule
        members = [ngrams.scores(texts(inner_val + held_idx))]
        if recipe.encoder is not None:
            encoder = SentenceEncoderModel.fit(recipe.encoder, embeddings[inner_train], y_inner, n_classes, seed)
            members.append(encoder.scores_of(embeddings[inner_val + held_idx]))
        y_val, n_val = [labels[i] for i in inner_val], len(inner_val)
        blended = []
        for probs in watched:  # the weights are fitted again for every epoch's language model
            parts = [np.log(np.clip(probs, 1e-12, 1.0)), *members]
            if rule == "log":
                ngrams.weights = fit_blend_weights([p[:n_val] for p in parts], y_val).astype(np.float32)
            else:
                ngrams.weights = np.ones(len(parts), dtype=np.float32)
            blended.append(ngrams.combine(probs[n_val:], *(m[n_val:] for m in members)))
        scores.add(blended, gold)
    return scores


def cross_validate_encoder(embeddings: np.ndarray, labels: list[int], n_classes: int,
                           folds: list[tuple[list[int], list[int]]], name: str, seed: int) -> Scores:
    """A blend's sentence encoder alone (the regression on its frozen `embeddings`) on the same folds."""
    from llmclf.sentence_encoder import SentenceEncoderModel

    scores, y = Scores(), np.asarray(labels)
    for train_idx, held_idx in folds:
        model = SentenceEncoderModel.fit(name, embeddings[train_idx], y[train_idx], n_classes, seed)
        scores.add([np.exp(model.scores_of(embeddings[held_idx]))], y[held_idx])
    return scores


def cross_validate_fit(candidate: Candidate, pool: LabelledTexts, folds: list[tuple[list[int], list[int]]],
                       seed: int, precision: str = "auto") -> Scores:
    """A candidate trained per fold by `fit` itself (the Transformers engine), scored at its last epoch."""
    from llmclf.classifier import make_classifier

    scores, start = Scores(), time.perf_counter()
    assert candidate.recipe is not None
    for train_idx, held_idx in folds:
        part = lambda idx: LabelledTexts([pool.texts[i] for i in idx], [pool.labels[i] for i in idx],  # noqa: E731
                                         pool.source)
        train, held = part(train_idx), part(held_idx)
        clf = make_classifier(candidate.backbone, candidate.engine, precision=precision,
                              **candidate.train_options(candidate.recipe.epochs, seed))
        clf.fit(train, held, progress=False)
        gold = np.array([clf.classes_.index(label) for label in held.labels])
        scores.add([clf.predict_proba(held.texts)], gold)
        scores.accuracy[-1] = [math.nan] * (candidate.recipe.epochs - 1) + scores.accuracy[-1]
        scores.macro_f1[-1] = [math.nan] * (candidate.recipe.epochs - 1) + scores.macro_f1[-1]
    scores.seconds = time.perf_counter() - start
    return scores


def cross_validate_ngrams(texts: list[str], labels: list[int], n_classes: int,
                          folds: list[tuple[list[int], list[int]]]) -> Scores:
    """The n-gram model alone (TF-IDF logistic regression, `llmclf.ngrams`) on the same folds."""
    from llmclf.ngrams import NgramModel

    scores = Scores()
    for train_idx, held_idx in folds:
        model = NgramModel.fit([texts[i] for i in train_idx], [labels[i] for i in train_idx], n_classes)
        scores.add([np.exp(model.scores([texts[i] for i in held_idx]))], np.array([labels[i] for i in held_idx]))
    return scores


def _embedded(name: str, embeddings: dict[str, np.ndarray], pool: LabelledTexts, progress: bool,
              budget_left: _Budget) -> np.ndarray:
    """The pool's embeddings by sentence encoder `name`, computed once (timed into `budget_left`)."""
    from llmclf.sentence_encoder import sentence_embeddings

    if name not in embeddings:
        begin = time.perf_counter()
        embeddings[name] = sentence_embeddings(name, pool.texts, progress=progress)
        budget_left.encoder_pass[name] = time.perf_counter() - begin
    return embeddings[name]


# --- the leaderboard ----------------------------------------------------------------------------

def _fingerprint(train: LabelledTexts, val: LabelledTexts) -> dict[str, str]:
    """The checksums of the data, as a training run's fingerprint has them (`texts_checksum`)."""
    return {"train": texts_checksum(train.texts, train.labels), "validation": texts_checksum(val.texts, val.labels)}


@dataclass
class TuneResult:
    """What `tune` found: the leaderboard (best first), what the budget skipped, and the winner."""

    leaderboard: list[dict[str, Any]]
    skipped: list[dict[str, Any]]
    winner: dict[str, Any] | None
    out_dir: Path
    classifier: Any = None  # the winner, trained on train (a BaseClassifier), when one was trained
    test_metrics: dict[str, Any] | None = None


class Search:
    """The state of one search in `out_dir/tune.json`: settings, data fingerprint, scores per candidate."""

    def __init__(self, out_dir: Path, settings: dict[str, Any], resume: bool) -> None:
        self.out_dir, self.path = out_dir, out_dir / STATE_FILE
        self.settings = settings
        self.results: dict[str, dict[str, Any]] = {}
        self.skipped: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            try:
                saved = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ConfigError(f"{self.path} is unreadable ({exc}); delete it to start the search over") from exc
            if not resume:
                raise ConfigError(f"{out_dir} holds a search already ({self.path}); continue it with --resume, or "
                                  "give another --out")
            changed = [k for k in ("fingerprint", "folds", "seed", "metric", "max_length", "precision")
                       if saved.get("settings", {}).get(k) != settings[k]]
            if changed:
                raise ConfigError(f"--resume: the search in {out_dir} used another {', '.join(changed)} (the "
                                  "fingerprint is the data's); give the same, or another --out")
            self.results = saved.get("results", {})
        elif resume:
            raise ConfigError(f"nothing to resume in {out_dir}: no {STATE_FILE}; start the search without --resume")

    def record(self, candidate: Candidate, scores: Scores, seconds: float, order: int) -> None:
        """`order`: the candidate's place in the plan, which breaks ties (cheaper first)."""
        self.results[candidate.key] = {"backbone": candidate.backbone, "engine": candidate.engine, "order": order,
                                       "recipe": str(candidate.recipe) if candidate.recipe else "",
                                       "scores": asdict(scores), "seconds": seconds}
        self.skipped.pop(candidate.key, None)
        self.save()

    def skip(self, candidate: Candidate, reason: str, short_by: float | None = None) -> None:
        """List `candidate` as skipped for `reason`; `short_by`: the seconds the budget lacked for it."""
        self.skipped[candidate.key] = {"backbone": candidate.backbone, "engine": candidate.engine,
                                       "recipe": str(candidate.recipe), "reason": reason,
                                       **({} if short_by is None else {"short_by_s": round(short_by, 1)})}
        self.save()

    def save(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path, {"settings": self.settings, "results": self.results,
                                      "skipped": list(self.skipped.values())})
        rows = self.leaderboard()
        _write_csv(self.out_dir / LEADERBOARD_CSV, rows, list(self.skipped.values()))
        if rows:
            plot_leaderboard(rows, self.out_dir / LEADERBOARD_PNG, self.settings["metric"], self.settings["folds"])

    def leaderboard(self) -> list[dict[str, Any]]:
        """One row per scored candidate at its best epoch, best first by the metric's mean (ties: the
        smaller std, then the one planned first, i.e. the cheaper: never the time, so the same seed
        gives the same order)."""
        metric = self.settings["metric"]
        rows = []
        for key, result in self.results.items():
            best = Scores(**result["scores"]).best(metric)
            rows.append({"candidate": key, "backbone": result["backbone"] or "-", "engine": result["engine"],
                         "recipe": result["recipe"] or REFERENCE_RECIPES[result["engine"]],
                         **best, "seconds": round(result["seconds"], 1), "order": result["order"]})
        rows.sort(key=lambda r: (-r[metric], r[f"{metric}_std"], r.pop("order")))
        for rank, row in enumerate(rows, start=1):
            row["rank"] = rank
        return rows


def _write_csv(path: Path, rows: list[dict[str, Any]], skipped: list[dict[str, Any]]) -> None:
    import csv

    columns = ["rank", "candidate", "backbone", "engine", "recipe", "epochs", "accuracy", "accuracy_std",
               "macro_f1", "macro_f1_std", "seconds", "status"]
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, **{k: f"{row[k]:.4f}" for k in columns[6:10]}, "status": "scored"})
        for row in skipped:
            writer.writerow({"candidate": f"{row['backbone']}|{row['recipe']}", "backbone": row["backbone"],
                             "engine": row["engine"], "recipe": row["recipe"], "status": f"skipped: {row['reason']}"})


def plot_leaderboard(rows: list[dict[str, Any]], path: Path, metric: str, folds: int) -> Path:
    """Horizontal bars: mean `metric` +- std over the folds per candidate, best at the top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = rows[:30]
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.35 * len(shown)))
    y = np.arange(len(shown))[::-1]
    values = [r[metric] * 100 for r in shown]
    colors = ["tab:gray" if r["engine"] in REFERENCE_ENGINES else "tab:blue" for r in shown]
    ax.barh(y, values, xerr=[r[f"{metric}_std"] * 100 for r in shown], color=colors, capsize=3)
    short = lambda key: re.sub(r"(?:[\w.~-]*/)+", "", key)  # noqa: E731 (paths by their last part)
    ax.set_yticks(y, [f"{short(r['candidate'])} x{r['epochs']} ({r['seconds']:.0f} s)" for r in shown], fontsize=8)
    low = min(v - r[f"{metric}_std"] * 100 for v, r in zip(values, shown, strict=True))
    ax.set_xlim(max(0.0, low - 2), 100)
    ax.set_xlabel(f"{metric.replace('_', '-')} (%), mean +- std over {folds} folds")
    ax.set_title("llmclf tune: cross-validated leaderboard (gray: references, never the winner)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path


# --- the search ----------------------------------------------------------------------------------

@dataclass
class _PassSpeed:
    """How fast the last backbone timed ran its frozen pass: seconds per block parameter per padded
    token, which sizes the next backbone's pass before it is loaded or timed."""

    spec: str
    seconds_per_unit: float
    padded_tokens: int  # its pass's (another backbone's tokenizer counts about as many)

    @classmethod
    def of(cls, features: FrozenFeatures, seconds: float) -> _PassSpeed:
        return cls(features.spec, seconds / max(features.block_params * features.padded_tokens, 1),
                   features.padded_tokens)

    def seconds(self, block_params: int, padded_tokens: int | None = None) -> float:
        return self.seconds_per_unit * block_params * (padded_tokens or self.padded_tokens)


class _Budget:
    """Wall time left, and the estimates that decide whether a candidate still fits."""

    def __init__(self, seconds: float, test_share: float = 0.0) -> None:
        self.start, self.seconds = time.perf_counter(), seconds
        self.test_share = test_share  # the test set's length against train + validation's (the winner scores it)
        # scored candidate -> seconds training it as the winner would take (`_winner_seconds`)
        self.reserve: dict[str, float] = {}
        self.speed: _PassSpeed | None = None  # of the last backbone timed
        self.passes: dict[str, float] = {}  # backbone -> seconds its frozen pass took (when it comes back)
        self.ngram_fit = 0.0  # seconds of one n-gram model fit, from the reference's folds (a blend fits several)
        self.encoder_fit: dict[str, float] = {}  # encoder -> seconds of one fit of its regression (its reference's)
        self.encoder_pass: dict[str, float] = {}  # encoder -> seconds embedding train + validation

    def blend_fit(self, recipe: Recipe | None) -> float:
        """Seconds fitting a recipe's blend members once (0 without a blend)."""
        if recipe is None or not recipe.blended:
            return 0.0
        return self.ngram_fit + (self.encoder_fit.get(recipe.encoder, 0.0) if recipe.encoder else 0.0)

    def blend_pass(self, recipe: Recipe | None) -> float:
        """Seconds embedding train + validation with a recipe's sentence encoder (0 without one)."""
        return self.encoder_pass.get(recipe.encoder, 0.0) if recipe is not None and recipe.encoder else 0.0

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)

    def fits(self, seconds: float, winner_seconds: float) -> bool:
        """Whether `seconds` of work on a candidate fit, keeping enough for the winner's training: the
        longest of this candidate's (`winner_seconds`) and those of the candidates already scored."""
        return self.short_by(seconds, winner_seconds) <= 0

    def short_by(self, seconds: float, winner_seconds: float) -> float:
        """How many seconds of budget `fits` lacks (<= 0: it fits)."""
        return seconds + max([winner_seconds, *self.reserve.values()]) - self.left()

    def why_not(self, seconds: float, winner_seconds: float) -> str:
        kept = max([winner_seconds, *self.reserve.values()])
        return (f"needs about {seconds:.0f} s and {kept:.0f} s kept for training the winner, "
                f"{max(self.left(), 0):.0f} s of the budget left")


def _recipe_seconds(recipe: Recipe, frozen_seconds: float, n_layers: int) -> tuple[float, float]:
    """(Seconds to continue the cached states to the recipe's first trainable block; seconds of one
    epoch over all the texts: the trainable blocks forward and backward, and the head, `HEAD_COST` of
    a frozen pass), from the frozen pass's `frozen_seconds` (blocks :n_layers - 2)."""
    from llmclf.models.heads import Trainable

    first = Trainable.parse(recipe.trainable).first_trainable_block(n_layers)
    per_block = frozen_seconds / max(n_layers - 2, 1)
    continued = max(first - (n_layers - 2), 0) * per_block
    return continued, (n_layers - first) * per_block * TRAIN_COST + HEAD_COST * frozen_seconds


def _estimate(candidate: Candidate, frozen_seconds: float, n_layers: int, folds: int, blend_fit: float = 0.0) -> float:
    """Seconds a scratch candidate's cross-validation needs once its backbone's states exist: every
    epoch of every fold over the fold's training part, after continuing the states once; a blend fits
    its members per fold (`blend_fit` seconds each time: `_Budget.blend_fit`)."""
    assert candidate.recipe is not None
    continued, epoch = _recipe_seconds(candidate.recipe, frozen_seconds, n_layers)
    return continued + (folds - 1) * candidate.recipe.epochs * epoch + (folds * blend_fit if candidate.recipe.blended
                                                                         else 0.0)


def _winner_seconds(candidate: Candidate, frozen_seconds: float, n_layers: int, test_share: float,
                    load_seconds: float = 0.0, blend_fit: float = 0.0, blend_pass: float = 0.0) -> float:
    """Seconds training a scratch candidate as the winner takes (`_train_winner`): loading the backbone
    again, `fit`'s own frozen pass over train + validation, the recipe's epochs, once more per
    out-of-fold refit of the blend (`ensemble_folds` with `--blend log`, for a head trained alone), the blend's members
    fitted once and per out-of-fold refit (`blend_fit` seconds each), and the test set's pass; a
    sentence encoder's embedding of train + validation (`blend_pass`) and of the test set too."""
    from llmclf.training.args import TrainArgs

    assert candidate.recipe is not None
    continued, epoch = _recipe_seconds(candidate.recipe, frozen_seconds, n_layers)
    defaults = TrainArgs.defaults(candidate.engine)
    folds = defaults["ensemble_folds"] if defaults["blend"] == "log" else 0  # --blend mean fits no weights
    refits = folds if candidate.recipe.blended and candidate.recipe.trainable == "head" else 0
    members = (1 + folds) * blend_fit if candidate.recipe.blended else 0.0
    training = (1 + refits) * candidate.recipe.epochs * epoch
    return load_seconds + (frozen_seconds + blend_pass) * (1 + test_share) + continued + training + members


def _train_winner(winner: dict[str, Any], search: Search, train: LabelledTexts, val: LabelledTexts,
                  test: LabelledTexts | None, out_dir: Path, max_length: int | None, seed: int,
                  progress: bool, precision: str) -> tuple[Any, dict[str, Any] | None]:
    """The winner trained as `llmclf train` trains it, saved in `out_dir/model` with the search in its config.json."""
    from llmclf.classifier import make_classifier
    from llmclf.engines.base import TEST_METRICS_FILE, evaluation_report
    from llmclf.loaders.checkpoint import CONFIG_FILE

    result = search.results[winner["candidate"]]
    candidate = Candidate(result["backbone"], result["engine"], Recipe.parse(result["recipe"], result["engine"]))
    options = {**candidate.train_options(winner["epochs"], seed), "precision": precision}
    if max_length:
        options["max_length"] = max_length
    model_dir = out_dir / MODEL_DIR
    log.info("training the winner %s for %d epoch(s) into %s", candidate.key, winner["epochs"], model_dir)
    clf = make_classifier(candidate.backbone, candidate.engine, **options)
    clf.fit(train, val, out_dir=model_dir, progress=progress)
    record = {"winner": winner["candidate"], "epochs": winner["epochs"], "metric": search.settings["metric"],
              "cv": {k: winner[k] for k in ("accuracy", "accuracy_std", "macro_f1", "macro_f1_std")},
              "folds": search.settings["folds"], "seed": seed, "budget_seconds": search.settings["budget_seconds"],
              "leaderboard": [{k: r[k] for k in ("rank", "candidate", "epochs", "accuracy", "accuracy_std",
                                                 "macro_f1", "macro_f1_std", "seconds")}
                              for r in search.leaderboard()],
              "skipped": list(search.skipped.values())}
    config_path = model_dir / CONFIG_FILE
    config = json.loads(config_path.read_text(encoding="utf-8"))
    atomic_write_json(config_path, {**config, "tune": record})
    clf.config_ = {**getattr(clf, "config_", {}), "tune": record}
    test_metrics = None
    if test is not None:
        test_metrics = evaluation_report(clf, test, plots_dir=model_dir)
        atomic_write_json(model_dir / TEST_METRICS_FILE, test_metrics)
    return clf, test_metrics


def tune(train: LabelledTexts, val: LabelledTexts, out_dir: str | Path, budget: str | float = "30m",
         backbones: Sequence[str] | None = None, recipes: Sequence[str] | None = None,
         hf_recipes: Sequence[str] | None = None, folds: int = 5,
         seed: int = 123, metric: str = "accuracy", max_length: int | None = None, test: LabelledTexts | None = None,
         resume: bool = False, progress: bool = True, train_winner: bool = True,
         precision: str = "auto", reference: bool = True) -> TuneResult:
    """Search backbones x recipes by k-fold cross-validation on `train` + `val` within `budget`, then
    train the winner as `llmclf train` does (on `train`, best epoch by `val`) into `out_dir/model`.

    Args:
        budget: wall time for the whole search, the winner's training (and `test` score) included ("30m", "1h",
            seconds).
        backbones: model specs; default: every installed packaged backbone (`installed_backbones()`).
        recipes: the scratch engine's, TRAINABLE:POOLING:LR:EPOCHS[+ENSEMBLE]; default `DEFAULT_RECIPES`
            (those whose sentence encoder is installed).
        hf_recipes: the Transformers engine's, LR:EPOCHS[+tfidf] (the whole encoder is trained);
            default `HF_RECIPES`.
        folds, seed: `StratifiedKFold(folds, shuffle=True, random_state=seed)`; the seed also seeds training.
        metric: accuracy or macro_f1, what ranks the candidates (both are reported).
        max_length: tokens per text (default: the longest training text, as `train` does).
        test: scored once by the winner, at the end.
        resume: continue the search in `out_dir` (its scored candidates are kept, not run again).
        train_winner: False to stop after the leaderboard.
        precision: auto | float32 | bfloat16, as `llmclf train --precision`.
        reference: also score the n-gram model alone (TF-IDF logistic regression) on the same folds.
    """
    from tqdm.auto import tqdm

    if train.label_sep or val.label_sep:
        raise ConfigError(f"{train.source} is multi-label (several labels per text); tune takes one label per text: "
                          "train with llmclf train --label-sep instead")
    if metric not in METRICS:
        raise ConfigError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if folds < 2:
        raise ConfigError(f"folds must be at least 2, got {folds}")
    classes = label_order(train.labels)
    if len(classes) < 2:
        raise DataError(f"{train.source}: training data has a single label {classes}; need 2 or more")
    unseen = sorted(set(val.labels) - set(classes))
    if unseen:
        raise DataError(f"{val.source}: labels {unseen} do not occur in the training data")
    pool = LabelledTexts(train.texts + val.texts, train.labels + val.labels, f"{train.source} + {val.source}")
    test_share = sum(map(len, test.texts)) / max(sum(map(len, pool.texts)), 1) if test is not None else 0.0
    budget_left = _Budget(parse_budget(budget), test_share)
    label_ids = [classes.index(label) for label in pool.labels]
    rarest = min(range(len(classes)), key=label_ids.count)
    if label_ids.count(rarest) < folds:
        raise DataError(f"{pool.source}: label {classes[rarest]!r} has {label_ids.count(rarest)} example(s) in train "
                        f"+ validation, fewer than the {folds} folds; lower --folds")
    backbones = list(backbones) if backbones else installed_backbones()
    if not backbones:
        raise ConfigError("no packaged backbone is installed (`make setup` installs them); or give --backbones")
    candidates = plan(backbones, recipes, hf_recipes)[0 if reference else 1:]
    out_dir = Path(out_dir)
    settings = {"fingerprint": _fingerprint(train, val), "folds": folds, "seed": seed, "metric": metric,
                "max_length": max_length, "precision": precision, "budget_seconds": budget_left.seconds,
                "classes": classes, "n_train": len(train), "n_validation": len(val)}
    search = Search(out_dir, settings, resume)
    fold_index = fold_indices(label_ids, folds, seed)
    if NGRAM_REFERENCE in search.results:  # scored before this --resume
        budget_left.ngram_fit = search.results[NGRAM_REFERENCE]["seconds"] / folds
    for result in search.results.values():  # the encoders' references too (their pass counted in: an overestimate)
        if result["engine"] == "sentence-encoder":
            budget_left.encoder_fit[result["backbone"]] = result["seconds"] / folds
    bar = tqdm(total=len(candidates), desc="tune", unit="candidate", disable=not progress, dynamic_ncols=True)
    features: FrozenFeatures | None = None
    embeddings: dict[str, np.ndarray] = {}  # sentence encoder -> the pool's embeddings (its blends reuse them)
    try:
        for order, candidate in enumerate(candidates):
            if candidate.key in search.results or candidate.key in search.skipped:
                bar.update(1)
                continue
            begin = time.perf_counter()
            if candidate.engine == "ngrams":
                scores = cross_validate_ngrams(pool.texts, label_ids, len(classes), fold_index)
                budget_left.ngram_fit = (time.perf_counter() - begin) / folds
            elif candidate.engine == "sentence-encoder":
                embedded = _embedded(candidate.backbone, embeddings, pool, progress, budget_left)
                scores = cross_validate_encoder(embedded, label_ids, len(classes), fold_index, candidate.backbone, seed)
                budget_left.encoder_fit[candidate.backbone] = \
                    (time.perf_counter() - begin - budget_left.encoder_pass[candidate.backbone]) / folds
            elif candidate.engine == "hf":
                scores = _hf_candidate(candidate, pool, fold_index, seed, search, budget_left, precision)
            else:
                if features is None or features.spec != candidate.backbone:
                    features = None  # the previous backbone's states go before the next one's are made
                    features = _scratch_features(candidate, candidates, pool, label_ids, classes, max_length,
                                                 folds, seed, progress, search, budget_left, precision)
                    begin = time.perf_counter() - (features.seconds if features else 0.0)  # charged to its 1st recipe
                scores = None
                if features is not None:
                    recipe = candidate.recipe
                    estimate = _estimate(candidate, features.seconds, features.n_layers, folds,
                                         budget_left.blend_fit(recipe))
                    winner = _winner_seconds(candidate, features.seconds, features.n_layers, test_share,
                                             features.load_seconds, budget_left.blend_fit(recipe),
                                             budget_left.blend_pass(recipe))
                    if budget_left.fits(estimate, winner):
                        embedded = None if recipe.encoder is None else \
                            _embedded(recipe.encoder, embeddings, pool, progress, budget_left)
                        scores = cross_validate_cached(features, recipe, fold_index, seed, embedded)
                        budget_left.reserve[candidate.key] = winner
                    else:
                        search.skip(candidate, budget_left.why_not(estimate, winner),
                                    budget_left.short_by(estimate, winner))
            if scores is not None:
                search.record(candidate, scores, time.perf_counter() - begin, order)
                leader = search.leaderboard()[0]
                bar.set_postfix_str(f"best {leader['candidate']} {leader[metric] * 100:.2f}%, "
                                    f"{max(budget_left.left(), 0) / 60:.1f} min left")
            bar.update(1)
    except (KeyboardInterrupt, Interrupted) as exc:
        bar.close()
        search.save()
        signum = getattr(exc, "signum", signal.SIGINT)
        raise TrainingInterruptedError(f"the search stopped by {signal.Signals(signum).name}; its leaderboard so far "
                                       f"({len(search.results)} candidate(s)) is in {out_dir / LEADERBOARD_CSV}",
                                       signum) from None
    bar.close()
    features = None
    rows = search.leaderboard()
    selectable = [r for r in rows if r["engine"] not in REFERENCE_ENGINES]
    result = TuneResult(rows, list(search.skipped.values()), selectable[0] if selectable else None, out_dir)
    if result.winner is None:
        raise ConfigError(f"no language-model candidate fitted in the budget of {budget} (see "
                          f"{out_dir / LEADERBOARD_CSV}); {_larger_budget(search.skipped.values(), budget_left)}")
    if train_winner:
        result.classifier, result.test_metrics = _train_winner(result.winner, search, train, val, test, out_dir,
                                                               max_length, seed, progress, precision)
    return result


def _larger_budget(skipped: Iterable[dict[str, Any]], budget: _Budget) -> str:
    """What to do when nothing fitted: the smallest budget that would have fitted a skipped candidate, as
    estimated when it was skipped, or the generic advice."""
    short = [s for s in skipped if s.get("short_by_s") is not None and s["engine"] not in REFERENCE_ENGINES]
    if not short:
        return "give a larger --budget or smaller --backbones"
    first = min(short, key=lambda s: s["short_by_s"])
    minutes = math.ceil((budget.seconds + first["short_by_s"]) / 60)
    return (f"--budget {minutes}m would fit {first['backbone']} {first['recipe']} by the estimates (`--resume` "
            f"keeps what was scored), or give smaller --backbones")


def _scratch_features(candidate: Candidate, candidates: list[Candidate], pool: LabelledTexts, label_ids: list[int],
                      classes: list[str], max_length: int | None, folds: int, seed: int, progress: bool,
                      search: Search, budget_left: _Budget, precision: str) -> FrozenFeatures | None:
    """The frozen states of the candidate's backbone, if its frozen pass and cheapest recipe fit the
    budget; else None, with every recipe of that backbone skipped. The pass is sized three times, each
    before spending more on it: from the last backbone timed (`budget_left.speed`) scaled by block
    parameters, before loading it (packaged backbones, whose size is known); the same, with its own
    token count, before timing it; then from its own timing (`FrozenFeatures.estimate_seconds`). A
    backbone back for its trainable-block recipes is sized by its pass as measured the first time."""
    from llmclf.families import packaged

    def skipped(how: str, frozen: float, features: FrozenFeatures | None) -> bool:
        """Whether the backbone does not fit (its recipes are then skipped) with a frozen pass of `frozen` s."""
        if features is None:  # not loaded yet: its own pass, and that pass again for the winner
            what, needed, winner = "its frozen pass", frozen, frozen * (1 + budget_left.test_share)
        else:
            what, needed = "its frozen pass and first recipe", frozen + _estimate(
                candidate, frozen, features.n_layers, folds, budget_left.blend_fit(candidate.recipe))
            winner = _winner_seconds(candidate, frozen, features.n_layers, budget_left.test_share,
                                     features.load_seconds, budget_left.blend_fit(candidate.recipe),
                                     budget_left.blend_pass(candidate.recipe))
        if budget_left.fits(needed, winner):
            return False
        for other in candidates:  # its recipes not yet scored or skipped (for their own reasons)
            if other.backbone == candidate.backbone and other.key not in (*search.results, *search.skipped):
                search.skip(other, f"{what}, {how}, {budget_left.why_not(needed, winner)}",
                            budget_left.short_by(needed, winner))
        return True

    speed, known = budget_left.speed, packaged(candidate.backbone)
    measured = budget_left.passes.get(candidate.backbone)  # back for its trainable-block recipes
    if measured is not None and skipped("as measured before", measured, None):
        return None
    if measured is None and speed is not None and known and known[1].block_params and skipped(
            f"sized from {speed.spec}'s speed without loading it", speed.seconds(known[1].block_params), None):
        return None
    mean_blocks = any(c.backbone == candidate.backbone and c.recipe is not None and c.recipe.pooling == "mean-blocks"
                      for c in candidates)
    features = FrozenFeatures(candidate.backbone, pool.texts, label_ids, classes, max_length, seed=seed,
                              progress=progress, precision=precision, defer=True, mean_blocks=mean_blocks)
    if measured is None:
        if speed is not None and skipped(f"sized from {speed.spec}'s speed before timing it",
                                         speed.seconds(features.block_params, features.padded_tokens), features):
            return None
        frozen = features.estimate_seconds()
        budget_left.speed = _PassSpeed.of(features, frozen)
        if skipped(f"timed on {min(PROBE_TEXTS, len(pool))} texts", frozen, features):
            return None
    elif skipped("as measured before", measured, features):
        return None
    features.compute()
    budget_left.speed = _PassSpeed.of(features, features.seconds)
    budget_left.passes[candidate.backbone] = features.seconds
    return features


def _hf_candidate(candidate: Candidate, pool: LabelledTexts, fold_index: list[tuple[list[int], list[int]]],
                  seed: int, search: Search, budget_left: _Budget, precision: str) -> Scores | None:
    """A Transformers-engine candidate, if its folds fit: estimated from the encoder's forward pass on a
    few texts (x 3 for the backward pass, x epochs, over each fold's training part), then from its first
    fold once that is done."""
    from transformers import AutoModel, AutoTokenizer

    from llmclf.loaders.encoders import resolve_hf_model

    assert candidate.recipe is not None
    source = resolve_hf_model(candidate.backbone)
    model, tokenizer = AutoModel.from_pretrained(source).eval(), AutoTokenizer.from_pretrained(source)
    limit = tokenizer.model_max_length if tokenizer.model_max_length < 10**6 else 512
    tokens = sum(len(ids) for ids in tokenizer(pool.texts, truncation=True, max_length=limit)["input_ids"])
    picked = [pool.texts[i] for i in np.linspace(0, len(pool) - 1, min(PROBE_TEXTS, len(pool))).round().astype(int)]
    with torch.no_grad():
        model(**tokenizer(picked[:2], truncation=True, max_length=limit, padding=True, return_tensors="pt"))
        batch = tokenizer(picked, truncation=True, max_length=limit, padding=True, return_tensors="pt")
        start = time.perf_counter()
        model(**batch)
        per_token = (time.perf_counter() - start) / max(int(batch["attention_mask"].sum()), 1)
    del model
    per_fold = tokens * per_token * (
        TRAIN_COST * candidate.recipe.epochs * (len(fold_index) - 1) / len(fold_index) + 1.0 / len(fold_index))
    test_pass = tokens * per_token * budget_left.test_share
    # trained as the winner: about one fold's training, and the test set's pass
    needed, winner = per_fold * len(fold_index), per_fold + test_pass
    if not budget_left.fits(needed, winner):
        search.skip(candidate, f"{len(fold_index)} folds {budget_left.why_not(needed, winner)}")
        return None
    first = cross_validate_fit(candidate, pool, fold_index[:1], seed, precision)
    estimate = first.seconds * (len(fold_index) - 1)
    if not budget_left.fits(estimate, first.seconds + test_pass):
        search.skip(candidate, f"its first fold took {first.seconds:.0f} s; the other {len(fold_index) - 1} "
                               f"{budget_left.why_not(estimate, first.seconds + test_pass)}")
        return None
    rest = cross_validate_fit(candidate, pool, fold_index[1:], seed, precision)
    budget_left.reserve[candidate.key] = first.seconds + test_pass
    return Scores(first.accuracy + rest.accuracy, first.macro_f1 + rest.macro_f1, first.seconds + rest.seconds)
