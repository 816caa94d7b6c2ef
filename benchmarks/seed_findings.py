"""The seed's interpretation findings (supplementary §A, Figs. B, C, F) checked on one ``nd analyze`` output.

Reads ``analysis.json`` of a CIFAR-10 run and prints each finding as holds / does not hold with its
number:

1. bottom layers are shared by all classes: no split of the tree in the first third of the gated
   layers;
2. artefacts (airplane, automobile, ship, truck) and animals part in the middle: the median layer
   at which an artefact and an animal part lies in the middle third;
3. similar classes part last: cat/dog and automobile/truck part at the latest layer at which
   either class parts from any class (or never);
4. "automobile and truck need more filters than bird" (Fig. F): mean filters on per input;
5. occlusion silences specific filters (Fig. B): per occluded class, the share of the filters on in
   some image whose concept is localised on at least half of the class's images, and the top
   filters' consistency with their patch-set IoU against chance.

With ``--paths RUN/paths.npz`` (raw paths), also a test-free reading of where groups of classes
part: per gated layer, how well k-means (k = 2) on that layer's gates separates artefacts from
animals (all inputs), cat from dog and automobile from truck (the two classes' inputs), as the
agreement of its two clusters with the truth (chance: the larger group's share, 0.6 for
artefacts | animals, 0.5 for the pairs), with the copula test's p-value on the same inputs.

Usage:
    nd analyze /tmp/runs/r20_new --out /tmp/r20_new_report --occlusion-class cat --occlusion-class automobile
    python benchmarks/seed_findings.py /tmp/r20_new_report/analysis.json --paths /tmp/runs/r20_new/paths.npz \
        --json docs/data/seed_findings_r20.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

ARTEFACTS = ("airplane", "automobile", "ship", "truck")
ANIMALS = ("bird", "cat", "deer", "dog", "frog", "horse")


def findings(a: dict[str, Any]) -> list[dict[str, Any]]:
    """Every finding with ``holds`` and the numbers behind it."""
    tree = a["decision_tree"]
    layers, classes = tree["layers"], tree["classes"]
    n_layers = len(layers)
    part = np.array(tree["parting_layer_index"])
    third = n_layers / 3
    split_layers = [nd["split_layer_index"] for nd in tree["nodes"] if nd["split_layer_index"] is not None]
    out = []
    first = min(split_layers) if split_layers else None
    out.append({
        "finding": "bottom layers shared by all classes",
        "holds": first is None or first >= third,  # trivially when nothing splits (the number says so)
        "number": f"first split at layer index {first} ({layers[first] if first is not None else 'none'}) of {n_layers}; "
                  f"bottom third = indices < {third:.1f}",
    })
    idx = {c: i for i, c in enumerate(classes)}
    pairs = [part[idx[x], idx[y]] for x in ARTEFACTS for y in ANIMALS if x in idx and y in idx]
    parted = [p for p in pairs if p >= 0]
    med = float(np.median(parted)) if parted else None
    out.append({
        "finding": "artefacts and animals part in the middle layers",
        "holds": med is not None and third <= med < 2 * third,
        "number": f"{len(parted)} of {len(pairs)} artefact-animal pairs part; median parting layer index "
                  f"{med} ({layers[int(med)] if med is not None else 'none'}); middle third = [{third:.1f}, {2 * third:.1f})",
    })
    for a_, b_ in (("cat", "dog"), ("automobile", "truck")):
        if a_ not in idx or b_ not in idx:
            continue
        i, j = idx[a_], idx[b_]
        pij = int(part[i, j])
        others = [int(part[i, k]) for k in range(len(classes)) if k not in (i, j)] + \
                 [int(part[j, k]) for k in range(len(classes)) if k not in (i, j)]
        latest = max(others) if others else -1
        # when the tree parts no classes at all, "last" cannot be checked
        holds = None if (part < 0).all() else (pij == -1 or pij >= latest)
        out.append({
            "finding": f"similar classes part last: {a_} / {b_}",
            "holds": holds,
            "number": f"{a_}/{b_} part at {layers[pij] if pij >= 0 else 'never'} (index {pij}); latest layer at which "
                      f"{a_} or {b_} parts from another class: index {latest}; pairs of all 45 parting later: "
                      f"{int(((part > pij) if pij >= 0 else np.zeros_like(part, bool)).sum() // 2)}",
        })
    width = dict(zip(a["class_paths"]["classes"], a["class_paths"]["total_width"]))
    if all(c in width for c in ("automobile", "truck", "bird")):
        out.append({
            "finding": "automobile and truck need more filters than bird (Fig. F)",
            "holds": width["automobile"] > width["bird"] and width["truck"] > width["bird"],
            "number": f"filters on per input: automobile {width['automobile']:.1f}, truck {width['truck']:.1f}, "
                      f"bird {width['bird']:.1f} (widest {max(width, key=width.get)} {max(width.values()):.1f}, "
                      f"thinnest {min(width, key=width.get)} {min(width.values()):.1f})",
        })
    occ = a.get("occlusion") or {}
    for group, cc in (occ.get("concept_consistency") or {}).items():
        top = cc["top"][:5]
        lifts = [t["iou"] - t["chance_iou"] for t in top if t["iou"] is not None]
        out.append({
            "finding": f"occlusion silences specific filters (Fig. B): {group}",
            "holds": bool(top) and top[0]["consistency"] >= 0.5,
            "number": f"{len(cc['images'])} images; {cc['filters_localised_somewhere']} of {cc['filters_on_somewhere']} filters on "
                      f"somewhere are turned off by some (<= half) patches on some image; share localised on >= half the "
                      f"images: {cc['share_consistent_ge_half']:.3f}; top filters' consistency "
                      + ", ".join(f"{t['filter']} {t['consistency']:.2f}" for t in top)
                      + (f"; their patch-set IoU minus chance: mean {np.mean(lifts):+.3f}" if lifts else ""),
        })
    return out


def layer_separation(paths_file: str) -> dict[str, list[dict[str, Any]]]:
    """Per layer: k-means agreement with artefact/animal, cat/dog, automobile/truck, and the copula p."""
    from nd_plugin.interpret.calibration import kmeans_agreement
    from nd_plugin.interpret.cluster_test import cluster_test
    from nd_plugin.paths import PathStats

    st = PathStats.load(paths_file)
    offsets = np.cumsum([0, *st.site_channels])
    cls = list(st.classes)
    kinds = np.isin(np.array(cls)[st.labels], ANIMALS).astype(int)
    groupings = {"artefacts | animals": (np.ones(st.n, bool), kinds)}
    for a_, b_ in (("cat", "dog"), ("automobile", "truck")):
        m = np.isin(st.labels, [cls.index(a_), cls.index(b_)])
        groupings[f"{a_} | {b_}"] = (m, (st.labels[m] == cls.index(b_)).astype(int))
    out: dict[str, list[dict[str, Any]]] = {}
    for name, (mask, truth) in groupings.items():
        rows = []
        for i, layer in enumerate(st.site_names):
            x = st.paths[mask][:, offsets[i] : offsets[i + 1]]
            x = x[:, x.min(0) != x.max(0)]
            agree = kmeans_agreement(x, truth) if x.shape[1] else None
            p = cluster_test(x, seed=0).p_value if x.shape[1] else None
            rows.append({"layer": layer, "dynamic": int(x.shape[1]), "kmeans_agreement": agree, "copula_p": p})
        out[name] = rows
        print(name + ": " + ", ".join(
            f"{r['layer']} " + ("n/a (no varying filter)" if r["kmeans_agreement"] is None else
                                f"{r['kmeans_agreement']:.2f} (p {r['copula_p']:.2g})") for r in rows))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("analysis", help="analysis.json written by nd analyze")
    ap.add_argument("--paths", default=None, help="RUN/paths.npz with raw paths: per-layer k-means separation of class groups")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    a = json.loads(Path(args.analysis).read_text())
    rows = findings(a)
    for r in rows:
        verdict = "cannot be checked" if r["holds"] is None else ("HOLDS" if r["holds"] else "does not hold")
        print(f"{verdict}: {r['finding']}: {r['number']}")
    separation = layer_separation(args.paths) if args.paths else None
    if args.json:
        tree = a["decision_tree"]
        Path(args.json).write_text(json.dumps({"analysis": args.analysis, "findings": rows, "tree_test": tree["test"],
                                               "no_split_reason": tree["no_split_reason"], "meta": a["meta"],
                                               "layer_separation": separation}, indent=1))


if __name__ == "__main__":
    main()
