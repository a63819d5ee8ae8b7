"""GPT-2 124M speed: llmclf's GPTModel vs the book's GPTModel (llms-from-scratch), in one run.

Prints forward+backward training throughput (tokens/s) at batch 8 x 256 tokens for the book's
model (float32, as the book runs it) and ours (float32, and the product's default precision),
then greedy generation throughput with and without the KV cache. It also measures this
machine's matmul throughput at the default precision and prints the ceiling it sets: the
tokens/s that any implementation could reach if every FLOP of the step ran at that speed.

    python bench/bench_gpt2_speed.py [--steps 3] [--new-tokens 200]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
import torch.nn.functional as F

from llmclf.config import GPTConfig
from llmclf.generation import generate
from llmclf.models.gpt2 import GPTModel
from llmclf.runtime import autocast, resolve_precision


def train_throughput(model: torch.nn.Module, dtype: torch.dtype, steps: int, batch: int, seq: int) -> float:
    """Tokens/s of forward + loss + backward (one warm-up step not timed)."""
    device = torch.device("cpu")
    x = torch.randint(0, 50257, (batch, seq), generator=torch.Generator().manual_seed(0))
    y = torch.roll(x, -1, dims=1)
    model.train()
    times = []
    for step in range(steps + 1):
        start = time.perf_counter()
        with autocast(device, dtype):
            logits = model(x)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        loss.backward()
        model.zero_grad(set_to_none=True)
        if step:
            times.append(time.perf_counter() - start)
    return batch * seq * len(times) / sum(times)


def matmul_flops(dtype: torch.dtype, m: int = 2048, k: int = 768, n: int = 3072, repeats: int = 20) -> float:
    """FLOP/s of one GEMM of a GPT-2-small feed-forward layer's shape, the best of `repeats`."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    best = float("inf")
    with autocast(torch.device("cpu"), dtype):
        for _ in range(repeats + 1):
            start = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - start)
    return 2 * m * k * n / best


def step_flops(cfg: GPTConfig, tokens: int) -> float:
    """Matmul FLOPs of forward + backward (6 per weight per token) plus attention scores."""
    block = 12 * cfg.emb_dim**2  # W_query, W_key, W_value, out_proj (4 d^2) + feed-forward (8 d^2)
    weights = cfg.n_layers * block + cfg.emb_dim * cfg.vocab_size  # + out_head
    return 6 * weights * tokens


def generation_throughput(model: GPTModel, dtype: torch.dtype, new_tokens: int, use_kv_cache: bool) -> float:
    model.eval()
    prompt = torch.tensor([[6109, 3626, 6100, 345]])  # "Every effort moves you"
    with autocast(torch.device("cpu"), dtype):
        generate(model, prompt, 5, use_kv_cache=use_kv_cache)  # warm-up
        start = time.perf_counter()
        generate(model, prompt, new_tokens, use_kv_cache=use_kv_cache)
    return new_tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per model")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=200, help="tokens generated per generation run")
    args = parser.parse_args()

    from llms_from_scratch.ch04 import GPTModel as BookGPTModel  # pip install --no-deps llms-from-scratch

    cfg = GPTConfig.from_name("gpt2-small", context_length=1024, drop_rate=0.0, qkv_bias=False)
    default_dtype = resolve_precision("auto", torch.device("cpu"))
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; default precision here: {default_dtype}")
    print(f"training step: batch {args.batch_size} x {args.seq_len} tokens, forward + loss + backward")

    torch.manual_seed(123)
    book = BookGPTModel(cfg.to_dict())
    book_tps = train_throughput(book, torch.float32, args.steps, args.batch_size, args.seq_len)
    print(f"  book GPTModel    float32   {book_tps:8.1f} tokens/s")
    del book

    torch.manual_seed(123)
    ours = GPTModel(cfg)
    results = {}
    for dtype in dict.fromkeys([torch.float32, default_dtype]):
        results[dtype] = train_throughput(ours, dtype, args.steps, args.batch_size, args.seq_len)
        print(f"  llmclf GPTModel  {str(dtype).removeprefix('torch.'):9s} {results[dtype]:8.1f} tokens/s"
              f"   ratio vs book {results[dtype] / book_tps:5.2f}x")
    print(f"ratio at the default precision ({default_dtype}): {results[default_dtype] / book_tps:.2f}x")
    flops = matmul_flops(default_dtype)
    ceiling = args.batch_size * args.seq_len / (step_flops(cfg, args.batch_size * args.seq_len) / flops)
    print(f"hardware ceiling: a {str(default_dtype).removeprefix('torch.')} GEMM runs at {flops / 1e9:.0f} GFLOP/s "
          f"here, so a step's {step_flops(cfg, args.batch_size * args.seq_len) / 1e12:.2f} TFLOP allow at most "
          f"{ceiling:.0f} tokens/s = {ceiling / book_tps:.2f}x the book (ours reaches "
          f"{results[default_dtype] / ceiling:.0%} of it)")

    print(f"greedy generation, {args.new_tokens} new tokens after a 4-token prompt ({default_dtype}):")
    with_cache = generation_throughput(ours, default_dtype, args.new_tokens, True)
    without = generation_throughput(ours, default_dtype, args.new_tokens, False)
    print(f"  with KV cache     {with_cache:8.1f} tokens/s")
    print(f"  without KV cache  {without:8.1f} tokens/s   (cache speed-up {with_cache / without:.2f}x)")


if __name__ == "__main__":
    main()
