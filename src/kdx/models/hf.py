"""Hugging Face sequence classifiers as kdx models (``model=hf``).

``hf_model`` builds any ``AutoModelForSequenceClassification`` either from a local folder or Hub id
(``name_or_path``: pre-trained weights, e.g. ``bert-base-uncased``; a fresh classification head
unless the checkpoint has one of the right size) or from a config dict (``config``: random
initialisation, e.g. ``{model_type: bert, hidden_size: 32, ...}`` for tests and for the
synthetic-text experiments). kdx never downloads by itself: a Hub id works only when the Hub
cache or the internet has it.

Batches of text (the batch contract for text): ``x`` is a mapping of tensors, ``y`` and ``index``
stay tensors. The data modules emit ``input_ids`` / ``attention_mask`` (and ``token_type_ids``
when the tokenizer makes them) for the student, and — only when the teacher's tokenizer differs
from the student's — the teacher's own tokenisation under ``teacher.input_ids`` /
``teacher.attention_mask`` / ... Each model reads the keys of its ``input_prefix`` (``""`` for
students, ``"teacher."`` for teachers): if any key with the prefix is in the batch, it reads only
prefixed keys; if none is (one shared tokenisation), it reads the plain keys.

What the adapter (:class:`HFFeatureModel`) returns:

* ``logits``: the model's own logits.
* ``embedding``: exactly what the final linear layer of the classification head reads, captured
  by a hook on that layer, so it is right by construction for every architecture:

  - BERT, ALBERT (``classifier``): ``dropout(tanh(W·h_[CLS] + b))``, the pooler output;
  - DistilBERT (``classifier``): ``dropout(ReLU(pre_classifier(h_[CLS])))``;
  - RoBERTa, XLM-R, ELECTRA (``classifier.out_proj``): ``dropout(tanh(dense(dropout(h_<s>))))``;
  - decoder models such as GPT-2 or Llama (``score``): the last layer's hidden state of the last
    non-padding token per row (the token whose logits those models return), found from the
    attention mask;
  - any other model: the input of its last ``nn.Linear``.

  Dropout is active in ``train()`` (a frozen teacher is in ``eval()``).
* ``stages``: the hidden states after each transformer layer (the embedding layer's output is not
  a stage), pooled over tokens as ``stage_pooling`` says: ``mean`` (default: the mean over
  non-padding tokens, from the attention mask), ``cls`` (the first token) or ``none`` (the
  ``(B, L, H)`` states, padding included; only for methods that handle sequences).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from kdx.errors import KDXError
from kdx.models.base import EMBEDDING, LOGITS, STAGES, ModelOutput, train_mode
from kdx.models.feature import FeatureModel

TEACHER_PREFIX = "teacher."
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds")
STAGE_POOLINGS = ("mean", "cls", "none")
# where the final linear layer of the classification head lives, by architecture (first match wins)
_HEAD_PATHS = ("classifier", "classifier.out_proj", "classifier.dense_out", "score", "logits_proj")


def _import_transformers():
    try:
        import transformers
    except ImportError as err:  # pragma: no cover - a declared dependency
        raise KDXError("model=hf needs the transformers package: pip install transformers") from err
    transformers.logging.set_verbosity_error()  # "some weights were newly initialised" is expected
    transformers.utils.logging.disable_progress_bar()  # no per-load progress bars in run logs
    return transformers


def select_inputs(x: Any, prefix: str) -> dict[str, Tensor]:
    """The model inputs of one model from a text batch (see the module docstring for the rule)."""
    if isinstance(x, Tensor):  # a bare tensor is a batch of token ids without padding
        # (a float one comes from shape checks that feed zeros: the ids of [PAD])
        return {"input_ids": x.long() if x.is_floating_point() else x}
    if not isinstance(x, Mapping):
        raise KDXError(
            f"a Hugging Face model needs a mapping of tensors (input_ids, attention_mask...) as x, got "
            f"{type(x).__name__}; use a text data set (dataset=glue or dataset=synthetic_text)"
        )
    own = prefix and any(str(k).startswith(prefix) for k in x)
    source = prefix if own else ""
    inputs = {k: x[source + k] for k in MODEL_INPUTS if source + k in x}
    if "input_ids" not in inputs and "inputs_embeds" not in inputs:
        raise KDXError(
            f"the batch has no '{source}input_ids' (keys: {', '.join(map(str, x))}); "
            "a text data set emits input_ids and attention_mask"
        )
    return inputs


class HFSequenceClassifier(nn.Module):
    """A Hugging Face sequence classifier that reads its own keys of a text batch.

    ``forward(x)`` returns plain logits, so the model is still an ordinary classifier for code that
    knows nothing of text (teacher checks, the plain benchmark loop).
    """

    def __init__(self, hf: nn.Module, input_prefix: str = "", stage_pooling: str = "mean"):
        super().__init__()
        if stage_pooling not in STAGE_POOLINGS:
            raise ValueError(f"stage_pooling={stage_pooling!r} must be one of {', '.join(STAGE_POOLINGS)}")
        self.hf = hf
        self.input_prefix = input_prefix
        self.stage_pooling = stage_pooling
        # e.g. DistilBERT and RoBERTa-style models take no token_type_ids: drop what forward() does not take
        self.accepted_inputs = frozenset(
            k for k in MODEL_INPUTS if k in inspect.signature(hf.forward).parameters
        )

    @property
    def num_classes(self) -> int:
        return int(self.hf.config.num_labels)

    @property
    def vocab_size(self) -> int:
        return int(self.hf.get_input_embeddings().num_embeddings)

    @property
    def hidden_size(self) -> int:
        return int(self.hf.get_input_embeddings().embedding_dim)

    def inputs(self, x: Any) -> dict[str, Tensor]:
        return {k: v for k, v in select_inputs(x, self.input_prefix).items() if k in self.accepted_inputs}

    def forward(self, x: Any) -> Tensor:
        return self.hf(**self.inputs(x)).logits

    def feature_model(self) -> HFFeatureModel:
        """The adapter :func:`kdx.models.adapter.as_feature_model` picks for this model."""
        return HFFeatureModel(self)


def hf_model(
    num_classes: int,
    name_or_path: str | None = None,
    config: dict[str, Any] | None = None,
    input_prefix: str = "",
    stage_pooling: str = "mean",
    tokenizer: str | None = None,
    vocab_size: int | None = None,
) -> HFSequenceClassifier:
    """Build a Hugging Face sequence classifier with ``num_classes`` outputs.

    Exactly one of ``name_or_path`` (pre-trained weights from a folder or the Hub cache) and
    ``config`` (random init; needs ``model_type``) is given. ``vocab_size`` sets the vocabulary of
    a config-built model (``None``: its tokenizer's size, else the architecture's default);
    ``tokenizer`` is the folder of the
    model's tokenizer, read by the data module, and checked here to fit the vocabulary.
    """
    transformers = _import_transformers()
    if (name_or_path is None) == (config is None):
        raise KDXError(
            "model=hf needs exactly one of model.name_or_path (a local folder or Hub id of a checkpoint) "
            "and model.config (a dict with model_type, for random initialisation)"
        )
    if config is not None:
        settings = dict(config)
        model_type = settings.pop("model_type", None)
        if model_type is None:
            raise KDXError("model.config needs model_type (e.g. bert, roberta, distilbert)")
        if vocab_size is None and tokenizer is not None:
            vocab_size = len(load_tokenizer(tokenizer))  # the vocabulary follows the tokenizer
        if vocab_size is not None:
            settings["vocab_size"] = int(vocab_size)
        hf_config = transformers.AutoConfig.for_model(model_type, num_labels=num_classes, **settings)
        hf = transformers.AutoModelForSequenceClassification.from_config(hf_config)
    else:
        try:
            hf = transformers.AutoModelForSequenceClassification.from_pretrained(
                str(name_or_path), num_labels=num_classes, ignore_mismatched_sizes=True, dtype=torch.float32
            )
        except OSError as err:
            raise KDXError(
                f"model.name_or_path={name_or_path} is neither a local checkpoint folder nor in the Hugging "
                "Face cache (kdx does not download); save it with save_pretrained(<dir>) or "
                f"`hf download {name_or_path} --local-dir <dir>` and pass model.name_or_path=<dir>"
            ) from err
        if vocab_size is not None and int(vocab_size) != hf.get_input_embeddings().num_embeddings:
            raise KDXError(
                f"model.vocab_size={vocab_size} does not match the checkpoint {name_or_path} "
                f"({hf.get_input_embeddings().num_embeddings}); leave model.vocab_size null for a checkpoint"
            )
    model = HFSequenceClassifier(hf, input_prefix=input_prefix, stage_pooling=stage_pooling)
    if tokenizer is not None:
        size = len(load_tokenizer(tokenizer))
        if size > model.vocab_size:
            fix = (
                f"leave model.vocab_size null (it follows the tokenizer) or set it >= {size}"
                if config is not None
                else "give each model its own tokenizer (model.tokenizer)"
            )
            raise KDXError(
                f"tokenizer {tokenizer} has {size} tokens but the model's vocabulary has {model.vocab_size}; {fix}"
            )
    return model


# what the model reads (the data protocol's ``KDDataModule.input_kind``): run validation refuses a model
# without this declaration on token data, and a text model declares it
hf_model.input_kind = "tokens"  # type: ignore[attr-defined]
HFSequenceClassifier.input_kind = "tokens"  # type: ignore[attr-defined]


def load_tokenizer(path: str):
    """A tokenizer from a local folder (or the Hub cache), as a ``PreTrainedTokenizerFast``."""
    transformers = _import_transformers()
    try:
        return transformers.AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        raise KDXError(
            f"tokenizer {path} is neither a local tokenizer folder nor in the Hugging Face cache (kdx does "
            "not download); save it with tokenizer.save_pretrained(<dir>) and point model.tokenizer at it"
        ) from err


def _masked_mean(hidden: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return hidden.mean(1)
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def _last_token(hidden: Tensor, mask: Tensor | None) -> Tensor:
    """Each row's last non-padding position (right padding), or the last position without a mask."""
    if mask is None:
        return hidden[:, -1]
    last = (mask.long().sum(1) - 1).clamp_min(0)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


class HFFeatureModel(FeatureModel):
    """``x -> ModelOutput`` for :class:`HFSequenceClassifier` (see the module docstring)."""

    model: HFSequenceClassifier

    def __init__(self, model: HFSequenceClassifier):
        super().__init__(model)
        self.head_path = self._find_head()

    def _find_head(self) -> str:
        hf = self.model.hf
        modules = dict(hf.named_modules())
        for path in _HEAD_PATHS:
            if isinstance(modules.get(path), nn.Linear):
                return path
        linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
        if not linears:
            raise KDXError(f"{type(hf).__name__} has no nn.Linear classification head")
        warnings.warn(
            f"{type(hf).__name__}: no known classification head; using its last nn.Linear '{linears[-1]}'",
            stacklevel=3,
        )
        return linears[-1]

    @property
    def classifier(self) -> nn.Linear:
        return self.model.hf.get_submodule(self.head_path)

    @property
    def input_prefix(self) -> str:
        return self.model.input_prefix

    def input_embeddings(self) -> nn.Embedding:
        return self.model.hf.get_input_embeddings()

    def forward(self, x: Any, reads: Iterable[str] = (LOGITS,)) -> ModelOutput:
        reads = set(reads)
        self.refuse_preact(reads)
        inputs = self.model.inputs(x)
        if reads <= {LOGITS}:
            return ModelOutput(self.model.hf(**inputs).logits)
        captured: dict[str, Tensor] = {}
        handle = None
        if EMBEDDING in reads:
            handle = self.classifier.register_forward_pre_hook(
                lambda _m, args: captured.__setitem__("embedding", args[0])
            )
        try:
            out = self.model.hf(**inputs, output_hidden_states=STAGES in reads)
        finally:
            if handle is not None:
                handle.remove()
        mask = inputs.get("attention_mask")
        embedding = captured.get("embedding")
        if embedding is not None and embedding.dim() == 3:  # decoder heads score every token
            embedding = _last_token(embedding, mask)
        stages = []
        if STAGES in reads:
            stages = [self._pool(h, mask) for h in out.hidden_states[1:]]
        return ModelOutput(out.logits, embedding, stages)

    def _pool(self, hidden: Tensor, mask: Tensor | None) -> Tensor:
        if self.model.stage_pooling == "mean":
            return _masked_mean(hidden, mask)
        if self.model.stage_pooling == "cls":
            return hidden[:, 0]
        return hidden

    @torch.no_grad()
    def probe(
        self, input_shape: tuple[int, ...], reads: Iterable[str] = (LOGITS, EMBEDDING, STAGES)
    ) -> ModelOutput:
        """Forward two all-[PAD]-id rows of ``input_shape = (length,)`` tokens, unmasked, in eval mode."""
        with train_mode(self, False):
            device = next(self.parameters()).device
            length = int(input_shape[-1]) if input_shape else 8
            ids = torch.zeros(2, length, dtype=torch.long, device=device)
            return self({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, reads)


def wrap_transformers_model(model: nn.Module) -> HFFeatureModel:
    """The adapter for a bare ``transformers`` sequence classifier given to kdx from Python."""
    return HFFeatureModel(HFSequenceClassifier(model))


def is_transformers_classifier(model: nn.Module) -> bool:
    return type(model).__module__.startswith("transformers.") and hasattr(
        getattr(model, "config", None), "num_labels"
    )
