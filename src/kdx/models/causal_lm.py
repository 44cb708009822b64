"""Hugging Face causal language models as kdx models (``model=gpt2_*``, ``model=llama_*``, ``model=causal_lm``).

:func:`causal_lm` builds any ``AutoModelForCausalLM`` either from a local folder (``name_or_path``:
pre-trained weights; kdx never downloads) or from a config dict (``config``: random initialisation,
e.g. ``{model_type: gpt2, n_embd: 64, n_layer: 2, ...}``: the tiny GPT-2 / Llama-style models of
``conf/model/gpt2_*.yaml`` / ``llama_*.yaml`` that train on a CPU in seconds).

The batch of a language-modelling data set (:mod:`kdx.data.lm`) is ``(x, y, index)`` with ``x`` a
mapping holding ``input_ids`` and ``attention_mask`` ``(B, L)`` and ``y`` the next token of every
position ``(B, L)`` (``-100`` where nothing is predicted: padding). The model's "classes" are its
vocabulary: ``num_classes`` is the vocabulary size, which must equal the data set's.

What the adapter (:class:`CausalLMFeatureModel`) returns: ``logits`` of every position,
``(B, L, V)``, and nothing else (``embedding`` and ``stages`` stay empty: the token-level methods read
logits only). :meth:`CausalLM.sample` draws continuations of prompts (on-policy distillation,
sequence-level KD) from a seeded generator with the model's key-value cache.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from kdx.errors import KDXError
from kdx.models.base import LOGITS, ModelOutput, train_mode
from kdx.models.feature import FeatureModel

IGNORE_INDEX = -100  # a target no loss and no metric reads (padding, masked prompt tokens)


def _import_transformers():
    try:
        import transformers
    except ImportError as err:  # pragma: no cover - a declared dependency
        raise KDXError(
            "a causal language model needs the transformers package: pip install transformers"
        ) from err
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


class CausalLM(nn.Module):
    """A Hugging Face causal LM that reads ``input_ids`` / ``attention_mask`` of a batch.

    ``forward(x)`` returns the plain ``(B, L, V)`` logits, so the model is still an ordinary module
    for code that knows nothing of kdx (the plain benchmark loop)."""

    input_kind = "lm"  # the data protocol's KDDataModule.input_kind this model reads

    def __init__(self, hf: nn.Module, input_prefix: str = ""):
        super().__init__()
        self.hf = hf
        self.input_prefix = input_prefix

    @property
    def num_classes(self) -> int:
        return self.vocab_size

    @property
    def vocab_size(self) -> int:
        return int(self.hf.get_output_embeddings().out_features)

    def inputs(self, x: Any) -> dict[str, Tensor]:
        if isinstance(x, Tensor):  # bare token ids, no padding
            return {"input_ids": x.long()}
        if not isinstance(x, Mapping):
            raise KDXError(
                f"a causal language model reads a mapping with input_ids (and attention_mask), got "
                f"{type(x).__name__}; use a language-modelling data set (dataset=lm, e.g. experiment=lm/synthetic)"
            )
        own = self.input_prefix and any(str(k).startswith(self.input_prefix) for k in x)
        source = self.input_prefix if own else ""
        if source + "input_ids" not in x:
            raise KDXError(f"the batch has no '{source}input_ids' (keys: {', '.join(map(str, x))})")
        out = {"input_ids": x[source + "input_ids"]}
        if source + "attention_mask" in x:
            out["attention_mask"] = x[source + "attention_mask"]
        return out

    def forward(self, x: Any) -> Tensor:
        return self.hf(**self.inputs(x), use_cache=False).logits

    def feature_model(self) -> CausalLMFeatureModel:
        """The adapter :func:`kdx.models.adapter.as_feature_model` picks for this model."""
        return CausalLMFeatureModel(self)

    @torch.no_grad()
    def sample(
        self,
        prompt: Tensor,
        new_tokens: int,
        generator: torch.Generator,
        temperature: float = 1.0,
        top_k: int = 0,
    ) -> Tensor:
        """``prompt`` ``(B, P)`` followed by ``new_tokens`` tokens sampled from the model, ``(B, P + n)``.

        Sampling draws from ``softmax(z / temperature)`` restricted to the ``top_k`` most likely tokens
        (0: all), with ``generator`` (seeded by the caller: the same draw for the same seed and step);
        ``temperature=0`` is greedy decoding. The model runs in eval mode (no dropout) inside."""
        tokens = prompt
        # the key-value cache's argument: `cache` in recent transformers, `past_key_values` before
        name = "cache" if "cache" in inspect.signature(self.hf.forward).parameters else "past_key_values"
        with train_mode(self, False):
            out = self.hf(input_ids=prompt, use_cache=True)
            cache = out[name]
            logits = out.logits[:, -1]
            for i in range(new_tokens):
                logits = logits.float()
                if temperature <= 0:
                    nxt = logits.argmax(-1, keepdim=True)
                else:
                    logits = logits / temperature
                    if 0 < top_k < logits.shape[-1]:
                        kth = logits.topk(top_k, dim=-1).values[:, -1:]
                        logits = logits.masked_fill(logits < kth, float("-inf"))
                    nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator)
                tokens = torch.cat([tokens, nxt], dim=1)
                if i + 1 < new_tokens:
                    out = self.hf(input_ids=nxt, use_cache=True, **{name: cache})
                    cache, logits = out[name], out.logits[:, -1]
        return tokens


def causal_lm(
    num_classes: int | None = None,
    name_or_path: str | None = None,
    config: dict[str, Any] | None = None,
    vocab_size: int | None = None,
    input_prefix: str = "",
) -> CausalLM:
    """A causal LM: exactly one of ``name_or_path`` (a local checkpoint folder) and ``config`` (random
    init; needs ``model_type``). ``vocab_size`` sets a config-built model's vocabulary (the data set's
    tokenizer); ``num_classes``, when given, must equal the vocabulary (the data set's ``num_classes``)."""
    transformers = _import_transformers()
    if (name_or_path is None) == (config is None):
        raise KDXError(
            "a causal LM needs exactly one of model.name_or_path (a local checkpoint folder) and "
            "model.config (a dict with model_type, for random initialisation)"
        )
    if config is not None:
        settings = dict(config)
        model_type = settings.pop("model_type", None)
        if model_type is None:
            raise KDXError("model.config needs model_type (e.g. gpt2, llama)")
        if vocab_size is not None:
            settings["vocab_size"] = int(vocab_size)
        # kdx's blocks carry their own end-of-document token; the architecture's default ids (GPT-2's
        # 50256) would lie outside a small vocabulary
        settings.setdefault("bos_token_id", None)
        settings.setdefault("eos_token_id", None)
        hf = transformers.AutoModelForCausalLM.from_config(
            transformers.AutoConfig.for_model(model_type, **settings)
        )
    else:
        try:
            hf = transformers.AutoModelForCausalLM.from_pretrained(str(name_or_path), dtype=torch.float32)
        except OSError as err:
            raise KDXError(
                f"model.name_or_path={name_or_path} is not a local causal-LM checkpoint folder (kdx does not "
                "download); save one with save_pretrained(<dir>) and pass model.name_or_path=<dir>"
            ) from err
    model = CausalLM(hf, input_prefix=input_prefix)
    if vocab_size is not None and int(vocab_size) != model.vocab_size:
        raise KDXError(
            f"model.vocab_size={vocab_size} differs from the checkpoint {name_or_path}'s {model.vocab_size}; "
            "the data set must tokenise with the checkpoint's tokenizer (dataset.datamodule.tokenizer)"
        )
    if num_classes is not None and int(num_classes) != model.vocab_size:
        raise KDXError(
            f"the causal LM's vocabulary ({model.vocab_size}) differs from the data set's ({num_classes}); "
            "teacher and student must share the data set's tokenizer (set dataset.vocab_size to the model's)"
        )
    return model


causal_lm.input_kind = "lm"  # type: ignore[attr-defined]  # read by run validation from the config target


class CausalLMFeatureModel(FeatureModel):
    """``x -> ModelOutput(logits (B, L, V))`` for :class:`CausalLM`."""

    model: CausalLM

    @property
    def num_classes(self) -> int:
        return self.model.vocab_size

    @property
    def classifier(self) -> nn.Linear:
        return self.model.hf.get_output_embeddings()

    def forward(self, x: Any, reads: Iterable[str] = (LOGITS,)) -> ModelOutput:
        reads = set(reads)
        self.refuse_preact(reads)
        return ModelOutput(self.model(x))

    def sample(self, *args: Any, **kwargs: Any) -> Tensor:
        return self.model.sample(*args, **kwargs)

    @torch.no_grad()
    def probe(self, input_shape: tuple[int, ...], reads: Iterable[str] = (LOGITS,)) -> ModelOutput:
        with train_mode(self, False):
            device = next(self.parameters()).device
            length = int(input_shape[-1]) if input_shape else 8
            return self(torch.zeros(2, length, dtype=torch.long, device=device), reads)
