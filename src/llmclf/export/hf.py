"""`llmclf export --format hf`: a trained classifier as a plain Hugging Face Transformers directory.

The directory loads without llmclf: `AutoModelForSequenceClassification.from_pretrained(DIR)`,
`AutoTokenizer.from_pretrained(DIR)` and `pipeline("text-classification", model=DIR)`. It holds
config.json (Transformers' classifier class, `id2label`/`label2id`, and an `llmclf` entry with the
template, max_length, backbone and labels), model.safetensors, tokenizer.json + tokenizer_config.json
and README.md, a model card that says how to put texts into the template.

From-scratch models (any registered family) are written through the family registry: the config by
`Family.config_to_hf`, the weights renamed by `Family.rename_to_hf`, the class head as `score.weight`,
the class from `Family.hf_classifiers`. Transformers' decoder classifiers pool the last token that is
not padding, which is llmclf's `last` pooling when `pad_token_id` is the id llmclf pads with; their
`score` layer has no bias, so a head bias is folded into the final norm's bias where the family has
one (`Family.final_norm_bias`, GPT-2's LayerNorm) and refused where it has none (RMSNorm). The
tokenizer becomes tokenizer.json with a post-processor that adds what llmclf adds (BOS or nothing).
Transformers-engine models are written with `save_pretrained`. Either way the export is checked:
the directory, read back by Transformers, must give llmclf's probabilities within `MAX_ABS_DIFF`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from llmclf.data.classification import TEXT_FIELD, template_suffix_tokens
from llmclf.errors import ConfigError
from llmclf.export import MAX_ABS_DIFF
from llmclf.families import family_of
from llmclf.loaders.tensors import atomic_save_safetensors, atomic_write_json

log = logging.getLogger(__name__)

BIAS_FOLD_RTOL = 1e-6  # |W·δ - b| / |b| that a head bias folded into the final norm may leave
# Texts the export is checked on, one by one and as one padded batch (whitespace runs, digits and
# accents test the tokenizer; the long one, the truncation).
CHECK_TEXTS = ("ok", "Free entry! Win a prize now, text WIN to 80082.", "See you at the station at six,  then dinner?",
               "  Hey,\n\njust checking?? 123 é ü", "a " * 40 + "long text, cut when the model's max_length is short")
# The texts the model card's snippet classifies.
EXAMPLE_TEXTS = ("Free entry! Win a prize now, text WIN to 80082.", "See you at the station at six, then dinner?")


def export_hf(clf: Any, out_dir: Path, model_path: str | os.PathLike | None = None) -> None:
    """Write the trained classifier `clf` (either engine, float32 on the CPU) into the existing empty
    directory `out_dir` as a Transformers sequence classifier with its tokenizer and model card,
    and check it against `clf`. `model_path` is where the directory will be used from, the path
    the card's snippets load (default: `out_dir`).

    A classifier Transformers cannot reproduce (mean or last-position pooling, a TF-IDF ensemble, a
    head bias on a family without a final-norm bias) is a ConfigError saying what to do instead."""
    check_exportable(clf)
    out_dir = Path(out_dir)
    if clf.engine == "hf":
        architecture, keep_last = _write_transformers_model(clf, out_dir), 0
    else:
        architecture = _write_scratch_model(clf, out_dir)
        keep_last = min(template_suffix_tokens(clf.template_, clf.tokenizer_), clf.max_length_ // 2)
        _write_tokenizer(clf.tokenizer_, out_dir, clf.max_length_)
    _amend_json(out_dir / "config.json", {
        "id2label": dict(enumerate(clf.classes_)), "label2id": {label: i for i, label in enumerate(clf.classes_)},
        **({"problem_type": "multi_label_classification"} if clf.label_thresholds is not None else {}),
        "llmclf": {"template": clf.template_, "max_length": clf.max_length_, "backbone": _backbone(clf),
                   "labels": list(clf.classes_), "keep_last_tokens": keep_last, **clf.fitted_config()}})
    if clf.decision is not None:
        log.warning("Transformers' pipeline labels each text with its most probable class; the model's decision "
                    "threshold (%s when p(%s) >= %.4f) is in config.json (llmclf.decision_threshold) and the model "
                    "card, for you to apply", clf.classes_[clf.decision.positive], clf.classes_[clf.decision.positive],
                    clf.decision.threshold)
    (out_dir / "README.md").write_text(
        model_card(clf, architecture, keep_last, str(Path(model_path or out_dir).resolve())), encoding="utf-8")
    max_diff = check_export(clf, out_dir, keep_last)
    log.info("exported %s as %s; Transformers gives llmclf's probabilities within %.1e", _backbone(clf),
             architecture, max_diff)


def check_exportable(clf: Any) -> None:
    """A ConfigError (what, why, what to do) when Transformers cannot compute what `clf` computes."""
    if getattr(clf, "ngrams_", None) is not None:
        raise ConfigError("this classifier is a TF-IDF ensemble (a language model combined with an n-gram model), "
                          "which a Transformers directory cannot hold; use --format onnx, which keeps it, or train "
                          "with --ensemble none")
    if clf.engine == "hf":
        return
    pooling = clf.model_.pooling
    if pooling != "last":
        raise ConfigError(f"this classifier reads its texts with --pooling {pooling}, but Transformers' sequence "
                          "classifiers pool the last token that is not padding only; retrain with --pooling last, "
                          "or use --format onnx")
    if _template_ends_with_padding(clf):
        raise ConfigError(f"this classifier's template ends with its padding token "
                          f"{clf.tokenizer_.decode([clf.tokenizer_.pad_id])!r}, which Transformers' pooling skips as "
                          "padding (it reads the last token that is not padding); retrain with a template that ends "
                          "otherwise, or use --format onnx")
    fam = family_of(clf.model_.backbone)
    if clf.model_.backbone.out_head.bias is not None and fam.final_norm_bias is None:
        raise ConfigError(f"this classifier's head has a bias, which Transformers' score layer lacks and the "
                          f"{fam.name} family's final norm (an RMSNorm, without a bias) cannot absorb; retrain with "
                          "--no-head-bias (or use --format onnx)")


def _template_ends_with_padding(clf: Any) -> bool:
    template = clf.template_
    if template is None or template.endswith(TEXT_FIELD):
        return False
    ids = clf.tokenizer_.encode(template.split(TEXT_FIELD)[-1])
    return bool(ids) and ids[-1] == clf.tokenizer_.pad_id


# --- from-scratch models -------------------------------------------------------------------------

def _write_scratch_model(clf: Any, out_dir: Path) -> str:
    """config.json and model.safetensors of a from-scratch classifier; returns its Transformers class."""
    backbone = clf.model_.backbone
    fam = family_of(backbone)
    state = {name: tensor.detach().cpu() for name, tensor in backbone.state_dict().items()}
    weight, bias = state.pop("out_head.weight"), state.pop("out_head.bias", None)
    weight, bias = fold_temperature(clf, weight, bias)
    if bias is not None:  # check_exportable made sure the family has a final-norm bias
        state[fam.final_norm_bias] = fold_head_bias(weight, bias, state[fam.final_norm_bias])
    tensors = {**fam.rename_to_hf(state, backbone.cfg), "score.weight": weight}
    atomic_save_safetensors({k: v.contiguous() for k, v in tensors.items()}, out_dir / "model.safetensors",
                            metadata={"format": "pt"})
    hf_config = fam.config_to_hf(backbone.cfg)
    architecture = fam.hf_classifier(hf_config["model_type"])
    tokenizer = clf.tokenizer_
    atomic_write_json(out_dir / "config.json", {
        **hf_config, "architectures": [architecture],
        "pad_token_id": tokenizer.pad_id, "eos_token_id": tokenizer.eos_id, "bos_token_id": tokenizer.bos_id,
        "dtype": str(weight.dtype).removeprefix("torch.")})
    return architecture


def fold_temperature(clf: Any, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """The class head's weight and bias divided by the classifier's calibration temperature T: softmax(z / T)
    with z = Wx + b is softmax((W/T)x + b/T), so Transformers computes the calibrated probabilities exactly."""
    t = float(getattr(clf, "temperature_", 1.0))
    if t == 1.0:
        return weight, bias
    return weight / t, None if bias is None else bias / t


def fold_head_bias(weight: torch.Tensor, bias: torch.Tensor, norm_bias: torch.Tensor) -> torch.Tensor:
    """`norm_bias + δ` with `weight @ δ = bias`: shifting the final norm's output by δ gives the head's
    bias through its weight, W·(LN(x) + δ) = W·LN(x) + b, so the head needs none. δ is the least-squares,
    minimum-norm solution in float64; a ConfigError when it leaves more than `BIAS_FOLD_RTOL` of |b|
    (b is not in the span of W's columns, e.g. two classes with the same weights but other biases)."""
    w, b = weight.double(), bias.double()
    delta = torch.linalg.pinv(w) @ b
    residual = (w @ delta - b).norm().item()
    if residual > BIAS_FOLD_RTOL * b.norm().item():
        raise ConfigError(f"this classifier's head bias cannot be folded into the final norm exactly (residual "
                          f"{residual:.1e} for |bias| {b.norm().item():.1e}): Transformers' score layer has no "
                          "bias; retrain with --no-head-bias (or use --format onnx)")
    return (norm_bias.double() + delta).to(norm_bias.dtype)


def _write_tokenizer(tokenizer: Any, out_dir: Path, max_length: int) -> None:
    """tokenizer.json (encoding exactly as llmclf's tokenizer, BOS included where llmclf adds it) and a
    tokenizer_config.json for Transformers' generic fast tokenizer class."""
    from tokenizers import processors

    backend = _backend_tokenizer(tokenizer)
    backend.no_padding()
    backend.no_truncation()
    bos = None if tokenizer.bos_id is None else backend.id_to_token(tokenizer.bos_id)
    first, second = (f"{bos}:0 ", f"{bos}:1 ") if bos is not None else ("", "")
    backend.post_processor = processors.TemplateProcessing(  # what add_special_tokens=True adds
        single=f"{first}$A:0", pair=f"{first}$A:0 {second}$B:1",
        special_tokens=[(bos, tokenizer.bos_id)] if bos is not None else [])
    backend.save(str(out_dir / "tokenizer.json"))
    specials = {"eos_token": tokenizer.eos_id, "pad_token": tokenizer.pad_id, "bos_token": tokenizer.bos_id}
    atomic_write_json(out_dir / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length, "padding_side": "right",
        "truncation_side": "right", "clean_up_tokenization_spaces": False,
        **{key: backend.id_to_token(i) for key, i in specials.items() if i is not None}})


def _backend_tokenizer(tokenizer: Any) -> Any:
    """A copy of llmclf's tokenizer as a `tokenizers.Tokenizer`: an HFTokenizer's own backend, or GPT-2's
    byte-level BPE built from its encoder.json + vocab.bpe (or vocab.json + merges.txt)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    from llmclf.tokenizer import ENDOFTEXT, GPT2Tokenizer, find_gpt2_tokenizer_files

    if not isinstance(tokenizer, GPT2Tokenizer):
        return Tokenizer.from_str(tokenizer.backend.to_str())
    files = find_gpt2_tokenizer_files(tokenizer.source) if Path(tokenizer.source).is_dir() else None
    if files is None:
        raise ConfigError(f"the GPT-2 tokenizer's files are not on disk (it came from {tokenizer.source!r}); put "
                          "encoder.json and vocab.bpe in a directory, set LLMCLF_GPT2_TOKENIZER_DIR to it and export "
                          "again")
    backend = Tokenizer(models.BPE.from_file(str(files[0]), str(files[1])))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(ENDOFTEXT, special=True, normalized=False)])
    return backend


# --- Transformers-engine models ------------------------------------------------------------------

def _write_transformers_model(clf: Any, out_dir: Path) -> str:
    """The model's and tokenizer's save_pretrained files (model_max_length = max_length), the calibration
    temperature folded into the class head (`fold_temperature`); returns its class."""
    model = clf.model_
    if float(getattr(clf, "temperature_", 1.0)) != 1.0:
        import copy

        model = copy.deepcopy(clf.model_)  # clf keeps its own head: the check compares against it
        head = _class_head(model, len(clf.classes_))
        with torch.no_grad():
            weight, bias = fold_temperature(clf, head.weight, head.bias)
            head.weight.copy_(weight)
            if bias is not None:
                head.bias.copy_(bias)
    model.save_pretrained(out_dir)
    clf.tokenizer_.save_pretrained(out_dir)
    _amend_json(out_dir / "tokenizer_config.json", {"model_max_length": clf.max_length_})
    return type(clf.model_).__name__


def _class_head(model: torch.nn.Module, n_classes: int) -> torch.nn.Linear:
    """The Linear layer that gives a Transformers sequence classifier its logits: its last Linear module,
    which must have one output per class (BERT's `classifier`, RoBERTa's `classifier.out_proj`, `score`)."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if not linears or linears[-1].out_features != n_classes:
        raise ConfigError(f"cannot find the class head of this {type(model).__name__} (its last Linear layer has "
                          f"{linears[-1].out_features if linears else 'no'} outputs, not {n_classes}) to fold the "
                          "calibration temperature into; use --format onnx, which keeps it, or retrain with "
                          "--calibration none")
    return linears[-1]


def _amend_json(path: Path, values: dict[str, Any]) -> None:
    atomic_write_json(path, {**json.loads(path.read_text(encoding="utf-8")), **values})


def _backbone(clf: Any) -> str:
    return str((getattr(clf, "config_", None) or {}).get("backbone", clf.model))


# --- the check -----------------------------------------------------------------------------------

@torch.no_grad()
def check_export(clf: Any, out_dir: Path, keep_last: int) -> float:
    """The largest |Transformers - llmclf| class probability over `CHECK_TEXTS` (one by one and as one
    padded batch), read back from `out_dir` by Transformers alone; a ConfigError beyond `MAX_ABS_DIFF`,
    or when the exported tokenizer gives other token ids than llmclf's. Texts longer than max_length
    are checked only where `truncation=True` is what llmclf does (`keep_last` 0)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from llmclf.loaders.encoders import quiet_loading

    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    with quiet_loading():
        model, loading = AutoModelForSequenceClassification.from_pretrained(out_dir, dtype=torch.float32,
                                                                            output_loading_info=True)
    if loading["missing_keys"] or loading["unexpected_keys"]:
        raise ConfigError(f"Transformers' {type(model).__name__} does not take the exported weights as they are "
                          f"(missing: {sorted(loading['missing_keys'])[:5]}, unexpected: "
                          f"{sorted(loading['unexpected_keys'])[:5]}); please report it with the backbone")
    model.eval()
    texts = list(CHECK_TEXTS)
    inputs = clf._model_inputs(texts)
    if clf.engine != "hf":
        ids = clf.tokenizer_.encode_batch(inputs)
        fits = [len(x) <= clf.max_length_ or keep_last == 0 for x in ids]
        texts, inputs, ids = ([x for x, ok in zip(seq, fits, strict=True) if ok] for seq in (texts, inputs, ids))
        theirs = tokenizer(inputs, truncation=True)["input_ids"]
        for text, mine, other in zip(inputs, ids, theirs, strict=True):
            if mine[:clf.max_length_] != other:
                raise ConfigError(f"Transformers reads the exported tokenizer as its {type(tokenizer).__name__}, "
                                  f"which gives other token ids than llmclf's tokenizer for {text!r} ({other[:8]}... "
                                  f"vs {mine[:8]}...); nothing was written. Use --format onnx, which keeps llmclf's "
                                  "tokenizer, and please report it with the backbone")
    if not texts:
        log.warning("max_length %d is too short for any check text: the export is not checked", clf.max_length_)
        return 0.0
    expected = clf.predict_proba(texts)
    worst = 0.0
    for rows in [[i] for i in range(len(texts))] + [list(range(len(texts)))]:
        batch = tokenizer([inputs[i] for i in rows], truncation=True, padding=True, return_tensors="pt")
        logits = model(**batch).logits.float()
        probs = (logits.sigmoid() if clf.label_thresholds is not None else logits.softmax(-1)).numpy()
        worst = max(worst, float(abs(probs - expected[rows]).max()))
    if not worst <= MAX_ABS_DIFF:
        raise ConfigError(f"Transformers' probabilities from the export differ from llmclf's by {worst:.2e} (more "
                          f"than {MAX_ABS_DIFF:g}); nothing was written. Please report it with the backbone.")
    return worst


# --- the model card ------------------------------------------------------------------------------

def model_card(clf: Any, architecture: str, keep_last: int, model_path: str) -> str:
    """README.md: what the model is, how to call it (template included), long texts, metrics, limits."""
    template, max_length = clf.template_, clf.max_length_
    labels = ", ".join(f"{i}: {json.dumps(label, ensure_ascii=False)}" for i, label in enumerate(clf.classes_))
    rows = [("Labels (id: label)", labels), ("Backbone", f"`{_backbone(clf)}` (llmclf's {clf.engine} engine)"),
            ("Transformers class", f"`{architecture}`"),
            ("Max length", f"{max_length} tokens (the tokenizer's `model_max_length`)"),
            ("Template", "each text is put into `TEMPLATE` (see the snippets) first, as in training"
             if template is not None else "none: texts go in as they are")]
    if clf.engine != "hf":
        rows.insert(3, ("Pooling", "the last token that is not padding (`pad_token_id` in config.json)"))
    table = "| | |\n|---|---|\n" + "".join(f"| {name} | {_escape_cell(value)} |\n" for name, value in rows)
    sections = [
        "---\nlibrary_name: transformers\npipeline_tag: text-classification\ntags:\n- llmclf\n---\n",
        f"# Text classifier on {_backbone(clf)}\n",
        "Exported by llmclf (`llmclf export --format hf`). It is a plain Transformers sequence classifier: it "
        "loads with `AutoModelForSequenceClassification`, `AutoTokenizer` and `pipeline(\"text-classification\")`, "
        "without llmclf.\n",
        table,
        "## Use\n",
        "```python\n" + pipeline_snippet(template, model_path) + "```\n",
        "## Texts longer than max_length\n",
        _long_text_section(clf, keep_last, model_path),
    ]
    if clf.decision is not None:
        positive = clf.classes_[clf.decision.positive]
        sections += ["## Decision threshold\n",
                     f"llmclf labels a text {json.dumps(positive)} when that class's probability reaches "
                     f"{clf.decision.threshold:.6g} (tuned on the validation set; config.json, "
                     "`llmclf.decision_threshold`), not at the most probable class as the pipeline does. The "
                     "probabilities are calibrated (the temperature is folded into the `score` layer).\n"]
    metrics = _metrics_table(clf)
    if metrics:
        sections += ["## Metrics (from llmclf)\n", metrics]
    if clf.engine != "hf" and (template is None or template.endswith(TEXT_FIELD)):
        sections += ["## Limits\n", _limits(clf)]
    return "\n".join(sections)


def _escape_cell(text: str) -> str:
    """`text` safe in a Markdown table cell (a `|` would end the cell)."""
    return text.replace("|", "\\|").replace("\n", " ")


def _template_lines(template: str | None) -> str:
    if template is None:
        return ""
    return f"TEMPLATE = {template!r}  # what llmclf put each text into; {TEXT_FIELD} is where the text goes\n"


def pipeline_snippet(template: str | None, model_path: str) -> str:
    """The card's first snippet: the pipeline on `EXAMPLE_TEXTS`, printing each one's label."""
    inputs = "[TEMPLATE.replace(\"{text}\", text) for text in texts]" if template is not None else "texts"
    return ("from transformers import pipeline\n\n" + _template_lines(template)
            + f"classifier = pipeline(\"text-classification\", model={model_path!r}, top_k=None)\n"
            f"texts = {list(EXAMPLE_TEXTS)!r}\n"
            f"for scores in classifier({inputs}, truncation=True):  # a score for every label\n"
            "    print(max(scores, key=lambda score: score[\"score\"])[\"label\"])\n")


def truncation_snippet(template: str | None, model_path: str, max_length: int, keep_last: int) -> str:
    """The card's second snippet: llmclf's truncation (first tokens + the template's last `keep_last`)."""
    text = "TEMPLATE.replace(\"{text}\", text)" if template is not None else "text"
    return ("import torch\nfrom transformers import AutoModelForSequenceClassification, AutoTokenizer\n\n"
            + _template_lines(template)
            + f"MAX_LENGTH, KEEP_LAST = {max_length}, {keep_last}\n"
            f"tokenizer = AutoTokenizer.from_pretrained({model_path!r})\n"
            f"model = AutoModelForSequenceClassification.from_pretrained({model_path!r}).eval()\n\n\n"
            "def classify(text: str) -> dict[str, float]:\n"
            f"    ids = tokenizer({text})[\"input_ids\"]\n"
            "    if len(ids) > MAX_LENGTH:  # llmclf keeps the first tokens and the template's last KEEP_LAST\n"
            "        ids = ids[:MAX_LENGTH - KEEP_LAST] + ids[len(ids) - KEEP_LAST:]\n"
            "    with torch.no_grad():\n"
            "        probs = model(torch.tensor([ids])).logits.softmax(-1)[0]\n"
            "    return {model.config.id2label[i]: float(p) for i, p in enumerate(probs)}\n\n\n"
            f"print(classify({EXAMPLE_TEXTS[0]!r} * 100))\n")


def _long_text_section(clf: Any, keep_last: int, model_path: str) -> str:
    if keep_last == 0:
        return ("llmclf cut longer inputs to their first max_length tokens. `truncation=True`, as in the snippet, "
                "does the same (the tokenizer's `model_max_length` is max_length).\n")
    return (f"llmclf keeps the first {clf.max_length_ - keep_last} tokens of a longer input and its last {keep_last}, "
            "the end of the template, which holds the token the classifier reads. `truncation=True` keeps the "
            "first max_length tokens only, so on such texts the pipeline's results differ from llmclf's. This "
            "gives llmclf's exactly:\n\n```python\n"
            + truncation_snippet(clf.template_, model_path, clf.max_length_, keep_last) + "```\n")


def _metrics_table(clf: Any) -> str:
    config = getattr(clf, "config_", None) or {}
    rows = [(name, m) for name, m in (("validation", (config.get("metrics") or {}).get("validation")),
                                      ("test", config.get("test_metrics"))) if isinstance(m, dict)]
    if not rows:
        return ""

    def cell(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, float) else ("" if value is None else str(value))

    lines = ["| split | texts | accuracy | macro-F1 | loss |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {cell(m.get('n'))} | {cell(m.get('accuracy'))} | {cell(m.get('macro_f1'))} | "
              f"{cell(m.get('loss'))} |" for name, m in rows]
    return "\n".join(lines) + "\n"


def _limits(clf: Any) -> str:
    pad = clf.tokenizer_.decode([clf.tokenizer_.pad_id])
    return (f"Transformers finds the last token by its id: an input whose own last token is the padding token "
            f"{pad!r} is read one token earlier than llmclf read it (llmclf knows where each text ends). "
            "A template that ends after the text avoids this."
            + (" An empty text gives Transformers no token to read; llmclf read it as one padding token."
               if clf.template_ is None else "") + "\n")
