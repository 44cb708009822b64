"""``method=backward method.space=embedding``: backward-pass KD's auxiliary samples for text.

Paper: Jafari, Rezagholizadeh & Ghodsi, *Improved knowledge distillation by utilizing backward pass
knowledge in neural networks* (arXiv 2301.12006, 2023). Its abstract says the auxiliary samples
(inputs moved along the gradient of the teacher–student divergence) also work for discrete inputs
such as text; token ids have no gradient, so the move happens in the continuous space of the
input (word-piece) embeddings. The loss and the rest of the method are
:mod:`kdx.methods.backward`'s; this module only generates the auxiliary inputs.

Formula. For a text batch with student ids ``u``, teacher ids ``v`` and attention mask ``m``, the
models read ``inputs_embeds`` instead of ids (position and token-type embeddings are still added
inside each model, unperturbed)::

    E_s = emb_s(u),  E_t = emb_t(v)                                  (word-embedding lookups)
    D(δ_s, δ_t) = KL(softmax(f_t(E_t + δ_t)/T) ‖ softmax(f_s(E_s + δ_s)/T))   per sample
    k steps from δ = 0 (both models in eval(), no parameter gradient):
        g   = ∇_δ D                     (zero on padding positions, m = 0)
        δ  ← Π( δ + η·s · g/‖g‖₂ )      step=normalized;  δ ← Π( δ + η·c·sign(g) ) for step=sign

with ``‖·‖`` over what ``step_scale`` normalises and ``s``/``c`` as in :mod:`kdx.methods.backward`:

* ``token`` (the text default): per token, ``δ_i = η·‖e_i‖·g_i/‖g_i‖`` (sign step: ``η·‖e_i‖/√d ·
  sign(g_i)``), so every real token moves by exactly η of its own embedding's norm;
* ``norm``: per sentence, ``s = ‖E_s‖₂`` over the non-padding tokens and all widths, so the
  *sentence* moves by η — but the gradient concentrates on a few tokens, and those move much
  further (on SST-2 at η = 0.2 the most-moved token of a sentence moved 0.44–0.51 of its norm, and
  one token took about half of the squared move);
* ``rms``: the batch's RMS; ``absolute``: ``s = c = 1``.

``Π`` projects onto the ε-ball (``epsilon``) scaled the same way (per token for ``token``). The
auxiliary sample is then ``(E_s + δ_s, E_t + δ_t)``, and the student's embedding table gets
gradients from it as from the clean batch (the move is data, the lookup is the student's).

Which embeddings move (``method.tie``):

* ``student`` (the text default): only the student's embeddings move, along ``∂D/∂E_s``; the
  teacher reads the clean sentence, so its target is its prediction for the sentence the auxiliary
  sample stands for. Any widths, any tokenisations.
* ``auto``: the rule follows from the models and the batch —

  * ``shared`` when both read the same token ids (one tokenisation, the same ids in both keys)
    and both embeddings have the same width: one ``δ`` added to both, ``δ_s = δ_t = δ``, ascending
    on ``∇_δ D = ∂D/∂E_s + ∂D/∂E_t``, scaled by the student's embeddings;
  * ``separate`` otherwise (different widths or tokenizers): each model's embeddings move along
    their own gradient of the same ``D`` with their own normalisation — joint ascent over the
    pair. The teacher's move is then an attack on the teacher: on SST-2 (2-layer BERTs, widths
    64/32) it flipped the teacher's prediction on 27 % of the sentences at η = 0.05 and 37 % at
    η = 0.2, so the auxiliary targets stopped being labels of any sentence.

``method.direction=random`` (the control) draws a Gaussian direction per move instead of the
gradient (no backward pass), normalised by the same rule: the same length, no backward-pass
knowledge. ``clamp_min`` / ``clamp_max`` have no meaning for embeddings and are refused;
``mode=offline`` is refused (the auxiliary set would be stored embeddings of a student that keeps
changing its table).

The guard. Logged with every step (``train/aux/...``): ``move`` (sentence), ``move_teacher``,
``move_token`` (mean of ‖δ_i‖/‖e_i‖ over tokens), ``move_token_max`` (each sentence's largest,
averaged) and ``neighbour`` (:func:`neighbour_distance`: the median distance from a word's
embedding to the nearest other word's, relative to its norm — about 0.86 for the 32-wide student
on SST-2). On the first batch of every epoch: a mean token move beyond ``neighbour`` is refused
(:class:`~kdx.errors.KDXError` naming ``method.step_size``: the auxiliary samples are no
sentences), a most-moved token beyond it is a warning, and so is one beyond ``COLLAPSE_MOVE`` =
0.15 of its norm (on SST-2 the students collapsed to chance at 0.2 and trained at 0.10, well
inside the words' neighbourhoods).

Defaults for ``method.space=embedding`` (the ``method.*`` keys left null; chosen from measurements
on SST-2, docs/text.md "Backward-pass KD on SST-2"): ``step_scale=token``, ``tie=student``,
η = 0.02, λ_aux = 1. ``method.space=input`` keeps its own (η = 0.2 of ‖x‖, ``norm``, λ_aux = 1).

Deviations from the paper: only the abstract could be read. Perturbing the word embeddings (not
the sum with position embeddings), the tie rules, the normalisations and the online (per-batch)
generation are our choices.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from kdx.errors import KDXError
from kdx.methods.backward import PERTURBATIONS, Divergence, Perturbation
from kdx.models.hf import select_inputs

log = logging.getLogger(__name__)

_DELTA = "__embedding_delta__"  # key of the student's move in an auxiliary batch
_TEACHER_DELTA = "__teacher_embedding_delta__"
_SEQUENCE_KEYS = ("attention_mask", "token_type_ids", "position_ids")


_MOVES = "__moves__"  # the move's sizes (detached scalars), for the log and the guard
_NEIGHBOUR_ROWS = 512  # vocabulary rows sampled by neighbour_distance
# a most-moved token beyond this fraction of its norm is warned about: on SST-2 (2-layer BERTs)
# 0.10 trained and every setting at 0.2 or more collapsed to chance (docs/text.md)
COLLAPSE_MOVE = 0.15


def _per_sample(values: Tensor) -> Tensor:
    return values.view(-1, 1, 1)


def _relative(delta: Tensor, embeds: Tensor, mask: Tensor) -> Tensor:
    """Mean over the batch of ‖δ‖ / ‖E‖, both over a sample's non-padding tokens."""
    norm = (embeds * mask).flatten(1).norm(dim=1).clamp_min(1e-12)
    return ((delta * mask).flatten(1).norm(dim=1) / norm).mean().detach()


def _token_moves(delta: Tensor, embeds: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """Per token ‖δ_i‖ / ‖e_i‖: the mean over the batch's tokens, and the mean over sentences of
    each sentence's largest."""
    real = mask.squeeze(-1) > 0
    ratio = delta.norm(dim=-1) / embeds.norm(dim=-1).clamp_min(1e-12)
    mean = ratio[real].mean() if bool(real.any()) else ratio.new_zeros(())
    most = ratio.masked_fill(~real, 0.0).amax(dim=1).mean()
    return {"aux/move_token": mean.detach(), "aux/move_token_max": most.detach()}


@torch.no_grad()
def neighbour_distance(table: Tensor, rows: int = _NEIGHBOUR_ROWS) -> float:
    """Median over (at most ``rows``, a fixed sample of) vocabulary rows of the distance to the
    nearest other row, relative to the row's norm: how far a token must move to sit as close to
    another word as to itself. Rows of norm 0 (an unused padding row) are left out."""
    table = table.detach().float()
    keep = table.norm(dim=1) > 0
    table = table[keep]
    if table.shape[0] < 2:
        return float("inf")
    generator = torch.Generator().manual_seed(0)
    picked = torch.randperm(table.shape[0], generator=generator)[:rows].to(table.device)
    distance = torch.cdist(table[picked], table)
    distance[torch.arange(len(picked), device=table.device), picked] = float("inf")
    return float((distance.min(dim=1).values / table[picked].norm(dim=1)).median())


class EmbeddingPerturbation(Perturbation):
    """Gradient ascent on ``D`` in the word-embedding space of Hugging Face models (kdx.models.hf)."""

    supports_offline = False
    # chosen on SST-2 (docs/text.md): η = 0.2 of the review's norm collapsed the student to chance
    defaults: ClassVar[dict[str, Any]] = {
        "aux_weight": 1.0,
        "step_size": 0.02,
        "step_scale": "token",
        "tie": "student",
    }

    def __init__(
        self,
        steps: int = 1,
        step_size: float = 0.2,
        step: str = "normalized",
        step_scale: str = "norm",
        clamp_min: float | None = None,
        clamp_max: float | None = None,
        epsilon: float | None = None,
        direction: str = "gradient",
        tie: str = "auto",
    ):
        if clamp_min is not None or clamp_max is not None:
            raise ValueError(
                "method.clamp_min / method.clamp_max bound input values and have no meaning for "
                "method.space=embedding; leave them null"
            )
        self.steps = steps
        self.step_size = step_size
        self.step = step
        self.step_scale = step_scale
        self.epsilon = epsilon
        self.random_direction = direction == "random"
        self.teacher_moves = tie != "student"
        self.student: nn.Module | None = None
        self.teacher: nn.Module | None = None
        self.nn_distance: float | None = None  # see neighbour_distance

    # -- models -----------------------------------------------------------------------------------
    def setup(self, student: nn.Module, teacher: nn.Module | None) -> None:
        for role, model in (("student", student), ("teacher", teacher)):
            if not callable(getattr(model, "input_embeddings", None)):
                raise KDXError(
                    f"method.space=embedding perturbs word embeddings, but the {role} "
                    f"({type(getattr(model, 'model', model)).__name__}) is not a Hugging Face text model; "
                    "use model=hf models (e.g. experiment=text/synthetic) or method.space=input"
                )
        if student.input_prefix == teacher.input_prefix:
            raise KDXError(
                f"student and teacher both read the batch keys with prefix {student.input_prefix!r}; "
                "set teacher.model.input_prefix=teacher. (the teacher configs' default)"
            )
        self.student, self.teacher = student, teacher

    def _embed(self, model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
        return model.input_embeddings()(inputs["input_ids"])

    def _inputs(self, x: Any) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        if self.student is None or self.teacher is None:
            raise RuntimeError("EmbeddingPerturbation.setup(student, teacher) has not been called")
        return select_inputs(x, self.student.input_prefix), select_inputs(x, self.teacher.input_prefix)

    def tie(self, student_inputs: dict[str, Tensor], teacher_inputs: dict[str, Tensor]) -> str:
        """``shared`` or ``separate`` (see the module docstring)."""
        same_ids = student_inputs["input_ids"] is teacher_inputs["input_ids"] or (
            student_inputs["input_ids"].shape == teacher_inputs["input_ids"].shape
            and bool(torch.equal(student_inputs["input_ids"], teacher_inputs["input_ids"]))
        )
        same_width = (
            self.student.input_embeddings().embedding_dim == self.teacher.input_embeddings().embedding_dim
        )
        return "shared" if same_ids and same_width else "separate"

    # -- batches ----------------------------------------------------------------------------------
    def _batch(self, parts: list[tuple[dict, Tensor, dict, Tensor]]) -> dict[str, Tensor]:
        """A batch the models read as ``inputs_embeds``: student keys plain, teacher keys prefixed."""
        prefix = self.teacher.input_prefix
        out: dict[str, Tensor] = {"inputs_embeds": torch.cat([p[1] for p in parts])}
        out[prefix + "inputs_embeds"] = torch.cat([p[3] for p in parts])
        for key in _SEQUENCE_KEYS:
            if key in parts[0][0]:
                out[key] = torch.cat([p[0][key] for p in parts])
            if key in parts[0][2]:
                out[prefix + key] = torch.cat([p[2][key] for p in parts])
        return out

    def join(self, inputs: Any, aux_inputs: dict[str, Any]) -> dict[str, Tensor]:
        """Clean batch then auxiliary batch, as one embedding batch (the student's lookups keep
        their gradient; the moves are constants)."""
        s_in, t_in = self._inputs(inputs)
        e_s, e_t = self._embed(self.student, s_in), self._embed(self.teacher, t_in)
        delta_s, delta_t = aux_inputs[_DELTA], aux_inputs[_TEACHER_DELTA]
        return self._batch(
            [(s_in, e_s, t_in, e_t), (s_in, e_s + delta_s.to(e_s.dtype), t_in, e_t + delta_t.to(e_t.dtype))]
        )

    @staticmethod
    def relative_move(inputs: Any, aux_inputs: Any) -> Tensor:
        """Mean ‖δ_s‖ / ‖E_s‖ over the batch (logged as ``aux/move``)."""
        return aux_inputs[_MOVES]["aux/move"]

    # -- generation -------------------------------------------------------------------------------
    def _scale(self, embeds: Tensor, mask: Tensor) -> Tensor:
        """``s`` (normalized step) or ``c = s/√n`` (sign step): per sample ``(B, 1, 1)``, or per
        token ``(B, L, 1)`` for ``step_scale=token`` (``s_i = ‖e_i‖``, ``c_i = ‖e_i‖/√d``)."""
        if self.step_scale == "token":
            s = embeds.norm(dim=-1, keepdim=True) * mask
            return s / embeds.shape[-1] ** 0.5 if self.step == "sign" else s
        masked = embeds * mask
        count = (mask.sum((1, 2)) * embeds.shape[-1]).clamp_min(1.0)
        if self.step_scale == "absolute":
            s = torch.ones_like(count)
        elif self.step_scale == "norm":
            s = masked.flatten(1).norm(dim=1)
        else:  # rms: the batch's RMS over non-padding values, times √n of each sample
            rms = (masked.pow(2).sum() / count.sum()).sqrt()
            s = rms * count.sqrt()
        return _per_sample(s / count.sqrt() if self.step == "sign" else s)

    def _norm(self, values: Tensor) -> Tensor:
        """L2 norm over what one step is normalised over: a token (``token``) or a sample."""
        if self.step_scale == "token":
            return values.norm(dim=-1, keepdim=True)
        return _per_sample(values.flatten(1).norm(dim=1))

    def _direction(self, grad: Tensor, mask: Tensor) -> Tensor:
        grad = grad * mask
        if self.step == "sign":
            return grad.sign()
        norm = self._norm(grad)
        return torch.where(
            norm > 0, grad / norm.clamp_min(torch.finfo(grad.dtype).tiny), torch.zeros_like(grad)
        )

    def _project(self, delta: Tensor, scale: Tensor) -> Tensor:
        if self.epsilon is None:
            return delta
        if self.step == "sign":
            bound = self.epsilon * scale
            return torch.maximum(torch.minimum(delta, bound), -bound)
        radius = self.epsilon * scale
        norm = self._norm(delta)
        return delta * (radius / torch.maximum(norm, radius).clamp_min(torch.finfo(delta.dtype).tiny))

    def _ascent_direction(
        self, divergence: Divergence, parts: tuple, delta_s: Tensor, delta_t: Tensor, shared: bool
    ) -> tuple[Tensor | None, Tensor | None]:
        """The raw (un-normalised) directions of the student's and the teacher's move."""
        s_in, e_s, t_in, e_t = parts
        if self.random_direction:  # the control: same step rule and length, no backward pass
            noise = torch.randn_like(delta_s)
            return noise, (noise if shared else torch.randn_like(delta_t) if self.teacher_moves else None)
        if shared:
            delta = delta_s.clone().requires_grad_(True)
            batch = self._batch([(s_in, e_s + delta, t_in, e_t + delta)])
            (grad,) = torch.autograd.grad(divergence(batch).sum(), delta, allow_unused=True)
            return grad, grad
        ds = delta_s.clone().requires_grad_(True)
        dt = delta_t.clone().requires_grad_(self.teacher_moves)
        batch = self._batch([(s_in, e_s + ds, t_in, e_t + dt)])
        wrt = (ds, dt) if self.teacher_moves else (ds,)
        grads = torch.autograd.grad(divergence(batch).sum(), wrt, allow_unused=True)
        return grads[0], (grads[1] if self.teacher_moves else None)

    def __call__(self, inputs: Any, divergence: Divergence) -> dict[str, Any]:
        s_in, t_in = self._inputs(inputs)
        with torch.no_grad():
            e_s = self._embed(self.student, s_in).float()
            e_t = self._embed(self.teacher, t_in).float()
        mask_s = s_in.get("attention_mask", torch.ones(e_s.shape[:2], device=e_s.device))
        mask_t = t_in.get("attention_mask", torch.ones(e_t.shape[:2], device=e_t.device))
        mask_s, mask_t = mask_s.unsqueeze(-1).to(e_s.dtype), mask_t.unsqueeze(-1).to(e_t.dtype)
        shared = self.teacher_moves and self.tie(s_in, t_in) == "shared"
        scale_s, scale_t = self._scale(e_s, mask_s), self._scale(e_t, mask_t)
        delta_s, delta_t = torch.zeros_like(e_s), torch.zeros_like(e_t)
        if self.step_size > 0:
            with torch.enable_grad():
                for _ in range(self.steps):
                    grad_s, grad_t = self._ascent_direction(
                        divergence, (s_in, e_s, t_in, e_t), delta_s, delta_t, shared
                    )
                    step_s = torch.zeros_like(delta_s) if grad_s is None else self._direction(grad_s, mask_s)
                    delta_s = self._project(delta_s.detach() + self.step_size * scale_s * step_s, scale_s)
                    if shared:
                        delta_t = delta_s
                    elif self.teacher_moves:
                        step_t = (
                            torch.zeros_like(delta_t) if grad_t is None else self._direction(grad_t, mask_t)
                        )
                        delta_t = self._project(delta_t.detach() + self.step_size * scale_t * step_t, scale_t)
        moves = {
            "aux/move": _relative(delta_s, e_s, mask_s),
            "aux/move_teacher": _relative(delta_t, e_t, mask_t),
            **_token_moves(delta_s, e_s, mask_s),
        }
        return {
            _DELTA: delta_s.detach(),
            _TEACHER_DELTA: delta_t.detach(),
            "__move__": moves["aux/move"],
            _MOVES: moves,
        }

    # -- the guard --------------------------------------------------------------------------------
    def move_terms(self, inputs: Any, aux_inputs: Any) -> dict[str, Tensor]:
        """``aux/move`` (‖δ_s‖/‖E_s‖ per sentence), ``aux/move_teacher`` (the same for the teacher's
        δ_t), ``aux/move_token`` (‖δ_i‖/‖e_i‖ per token, the mean over the batch's tokens),
        ``aux/move_token_max`` (its maximum in each sentence, the mean over sentences), and
        ``aux/neighbour`` (:meth:`neighbour_distance`), all batch means."""
        terms = dict(aux_inputs[_MOVES])
        if self.nn_distance is None:
            self.refresh()
        terms["aux/neighbour"] = torch.tensor(self.nn_distance, device=terms["aux/move"].device)
        return terms

    def refresh(self) -> None:
        if self.student is not None:
            self.nn_distance = neighbour_distance(self.student.input_embeddings().weight)

    def check(self, terms: dict[str, Tensor]) -> None:
        """A token moved further than the typical distance between two words of the vocabulary
        (``aux/neighbour``) stands for no word the teacher has seen: refuse when the mean token
        moves that far, warn when the most-moved token of a typical sentence does."""
        neighbour = float(terms["aux/neighbour"])
        mean, most = float(terms["aux/move_token"]), float(terms["aux/move_token_max"])
        setting = (
            f"method.step_size={self.step_size:g} with method.step_scale={self.step_scale}"
            f" and method.steps={self.steps}"
        )
        if mean > neighbour:
            raise KDXError(
                f"{setting} moves the average token by {mean:.2f} of its embedding's norm, further than "
                f"the median distance between neighbouring words ({neighbour:.2f}): the auxiliary samples "
                "are not sentences; lower method.step_size (the text default, step_scale=token, "
                f"moves each token by step_size; keep it below {neighbour:.2f})"
            )
        if neighbour >= most > COLLAPSE_MOVE:
            log.warning(
                "kdx: warning: %s moves the most-moved token of a sentence by %.2f of its norm on average; "
                "on SST-2 every setting that moved it by 0.2 or more collapsed the student to chance "
                "(docs/text.md); the text default moves each token by 0.02 (method.step_scale=token)",
                setting,
                most,
            )
        if most > neighbour:
            log.warning(
                "kdx: warning: %s moves the most-moved token of a sentence by %.2f of its norm on average, "
                "further than the median distance between neighbouring words (%.2f): those tokens stand "
                "for no word; lower method.step_size or use method.step_scale=token",
                setting,
                most,
                neighbour,
            )


PERTURBATIONS["embedding"] = EmbeddingPerturbation
