"""A packaged GGUF (default Gemma 3 270M; `--model qwen2.5-0.5b` ...): llmclf's model against transformers' on
the same file.

Prints a greedy continuation of "The capital of France is" (as `llmclf generate` does), the
cross-entropy and perplexity on The Verdict (as `llmclf lm-eval --context-length 256` does: the
book's 90/10 split, non-overlapping windows) of llmclf's model and of
`transformers.AutoModelForCausalLM.from_pretrained(gguf_file=...)` on exactly the same windows, and the
largest float32 logit difference between the two.

    python bench/bench_gemma3_gguf.py [--model gemma3-270m] [--text ../shared/data/the_verdict/the-verdict.txt]
        [--context-length 256]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch

from llmclf.data.lm import create_dataloader_v1, read_text, split_text
from llmclf.families import packaged_path
from llmclf.language_model import evaluate_lm, generate_text
from llmclf.loaders.spec import load_model

SHARED = Path(os.environ.get("LLMCLF_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma3-270m", help="a packaged GGUF model name")
    parser.add_argument("--text", type=Path, default=SHARED / "data/the_verdict/the-verdict.txt")
    parser.add_argument("--context-length", type=int, default=256)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, float32")
    start = time.perf_counter()
    model, tokenizer = load_model(args.model, context_length=args.context_length)
    print(f"llmclf load (assemble if needed, dequantise): {time.perf_counter() - start:.1f} s")
    print("generate:", repr(generate_text(model, tokenizer, "The capital of France is", max_new_tokens=12,
                                          precision="float32")))

    text = read_text(args.text)
    ours = evaluate_lm(model, tokenizer, text, precision="float32")
    path = packaged_path(args.model)
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    losses, mine, max_diff = {}, {}, 0.0
    for part, part_text in zip(("train", "validation"), split_text(text), strict=True):
        loader = create_dataloader_v1(part_text, tokenizer, 2, args.context_length, args.context_length,
                                      shuffle=False, drop_last=part == "train", name=part)
        total, total_mine, batches = 0.0, 0.0, 0
        with torch.no_grad():
            for inputs, targets in loader:
                logits, our_logits = hf(inputs).logits, model(inputs)
                max_diff = max(max_diff, (logits - our_logits).abs().max().item())
                total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()).item()
                total_mine += torch.nn.functional.cross_entropy(our_logits.flatten(0, 1), targets.flatten()).item()
                batches += 1
        losses[part], mine[part] = total / batches, total_mine / batches
    print(f"lm-eval The Verdict, windows of {args.context_length}: llmclf train {ours.train_loss:.4f} / "
          f"val {ours.val_loss:.4f} (perplexity {ours.val_perplexity:.2f}); transformers train "
          f"{losses['train']:.4f} / val {losses['validation']:.4f}; relative difference (val) "
          f"{abs(ours.val_loss - losses['validation']) / losses['validation'] * 100:.3f} %")
    print(f"on the same unshuffled training windows (lm-eval drops one window after shuffling): llmclf "
          f"{mine['train']:.4f}, transformers {losses['train']:.4f}")
    print(f"max abs logit difference llmclf vs transformers (float32, every window): {max_diff:.2e}")


if __name__ == "__main__":
    main()
