"""The input views alone (``guard.inputs``): which zoo triggers their direction test finds, without a model.

For every trigger of a zoo seed (the zoo's data: CIFAR-10 4,000 images, 50 trusted a class, read
without augmentation as a scan reads them), the direction test (``guard.direction``) runs on each
class's images in both input views (fine: high-passed; coarse: whitened thumbnails, the whitening
fitted on the screens of all classes) against the class's trusted images, as a scan runs it, and its
p-value is corrected as a scan corrects it beside ``LAYERS`` model layers (x (LAYERS + 2); the two
sides are in ``direction_test``'s p already); the coarse view stands only where the fine one does
not act. A class is acted on below ``max_false_alarm / classes``. Prints per trigger the target
class's p and view, share beyond every trusted image, the share of the poison among those beyond
(TPR of the test's own seed) and the poison's AUROC on the held-out projection, and the smallest p
of the nine clean classes.

    python benchmarks/input_view.py --zoo-seed 2 --out benchmarks/results/input_view_zoo2.json
    python benchmarks/input_view.py --triggers zoo:4:3 zoo:4:11 --out F.json              # chosen triggers
    python benchmarks/input_view.py --harm --out benchmarks/results/input_view_harm.json   # do no harm
    python benchmarks/input_view.py --n 0 --clean 10 --trusted-shift blur                 # ... trusted elsewhere
    python benchmarks/input_view.py --triggers zoo:2:1 --clean 4 --train-shift resized    # ... training elsewhere
    python benchmarks/input_view.py --triggers zoo:1:12 zoo:0:12 --clean 2 --crops       # no scan_dataset

Trust-free (``--trust-free``): what a trust-free scan does with the images
(``guard.scan.Scanner.images_across``): each class's images against the other classes' images
(``guard.direction.across_classes``) in the fine view, then in the coarse view where the fine one
does not act (each p doubled for the two views), and in each class acted on the probe seeded with the images
beyond, calibrated on the other classes' images, flags the class's images above ``flag_z``: TPR and
FPR of that flag over the whole data set, and every clean class acted on with what it would lose.

    python benchmarks/input_view.py --trust-free --zoo-seed 0 --out benchmarks/results/input_view_tf_zoo0.json
    python benchmarks/input_view.py --trust-free --harm --out benchmarks/results/input_view_tf_harm.json
    python benchmarks/input_view.py --trust-free --triggers zoo:0:18 zoo:1:8 --clean 5 --out F.json   # smooth blends

Against their own mirror images (``--mirror``: what a scan with ``mirror_images`` does with the images,
trusted set or not): the zoo's triggers, chosen ``guard.attacks`` cells (``--attacks``, with their fields
``--attack-args``, on the main recipe's 10k data or the zoo's 4k: ``--attacks-on``); an attack's cover
images (triggered, label kept) are counted apart, and a class holding any is not a clean decision.

    python benchmarks/input_view.py --mirror --zoo-seed 0 --clean 5 --out F.json
    python benchmarks/input_view.py --mirror --n 0 --clean 0 --attacks adaptive_blend:0.1:0 \\
        --attack-args cover_rate=0.1 alpha=0.25 test_alpha=0.3 --attacks-on zoo

What a catch would take with the trusted images' mirror images as a further bound (``--take``, with a trusted
set; tried, not kept: benchmarks/NOTES.md): in every class the views' test above acts on, the probe a scan fits
there (``guard.probe.self_train`` seeded from the test) scores all of the class's images; the catch takes what
lies above ``flag_z`` and the class's highest trusted image (the guard's bar) and, where the trusted images pass
the symmetry check, what lies above their mirror images too: poison, cover and benign images taken at either bar.

    python benchmarks/input_view.py --take --zoo-seed 4 --clean 5 --out F.json
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks import bench_harm as harm  # noqa: E402
from benchmarks.bench_guard import fields  # noqa: E402
from benchmarks.bench_zoo import spec  # noqa: E402
from guard.attacks import make_attack  # noqa: E402
from guard.direction import across_views, direction_test  # noqa: E402
from guard.experiment import RunSpec, prepare  # noqa: E402
from guard.inputs import NAMES, InputViews, coarse, high_pass  # noqa: E402
from guard.mismatch import mismatch  # noqa: E402
from guard.probe import self_train  # noqa: E402
from guard.thresholds import Thresholds  # noqa: E402

LAYERS = 10          # the probe layers a scan of the zoo's ResNet-18 tests beside the input


_blur = lambda x: torch.nn.functional.avg_pool2d(torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1)  # noqa: E731
# trusted images from another pipeline than the training images (--trusted-shift): must not read as poison
SHIFTS = {"blur": lambda x: 0.5 * (x + _blur(x)), "brighter": lambda x: x + 0.3, "contrast": lambda x: 1.2 * x,
          "resized": lambda x: torch.nn.functional.interpolate(torch.nn.functional.interpolate(
              x, size=(x.shape[2] * 3 // 4, x.shape[3] * 3 // 4), mode="bilinear", antialias=True),
              size=x.shape[2:], mode="bilinear"),
          "noise": lambda x: x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))}
TRUSTED_SHIFT: str | None = None
TRAIN_SHIFT: str | None = None    # --train-shift: the training images through it, the trusted ones not
CROPS = False           # --crops: the screen read through the training Dataset's random crop + flip


def raw_views(ds, positions: np.ndarray, shift: str | None = None) -> list[torch.Tensor]:
    x = torch.stack([ds[int(i)][0] for i in positions])
    x = SHIFTS[shift](x) if shift else x
    return [high_pass(x), coarse(x)]


def _trusted_screen(trigger: str | None, seed: int, make) -> tuple:
    """A data set as a scan with a trusted set reads it in the input views: ``(attack, data, poison mask, bar,
    screen rows, the trusted images' raw views, the views, the screen's and the trusted images' unit features)``.
    ``make(trigger, rate, seed)`` builds its RunSpec (None: the zoo's data)."""
    atk = make_attack(trigger) if trigger else None
    make = make or (lambda a, r, s: spec("zoo", a, r, s))
    data = prepare(make(trigger, atk.rate if atk else 0.0, seed))
    lab = data.labels
    poison = np.isin(np.arange(len(lab)), data.poisoned)
    bar = Thresholds().max_false_alarm / data.num_classes
    rng, n = np.random.default_rng([seed, 3]), Thresholds().screen_per_class
    screen = np.concatenate([np.sort(rng.choice(np.flatnonzero(lab == c), min(int((lab == c).sum()), n), replace=False))
                             for c in range(data.num_classes)])
    torch.manual_seed(seed)
    raw = raw_views(data.train if CROPS else data.scan, screen, TRAIN_SHIFT)
    traw = raw_views(data.trusted, np.arange(len(data.trusted.labels)), TRUSTED_SHIFT)
    views = InputViews(raw[1], lab[screen])
    return atk, data, poison, bar, screen, traw, views, views.units(raw), views.units(traw)


def _class_test(x: list[torch.Tensor], t: list[torch.Tensor], sel: torch.Tensor, tsel: torch.Tensor, bar: float
                ) -> tuple[list, list[float], int]:
    """One class's direction test in each view (its screened rows ``sel`` of ``x`` against its trusted rows ``tsel``
    of ``t``), each p corrected as a scan corrects it beside ``LAYERS`` layers (the sides' correction is in it
    already): ``(tests, p per view, the view that decides)``; the coarse view is the last resort."""
    tests = [direction_test([u[sel]], [r[tsel]], 0) for u, r in zip(x, t)]
    p = [min(1.0, te.p * (LAYERS + len(NAMES))) for te in tests]
    return tests, p, 0 if p[0] < bar or p[0] <= p[1] else 1


def trigger_row(trigger: str | None, seed: int = 0, make=None) -> dict:
    """One data set's class decisions in the input views: ``make(trigger, rate, seed)`` builds its
    RunSpec (default: the zoo's data)."""
    atk, data, poison, bar, screen, _, _, x, t = _trusted_screen(trigger, seed, make)
    lab, tlab = data.labels, data.trusted.labels
    rows, layer_p = {}, {}
    for c in range(data.num_classes):
        sel, tsel = torch.from_numpy(lab[screen] == c), torch.from_numpy(tlab == c)
        tests, p, k = _class_test(x, t, sel, tsel, bar)
        layer_p[c] = {k: te.layer_p[0] for k, te in enumerate(tests)}
        test, pc = tests[k], poison[screen][sel.numpy()]
        rows[c] = {"p": p[k], "view": NAMES[k], "p_views": p, "share": test.share, "acted": p[k] < bar,
                   "tpr": float(test.beyond[pc].mean()) if pc.any() else None,
                   "auroc": float(roc_auc_score(pc, test.z)) if 0 < pc.sum() < len(pc) else None}
    target = atk.target if atk else None
    clean = [r["p"] for c, r in rows.items() if c != target]
    check = mismatch({c: ps for c, ps in layer_p.items() if not rows[c]["acted"]})   # the scan's trusted-set check
    return {"trigger": trigger or f"none (seed {seed})", "counts": np.bincount(lab).tolist(),
            "mismatch_p": None if check is None else check.p,
            "trusted_per_class": int(np.bincount(tlab).min()), "attack": repr(atk) if atk else "none",
            "family": atk.name if atk else "none", "kind": getattr(atk, "kind", getattr(atk, "style", "")) if atk else "",
            "target": target, "rate": atk.rate if atk else 0.0, "target_row": rows.get(target),
            "clean_min_p": min(clean), "clean_acted": int(sum(p < bar for p in clean)), "bar": bar}


def _trust_free_screen(trigger: str | None, seed: int, make) -> tuple:
    """A data set as a trust-free scan reads it: ``(attack, data, labels, thresholds, poison mask, classes
    tested, bar, screen rows, the screen's raw views)``."""
    atk = make_attack(trigger) if trigger else None
    make = make or (lambda a, r, s: spec("zoo", a, r, s))
    data = prepare(make(trigger, atk.rate if atk else 0.0, seed))
    lab, th = data.labels, Thresholds()
    poison = np.isin(np.arange(len(lab)), data.poisoned)
    tested = [c for c in range(data.num_classes) if (lab == c).sum() >= th.min_class]
    rng, n = np.random.default_rng([seed, 3]), th.screen_per_class
    screen = np.concatenate([np.sort(rng.choice(np.flatnonzero(lab == c), min(int((lab == c).sum()), n), replace=False))
                             for c in range(data.num_classes)])
    return atk, data, lab, th, poison, tested, th.max_false_alarm / len(tested), screen, raw_views(data.scan, screen)


def trust_free_row(trigger: str | None, seed: int = 0, make=None) -> dict:
    """One data set as a trust-free scan sees it in the images: per class the across-classes test, and
    where it acts the probe's flags over all the class's images."""
    atk, data, lab, th, poison, tested, bar, screen, raw = _trust_free_screen(trigger, seed, make)
    views = InputViews(raw[1], lab[screen])
    units, everything = views.units(raw), views.units(raw_views(data.scan, np.arange(len(lab))))
    flagged, rows = np.zeros(len(lab), bool), {}
    for c, (k, test) in across_views(units, lab[screen], bar, 0).items():   # as Scanner.images_across
        acted = c in tested and test.p < bar
        rows[c] = {"p": test.p, "view": NAMES[k], "share": test.share, "acted": acted, "n": int((lab == c).sum()),
                   "flagged": 0}
        if not acted:
            continue
        mine = torch.from_numpy(lab[screen] == c)
        z0 = np.where(test.beyond, th.screen_z + 1.0, np.where(test.z < th.benign_z, 0.0, th.benign_z))
        probe = self_train([units[k][mine].double()], [units[k][~mine].double()], z0, th, rng_seed=0)
        if probe is None:
            rows[c]["no_probe"] = True
            continue
        at = np.flatnonzero(lab == c)
        hit = at[probe.z([everything[k][torch.from_numpy(at)].double()]) > th.flag_z]
        flagged[hit] = True
        rows[c]["flagged"] = len(hit)
    target = atk.target if atk else None
    clean = {c: r for c, r in rows.items() if c != target}
    return {"trigger": trigger or f"none (seed {seed})", "family": atk.name if atk else "none",
            "kind": getattr(atk, "kind", getattr(atk, "style", "")) if atk else "", "target": target,
            "rate": atk.rate if atk else 0.0, "bar": bar, "target_row": rows.get(target),
            "tpr": float(flagged[poison].mean()) if poison.any() else None, "fpr": float(flagged[~poison].mean()),
            "clean_decisions": len(clean), "clean_acted": {c: r for c, r in clean.items() if r["acted"]},
            "counts": np.bincount(lab).tolist()}


def mirror_row(trigger: str | None, seed: int = 0, make=None) -> dict:
    """One data set as a scan with ``mirror_images`` sees it in the images, with or without a trusted set:
    the trust-free across-classes test of each class (p x 3: the two views and the mirror test share the
    bar), then, for every class it does not act on, the class's screened images against their own
    mirror images (``guard.mirror``, p x 3); where that acts, what ``Scanner.mirror_images`` takes (every
    image of the class beyond every mirror image, the screened ones held out, the others on both halves'
    directions; then again on what that leaves, while it passes: ``guard.mirror.mirror_steps``): TPR and FPR
    over the data set, and every clean class it acts on."""
    from guard.mirror import mirror_steps, mirrored, symmetry
    from guard.reference import unit

    atk, data, lab, th, poison, tested, bar, screen, raw = _trust_free_screen(trigger, seed, make)
    units = InputViews(raw[1], lab[screen]).units(raw)
    across = {c: t.p for c, (_, t) in across_views(units, lab[screen], bar, 0, 3).items()}
    shape = tuple(data.scan[0][0].shape)
    # mirror_images="auto" without a trusted set: the check a scan reads on this screen (Scanner.training_symmetry)
    check = symmetry(raw[0], lab[screen], shape, th.mirror_check_max, th.mirror_symmetry_p, 0, trim=th.mirror_check_trim)
    everything = unit(raw_views(data.scan, np.arange(len(lab)))[0])
    taken, rows = np.zeros(len(lab), bool), {}
    for c in tested:
        if across.get(c, 1.0) < bar:
            rows[c] = {"across_p": across[c], "mirror_p": None, "acted": False, "taken": 0}
            continue
        sel = lab[screen] == c
        steps = mirror_steps(units[0][torch.from_numpy(sel)], mirrored(units[0][torch.from_numpy(sel)], shape), bar / 3, 0)
        p = min(1.0, 3 * steps.first.p)
        rows[c] = {"across_p": across.get(c, 1.0), "mirror_p": p, "share": steps.first.share, "acted": p < bar,
                   "taken": 0, "steps": len(steps.steps)}
        if p >= bar:
            continue
        at = np.flatnonzero(lab == c)
        beyond, _ = steps.over(everything[torch.from_numpy(at)], np.searchsorted(at, screen[sel]))
        taken[at[beyond]] = True
        rows[c]["taken"] = int(beyond.sum())
    target = atk.target if atk else None
    cover = np.isin(np.arange(len(lab)), data.cover)          # triggered images that keep their label (adaptive attacks)
    covered = set(np.unique(lab[cover]).tolist())             # classes holding any: not clean
    clean = {c: r for c, r in rows.items()
             if c != target and c not in covered and not (atk and getattr(atk, "name", "") == "all2all")}
    name = (trigger if make is None else f"{trigger}, seed {seed}") if trigger else f"none (seed {seed})"
    return {"trigger": name, "family": atk.name if atk else "none",
            "kind": getattr(atk, "kind", getattr(atk, "style", "")) if atk else "", "target": target,
            "rate": float(poison.mean()), "bar": bar, "target_row": rows.get(target),
            "check_p": None if check is None else check.p, "check_holds": check is not None and check.holds(th.mirror_symmetry_p),
            "tpr": float(taken[poison].mean()) if poison.any() else None, "fpr": float(taken[~poison].mean()),
            "covers": int(cover.sum()), "cover_taken": float(taken[cover].mean()) if cover.any() else None,
            "fpr_clean": float(taken[~poison & ~cover].mean()),
            "clean_decisions": sum(r["mirror_p"] is not None for r in clean.values()),
            "clean_acted": {c: r for c, r in clean.items() if r["acted"]},
            "clean_min_p": min((r["mirror_p"] for r in clean.values() if r["mirror_p"] is not None), default=1.0),
            "counts": np.bincount(lab).tolist()}


def take_row(trigger: str | None, seed: int = 0, make=None) -> dict:
    """One data set's first catches in the images with a trusted set (as :func:`trigger_row` decides them): per
    class acted on, the poison, cover and benign images its probe puts above the guard's bar (``flag_z``, the
    class's highest trusted image) and above the trusted images' mirror images too (a bound tried, not kept)."""
    from guard.inputs import COARSE_SIDE, view_shape
    from guard.mirror import mirrored, symmetry
    from guard.scan import _seed

    def mirrored_views(raw: list[torch.Tensor], shape: tuple[int, int, int]) -> list[torch.Tensor]:
        """Both raw views of the same images mirrored: each commutes with the flip (symmetric filter and pooling)."""
        c, h, w = shape
        return [mirrored(raw[0], shape), mirrored(raw[1], (c, min(h, COARSE_SIDE), min(w, COARSE_SIDE)))]

    atk, data, poison, bar, screen, traw, views, x, t = _trusted_screen(trigger, seed, make)
    th, lab, tlab = Thresholds(), data.labels, data.trusted.labels
    cover = np.isin(np.arange(len(lab)), data.cover)          # triggered images that keep their label (adaptive attacks)
    shape = view_shape(data.scan[0][0][None])
    check = symmetry(traw[0], tlab, shape, th.mirror_check_max, th.mirror_symmetry_p, 0)   # Scanner.trusted_symmetry
    on = check is not None and check.holds(th.mirror_symmetry_p)
    catches = []
    for c in range(data.num_classes):
        sel, tsel = torch.from_numpy(lab[screen] == c), torch.from_numpy(tlab == c)
        tests, p, k = _class_test(x, t, sel, tsel, bar)
        if p[k] >= bar:
            continue
        probe = self_train([x[k][sel].double()], [t[k][tsel].double()], _seed(tests[k], th), th, rng_seed=0)
        if probe is None:
            continue
        rows = np.flatnonzero(lab == c)
        z = probe.z([views.units(raw_views(data.scan, rows))[k].double()])
        old = max(th.flag_z, float(probe.z([t[k][tsel].double()]).max()))
        new = max(old, float(probe.z([views.units(mirrored_views([v[tsel] for v in traw], shape))[k].double()]).max())
                  if on else old)
        pc, cc = poison[rows], cover[rows]
        bc = ~pc & ~cc
        catches.append({"class": c, "view": NAMES[k], "p": p[k], "poisoned": int(pc.sum()), "benign": int(bc.sum()),
                        "covers": int(cc.sum()), "bar": old, "bar_mirror": new, "poison": int((z[pc] > old).sum()),
                        "poison_mirror": int((z[pc] > new).sum()), "taken_benign": int((z[bc] > old).sum()),
                        "taken_benign_mirror": int((z[bc] > new).sum()), "taken_covers": int((z[cc] > old).sum()),
                        "taken_covers_mirror": int((z[cc] > new).sum())})
    name = (trigger if make is None else f"{trigger}, seed {seed}") if trigger else f"none (seed {seed})"
    return {"trigger": name, "target": atk.target if atk else None, "trusted_per_class": int(np.bincount(tlab).min()),
            "check_p": None if check is None else check.p, "catches": catches}


def take_markdown(rows: list[dict], command: str) -> str:
    every = [c for r in rows for c in r["catches"]]
    tot = {k: sum(c[k] for c in every) for k in ("poisoned", "benign", "poison", "poison_mirror", "taken_benign",
                                                  "taken_benign_mirror", "covers", "taken_covers", "taken_covers_mirror")}
    moved, level = sum(c["bar_mirror"] > c["bar"] for c in every), Thresholds().mirror_symmetry_p
    lines = [f"`python benchmarks/input_view.py {command}`: each class the input views' test acts on with a trusted "
             "set, what its probe takes above `flag_z` and the class's highest trusted image (*bar*, the guard's) and "
             "above the trusted images' mirror images too (*with mirrors*, a bound tried and not kept). No model: a "
             "scan's first catch in the images.", "",
             f"{len(every)} catches in {len(rows)} data sets ({sum(not r['check_p'] or r['check_p'] < level for r in rows)} "
             "of them failing the trusted symmetry check, where the mirror test and the bound are off); the bar rises "
             f"in {moved}. Poison taken {tot['poison']:,} "
             f"-> {tot['poison_mirror']:,} of {tot['poisoned']:,}; benign images of the classes acted on taken "
             f"{tot['taken_benign']:,} -> {tot['taken_benign_mirror']:,} of {tot['benign']:,} "
             f"({tot['taken_benign'] / max(tot['benign'], 1):.2%} -> {tot['taken_benign_mirror'] / max(tot['benign'], 1):.2%})"
             + (f"; covers {tot['taken_covers']:,} -> {tot['taken_covers_mirror']:,} of {tot['covers']:,}" if tot["covers"] else "")
             + ". *Benign*: neither poison nor cover. Listed: the catches whose bar rises.",
             "", "| data | class | view | bar -> with mirrors | poison taken | benign taken | covers taken |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        for c in r["catches"]:
            if c["bar_mirror"] == c["bar"]:
                continue                                  # listed: the catches whose bar the mirror images raise
            lines.append(f"| {r['trigger']} | {c['class']}{' (target)' if c['class'] == r['target'] else ''} | "
                         f"{c['view']} | {c['bar']:.2f} -> {c['bar_mirror']:.2f} | {c['poison']} -> {c['poison_mirror']} "
                         f"of {c['poisoned']} | {c['taken_benign']} -> {c['taken_benign_mirror']} of {c['benign']} | "
                         + (f"{c['taken_covers']} -> {c['taken_covers_mirror']} of {c['covers']} |" if c["covers"] else "- |"))
    return "\n".join(lines) + "\n"


def mirror_markdown(rows: list[dict], command: str) -> str:
    lines = [f"`python benchmarks/input_view.py {command}`: each class's images against their own mirror images "
             "(`guard.mirror`; no model, no trusted set), in every class the test against the other classes' images does "
             f"not act on, as a scan with `mirror_images` runs it; acted on below {rows[0]['bar']:.0e} (p x 3). TPR / FPR: "
             "what the mirror test takes over the whole data set (-: the target caught across the classes, where it "
             "does not run); steps: tests of what the ones before left (`guard.mirror.mirror_steps`). Clean decisions: "
             "the classes it tested that hold no poison (and no cover images). Check p: the trust-free symmetry check on the "
             "same screen (`guard.mirror.symmetry` with `mirror_check_trim` set aside), which turns the test on by default where it is at least "
             "`mirror_symmetry_p` (no trusted set).", "",
             "| data | family | target: mirror p, share beyond | TPR | FPR | covers taken (FPR without them) | clean decisions "
             "| clean acted on (smallest p) | check p |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r["target_row"]
        tgt = ("-" if t is None else "across the classes" if t["mirror_p"] is None
               else f"{t['mirror_p']:.0e}, {t['share']:.0%}" + (f", {t['steps']} steps" if t.get("steps", 1) > 1 else ""))
        tpr = "-" if r["tpr"] is None or (t is not None and t["mirror_p"] is None) else f"{r['tpr']:.1%}"
        lines.append(f"| {r.get('variant', '') + ' ' if r.get('variant') else ''}{r['trigger']} | {r['family']} {r['kind']} | "
                     f"{tgt} | {tpr} | {r['fpr']:.2%} | {_covers(r)} | {r['clean_decisions']} | "
                     + (f"{len(r['clean_acted'])} ({r['clean_min_p']:.0e})" if r["clean_decisions"] else "-")
                     + (f" | {r['check_p']:.2g} |" if r.get("check_p") is not None else " | - |"))
    read = [r for r in rows if r.get("check_p") is not None]
    if read:
        on = [r for r in read if r["check_holds"]]
        lines += ["", f"The check lets the test run on {len(on)} of {len(read)} data sets; in those, "
                      f"{sum(len(r['clean_acted']) for r in on)} of {sum(r['clean_decisions'] for r in on)} clean class "
                      "decisions acted on."]
    return "\n".join(lines)


def _covers(r: dict) -> str:
    """A mirror row's cover images taken, and its FPR over the images that are neither poison nor cover."""
    if r.get("cover_taken") is None:
        return "-"
    return f"{r['cover_taken']:.1%} of {r['covers']:,} ({r['fpr_clean']:.2%})"


def trust_free_markdown(rows: list[dict], command: str) -> str:
    lines = [f"`python benchmarks/input_view.py {command}`: what a trust-free scan does with the images (no model, no "
             "trusted set): each class's fine view (high-passed) against the other classes' images "
             "(`direction.across_classes`), then the coarse view (whitened thumbnails) where the fine one does not act, "
             "each p doubled for the two views, acted on below `max_false_alarm` / classes; in a class acted on, the probe "
             "seeded with the images beyond and calibrated on the other classes' images flags those above `flag_z`. TPR "
             "and FPR of those flags over the whole data set.", "",
             "| data | trigger | family | target / rate | target p (view) | TPR | FPR | clean classes acted on (class: share "
             "beyond, flagged of n) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r["target_row"]
        fam = r["family"] + (f" ({r['kind']})" if r["kind"] else "")
        acted = ", ".join(f"{c}: {a['share']:.1%}, {a['flagged']} of {a['n']}" for c, a in r["clean_acted"].items()) or "-"
        lines.append(f"| {r.get('variant', 'zoo')} | {r['trigger']} | {fam} | "
                     f"{r['target'] if r['target'] is not None else '-'} / {r['rate']:.1%} | "
                     f"{'-' if t is None else format(t['p'], '.0e') + ' (' + t.get('view', NAMES[0]) + ')'} | "
                     f"{'-' if r['tpr'] is None else format(r['tpr'], '.1%')} | "
                     f"{r['fpr']:.2%} | {acted} |")
    attacked = [r for r in rows if r["target_row"] is not None]
    caught = [r for r in attacked if r["tpr"] >= 0.95]
    n_clean = sum(r["clean_decisions"] for r in rows)
    n_acted = sum(len(r["clean_acted"]) for r in rows)
    lost = [a["flagged"] / a["n"] for r in rows for a in r["clean_acted"].values()]
    lines += ["", f"Triggers caught at TPR >= 95 %: {len(caught)} of {len(attacked)} (FPR {min(r['fpr'] for r in caught):.2%}-"
              f"{max(r['fpr'] for r in caught):.2%})." if caught else f"Triggers caught: 0 of {len(attacked)}.",
              f"Clean class decisions acted on: {n_acted} of {n_clean}" + (f"; the most a clean class would lose: "
                                                                             f"{max(lost):.1%}." if lost else ".")]
    return "\n".join(lines)


def markdown(rows: list[dict], command: str) -> str:
    lines = [f"`python benchmarks/input_view.py {command}`: the direction test in the input views alone "
             "(fine: high-passed images; coarse: whitened thumbnails; no model), zoo data (CIFAR-10 4,000, 50 trusted a "
             f"class), p corrected as beside {LAYERS} model layers, the coarse view standing only where the fine one does "
             f"not act; acted on below {rows[0]['bar']:.0e}. TPR: share of the poison beyond every trusted "
             "image on the held-out projection (the probe's seed); a screen of up to 512 a class, as a scan takes.", "",
             "| trigger | family | target / rate | p | view | acted | share beyond | TPR | AUROC | clean classes: min p, acted "
             "| trusted-set check p |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r["target_row"]
        cells = (["-"] * 6 if t is None else
                 [f"{t['p']:.0e}", t["view"], "yes" if t["acted"] else "no", f"{t['share']:.0%}", f"{t['tpr']:.0%}",
                  f"{t['auroc']:.2f}"])
        fam = r["family"] + (f" ({r['kind']})" if r["kind"] else "")
        lines.append(f"| {r['trigger']} | {fam} | {r['target'] if r['target'] is not None else '-'} / {r['rate']:.1%} | "
                     + " | ".join(cells) + f" | {r['clean_min_p']:.0e}, {r['clean_acted']} | "
                     + ("-" if r.get("mismatch_p") is None else f"{r['mismatch_p']:.0e}") + " |")
    acted = [r for r in rows if r["target_row"] and r["target_row"]["acted"]]
    checked = harm.mismatch_summary([r.get("mismatch_p") for r in rows])
    lines += ["", f"Acted on: {len(acted)} of {sum(r['target_row'] is not None for r in rows)} triggers; clean classes "
              f"acted on: {sum(r['clean_acted'] for r in rows)} of {sum(9 if r['target_row'] else 10 for r in rows)}."
              + (f" The trusted-set check (`guard.mismatch` over the two views, the classes not acted on) below "
                 f"{Thresholds().max_false_alarm:g}: {checked['warned']} of {checked['scans']} data sets."
                 if checked else "")]
    return "\n".join(lines)


def harm_rows(seeds: int) -> list[dict]:
    """``bench_harm``'s data (small and long-tailed CIFAR-10 subsets, 10 or 20 trusted a class): its
    clean seeds and its attacked cells."""
    rows = []
    for variant in harm.VARIANTS:
        for trusted in harm.TRUSTED:
            make = (lambda a, r, s, v=variant, t=trusted: harm.spec(v, a, r if a else 0.0, s, t))
            for attack, _, seed in harm.ATTACKED:
                rows.append({"variant": variant, **trigger_row(attack, seed, make)})
            for seed in range(seeds):
                rows.append({"variant": variant, **trigger_row(None, seed, make)})
            print(f"{variant}, {trusted} trusted: clean classes acted on "
                  f"{sum(r['clean_acted'] for r in rows[-seeds - len(harm.ATTACKED):])}", flush=True)
    return rows


def harm_markdown(rows: list[dict]) -> str:
    lines = ["`python benchmarks/input_view.py --harm`: the direction test in the input views alone (fine and "
             "coarse, as for the zoo; no model) on `harm_cifar10`'s data (CIFAR-10 subsets read without augmentation: small 250 a "
             f"class, long-tailed lt10 / lt50), p corrected as beside {LAYERS} model layers; acted on below "
             f"{rows[0]['bar']:.0e}. Clean class decisions: every class of 10 no-attack seeds and the non-target classes "
             "of the two attacked cells (seed 0, target 0). TPR: share of the poison beyond every trusted image.", "",
             "| data | trusted / class | clean class decisions | acted on | smallest clean p | "
             "BadNets 10 %: p, acted, TPR | Blended 10 %: p, acted, TPR |", "|---|---|---|---|---|---|---|"]
    keys = sorted({(r["variant"], r["trusted_per_class"]) for r in rows}, key=lambda k: (list(harm.VARIANTS).index(k[0]), k[1]))
    for v, t in keys:
        mine = [r for r in rows if r["variant"] == v and r["trusted_per_class"] == t]
        n = sum(len(r["counts"]) - (r["target"] is not None) for r in mine)
        acted = sum(r["clean_acted"] for r in mine)
        atk = []
        for name in ("badnets", "blended"):
            a = next(r for r in mine if r["family"] == name or r["trigger"] == name)["target_row"]
            atk.append(f"{a['p']:.0e} ({a['view']}), {'yes' if a['acted'] else 'no'}, {a['tpr']:.0%}")
        lines.append(f"| {v} | {t} | {n} | {acted} | {min(r['clean_min_p'] for r in mine):.0e} | " + " | ".join(atk) + " |")
    return "\n".join(lines)


def _harm_grid(row) -> list[dict]:
    """``row(attack, seed, make)`` (:func:`trust_free_row`, :func:`mirror_row`) on every variant of ``bench_harm``'s
    data with 10 trusted a class: its attacked cells and its clean seeds."""
    return [{"variant": v, **row(atk, seed, lambda x, r, s, v=v: harm.spec(v, x, r if x else 0.0, s, 10))}
            for v in harm.VARIANTS for atk, _, seed in harm.ATTACKED + [(None, 0.0, s) for s in harm.CLEAN_SEEDS]]


def _emit(rows: list[dict], md: str, out: str | None) -> None:
    """Print a table; with ``out``, save it with its rows."""
    print(md)
    if out:
        Path(out).write_text(json.dumps({"rows": rows, "markdown": md}, indent=1, default=float))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo-seed", type=int, default=2)
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--triggers", nargs="*", help="these zoo triggers instead of a zoo seed's first --n")
    ap.add_argument("--clean", type=int, default=2, help="no-attack data seeds")
    ap.add_argument("--harm", action="store_true", help="bench_harm's data instead of the zoo's")
    ap.add_argument("--trusted-shift", choices=sorted(SHIFTS), help="trusted images through another pipeline")
    ap.add_argument("--train-shift", choices=sorted(SHIFTS), help="training images through another pipeline")
    ap.add_argument("--crops", action="store_true", help="read the screen with the training crops (no scan_dataset)")
    ap.add_argument("--trust-free", action="store_true", help="no trusted set: each class against the other classes")
    ap.add_argument("--mirror", action="store_true", help="each class against its own mirror images (guard.mirror)")
    ap.add_argument("--take", action="store_true",
                    help="with a trusted set: what each catch in the images takes with and without a mirror-image bound")
    ap.add_argument("--attacks", nargs="*", default=[], metavar="NAME:RATE:SEED",
                    help="with --mirror or --take: guard.attacks cells on the main recipe's data (10k) or the zoo's")
    ap.add_argument("--attack-args", nargs="*", default=[], metavar="FIELD=VALUE",
                    help="with --attacks: further attack fields for every cell, e.g. cover_rate=0.1 (JSON values)")
    ap.add_argument("--attacks-on", choices=("10k", "zoo"), default="10k",
                    help="with --attacks: the main recipe's data (10k) or the zoo recipe's (4k, crop + flip in training)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    global TRUSTED_SHIFT, TRAIN_SHIFT, CROPS
    TRUSTED_SHIFT, TRAIN_SHIFT, CROPS = a.trusted_shift, a.train_shift, a.crops
    command = " ".join(sys.argv[1:sys.argv.index("--out")] if a.out else sys.argv[1:])
    if a.mirror or a.take:
        kwargs = fields(a.attack_args)
        if a.attacks_on == "zoo":
            cell = lambda x, r, s: replace(spec("zoo", x, r, s), attack_kwargs=kwargs)  # noqa: E731
        else:
            cell = lambda x, r, s: RunSpec(data="cifar10", attack=x, rate=r, n_train=10000, seed=s,  # noqa: E731
                                           attack_kwargs=kwargs)
        row = take_row if a.take else mirror_row
        if a.harm:
            rows = _harm_grid(row)
        else:
            rows = ([row(t) for t in (a.triggers if a.triggers is not None
                                      else [f"zoo:{a.zoo_seed}:{i}" for i in range(a.n)])]
                    + [{"variant": "4k" if a.attacks_on == "zoo" else "10k", **row(None if x == "none" else x, int(s),
                                                        lambda x, r, s2, r0=float(r): cell(x, r0, s2))}
                       for x, r, s in (c.split(":") for c in a.attacks)]
                    + [row(None, s) for s in range(a.clean)])
        return _emit(rows, (take_markdown if a.take else mirror_markdown)(rows, command), a.out)
    if a.trust_free:
        if a.harm:
            rows = _harm_grid(trust_free_row)
        else:
            rows = ([trust_free_row(t) for t in (a.triggers or [f"zoo:{a.zoo_seed}:{i}" for i in range(a.n)])]
                    + [trust_free_row(None, s) for s in range(a.clean)])
        return _emit(rows, trust_free_markdown(rows, command), a.out)
    if a.harm:
        rows = harm_rows(len(harm.CLEAN_SEEDS))
        return _emit(rows, harm_markdown(rows), a.out)
    triggers = a.triggers or [f"zoo:{a.zoo_seed}:{i}" for i in range(a.n)]
    rows = [trigger_row(t) for t in triggers] + [trigger_row(None, s) for s in range(a.clean)]
    _emit(rows, markdown(rows, command), a.out)


if __name__ == "__main__":
    main()
