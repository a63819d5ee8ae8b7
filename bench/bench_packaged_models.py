"""The packaged GGUF backbones (default: those of `make models`): assembly, first load, generation speed.

For each model, in a fresh process each (so peak memory is the model's own):
- assembly: the chunk packages concatenated and sha256-checked into an empty cache (`--fresh-cache`,
  a temporary `$LLMCLF_CACHE`; otherwise the existing cache is used and this is the stamp check);
- first load: `load_model(name)` (assembly as above, GGUF read, dequantised to float32, tokenizer);
- generation: greedy, KV cache, `--tokens` new tokens after a short chat prompt, at `--precision`
  (default auto: bfloat16 where the CPU runs it fast), tokens/s over the whole `generate` call;
- peak resident memory of the process.

    python bench/bench_packaged_models.py [--models qwen2.5-0.5b qwen2.5-1.5b] [--tokens 32] [--fresh-cache]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time


def measure(name: str, tokens: int, precision: str) -> dict:
    import torch

    from llmclf.families import chat_template_for, packaged
    from llmclf.generation import generate
    from llmclf.loaders.spec import load_model
    from llmclf.runtime import autocast, resolve_device, resolve_precision

    start = time.perf_counter()
    packaged(name)[1].path()
    assembled = time.perf_counter() - start
    model, tokenizer = load_model(name, context_length=512)
    loaded = time.perf_counter() - start
    prompt = chat_template_for(name).format(prompt="Write a Python function that checks whether a number is prime.")
    ids = torch.tensor([tokenizer.encode(prompt)])
    device = resolve_device(None)
    dtype = resolve_precision(precision, device)
    with torch.no_grad(), autocast(device, dtype):
        generate(model, ids, 2)  # warm-up (and weight copies made once)
        start = time.perf_counter()
        out = generate(model, ids, tokens)  # no EOS stop: exactly `tokens` new tokens
        seconds = time.perf_counter() - start
    return {"model": name, "assembly_or_check_s": round(assembled, 2), "first_load_s": round(loaded, 1),
            "prompt_tokens": ids.shape[1], "new_tokens": tokens, "dtype": str(dtype).removeprefix("torch."),
            "generate_s": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 2),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "text": tokenizer.decode(out[0, ids.shape[1]:].tolist())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["qwen2.5-0.5b", "qwen2.5-1.5b"])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--fresh-cache", action="store_true", help="assemble into an empty temporary cache")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child process: measure this model, print JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.tokens, args.precision)))
        return
    import torch

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} "
          f"threads, torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, **({"LLMCLF_CACHE": cache} if args.fresh_cache else {})}
        for name in args.models:
            out = subprocess.run([sys.executable, __file__, "--one", name, "--tokens", str(args.tokens),
                                  "--precision", args.precision], env=env, capture_output=True, text=True)
            if out.returncode:
                print(f"{name}: failed\n{out.stderr[-2000:]}")
                continue
            print(json.dumps(json.loads(out.stdout.strip().splitlines()[-1]), ensure_ascii=False))


if __name__ == "__main__":
    main()
