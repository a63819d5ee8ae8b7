"""llmclf: turn pretrained language models into text classifiers."""

from llmclf.classifier import HFClassifier, TextClassifier, load_classifier, make_classifier
from llmclf.config import GPTConfig
from llmclf.errors import LlmclfError
from llmclf.generation import generate, generate_text_simple
from llmclf.language_model import LMEvalResult, evaluate_lm, generate_text, load_model, pretrain
from llmclf.models.gpt2 import GPTModel
from llmclf.tokenizer import load_gpt2_tokenizer, text_to_token_ids, token_ids_to_text
from llmclf.tuning import tune
from llmclf.zero_shot import ZeroShotClassifier

__version__ = "0.1.0"

__all__ = [
    "GPTConfig",
    "GPTModel",
    "HFClassifier",
    "LMEvalResult",
    "LlmclfError",
    "TextClassifier",
    "ZeroShotClassifier",
    "evaluate_lm",
    "generate",
    "generate_text",
    "generate_text_simple",
    "load_classifier",
    "load_gpt2_tokenizer",
    "load_model",
    "make_classifier",
    "pretrain",
    "text_to_token_ids",
    "token_ids_to_text",
    "tune",
]
