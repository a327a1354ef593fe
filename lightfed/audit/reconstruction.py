r"""Reconstruction of a client's data from what the server sees of its update.

A client's update after one local SGD step on a batch of one example is ``delta = -lr * grad``. Two attacks:

* **Analytic recovery from a fully connected first layer** (Phong et al. 2018; Geiping et al. 2020, Prop. 1;
  Fowl et al. 2022, "Robbing the Fed"). For ``z = W x + b`` at batch 1, ``dL/dW_i = (dL/dz_i) x`` and
  ``dL/db_i = dL/dz_i``, so every row with a nonzero bias gradient gives the input exactly,

  .. math:: x = \frac{\partial L / \partial W_{i,:}}{\partial L / \partial b_i} = \frac{\delta W_{i,:}}{\delta b_i}

  (``-lr`` cancels). Over a batch, several steps or a sum of clients, a row gives a mixture of the inputs
  that activated it; :func:`analytic_first_layer` takes the row with the largest ``|delta b_i|``.
* **iDLG label recovery** (Zhao, Mopuri & Bilen 2020): for cross-entropy, ``dL/db_j = p_j - y_j`` of the last
  layer is negative only at the true class, so at batch 1 the label is ``argmax_j delta b_j``. For a batch of
  ``B``, :func:`recover_labels` counts labels from ``sum_i y_ij = sum_i p_ij - B dL/db_j`` with the model's
  predictions taken as uniform (exact for an untrained model; Wainakh et al. 2022 "LLG").
* **Gradient inversion** (Geiping, Bauermeister, Droege & Moeller, NeurIPS 2020, "Inverting Gradients"): for
  batches and several local steps. Dummy inputs ``x'`` (seeded) with the recovered labels are optimised with
  Adam so that the update they would produce, ``delta'(x')`` (``local_steps`` full-batch SGD steps unrolled
  through ``torch.func``), points where the observed one does:

  .. math:: \min_{x' \in [lo, hi]} \; 1 - \frac{\langle \delta'(x'), \delta \rangle}{\|\delta'(x')\| \|\delta\|}
            + \alpha \, \mathrm{TV}(x')

Quality is PSNR and SSIM (torchmetrics) of each true image against its matched reconstruction, in the
pixel box ``[lo, hi]`` rescaled to ``[0, 1]`` (:func:`image_quality`). :func:`released_update` makes the
observed update the way a round releases it: the real client loop (:class:`~lightfed.client.LocalTrainer`)
and the real server path (:func:`~lightfed.server.run_server_round`) with the configured privacy and secure
aggregation, so under secure aggregation the attacker sees only the cohort's sum and under DP the noisy,
clipped sum. A reconstruction measures one attack on one update, not a bound: a failed attack does not show
that nothing leaks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from lightfed.params import ParamSpec
from lightfed.seeding import make_generator


# ---------------------------------------------------------------------------------------- the model's layers
@dataclass(frozen=True)
class LinearLayer:
    """A fully connected layer's weight and bias in the payload: names and offsets in the flat vector."""

    weight: str
    bias: str | None
    out_features: int
    in_features: int


class AnalyticNotApplicable(TypeError):
    """The analytic first-layer attack does not apply: no biased fully connected layer on the input is sent."""


def linear_layers(module: nn.Module, spec: ParamSpec) -> list[LinearLayer]:
    """The ``nn.Linear`` layers of ``module`` whose weight is in the payload, in module order.

    Raises:
        TypeError: for a model without a fully connected layer in its payload (nothing to attack).
    """
    layers = []
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Linear):
            w = f"{name}.weight" if name else "weight"
            b = f"{name}.bias" if name else "bias"
            if w in spec.names:
                layers.append(LinearLayer(w, b if sub.bias is not None and b in spec.names else None,
                                          sub.out_features, sub.in_features))
    if not layers:
        raise TypeError(
            f"{type(module).__name__} has no fully connected (nn.Linear) layer in its trained payload; the "
            f"reconstruction attacks need one (the first for analytic recovery, the last for label recovery)."
        )
    return layers


def tensor_of(spec: ParamSpec, flat: Tensor, name: str) -> Tensor:
    """The payload tensor ``name`` as a view of the flat vector ``flat``."""
    return spec.unflatten(flat)[spec.names.index(name)]


# ---------------------------------------------------------------------------------------- analytic attacks
def analytic_first_layer(delta_weight: Tensor, delta_bias: Tensor) -> Tensor:
    """The input recovered from a fully connected layer's update: ``delta W[i] / delta b[i]``.

    Args:
        delta_weight: ``[out, in]``, the layer's update (or gradient).
        delta_bias: ``[out]``, its bias's update (or gradient).

    Returns:
        ``[in]``: exact at batch 1 and one step for the row used (the largest ``|delta b_i|``); a mixture
        of the inputs otherwise.

    Raises:
        ValueError: if every bias entry is zero (no row saw the input).
    """
    i = int(delta_bias.abs().argmax())
    if float(delta_bias[i]) == 0.0:
        raise ValueError("every bias update of the first layer is zero: no row carries the input.")
    return delta_weight[i] / delta_bias[i]


def recover_labels(grad_bias: Tensor, count: int = 1) -> Tensor:
    """Labels of ``count`` examples from the last layer's bias *gradient* (``-delta / lr``).

    ``count == 1``: iDLG, ``argmin_j grad_j`` (the only negative entry). ``count > 1``: the counts
    ``n_j = count * (1 / K - grad_j)`` (uniform predictions assumed), rounded by largest remainders to sum
    to ``count``; returned sorted.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}.")
    if count == 1:
        return grad_bias.argmin().reshape(1)
    k = grad_bias.numel()
    est = (count * (1.0 / k - grad_bias.double())).clamp_min(0)
    base = est.floor()
    short = count - int(base.sum())
    if short > 0:
        base[torch.argsort(est - base, descending=True)[:short]] += 1
    elif short < 0:
        for j in torch.argsort(est - base):  # drop from the smallest remainders first
            while short < 0 and base[j] > 0:
                base[j] -= 1
                short += 1
    return torch.repeat_interleave(torch.arange(k), base.long())


def label_accuracy(predicted: Tensor, true: Tensor) -> float:
    """The fraction of ``true`` labels recovered, as multisets (order does not matter)."""
    k = int(max(predicted.max(), true.max())) + 1
    hits = torch.minimum(torch.bincount(predicted, minlength=k), torch.bincount(true, minlength=k)).sum()
    return float(hits) / len(true)


# ---------------------------------------------------------------------------------------- gradient inversion
def total_variation(x: Tensor) -> Tensor:
    """Anisotropic total variation of images ``[n, c, h, w]`` (mean absolute neighbour difference)."""
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


def simulated_update(
    module: nn.Module, spec: ParamSpec, params: dict[str, Tensor], x: Tensor, y: Tensor, lr: float, steps: int,
) -> Tensor:
    """The flat update ``local_steps`` full-batch SGD steps of cross-entropy on ``(x, y)`` would make.

    Differentiable in ``x`` (``create_graph``), so inversion can optimise it.
    """
    current = dict(params)
    names = [n for n, b in zip(spec.names, spec.is_buffer) if not b]
    for _ in range(steps):
        # tie_weights=False: a module registering a layer twice (the CNN's ``net`` and ``features``) keeps the
        # stepped, non-leaf weights after the call otherwise (torch 2.x); the swap reaches the shared layer anyway
        loss = F.cross_entropy(functional_call(module, current, (x,), tie_weights=False), y)
        grads = torch.autograd.grad(loss, [current[n] for n in names], create_graph=True)
        current = {**current, **{n: current[n] - lr * g for n, g in zip(names, grads)}}
    return torch.cat([(current[n] - params[n]).reshape(-1) for n in names])


def invert_gradients(
    module: nn.Module,
    spec: ParamSpec,
    global_params: Tensor,
    observed: Tensor,
    labels: Tensor,
    input_shape: Sequence[int],
    *,
    lr: float,
    local_steps: int = 1,
    iterations: int = 200,
    step_size: float = 0.1,
    tv: float = 1e-2,
    box: tuple[float, float] = (0.0, 1.0),
    image_shape: Sequence[int] | None = None,
    seed: int = 0,
) -> Tensor:
    """Inverting Gradients (Geiping et al. 2020): inputs whose simulated update matches ``observed`` in angle.

    Args:
        module: The model (its architecture; weights are taken from ``global_params``).
        spec: The payload layout of ``observed``.
        global_params: The weights the client started from.
        observed: The flat update the server saw.
        labels: ``[B]`` labels of the dummy inputs (recovered, :func:`recover_labels`).
        input_shape: The model's input shape of one example (``(64,)`` for flat digits).
        lr: The client's learning rate (the attacker knows the training configuration).
        local_steps: Full-batch SGD steps the simulation unrolls.
        iterations: Adam iterations (a small budget: 200 take about a second for the digits MLP).
        step_size: Adam's learning rate on the inputs.
        tv: Weight of total variation (on ``image_shape``).
        box: Pixel range; the inputs are kept inside it.
        image_shape: ``(c, h, w)`` of the images for total variation; default ``input_shape`` if 3-d, else
            no total variation.
        seed: Seed of the dummy inputs.

    Returns:
        ``[B, *input_shape]``, the reconstruction with the lowest objective seen.
    """
    params = {n: t.detach().clone() for n, t, b in zip(spec.names, spec.unflatten(global_params), spec.is_buffer) if not b}
    trainable = {n for n, b in zip(spec.names, spec.is_buffer) if not b}
    target = torch.cat([t.reshape(-1) for n, t in zip(spec.names, spec.unflatten(observed)) if n in trainable])
    target = target / target.norm().clamp_min(1e-12)
    lo, hi = box
    gen = make_generator(seed, "inversion")
    x = (lo + (hi - lo) * torch.rand((len(labels), *input_shape), generator=gen)).requires_grad_(True)
    image = tuple(image_shape) if image_shape is not None else (tuple(input_shape) if len(input_shape) == 3 else None)
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.Adam([x], lr=step_size)
    best, best_loss = x.detach().clone(), math.inf
    was_training = module.training
    module.eval()
    try:
        for _ in range(iterations):
            opt.zero_grad()
            sim = simulated_update(module, spec, params, x, labels, lr, local_steps)
            loss = 1 - (sim @ target) / sim.norm().clamp_min(1e-12)
            if image is not None and tv > 0:
                loss = loss + tv * total_variation(x.reshape(len(labels), *image))
            value = loss.item()
            if value < best_loss:
                best_loss, best = value, x.detach().clone()
            loss.backward()
            opt.step()
            with torch.no_grad():
                x.clamp_(lo, hi)
    finally:
        module.train(was_training)
    return best


# ---------------------------------------------------------------------------------------- quality
def image_quality(
    recon: Tensor, truth: Tensor, image_shape: Sequence[int], box: tuple[float, float] = (0.0, 1.0)
) -> tuple[Tensor, Tensor, Tensor]:
    """PSNR (dB) and SSIM of each reconstruction against the true image it is matched to, one-to-one.

    Reconstructions and true images are paired by the Hungarian assignment that maximises the summed PSNR
    (``min(R, B)`` pairs: one analytic reconstruction is scored against the true image it resembles most).
    Pixels are rescaled from ``box`` to ``[0, 1]`` first, so PSNR is ``10 log10(1 / MSE)``.

    Returns:
        ``(psnr, ssim, truth_index)``, one entry per pair.
    """
    from scipy.optimize import linear_sum_assignment
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    shape = tuple(image_shape)
    r, t = to_images(recon, shape, box), to_images(truth, shape, box)
    mse = ((r[:, None] - t[None]) ** 2).flatten(2).mean(-1)  # [R, B]
    rows, cols = linear_sum_assignment(mse.numpy())
    rows, cols = torch.as_tensor(rows), torch.as_tensor(cols)
    psnr = peak_signal_noise_ratio(r[rows], t[cols], data_range=1.0, reduction="none", dim=(1, 2, 3))
    kernel = min(11, shape[-1] - (1 - shape[-1] % 2))  # odd, at most the image side
    ssim = structural_similarity_index_measure(r[rows], t[cols], data_range=1.0, kernel_size=kernel, reduction="none")
    return psnr.reshape(-1), ssim.reshape(-1), cols


# ---------------------------------------------------------------------------------------- the attack on an update
@dataclass
class Reconstruction:
    """What an attack recovered from one observed update, and how good it is (when the truth is known).

    ``psnr`` / ``ssim``: means over the matched pairs (:func:`image_quality`); ``best_psnr``: the best pair (one
    example recovered well is a leak even if the others are not); ``label_accuracy``: the fraction of the true
    labels recovered, as multisets.
    """

    method: str
    images: Tensor
    labels: Tensor
    psnr: float = math.nan
    best_psnr: float = math.nan
    ssim: float = math.nan
    label_accuracy: float = math.nan
    per_image_psnr: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"method": self.method, "psnr": self.psnr, "best_psnr": self.best_psnr, "ssim": self.ssim, "label_accuracy": self.label_accuracy,
                "per_image_psnr": self.per_image_psnr, "labels": self.labels.tolist()}


def attack_update(
    module: nn.Module,
    spec: ParamSpec,
    global_params: Tensor,
    observed: Tensor,
    *,
    lr: float,
    batch_size: int = 1,
    local_steps: int = 1,
    method: str = "analytic",
    image_shape: Sequence[int],
    box: tuple[float, float] = (0.0, 1.0),
    truth: tuple[Tensor, Tensor] | None = None,
    input_shape: Sequence[int] | None = None,
    iterations: int = 200,
    tv: float = 1e-2,
    seed: int = 0,
) -> Reconstruction:
    """Reconstruct the inputs and labels behind ``observed`` (a released sum of updates, or one update).

    Args:
        module, spec, global_params: The model, its payload layout and the weights the round started from.
        observed: The flat update (or sum of updates) the attacker sees.
        lr: The client's learning rate; ``local_steps``: its steps; ``batch_size``: the examples the attacker
            looks for (the number of labels recovered and of images inverted).
        method: ``"analytic"`` (first fully connected layer, one image) or ``"inversion"`` (Geiping et al.).
        image_shape: ``(c, h, w)`` of one input, for quality and total variation.
        box: The pixel range of the inputs (reconstructions are clamped into it).
        truth: ``(inputs, labels)`` of the examples behind ``observed``, to score the attack.
        input_shape: The model's input shape of one example; default: that of ``truth``, else flat
            (``prod(image_shape)``) when the first layer is fully connected on it, else ``image_shape``.
        iterations, tv, seed: Inversion's budget, total-variation weight and seed.

    Raises:
        ValueError: for an unknown method; TypeError: for a model the attack cannot handle.
    """
    if method not in ("analytic", "inversion"):
        raise ValueError(f"method must be 'analytic' or 'inversion', got {method!r}.")
    layers = linear_layers(module, spec)
    last = layers[-1]
    grad_scale = -1.0 / (lr * max(local_steps, 1))
    if last.bias is not None:
        last_grad = tensor_of(spec, observed, last.bias) * grad_scale
    else:  # iDLG on weights: the row sums have the bias gradient's sign when inputs to the layer are >= 0
        last_grad = tensor_of(spec, observed, last.weight).sum(1) * grad_scale
    labels = recover_labels(last_grad, batch_size)
    lo, hi = box
    if method == "analytic":
        first = layers[0]
        if first.bias is None:
            raise AnalyticNotApplicable(f"analytic recovery needs a bias on the first fully connected layer ({first.weight}).")
        if first.in_features != int(np.prod(image_shape)):
            raise AnalyticNotApplicable(
                f"analytic recovery needs the model's first layer to be fully connected on the input; "
                f"{first.weight} takes {first.in_features} features, the input has {int(np.prod(image_shape))}. "
                f"Use method='inversion' for this model."
            )
        try:
            x = analytic_first_layer(tensor_of(spec, observed, first.weight), tensor_of(spec, observed, first.bias))
        except ValueError:  # a zero bias update (a saturated model's loss has no gradient): nothing recovered
            x = torch.full((first.in_features,), lo)
        images = torch.nan_to_num(x, nan=lo, posinf=hi, neginf=lo).clamp(lo, hi).reshape(1, -1)
    else:
        if input_shape is None:
            flat = layers[0].in_features == int(np.prod(image_shape))
            input_shape = truth[0].shape[1:] if truth is not None else ((layers[0].in_features,) if flat else image_shape)
        images = invert_gradients(
            module, spec, global_params, observed, labels, input_shape, lr=lr, local_steps=local_steps,
            iterations=iterations, tv=tv, box=box, image_shape=image_shape, seed=seed,
        ).reshape(len(labels), -1)
    result = Reconstruction(method, images, labels)
    if truth is not None:
        psnr, ssim, _ = image_quality(images, truth[0], image_shape, box)
        result.psnr, result.best_psnr, result.ssim = float(psnr.mean()), float(psnr.max()), float(ssim.mean())
        result.per_image_psnr = [round(float(p), 2) for p in psnr]
        result.label_accuracy = label_accuracy(labels, truth[1].reshape(-1))
    return result


# ---------------------------------------------------------------------------------------- what a round releases
def released_update(
    module: nn.Module,
    spec: ParamSpec,
    global_params: Tensor,
    clients: Sequence[Any],
    *,
    local_steps: int = 1,
    batch_size: int = 1,
    privacy: Any = None,
    secure_aggregation: Any = None,
    round_idx: int = 0,
    seed: int = 0,
) -> Tensor:
    """The sum of the cohort's updates as one round of the real server path releases it.

    Trains each :class:`~lightfed.data.client_data.ClientData` in ``clients`` with the real client loop, then
    runs :func:`~lightfed.server.run_server_round` with uniform FedAvg, ``privacy`` (set up, e.g.
    :class:`~lightfed.privacy.DPFixedClipping`: clipped, noisy sum) and ``secure_aggregation`` (set up: only
    the masked sum reaches the server). Returns the released sum (``RoundOutcome.aggregate.delta_sum``): what
    the attacker holds (exactly the client's update for a cohort of one without privacy).
    """
    from lightfed.client import LocalTrainer
    from lightfed.server import run_server_round
    from lightfed.strategy import FedAvg

    local = LocalTrainer(module, spec, FedAvg(weighted=False), local_steps=local_steps, batch_size=batch_size, seed=seed)
    updates = [local.fit_client(cid, round_idx, data, global_params) for cid, data in enumerate(clients)]
    outcome = run_server_round(
        FedAvg(weighted=False), global_params, updates, round_idx, privacy, secure_aggregation
    )
    if outcome.aggregate is None:  # nothing released (secure aggregation failed closed)
        return torch.zeros_like(global_params)
    return outcome.aggregate.delta_sum


# ---------------------------------------------------------------------------------------- images out
def to_images(x: Tensor, image_shape: Sequence[int], box: tuple[float, float] = (0.0, 1.0)) -> Tensor:
    """``[n, c, h, w]`` in ``[0, 1]`` (what TensorBoard's ``add_images`` expects)."""
    lo, hi = box
    return ((x.detach().float().reshape(len(x), *image_shape) - lo) / (hi - lo)).clamp(0, 1)


def log_reconstructions(logger: Any, tag: str, recon: Tensor, truth: Tensor | None, image_shape: Sequence[int],
                        box: tuple[float, float] = (0.0, 1.0), step: int = 0) -> None:
    """TensorBoard images ``{tag}/reconstruction`` (and ``{tag}/truth``) through a Lightning logger or writer."""
    writer = getattr(logger, "experiment", logger)
    writer.add_images(f"{tag}/reconstruction", to_images(recon, image_shape, box), step)
    if truth is not None:
        writer.add_images(f"{tag}/truth", to_images(truth, image_shape, box), step)


def save_png(rows: dict[str, Tensor], path: Path, image_shape: Sequence[int], box: tuple[float, float] = (0.0, 1.0)) -> Path:
    """A grid PNG: one row of images per entry of ``rows`` (its key as the row's label)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = max(len(v) for v in rows.values())
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.1 * cols + 1.5, 1.2 * len(rows)), squeeze=False)
    for r, (name, images) in enumerate(rows.items()):
        imgs = to_images(images, image_shape, box)
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([]), ax.set_yticks([])
            if c < len(imgs):
                ax.imshow(imgs[c].permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray", vmin=0, vmax=1)
            else:
                ax.axis("off")
        axes[r][0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


__all__ = [
    "AnalyticNotApplicable", "LinearLayer", "Reconstruction", "analytic_first_layer", "attack_update", "image_quality",
    "invert_gradients", "label_accuracy", "linear_layers", "log_reconstructions", "recover_labels", "released_update", "save_png",
    "simulated_update", "to_images", "total_variation",
]
