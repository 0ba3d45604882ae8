"""Caption metrics with coco-caption's definitions: BLEU-1..4, ROUGE-L and CIDEr-D without Java.

Every number equals what pycocoevalcap (coco-caption) reports for the same captions: captions are
tokenised with ``captioner.text.tokenize`` (coco-caption's PTBTokenizer, in pure Python) and scored
with the formulas, constants and corner cases of pycocoevalcap's ``Bleu`` (corpus level, "closest"
reference length), ``Rouge`` (ROUGE-L, beta 1.2, best reference) and ``Cider`` (which is CIDEr-D:
1- to 4-grams, clipped tf-idf vectors, Gaussian length penalty with sigma 6, x10, document
frequencies from the references of the evaluated set; computed in ``training.cider``, which the
self-critical reward shares). N-grams are counted once, into numpy arrays (``training.ngrams``), so
5,000 images score in well under a second.

METEOR needs Java: it runs pycocoevalcap's bundled ``meteor-1.5.jar`` when pycocoevalcap is
installed and ``java`` is on PATH, and is skipped with a logged message otherwise. SPICE is always
skipped: pycocoevalcap's SPICE downloads Stanford CoreNLP models on first use, which cannot be
relied on (no network on the training machines).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import IO, TypeVar

import numpy as np

from captioner.text import tokenize
from training.cider import corpus_cider_d
from training.ngrams import NgramTable, Tokens, gather

__all__ = [
    "METRIC_NAMES",
    "compute_bleu",
    "compute_cider_d",
    "compute_meteor",
    "compute_metrics",
    "compute_rouge_l",
    "find_meteor_jar",
    "format_metrics",
]

log = logging.getLogger(__name__)
ImageId = TypeVar("ImageId", bound=Hashable)  # any hashable id, the same kind in predictions and references

# Report order, as in coco-caption's COCOEvalCap.
METRIC_NAMES = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE")


def compute_metrics(
    predictions: Mapping[ImageId, str],
    references: Mapping[ImageId, Sequence[str]],
    *,
    java: bool | None = None,
) -> dict[str, float]:
    """Score one predicted caption per image against that image's reference captions.

    Returns ``BLEU-1`` .. ``BLEU-4``, ``ROUGE-L`` and ``CIDEr`` (CIDEr-D, as coco-caption reports
    it), plus ``METEOR`` when Java runs. ``java=None`` uses Java when it is available and logs why
    METEOR was skipped otherwise; ``java=True`` raises instead of skipping; ``java=False`` never
    starts Java (fast, for validation during training).

    Raises ``ValueError`` when the two mappings do not cover the same ids, when they are empty, or
    when an image has no reference captions.
    """
    ids = _check_inputs(predictions, references)
    hyps = [tokenize(predictions[i]) for i in ids]
    refs = [[tokenize(r) for r in references[i]] for i in ids]
    table = NgramTable(hyps, refs, n=4)
    metrics = {f"BLEU-{k}": score for k, score in enumerate(_bleu(table), start=1)}
    meteor = _meteor_or_none(hyps, refs, java)
    if meteor is not None:
        metrics["METEOR"] = meteor
    metrics["ROUGE-L"] = float(np.mean(compute_rouge_l(hyps, refs)))
    metrics["CIDEr"] = float(np.mean(corpus_cider_d(table, sigma=6.0)))
    return metrics


def format_metrics(metrics: Mapping[str, float]) -> str:
    """A two-column text table of ``metrics``, coco-caption's metrics first and in its order."""
    names = [m for m in METRIC_NAMES if m in metrics] + [m for m in metrics if m not in METRIC_NAMES]
    width = max([len("metric"), *map(len, names)])
    lines = [f"{'metric':<{width}}  {'score':>8}", f"{'-' * width}  {'-' * 8}"]
    lines += [f"{name:<{width}}  {metrics[name]:>8.4f}" for name in names]
    return "\n".join(lines)


def _check_inputs(predictions: Mapping[ImageId, str], references: Mapping[ImageId, Sequence[str]]) -> list:
    if predictions.keys() != references.keys():
        only_pred = [i for i in predictions if i not in references]
        only_ref = [i for i in references if i not in predictions]
        raise ValueError(
            "predictions and references must have the same ids: "
            f"{len(only_pred)} only in predictions (e.g. {only_pred[:3]}), "
            f"{len(only_ref)} only in references (e.g. {only_ref[:3]})"
        )
    if not references:
        raise ValueError("nothing to score: predictions and references are empty")
    for image_id, captions in references.items():
        if isinstance(captions, str):
            raise ValueError(f"references[{image_id!r}] must be a list of captions, got a str")
        if len(captions) == 0:
            raise ValueError(f"image {image_id!r} has no reference captions; every image needs at least one")
        if not isinstance(predictions[image_id], str):
            raise ValueError(f"predictions[{image_id!r}] must be a str, got {type(predictions[image_id]).__name__}")
    return list(references)  # pycocoevalcap iterates the references' ids


def _check_lengths(hyps: Sequence[Tokens], refs: Sequence[Sequence[Tokens]]) -> None:
    if len(hyps) != len(refs):
        raise ValueError(f"got {len(hyps)} candidate captions but references for {len(refs)} images")
    if not hyps:
        raise ValueError("nothing to score: no captions")
    if any(len(r) == 0 for r in refs):
        raise ValueError("every image needs at least one reference caption")


# --- BLEU ---------------------------------------------------------------------------------------------


def compute_bleu(hyps: Sequence[Tokens], refs: Sequence[Sequence[Tokens]], *, n: int = 4) -> list[float]:
    """Corpus BLEU-1..``n`` of tokenised captions, exactly as pycocoevalcap's ``Bleu(n)``.

    ``hyps[i]`` is the candidate caption for image i and ``refs[i]`` its references. Clipped n-gram
    matches and lengths are summed over the corpus before the geometric mean; the brevity penalty
    uses, per image, the reference length closest to the candidate's (the shorter one on ties).
    """
    _check_lengths(hyps, refs)
    return _bleu(NgramTable(hyps, refs, n=n))


def _bleu(table: NgramTable) -> list[float]:
    # pycocoevalcap's constants: they keep empty counts finite, and they move the scores slightly.
    small, tiny = 1e-9, 1e-15
    test_len = int(table.hyp_len.sum())
    ref_len = sum(
        min((abs(length - h), length) for length in lengths)[1]
        for h, lengths in zip(table.hyp_len.tolist(), table.ref_lengths_per_image(), strict=True)
    )
    guess = [int(np.maximum(table.hyp_len - k, 0).sum()) for k in range(table.n)]
    # A candidate n-gram is credited at most as often as it occurs in any single reference.
    clipped = np.minimum(table.hyp.count, gather(table.ref_max_count, table.ref_keys, table.hyp.key))
    correct = np.bincount(table.hyp.order, weights=clipped, minlength=table.n).tolist()

    scores, bleu = [], 1.0
    for k in range(table.n):
        bleu *= (correct[k] + tiny) / (guess[k] + small)
        scores.append(bleu ** (1.0 / (k + 1)))
    ratio = (test_len + tiny) / (ref_len + small)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


# --- ROUGE-L ------------------------------------------------------------------------------------------


def compute_rouge_l(hyps: Sequence[Tokens], refs: Sequence[Sequence[Tokens]], *, beta: float = 1.2) -> np.ndarray:
    """Per-image ROUGE-L of tokenised captions, exactly as pycocoevalcap's ``Rouge``; report the mean.

    Precision and recall of the longest common subsequence are each maximised over the references
    before the F-measure with ``beta`` is taken.
    """
    _check_lengths(hyps, refs)
    scores = np.zeros(len(hyps), dtype=np.float64)
    for i, (hyp, image_refs) in enumerate(zip(hyps, refs, strict=True)):
        # pycocoevalcap splits the joined caption on " ", so an empty caption is one empty token.
        hyp = list(hyp) or [""]
        masks = _match_masks(hyp)
        prec_max = rec_max = 0.0
        for ref in image_refs:
            ref = list(ref) or [""]
            lcs = _lcs_length(masks, len(hyp), ref)
            prec_max = max(prec_max, lcs / float(len(hyp)))
            rec_max = max(rec_max, lcs / float(len(ref)))
        if prec_max != 0 and rec_max != 0:
            scores[i] = ((1 + beta**2) * prec_max * rec_max) / float(rec_max + beta**2 * prec_max)
    return scores


def _match_masks(tokens: Sequence[str]) -> dict[str, int]:
    masks: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        masks[tok] = masks.get(tok, 0) | (1 << i)
    return masks


def _lcs_length(masks: dict[str, int], length: int, other: Sequence[str]) -> int:
    """Length of the longest common subsequence of the masked sequence and ``other``.

    Bit-parallel (Hyyrö 2004): bit i of ``v`` is cleared once row i of the dynamic-programming table
    has gained a match, so the LCS is the number of cleared bits; one big-int step per token.
    """
    v = (1 << length) - 1
    for tok in other:
        u = v & masks.get(tok, 0)
        v = (v + u) | (v - u)
    return length - (v & ((1 << length) - 1)).bit_count()


# --- CIDEr-D ------------------------------------------------------------------------------------------


def compute_cider_d(
    hyps: Sequence[Tokens], refs: Sequence[Sequence[Tokens]], *, n: int = 4, sigma: float = 6.0
) -> np.ndarray:
    """Per-image CIDEr-D of tokenised captions, exactly as pycocoevalcap's ``Cider``; report the mean.

    Document frequencies come from the references of these images, so a score depends on the whole
    evaluated set (as in coco-caption). Equal to ``training.cider.CiderD(refs).scores(range(len(hyps)), hyps)``.
    """
    _check_lengths(hyps, refs)
    return corpus_cider_d(NgramTable(hyps, refs, n=n), sigma=sigma)


# --- METEOR (Java) ------------------------------------------------------------------------------------


def find_meteor_jar() -> Path | None:
    """pycocoevalcap's bundled ``meteor/meteor-1.5.jar``, found without importing pycocoevalcap."""
    try:
        spec = importlib.util.find_spec("pycocoevalcap")
    except (ImportError, ValueError):
        return None
    for root in (spec.submodule_search_locations or []) if spec else []:
        jar = Path(root) / "meteor" / "meteor-1.5.jar"
        if jar.is_file():
            return jar
    return None


def compute_meteor(hyps: Sequence[Tokens], refs: Sequence[Sequence[Tokens]], *, jar: str | Path | None = None) -> float:
    """Corpus METEOR 1.5 of tokenised captions, as pycocoevalcap's ``Meteor`` (needs Java).

    Talks to ``meteor-1.5.jar -stdio -l en -norm`` with pycocoevalcap's protocol: one ``SCORE``
    line per image, then one ``EVAL`` line over all their statistics. Raises ``FileNotFoundError``
    when Java or the jar is missing and ``RuntimeError`` when METEOR fails.
    """
    _check_lengths(hyps, refs)
    jar_path = Path(jar) if jar is not None else find_meteor_jar()
    if jar_path is None or not jar_path.is_file():
        raise FileNotFoundError(f"METEOR jar not found ({jar_path or 'pycocoevalcap is not installed'})")
    java = shutil.which("java")
    if java is None:
        raise FileNotFoundError("java is not on PATH")
    lines = [_meteor_score_line(h, r) for h, r in zip(hyps, refs, strict=True)]
    cmd = [java, "-jar", "-Xmx2G", jar_path.name, "-", "-", "-stdio", "-l", "en", "-norm"]
    with tempfile.TemporaryFile() as stderr:
        proc = subprocess.Popen(cmd, cwd=jar_path.parent, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr)
        stdin, stdout = proc.stdin, proc.stdout
        assert stdin is not None and stdout is not None  # both are PIPEs
        try:
            # Write from a thread: the statistics come back while we are still sending, and a full
            # pipe in each direction would otherwise deadlock.
            writer = threading.Thread(target=_write_lines, args=(stdin, lines), daemon=True)
            writer.start()
            stats = [_read_line(proc, stderr) for _ in lines]
            writer.join()
            _write_lines(stdin, ["EVAL ||| " + " ||| ".join(stats)])
            for _ in lines:
                _read_line(proc, stderr)  # per-image scores
            score = float(_read_line(proc, stderr))
        finally:
            for pipe in (stdin, stdout):
                # A broken pipe when METEOR died; _read_line has already reported that.
                with contextlib.suppress(OSError):
                    pipe.close()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return score


def _meteor_score_line(hyp: Tokens, refs: Sequence[Tokens]) -> str:
    # As pycocoevalcap: captions joined with spaces, "|||" (the field separator) removed from the
    # candidate; also from references, where pycocoevalcap would send a malformed line.
    def clean(tokens: Tokens) -> str:
        return " ".join(tokens).replace("|||", "").replace("  ", " ")

    return " ||| ".join(("SCORE", " ||| ".join(clean(r) for r in refs), clean(hyp)))


def _write_lines(pipe: IO[bytes], lines: Sequence[str]) -> None:
    try:
        for line in lines:
            pipe.write(f"{line}\n".encode())
        pipe.flush()
    except (BrokenPipeError, ValueError):  # METEOR died: the reader reports it with its stderr
        pass


def _read_line(proc: subprocess.Popen, stderr: IO[bytes]) -> str:
    assert proc.stdout is not None  # compute_meteor starts METEOR with stdout=PIPE
    line = proc.stdout.readline().decode().strip()
    if not line:
        proc.kill()
        proc.wait()
        stderr.seek(0)
        tail = stderr.read().decode(errors="replace").strip()[-2000:]
        raise RuntimeError(f"METEOR stopped early (exit code {proc.returncode}): {tail or 'no output'}")
    return line


def _meteor_or_none(hyps: list[list[str]], refs: list[list[list[str]]], java: bool | None) -> float | None:
    """METEOR when ``java`` allows and it can run; otherwise None, with the reason logged (or raised)."""
    if java is False:
        return None
    log.info("SPICE skipped: pycocoevalcap's SPICE downloads Stanford CoreNLP models on first use")
    jar, exe = find_meteor_jar(), shutil.which("java")
    if jar is None or exe is None:
        reason = "java is not on PATH" if exe is None else "pycocoevalcap (its meteor-1.5.jar) is not installed"
        if java:
            raise RuntimeError(f"METEOR needs Java and pycocoevalcap's meteor-1.5.jar: {reason}")
        log.info("METEOR skipped: %s", reason)
        return None
    try:
        return compute_meteor(hyps, refs, jar=jar)
    except (OSError, RuntimeError, ValueError) as exc:
        if java:
            raise
        log.warning("METEOR skipped: %s", exc)
        return None
