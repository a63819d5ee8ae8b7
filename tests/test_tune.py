"""`llmclf tune`: cross-validated search over backbones x recipes in a budget, on tiny random GPT-2s."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from tests.tiny_classifier import toy_data

from llmclf.errors import ConfigError, DataError
from llmclf.training.state import TrainingInterruptedError
from llmclf.tuning import (
    DEFAULT_RECIPES,
    HEAD_COST,
    HF_RECIPES,
    LEADERBOARD_CSV,
    LEADERBOARD_PNG,
    MODEL_DIR,
    STATE_FILE,
    TRAIN_COST,
    Candidate,
    FrozenFeatures,
    Recipe,
    Search,
    _Budget,
    _estimate,
    _PassSpeed,
    _scratch_features,
    _winner_seconds,
    parse_budget,
    plan,
    tune,
)

RECIPES = ["head:mean:1e-2:3", "head:mean:1e-2:3+tfidf", "last-block:last:1e-3:2"]


def _data():
    return toy_data(40), toy_data(20, offset=40, pos_every=3), toy_data(12, offset=60)


def _tune(out: Path, backbone: Path, **kwargs):
    train, val, test = _data()
    options = dict(budget="10m", backbones=[str(backbone)], recipes=RECIPES, folds=3, precision="float32",
                   progress=False)
    return tune(train, val, out, **{**options, "test": test, **kwargs})


def test_parse_budget():
    assert parse_budget("30m") == 1800 and parse_budget("1h30m") == 5400 and parse_budget("90s") == 90
    assert parse_budget("45") == 45 and parse_budget(12.5) == 12.5
    for bad in ("", "soon", "-3m", "0s"):
        with pytest.raises(ConfigError, match="budget"):
            parse_budget(bad)


def test_recipes_parse_and_refuse_clearly():
    assert str(Recipe.parse("head:mean:1e-3:8+tfidf")) == "head:mean:1e-3:8+tfidf"
    assert Recipe.parse("last-n:2:last:1e-4:4") == Recipe("last-n:2", "last", 1e-4, 4, "none")
    assert str(Recipe.parse("5e-5:3", "hf")) == "5e-5:3"
    assert [str(Recipe.parse(r)) for r in DEFAULT_RECIPES] == list(DEFAULT_RECIPES)
    with pytest.raises(ConfigError, match="TRAINABLE:POOLING:LR:EPOCHS"):
        Recipe.parse("head:mean")
    with pytest.raises(ConfigError, match="pooling"):
        Recipe.parse("head:middle:1e-3:8")
    assert Recipe.parse("head:mean-blocks:1e-3:8").pooling == "mean-blocks"
    with pytest.raises(ConfigError, match="mean-blocks pooling with a head alone"):
        Recipe.parse("last-block:mean-blocks:1e-3:8")
    with pytest.raises(ConfigError, match="LR must be a number"):
        Recipe.parse("head:mean:fast:8")
    with pytest.raises(ConfigError, match="LR:EPOCHS"):
        Recipe.parse("head:mean:1e-3:8", "hf")
    blend = Recipe.parse("head:mean:1e-3:8+tfidf+all-minilm-l6-v2")
    assert str(blend) == "head:mean:1e-3:8+tfidf+all-minilm-l6-v2" and blend.encoder == "all-minilm-l6-v2"
    assert blend.options(8)["ensemble"] == "tfidf+all-minilm-l6-v2" and Recipe.parse("head:mean:1e-3:8").encoder is None
    with pytest.raises(ConfigError, match=r"--ensemble must be none, tfidf or tfidf\+ENCODER"):
        Recipe.parse("head:mean:1e-3:8+bm25")


def test_plan_runs_cheap_candidates_first(tiny_checkpoint):
    keys = [c.key for c in plan([str(tiny_checkpoint)], ["last-block:last:1e-4:2", "head:mean:1e-3:2"])]
    assert keys == ["tfidf", f"{tiny_checkpoint}|head:mean:1e-3:2", f"{tiny_checkpoint}|last-block:last:1e-4:2"]
    # a blend's sentence encoder is scored alone first, once, right after the n-gram reference
    keys = [c.key for c in plan(["a.gguf", "b.gguf"], ["head:mean:1e-3:2+tfidf+enc", "head:last:1e-3:2+tfidf+enc"])]
    assert keys[:2] == ["tfidf", "enc|frozen+lr"] and len(keys) == 6
    # every backbone's head recipes before any that trains blocks (fewest first); whole encoders last
    keys = [c.key for c in plan(["a.gguf", "all-minilm-l6-v2", "b.gguf"],
                                ["last-n:2:last:1e-4:2", "head:mean:1e-3:2", "last-block:last:1e-4:2"])]
    assert keys == ["tfidf", "a.gguf|head:mean:1e-3:2", "b.gguf|head:mean:1e-3:2", "a.gguf|last-block:last:1e-4:2",
                    "b.gguf|last-block:last:1e-4:2", "a.gguf|last-n:2:last:1e-4:2", "b.gguf|last-n:2:last:1e-4:2",
                    f"all-minilm-l6-v2|{HF_RECIPES[0]}"]


def test_tune_writes_leaderboard_and_a_normal_model_that_wins_it(tmp_path, tiny_checkpoint):
    from llmclf.classifier import load_classifier

    result = _tune(tmp_path / "t", tiny_checkpoint)
    rows = result.leaderboard
    assert {r["candidate"] for r in rows} == {"tfidf", *(f"{tiny_checkpoint}|{r}" for r in RECIPES)}
    assert [r["rank"] for r in rows] == [1, 2, 3, 4] and not result.skipped
    assert all(rows[i]["accuracy"] >= rows[i + 1]["accuracy"] for i in range(3))
    for row in rows:
        assert 0.0 <= row["accuracy"] <= 1.0 and row["accuracy_std"] >= 0.0 and row["seconds"] >= 0.0
    winner = next(r for r in rows if r["engine"] != "ngrams")
    assert result.winner == winner
    with open(tmp_path / "t" / LEADERBOARD_CSV, encoding="utf-8") as f:
        table = list(csv.DictReader(f))
    assert [r["candidate"] for r in table] == [r["candidate"] for r in rows]
    assert (tmp_path / "t" / LEADERBOARD_PNG).read_bytes()[:4] == b"\x89PNG"
    model_dir = tmp_path / "t" / MODEL_DIR
    config = json.loads((model_dir / "config.json").read_text())
    assert config["tune"]["winner"] == winner["candidate"] and config["tune"]["epochs"] == winner["epochs"]
    assert config["training"]["epochs"] == winner["epochs"]
    recipe = Recipe.parse(winner["candidate"].split("|")[1])
    assert config["training"]["pooling"] == recipe.pooling and config["training"]["lr"] == recipe.lr
    assert config["training"]["ensemble"] == recipe.ensemble
    clf = load_classifier(model_dir, precision="float32")
    assert clf.predict(["today: great wonderful happy"]) in (["pos"], ["neg"])
    assert result.test_metrics["n"] == 12
    assert json.loads((model_dir / "test_metrics.json").read_text())["accuracy"] == result.test_metrics["accuracy"]


def test_same_seed_same_leaderboard(tmp_path, tiny_checkpoint):
    scored = ("candidate", "epochs", "accuracy", "accuracy_std", "macro_f1", "macro_f1_std")
    recipes = ["head:mean:1e-2:3", "last-block:last:1e-3:2"]
    runs = [_tune(tmp_path / name, tiny_checkpoint, recipes=recipes, train_winner=False, reference=False)
            for name in ("a", "b")]
    assert [r["engine"] for r in runs[0].leaderboard] == ["scratch", "scratch"]
    first, second = ([{k: r[k] for k in scored} for r in run.leaderboard] for run in runs)
    assert first == second


def test_cross_validated_candidate_is_what_train_trains(tmp_path, tiny_checkpoint):
    """The states shared by a backbone's recipes and folds give the probabilities `fit` gives on that fold."""
    from llmclf.classifier import make_classifier
    from llmclf.data.classification import LabelledTexts, label_order

    train, val, _ = _data()
    classes = label_order(train.labels)
    texts, labels = train.texts + val.texts, [classes.index(x) for x in train.labels + val.labels]
    features = FrozenFeatures(str(tiny_checkpoint), texts, labels, classes, seed=5, progress=False,
                              precision="float32", mean_blocks=True)
    fold_train, fold_val = list(range(0, 60, 2)), list(range(1, 60, 2))
    for recipe in map(Recipe.parse, ("head:mean:1e-2:3", "head:mean-blocks:1e-2:3", "last-block:last:1e-3:2")):
        per_epoch = features.probabilities_per_epoch(recipe, fold_train, fold_val, fold_val, seed=5)
        part = lambda idx: LabelledTexts([texts[i] for i in idx], [classes[labels[i]] for i in idx], "fold")  # noqa: E731
        clf = make_classifier(str(tiny_checkpoint), **recipe.options(recipe.epochs), seed=5, precision="float32",
                              calibration="none")  # the language model's own probabilities
        clf.fit(part(fold_train), part(fold_val), progress=False)
        best = round(clf.history_.best_epoch) - 1
        np.testing.assert_allclose(per_epoch[best], clf.predict_proba(part(fold_val).texts), atol=1e-5)


def test_budget_skips_what_does_not_fit_and_says_so(tmp_path, tiny_checkpoint):
    with pytest.raises(ConfigError, match="no language-model candidate fitted in the budget") as error:
        _tune(tmp_path / "t", tiny_checkpoint, budget="0.001s")
    with open(tmp_path / "t" / LEADERBOARD_CSV, encoding="utf-8") as f:
        table = list(csv.DictReader(f))
    assert table[0]["candidate"] == "tfidf" and table[0]["status"] == "scored"
    assert len(table) == 1 + len(RECIPES)
    assert all(r["status"].startswith("skipped: its frozen pass") for r in table[1:])
    # the error names the budget that would have fitted the closest candidate, by the estimates kept in the state
    skipped = json.loads((tmp_path / "t" / STATE_FILE).read_text())["skipped"]
    assert len(skipped) == len(RECIPES) and all(s["short_by_s"] > 0 for s in skipped)
    minutes = math.ceil((0.001 + min(s["short_by_s"] for s in skipped)) / 60)
    assert f"--budget {minutes}m would fit {skipped[0]['backbone']}" in str(error.value)


def test_budget_keeps_room_for_the_winners_training_and_test_pass():
    head, blend, block = (Candidate("b", "scratch", Recipe.parse(r))
                          for r in ("head:mean:1e-3:8", "head:mean:1e-3:8+tfidf", "last-block:last:1e-4:4"))
    frozen, layers = 100.0, 12  # the cached frozen pass runs blocks :10, 10 s a block; a head needs all 12
    assert _winner_seconds(head, frozen, layers, 0.0) == pytest.approx(100 + 20 + 8 * HEAD_COST * 100)
    # the blend's weights come from 5 out-of-fold refits of the head: 6 trainings
    assert _winner_seconds(blend, frozen, layers, 0.0) == pytest.approx(100 + 20 + 6 * 8 * HEAD_COST * 100)
    # the test set, a quarter of train + validation's length, costs a quarter of the frozen pass more
    assert _winner_seconds(blend, frozen, layers, 0.25) == pytest.approx(_winner_seconds(blend, frozen, layers, 0) + 25)
    # the last block: continued once, then trained forward and backward each epoch (no refits)
    assert _winner_seconds(block, frozen, layers, 0.0) == pytest.approx(100 + 10 + 4 * (10 * TRAIN_COST + 0.5))
    # the blend's n-gram model: fitted once, and once per out-of-fold refit; not without a blend
    assert _winner_seconds(blend, frozen, layers, 0.0, blend_fit=7.0) == pytest.approx(
        _winner_seconds(blend, frozen, layers, 0.0) + 6 * 7.0)
    assert _winner_seconds(head, frozen, layers, 0.0, blend_fit=7.0) == _winner_seconds(head, frozen, layers, 0.0)
    # and cross-validating a blend fits it on every fold
    assert _estimate(blend, frozen, layers, 5, blend_fit=7.0) == pytest.approx(_estimate(blend, frozen, layers, 5) + 35)
    assert _estimate(head, frozen, layers, 5, blend_fit=7.0) == _estimate(head, frozen, layers, 5)
    # a sentence encoder's embedding of train + validation, and of the test set
    assert _winner_seconds(blend, frozen, layers, 0.25, blend_pass=8.0) == pytest.approx(
        _winner_seconds(blend, frozen, layers, 0.25) + 8.0 * 1.25)
    budget = _Budget(100.0)
    budget.ngram_fit, budget.encoder_fit["enc"], budget.encoder_pass["enc"] = 2.0, 3.0, 8.0
    assert [budget.blend_fit(Recipe.parse(f"head:mean:1e-3:8{e}")) for e in ("", "+tfidf", "+tfidf+enc")] == [0, 2, 5]
    assert budget.blend_pass(Recipe.parse("head:mean:1e-3:8+tfidf+enc")) == 8.0
    assert budget.blend_pass(Recipe.parse("head:mean:1e-3:8+tfidf")) == 0.0
    assert budget.fits(40.0, 50.0)
    budget.reserve["scored earlier"] = 70.0  # it may still win: its training stays reserved
    assert not budget.fits(40.0, 50.0) and budget.fits(20.0, 50.0)


def test_frozen_pass_estimate_counts_padding_as_the_pass_pads():
    from llmclf.training.classifier import padded_tokens

    # longest first, 2 texts a pass, each padded to its longest: [10, 3] and [2, 1], 2 x 10 + 2 x 2
    assert padded_tokens([1, 10, 3, 2], 2) == 24
    # one long text among short ones pads the probe's single chunk far more than a sorted whole pass
    probe, whole = [100, 10, 10, 10], [100, 100, 10, 10, 10, 10, 10, 10]
    assert padded_tokens(probe, 4) == 400 and padded_tokens(whole, 4) == 400 + 40


def test_backbone_that_cannot_fit_is_skipped_before_it_is_loaded_or_timed(tmp_path, tiny_checkpoint, monkeypatch):
    from llmclf import families, tuning
    from llmclf.data.classification import LabelledTexts
    from llmclf.loaders.packaged import PackagedModel

    train, val, _ = _data()
    pool = LabelledTexts(train.texts + val.texts, train.labels + val.labels, "pool")
    ids, classes = [["neg", "pos"].index(label) for label in pool.labels], ["neg", "pos"]
    search = Search(tmp_path, {"metric": "accuracy", "folds": 3}, resume=False)

    def features(candidate, budget, candidates=None):
        return _scratch_features(candidate, candidates or [candidate], pool, ids, classes, None, 3, 5, False, search,
                                 budget, "float32")

    # a packaged backbone of 10^12 block parameters, at the last backbone's speed: about 10^6 s
    huge = Candidate("huge-packaged", "scratch", Recipe.parse(RECIPES[0]))
    monkeypatch.setattr(families, "packaged", lambda spec: (None, PackagedModel("d", "1", "f", block_params=10**12))
                        if spec == huge.backbone else None)
    real = FrozenFeatures
    monkeypatch.setattr(tuning, "FrozenFeatures", lambda *a, **k: pytest.fail("loaded a backbone that cannot fit"))
    budget = _Budget(600.0)
    budget.speed = _PassSpeed("small", 1e-9, 1000)
    assert features(huge, budget) is None
    assert "sized from small's speed without loading it, needs about 1000000 s" in search.skipped[huge.key]["reason"]

    # not packaged: loaded (its size is its own), then sized again before it is timed
    tiny = Candidate(str(tiny_checkpoint), "scratch", Recipe.parse(RECIPES[0]))
    monkeypatch.setattr(tuning, "FrozenFeatures", real)
    monkeypatch.setattr(real, "estimate_seconds", lambda self: pytest.fail("timed a backbone that cannot fit"))
    budget.speed = _PassSpeed("small", 1.0, 1000)
    assert features(tiny, budget) is None
    assert "before timing it" in search.skipped[tiny.key]["reason"]

    # with time for it: timed, computed, and its own speed kept for the next backbone
    monkeypatch.undo()
    budget = _Budget(600.0)
    found = features(tiny, budget)
    assert found is not None and found.seconds > 0 and budget.speed.spec == tiny.backbone
    assert budget.speed.seconds(found.block_params, found.padded_tokens) == pytest.approx(found.seconds)
    # back for its trainable-block recipes: its pass as measured, not timed again; a recipe skipped
    # earlier keeps its own reason
    block = Candidate(tiny.backbone, "scratch", Recipe.parse(RECIPES[2]))
    monkeypatch.setattr(real, "estimate_seconds", lambda self: pytest.fail("timed a backbone measured before"))
    assert features(block, budget) is not None
    budget.passes[tiny.backbone] = 10**6
    assert features(block, budget, [tiny, block]) is None
    assert "as measured before" in search.skipped[block.key]["reason"]
    assert "before timing it" in search.skipped[tiny.key]["reason"]


def test_interrupted_search_keeps_its_leaderboard_and_resumes(tmp_path, tiny_checkpoint, monkeypatch):
    import llmclf.tuning as tuning

    calls = {"n": 0}
    real = tuning.cross_validate_cached

    def interrupted_second(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(tuning, "cross_validate_cached", interrupted_second)
    cheap = dict(recipes=["head:mean:1e-2:2", "head:last:1e-2:2"], train_winner=False)
    with pytest.raises(TrainingInterruptedError, match="leaderboard so far"):
        _tune(tmp_path / "t", tiny_checkpoint, **cheap)
    state = json.loads((tmp_path / "t" / STATE_FILE).read_text())
    assert len(state["results"]) == 2  # the reference and the first recipe
    with pytest.raises(ConfigError, match="--resume"):
        _tune(tmp_path / "t", tiny_checkpoint, **cheap)
    with pytest.raises(ConfigError, match="seed"):
        _tune(tmp_path / "t", tiny_checkpoint, **cheap, resume=True, seed=7)
    monkeypatch.setattr(tuning, "cross_validate_cached", real)
    resumed = _tune(tmp_path / "t", tiny_checkpoint, **cheap, resume=True)
    fresh = _tune(tmp_path / "fresh", tiny_checkpoint, **cheap)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(resumed.leaderboard) == strip(fresh.leaderboard)


def test_bad_data_is_refused_clearly(tmp_path, tiny_checkpoint):
    from llmclf.data.classification import LabelledTexts

    train, val, _ = _data()
    rare = LabelledTexts(train.texts + ["odd one"], train.labels + ["odd"], "train.csv")
    with pytest.raises(DataError, match="label 'odd' has 1 example.*fewer than the 3 folds"):
        tune(rare, val, tmp_path / "t", backbones=[str(tiny_checkpoint)], folds=3, progress=False)
    unseen = LabelledTexts(val.texts, ["maybe"] * len(val), "val.csv")
    with pytest.raises(DataError, match="val.csv: labels \\['maybe'\\] do not occur"):
        tune(train, unseen, tmp_path / "t", backbones=[str(tiny_checkpoint)], progress=False)
    with pytest.raises(ConfigError, match="metric"):
        tune(train, val, tmp_path / "t", backbones=[str(tiny_checkpoint)], metric="auc", progress=False)


def test_cli_tune(tmp_path, tiny_checkpoint):
    from typer.testing import CliRunner

    from llmclf.cli import app
    from llmclf.data.classification import write_labelled

    train, val, test = _data()
    for name, data in (("train", train), ("val", val), ("test", test)):
        write_labelled(data, tmp_path / f"{name}.csv")
    args = ["tune", "--train", str(tmp_path / "train.csv"), "--val", str(tmp_path / "val.csv"), "--test",
            str(tmp_path / "test.csv"), "--out", str(tmp_path / "t"), "--backbones", str(tiny_checkpoint),
            "--recipes", "head:mean:1e-2:2", "--folds", "3", "--budget", "5m", "--no-progress"]
    result = CliRunner().invoke(app, args, catch_exceptions=False, env={"LLMCLF_TEST": "1"})
    assert result.exit_code == 0, result.output
    assert "winner:" in result.output and "test       accuracy" in result.output
    assert (tmp_path / "t" / MODEL_DIR / "config.json").is_file()


def test_the_reference_times_the_blends_ngram_fits(tmp_path, tiny_checkpoint, monkeypatch):
    """The TF-IDF reference's seconds per fold size the n-gram fits of every blend candidate (its
    folds and its training as the winner); without the reference, a resumed search reads them back."""
    import llmclf.tuning as tuning

    seen: list[tuple[str, float]] = []
    original = tuning._winner_seconds

    def recording(candidate, *args, **kwargs):
        seen.append((str(candidate.recipe), kwargs.get("blend_fit", args[4] if len(args) > 4 else 0.0)))
        return original(candidate, *args, **kwargs)

    monkeypatch.setattr(tuning, "_winner_seconds", recording)
    _tune(tmp_path / "t", tiny_checkpoint, train_winner=False)
    reference = json.loads((tmp_path / "t" / STATE_FILE).read_text())["results"]["tfidf"]["seconds"]
    assert seen and all(fit == (pytest.approx(reference / 3, rel=0.01) if recipe.endswith("+tfidf") else 0.0)
                        for recipe, fit in seen)
    assert reference > 0
    seen.clear()
    _tune(tmp_path / "t", tiny_checkpoint, train_winner=False, resume=True,
          recipes=[*RECIPES, "head:last:1e-2:2+tfidf"])
    assert {recipe for recipe, _ in seen} == {"head:last:1e-2:2+tfidf"}  # the others were scored before
    assert all(fit == pytest.approx(reference / 3) for _, fit in seen)


def test_a_blend_with_a_sentence_encoder_is_searched_beside_its_encoder_alone(tmp_path, tiny_checkpoint,
                                                                               tiny_encoder_dir, monkeypatch):
    import llmclf.tuning as tuning
    from llmclf.classifier import load_classifier

    blend = f"head:mean:1e-2:2+tfidf+{tiny_encoder_dir}"
    result = _tune(tmp_path / "t", tiny_checkpoint, recipes=["head:mean:1e-2:2", blend])
    rows = {r["candidate"]: r for r in result.leaderboard}
    assert set(rows) == {"tfidf", f"{tiny_encoder_dir}|frozen+lr", f"{tiny_checkpoint}|head:mean:1e-2:2",
                         f"{tiny_checkpoint}|{blend}"}
    assert rows[f"{tiny_encoder_dir}|frozen+lr"]["engine"] == "sentence-encoder"
    assert result.winner["engine"] == "scratch"  # a reference never wins
    config = json.loads((tmp_path / "t" / MODEL_DIR / "config.json").read_text())
    winner = Recipe.parse(result.winner["candidate"].split("|")[1])
    assert config["training"]["ensemble"] == winner.ensemble
    assert (load_classifier(tmp_path / "t" / MODEL_DIR).encoder_ is not None) == (winner.encoder is not None)
    # resumed with one more blend: its members' fits are sized from both references' seconds per fold
    seen = []
    original = tuning._winner_seconds
    monkeypatch.setattr(tuning, "_winner_seconds", lambda c, *a, **k: seen.append(a[4]) or original(c, *a, **k))
    more = ["head:mean:1e-2:2", blend, f"head:last:1e-2:2+tfidf+{tiny_encoder_dir}"]
    _tune(tmp_path / "t", tiny_checkpoint, recipes=more, resume=True, train_winner=False)
    results = json.loads((tmp_path / "t" / STATE_FILE).read_text())["results"]
    per_fold = (results["tfidf"]["seconds"] + results[f"{tiny_encoder_dir}|frozen+lr"]["seconds"]) / 3
    assert seen and all(fit == pytest.approx(per_fold) for fit in seen)


def test_default_recipes_leave_out_a_blend_whose_encoder_is_not_installed(monkeypatch):
    from llmclf.loaders import encoders
    from llmclf.loaders.packaged import PackagedModel
    from llmclf.tuning import default_recipes

    assert any(Recipe.parse(r).encoder == "all-minilm-l6-v2" for r in DEFAULT_RECIPES)
    missing = PackagedModel("llmclf-no-such-dist", "1.0", "x")
    monkeypatch.setitem(encoders.PACKAGED_HF_MODELS, "all-minilm-l6-v2", missing)
    assert default_recipes() == [r for r in DEFAULT_RECIPES if Recipe.parse(r).encoder is None]


def test_a_mean_blend_is_cross_validated_as_the_average_of_members_trained_on_the_whole_fold(tiny_checkpoint,
                                                                                              monkeypatch):
    from llmclf.data.classification import label_order
    from llmclf.ngrams import NgramModel
    from llmclf.tuning import Scores, cross_validate_cached

    train, val, _ = _data()
    classes = label_order(train.labels)
    texts, labels = train.texts + val.texts, [classes.index(x) for x in train.labels + val.labels]
    features = FrozenFeatures(str(tiny_checkpoint), texts, labels, classes, seed=5, progress=False,
                              precision="float32")
    fold_train, fold_held = list(range(0, 60, 2)), list(range(1, 60, 2))
    recipe = Recipe.parse("head:mean:1e-2:3+tfidf")
    scored: list[list[np.ndarray]] = []
    add = Scores.add
    monkeypatch.setattr(Scores, "add", lambda self, probs, gold: scored.append(list(probs)) or add(self, probs, gold))
    cross_validate_cached(features, recipe, [(fold_train, fold_held)], seed=5, blend="mean")
    ngrams = NgramModel.fit([texts[i] for i in fold_train], [labels[i] for i in fold_train], len(classes))
    ngram_probs = np.exp(ngrams.scores([texts[i] for i in fold_held]))
    per_epoch = features.probabilities_per_epoch(recipe, fold_train, fold_held, fold_held, seed=5)
    assert len(scored[0]) == len(per_epoch) == 3
    for blended, lm in zip(scored[0], per_epoch, strict=True):
        np.testing.assert_allclose(blended, (lm + ngram_probs) / 2, atol=1e-6)
    cross_validate_cached(features, recipe, [(fold_train, fold_held)], seed=5, blend="log")
    assert not np.allclose(scored[1][-1], scored[0][-1], atol=1e-3)  # fitted weights, members on 80 % of the fold
