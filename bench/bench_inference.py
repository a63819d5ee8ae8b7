"""CPU inference, backend by backend, against the machine's limit: PyTorch float32 / bfloat16, ONNX Runtime
float32 / int8, for `llmclf predict` and `llmclf serve` on the same classifier.

Per model, the classifier is trained once (head only, `--pooling last`, no ensemble, no head bias, on the
SMS course split from `llmclf data sms-spam`) and exported once (`llmclf export --format onnx --quantize
int8`). Then, per backend x precision, as a user runs them (subprocesses):
- `llmclf evaluate` on the SMS test split: accuracy (300 texts);
- `llmclf predict --input` on `--rows` SMS messages (the 5,574 of the collection, repeated), batch 32:
  texts/s of inference and writing, model load excluded (predict's own figure);
- `llmclf serve` under 16 closed-loop clients for `--seconds`, sending 1 and 8 texts per request:
  texts/s, p50/p99 latency, errors.
And once per machine: the matmul peak of each precision (float32: the faster of PyTorch's and ONNX
Runtime's GEMM; bfloat16: PyTorch's; int8: ONNX Runtime's dynamically quantized MatMul; 2048^3, the threads PyTorch
uses), and each model's FLOPs per text (2 x block weights x tokens + attention's 4 x layers x width x
tokens^2, the mean over the predict texts as templated; embedding lookups and the one-row head excluded),
so every texts/s is also a fraction of the peak.

    python bench/bench_inference.py [--models smollm2,gpt2-small] [--rows 10000] [--seconds 30]

GPT-2 small has no pretrained weights offline: its backbone is randomly initialised (the speed is the
model's; its accuracy is a trained head on random features, not GPT-2's).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from bench_serve import REPO, SHARED, Server, load, sms_texts
from bench_training_loop import cpu_name

RUNS = REPO / "runs" / "bench_inference"
MODELS = {"smollm2": ("smollm2-135m", {}), "gpt2-small": ("gpt2-small", {"random_init": True})}
BACKENDS = ("torch:float32", "torch:bfloat16", "onnx:float32", "onnx:int8")


def llmclf(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "llmclf", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"llmclf {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def sms_split() -> Path:
    out = RUNS / "sms"
    if not (out / "test.csv").is_file():
        llmclf("data", "sms-spam", "--out", str(out), "--source", str(SHARED / "data/sms_spam/sms_spam_collection.zip"))
    return out


def build(name: str, data: Path) -> tuple[Path, Path]:
    """(trained classifier directory, its ONNX export), each built once."""
    from llmclf.classifier import make_classifier
    from llmclf.data.classification import read_labelled
    from llmclf.export import export_model

    spec, model_options = MODELS[name]
    trained, exported = RUNS / name, RUNS / f"{name}-onnx"
    if not (trained / "config.json").is_file():
        print(f"training {name} ...", flush=True)
        tokenizer_dir = os.environ.get("LLMCLF_GPT2_TOKENIZER_DIR", str(SHARED / "tokenizers" / "gpt2"))
        options = {**model_options, "tokenizer_dir": tokenizer_dir} if name == "gpt2-small" else model_options
        clf = make_classifier(spec, "scratch", pooling="last", ensemble="none", head_bias=False, log_every=10_000,
                              **({"model_options": options} if options else {}))
        clf.fit(read_labelled(data / "train.csv"), read_labelled(data / "validation.csv"), out_dir=trained,
                progress=False)
    if not (exported / "config.json").is_file():
        print(f"exporting {name} ...", flush=True)
        report = export_model(trained, exported, "onnx", quantize="int8", force=True)
        print(f"  {report['export_seconds']} s; max |ONNX - torch| {report['max_abs_diff_vs_torch']:.1e}; int8 keeps "
              f"{len(report['int8_float32_matmuls'])} MatMuls float32: {report['int8_float32_matmuls']}", flush=True)
    return trained, exported


def flops_per_text(trained: Path, texts: list[str]) -> tuple[float, float]:
    """(model FLOPs per text, mean tokens per text) over `texts` as the classifier reads them."""
    from llmclf.classifier import load_classifier

    clf = load_classifier(trained, precision="float32")
    backbone = clf.model_.backbone
    block_weights = sum(p.numel() for n, p in backbone.trf_blocks.named_parameters() if n.endswith("weight")
                        and p.ndim == 2)
    lengths = np.array([len(ids) for ids in clf.token_ids(texts)], dtype=np.float64)
    n_layers, width = len(backbone.trf_blocks), backbone.cfg.emb_dim
    per_text = 2 * block_weights * lengths + 4 * n_layers * width * lengths**2
    return float(per_text.mean()), float(lengths.mean())


def matmul_peaks(size: int = 2048, repeats: int = 10) -> dict[str, float]:
    """GFLOP/s of a size^3 matrix product: float32 (the faster of PyTorch and ONNX Runtime), bfloat16
    (PyTorch), int8 (ONNX Runtime, dynamically quantized as the int8 exports are)."""
    import onnx
    import onnxruntime as ort
    import torch

    peaks = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        torch.mm(a, b)
        start = time.perf_counter()
        for _ in range(repeats):
            torch.mm(a, b)
        peaks[name] = 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9
    # ONNX Runtime: a MatMul by a constant 2048 x 2048 weight, float32 and as `--quantize int8` writes it
    # (dynamic quantization: the input quantized per call, then the int8 GEMM), what the models run.
    from onnxruntime.quantization import QuantType, quantize_dynamic

    h = onnx.helper
    weight = onnx.numpy_helper.from_array(np.random.randn(size, size).astype(np.float32), "w")
    graph = h.make_graph([h.make_node("MatMul", ["a", "w"], ["c"])], "mm",
                         [h.make_tensor_value_info("a", onnx.TensorProto.FLOAT, [size, size])],
                         [h.make_tensor_value_info("c", onnx.TensorProto.FLOAT, [size, size])], [weight])
    fp32_path, int8_path = RUNS / "matmul.onnx", RUNS / "matmul.int8.onnx"
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]), str(fp32_path))
    quantize_dynamic(fp32_path, int8_path, weight_type=QuantType.QInt8, per_channel=True)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    feeds = {"a": np.random.randn(size, size).astype(np.float32)}
    for name, path in (("float32", fp32_path), ("int8", int8_path)):
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        session.run(None, feeds)
        start = time.perf_counter()
        for _ in range(repeats):
            session.run(None, feeds)
        # float32: the faster of PyTorch's and ONNX Runtime's GEMM (they differ by CPU vendor)
        peaks[name] = max(peaks.get(name, 0.0), 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9)
    return peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2,gpt2-small", help=f"comma-separated: {', '.join(MODELS)}")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated backend:precision")
    parser.add_argument("--rows", type=int, default=10_000, help="texts for predict")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=30.0, help="duration of each serve run")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_inference.json")
    args = parser.parse_args()

    import torch

    from llmclf.runtime import fast_bfloat16

    RUNS.mkdir(parents=True, exist_ok=True)
    data = sms_split()
    texts = sms_texts()
    rows = RUNS / f"sms_{args.rows}.csv"
    with open(rows, "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([["text"], *([texts[i % len(texts)]] for i in range(args.rows))])
    peaks = matmul_peaks()
    report = {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
              "bf16_is_auto": fast_bfloat16(torch.device("cpu")), "matmul_peak_gflops": peaks,
              "rows": args.rows, "batch_size": args.batch_size, "clients": args.clients, "runs": []}
    print(f"{report['cpu']}, {report['cores']} cores; matmul peak GFLOP/s: "
          + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items()), flush=True)
    for name in args.models.split(","):
        trained, exported = build(name, data)
        flops, tokens = flops_per_text(trained, texts[: min(len(texts), args.rows)])
        print(f"{name}: {flops / 1e9:.3f} GFLOP per text ({tokens:.1f} tokens on average)", flush=True)
        for backend_precision in args.backends.split(","):
            backend, precision = backend_precision.split(":")
            if precision == "bfloat16" and not report["bf16_is_auto"]:
                continue  # only where `auto` picks it: elsewhere bfloat16 is emulated and slow
            model = trained if backend == "torch" else exported
            common = ("--model", str(model), "--backend", backend, "--precision", precision)
            accuracy = json.loads(llmclf("evaluate", *common, "--data", str(data / "test.csv"), "--json"))["accuracy"]
            out = RUNS / f"predictions_{name}_{backend}_{precision}.csv"
            line = llmclf("predict", *common, "--input", str(rows), "--output", str(out), "--batch-size",
                          str(args.batch_size), "--overwrite", "--restart", "--no-progress").strip().splitlines()[-1]
            predict_rate = float(re.search(r"\(([\d.]+) texts/s\)", line).group(1))
            run = {"model": name, "backend": backend, "precision": precision, "accuracy": accuracy,
                   "gflop_per_text": flops / 1e9, "predict_texts_per_s": predict_rate,
                   "predict_fraction_of_peak": predict_rate * flops / 1e9 / peaks[precision], "serve": []}
            log = RUNS / f"serve_{name}_{backend}_{precision}.log"
            with Server(model, args.batch_size, 2.0, log, ("--backend", backend, "--precision", precision)) as server:
                asyncio.run(load(server.url, texts, 4, 3, 200, 1))  # warm-up
                for per_request in (1, 8):
                    result = asyncio.run(load(server.url, texts, args.clients, args.seconds, 1_000_000, per_request))
                    result["fraction_of_predict"] = result["texts_per_s"] / predict_rate
                    run["serve"].append(result)
            report["runs"].append(run)
            serve = "; ".join(f"serve x{s['texts_per_request']}: {s['texts_per_s']:.1f} texts/s "
                              f"({s['fraction_of_predict']:.0%} of predict), p50 {s['latency_ms']['p50']:.0f} ms, "
                              f"p99 {s['latency_ms']['p99']:.0f} ms, errors {s['errors']}, "
                              f"mean batch {s['mean_batch_texts']}, "
                              f"clients used {s['client_cpu_cores']:.2f} cores" for s in run["serve"])
            print(f"{name:10s} {backend:5s} {precision:8s} accuracy {accuracy:.2%}  predict {predict_rate:7.1f} "
                  f"texts/s ({run['predict_fraction_of_peak']:.1%} of peak); {serve}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
