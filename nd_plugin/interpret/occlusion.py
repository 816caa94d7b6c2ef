"""Semantic concepts by occlusion (seed §A.2, Fig. B).

Black patches are laid over an image (a grid, or given boxes); every occluded copy goes through
the decoupled model, and a filter is *silenced* by a patch when its gate is on for the image and
off for the occluded copy. A filter's concept region is the union of the patches that silence it.
Occluded copies of all images are batched together: one forward pass per ``batch_size`` copies.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from nd_plugin.errors import InputShapeError
from nd_plugin.utilities import eval_mode

from ._common import jsonable

__all__ = ["ConceptConsistency", "OcclusionConcepts", "concept_consistency", "grid_boxes", "occlusion_concepts"]


def _pair(v: int | Sequence[int], what: str) -> tuple[int, int]:
    a, b = (v, v) if isinstance(v, (int, np.integer)) else tuple(v)
    if int(a) < 1 or int(b) < 1:
        raise ValueError(f"{what} must be positive, got {v!r}")
    return int(a), int(b)


def grid_boxes(height: int, width: int, patch: int | Sequence[int], stride: int | Sequence[int] | None = None) -> np.ndarray:
    """Boxes ``(top, left, bottom, right)`` of square (or ``(h, w)``) patches over a grid.

    The last row and column of patches are aligned with the image's border, so every pixel is
    covered.

    Args:
        height: image height.
        width: image width.
        patch: patch size, an int or ``(h, w)``.
        stride: step between patches (default half the patch).

    Returns:
        ``(P, 4)`` int array.

    Raises:
        InputShapeError: the patch is larger than the image.

    Example:
        >>> grid_boxes(8, 8, 4).tolist()[:3]
        [[0, 0, 4, 4], [0, 2, 4, 6], [0, 4, 4, 8]]
    """
    ph, pw = _pair(patch, "patch")
    if ph > height or pw > width:
        raise InputShapeError(
            f"occlusion patch {ph}x{pw} is larger than the {height}x{width} image; use a patch of at most "
            f"{min(height, width)} pixels."
        )
    sh, sw = _pair(stride if stride is not None else (max(ph // 2, 1), max(pw // 2, 1)), "stride")

    def starts(size: int, p: int, s: int) -> list[int]:
        out = list(range(0, size - p + 1, s))
        if out[-1] != size - p:
            out.append(size - p)
        return out

    return np.array([(t, l, t + ph, l + pw) for t in starts(height, ph, sh) for l in starts(width, pw, sw)], dtype=np.int64)


@dataclass(frozen=True, eq=False)
class OcclusionConcepts:
    """Which filters each occluding patch silences, for a few images.

    Attributes:
        names: gated layers in path order.
        sizes: filters per layer.
        image_size: ``(H, W)``.
        boxes: ``(P, 4)`` patches ``(top, left, bottom, right)``.
        base: ``(B, F)`` each image's path.
        occluded: ``(B, P, F)`` the path of each occluded copy.
        base_pred: ``(B,)`` predicted class of each image.
        occluded_pred: ``(B, P)`` predicted class of each occluded copy.
    """

    names: tuple[str, ...]
    sizes: tuple[int, ...]
    image_size: tuple[int, int]
    boxes: np.ndarray
    base: np.ndarray
    occluded: np.ndarray
    base_pred: np.ndarray
    occluded_pred: np.ndarray

    @property
    def silenced(self) -> np.ndarray:
        """``(B, P, F)``: the filter is on for the image and off under the patch."""
        return self.base[:, None, :] & ~self.occluded

    def filter_name(self, f: int) -> tuple[str, int]:
        """``(layer, channel)`` of path position ``f``."""
        offsets = np.cumsum((0,) + self.sizes)
        i = int(np.searchsorted(offsets, f, side="right") - 1)
        return self.names[i], int(f - offsets[i])

    def silencing_count(self, image: int) -> np.ndarray:
        """``(F,)`` number of patches that silence each filter on one image."""
        return self.silenced[image].sum(0)

    def region(self, image: int, filt: int) -> np.ndarray:
        """``(H, W)`` in ``[0, 1]``: how many of the filter's silencing patches cover each pixel, over the most."""
        h, w = self.image_size
        heat = np.zeros((h, w), dtype=np.float64)
        for t, l, b, r in self.boxes[self.silenced[image, :, filt]]:
            heat[t:b, l:r] += 1.0
        return heat / heat.max() if heat.max() > 0 else heat

    def concept_filters(self, image: int, top: int = 6, max_share: float = 0.5) -> list[int]:
        """Filters with a localised concept on one image.

        Those silenced by at least one patch and by at most ``max_share`` of the patches, the
        most often silenced first (the most robust evidence).
        """
        cnt = self.silencing_count(image)
        ok = np.flatnonzero((cnt >= 1) & (cnt <= max_share * len(self.boxes)))
        return [int(f) for f in ok[np.argsort(-cnt[ok], kind="stable")][:top]]

    def to_dict(self) -> dict[str, Any]:
        """Per image: prediction, per patch the filters it silences, per filter its patches."""
        images = []
        sil = self.silenced
        for b in range(self.base.shape[0]):
            cnt = sil[b].sum(0)
            per_filter = {}
            for f in np.flatnonzero(cnt):
                layer, ch = self.filter_name(int(f))
                per_filter[f"{layer}[{ch}]"] = np.flatnonzero(sil[b, :, f])
            images.append(
                {
                    "pred": self.base_pred[b],
                    "active_filters": self.base[b].sum(),
                    "patch_silences": sil[b].sum(1),
                    "patch_activates": (~self.base[b][None, :] & self.occluded[b]).sum(1),
                    "patch_pred": self.occluded_pred[b],
                    "filters": per_filter,
                    "concept_filters": [
                        "{}[{}]".format(*self.filter_name(f)) for f in self.concept_filters(b)
                    ],
                }
            )
        return jsonable({"image_size": self.image_size, "boxes": self.boxes, "images": images})


def _expected_iou(total: int, a: int, b: int) -> float:
    """E[|A ∩ B| / |A ∪ B|] for random subsets of sizes ``a`` and ``b`` of ``total`` patches (exact)."""
    from scipy.stats import hypergeom

    if a == 0 or b == 0:
        return 0.0
    k = np.arange(max(0, a + b - total), min(a, b) + 1)
    return float((hypergeom(total, a, b).pmf(k) * k / (a + b - k)).sum())


@dataclass(frozen=True, eq=False)
class ConceptConsistency:
    """How consistently each filter's concept shows across several images (e.g. of one class).

    On one image a filter has a *localised concept* when it is on and some, but at most
    ``max_share`` of, the patches silence it. Across the images:

    Attributes:
        images: indices (into the :class:`OcclusionConcepts`) of the images considered.
        on: ``(F,)`` images on which the filter is on.
        localised: ``(F,)`` images on which it has a localised concept.
        consistency: ``(F,)`` ``localised / len(images)``: the share of the images whose
            occlusion silences the filter somewhere specific (1: on every image).
        iou: ``(F,)`` mean pairwise IoU of its silencing patch sets over those images (``nan``
            with fewer than two): whether the concept sits at the same place.
        chance_iou: ``(F,)`` the same for random patch sets of the same sizes (exact expectation).
    """

    images: tuple[int, ...]
    on: np.ndarray
    localised: np.ndarray
    consistency: np.ndarray
    iou: np.ndarray
    chance_iou: np.ndarray

    def top(self, k: int = 4) -> list[int]:
        """The ``k`` filters with the most consistent concept (ties: more localised images, then
        IoU above chance), only filters localised on at least one image."""
        lift = np.nan_to_num(self.iou - self.chance_iou, nan=-1.0)
        order = np.lexsort((-lift, -self.localised, -self.consistency))
        return [int(f) for f in order if self.localised[f] > 0][:k]

    def to_dict(self, names: Any = None) -> dict[str, Any]:
        """The top filters and the distribution of consistency over filters on in some image."""
        seen = self.on > 0
        top = self.top(10)
        return jsonable({
            "images": list(self.images),
            "filters_on_somewhere": int(seen.sum()),
            "filters_localised_somewhere": int((self.localised > 0).sum()),
            "mean_consistency_of_filters_on": float(self.consistency[seen].mean()) if seen.any() else None,
            "share_consistent_ge_half": float((self.consistency[seen] >= 0.5).mean()) if seen.any() else None,
            "top": [{"filter": names(f) if names else f, "consistency": self.consistency[f], "localised": self.localised[f],
                     "on": self.on[f], "iou": self.iou[f], "chance_iou": self.chance_iou[f]} for f in top],
        })


def concept_consistency(oc: OcclusionConcepts, images: Sequence[int] | None = None, *, max_share: float = 0.5) -> ConceptConsistency:
    """Scores each filter's concept over several images (:class:`ConceptConsistency`).

    Args:
        oc: occlusion results.
        images: the images to pool (default all), e.g. those of one class.
        max_share: a concept is localised when at most this share of the patches silence it.

    Returns:
        A :class:`ConceptConsistency`.

    Example:
        >>> sil = np.zeros((2, 4, 3), bool); sil[:, 0, 0] = True; sil[0, 1, 1] = True
        >>> oc = OcclusionConcepts(("l",), (3,), (8, 8), grid_boxes(8, 8, 4, 4), np.ones((2, 3), bool),
        ...                        ~sil, np.zeros(2, int), np.zeros((2, 4), int))
        >>> cc = concept_consistency(oc)
        >>> cc.consistency.tolist(), float(cc.iou[0]), cc.top(2)
        ([1.0, 0.5, 0.0], 1.0, [0, 1])
    """
    idx = tuple(range(oc.base.shape[0])) if images is None else tuple(int(i) for i in images)
    sil = oc.silenced[list(idx)]  # (m, P, F)
    p = sil.shape[1]
    counts = sil.sum(1)  # (m, F)
    loc = (counts >= 1) & (counts <= max_share * p)
    f_total = sil.shape[2]
    iou = np.full(f_total, np.nan)
    chance = np.full(f_total, np.nan)
    for f in np.flatnonzero(loc.sum(0) >= 2):
        sets = [sil[i, :, f] for i in np.flatnonzero(loc[:, f])]
        pairs = [(a, b) for i, a in enumerate(sets) for b in sets[i + 1 :]]
        iou[f] = np.mean([(a & b).sum() / (a | b).sum() for a, b in pairs])
        chance[f] = np.mean([_expected_iou(p, int(a.sum()), int(b.sum())) for a, b in pairs])
    m = max(len(idx), 1)
    return ConceptConsistency(
        images=idx,
        on=oc.base[list(idx)].sum(0),
        localised=loc.sum(0),
        consistency=loc.sum(0) / m,
        iou=iou,
        chance_iou=chance,
    )


@torch.no_grad()
def occlusion_concepts(
    dm: torch.nn.Module,
    images: torch.Tensor,
    patch: int | Sequence[int] = 8,
    stride: int | Sequence[int] | None = None,
    boxes: Sequence[Sequence[int]] | np.ndarray | None = None,
    *,
    fill: float | Sequence[float] = 0.0,
    batch_size: int = 256,
    device: torch.device | str | None = None,
) -> OcclusionConcepts:
    """Records which filters turn off when parts of each image are blacked out.

    Args:
        dm: a :class:`~nd_plugin.decoupled.DecoupledModel`.
        images: ``(B, C, H, W)`` (or one ``(C, H, W)``) in the model's input space (normalised).
        patch: grid patch size (int or ``(h, w)``), ignored when ``boxes`` are given.
        stride: grid step (default half the patch).
        boxes: explicit patches ``(top, left, bottom, right)`` in pixels, e.g. eyes, nose, mouth.
        fill: the occluder's value in the model's input space, one per channel or one for all;
            black for a model normalised with ``mean``/``std`` is ``-mean / std``.
        batch_size: occluded copies per forward pass (copies of several images share a batch).
        device: where to run (default: the model's device).

    Returns:
        An :class:`OcclusionConcepts`.

    Raises:
        InputShapeError: a patch larger than the image, a box outside it, or images of the wrong rank.

    Example:
        >>> oc = occlusion_concepts(dm, x[:2], patch=8, fill=(-mean / std).tolist())  # doctest: +SKIP
        >>> oc.concept_filters(0)  # doctest: +SKIP
        [412, 97, 1301]
    """
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4:
        raise InputShapeError(f"images must be (B, C, H, W) or (C, H, W), got shape {tuple(images.shape)}")
    _, c, h, w = images.shape
    if boxes is None:
        box_arr = grid_boxes(h, w, patch, stride)
    else:
        box_arr = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
        bad = (box_arr[:, 0] < 0) | (box_arr[:, 1] < 0) | (box_arr[:, 2] > h) | (box_arr[:, 3] > w)
        bad |= (box_arr[:, 2] <= box_arr[:, 0]) | (box_arr[:, 3] <= box_arr[:, 1])
        if bad.any():
            raise InputShapeError(
                f"occlusion box {box_arr[bad][0].tolist()} (top, left, bottom, right) is empty or outside the {h}x{w} image."
            )
    device = torch.device(device) if device is not None else next(dm.parameters()).device
    fill_t = torch.as_tensor(fill, dtype=images.dtype, device=device).reshape(-1, 1, 1)
    if fill_t.shape[0] not in (1, c):
        raise InputShapeError(f"fill has {fill_t.shape[0]} values but the images have {c} channels")
    images = images.to(device)
    n_img, n_box = images.shape[0], len(box_arr)
    with eval_mode(dm):
        logits, path = dm(images, return_path=True)
        base = torch.cat(list(path.values()), 1) > 0.5
        base_pred = logits.argmax(1)
        # every (image, patch) copy, in batches of batch_size across images (small batches are slow on a CPU)
        paths_b, preds_b = [], []
        for start in range(0, n_img * n_box, batch_size):
            pairs = range(start, min(start + batch_size, n_img * n_box))
            batch = images[[k // n_box for k in pairs]].clone()
            for j, k in enumerate(pairs):
                t, l, b, r = box_arr[k % n_box]
                batch[j, :, t:b, l:r] = fill_t
            logits, path = dm(batch, return_path=True)
            paths_b.append(torch.cat(list(path.values()), 1) > 0.5)
            preds_b.append(logits.argmax(1))
        occluded = torch.cat(paths_b).reshape(n_img, n_box, -1)
        occ_pred = torch.cat(preds_b).reshape(n_img, n_box)
    sites = getattr(dm, "gate_sites", None)
    names = tuple(s.name for s in sites) if sites is not None else tuple(f"layer{i}" for i in range(len(path)))
    sizes = tuple(s.channels for s in sites) if sites is not None else tuple(v.shape[1] for v in path.values())
    return OcclusionConcepts(
        names=names,
        sizes=sizes,
        image_size=(h, w),
        boxes=box_arr,
        base=base.cpu().numpy(),
        occluded=occluded.cpu().numpy(),
        base_pred=base_pred.cpu().numpy(),
        occluded_pred=occ_pred.cpu().numpy(),
    )
