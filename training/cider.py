"""CIDEr-D, once: for the reported metric (``training.metrics``) and the self-critical reward (``training.scst``).

CIDEr-D as coco-caption's ``Cider`` computes it (Vedantam et al., CVPR 2015, the "-D" variant): every
caption is a tf-idf vector of its n-grams per order, 1 to 4; a candidate's similarity to a reference is
the cosine of their vectors with the candidate's weights clipped at the reference's (no credit for
saying an n-gram more often than the reference does), times a Gaussian penalty on the difference of
their lengths (sigma 6; length counted in bigrams, as pycocoevalcap does). A candidate's score is the
mean over orders and over its image's references, times 10. The idf of an n-gram is the log of the
number of images over the number of images whose references contain it.

Which images make up the corpus for idf is all that differs between the two uses:

- the metric, :func:`corpus_cider_d`: the images being evaluated (coco-caption's definition);
- the reward, :class:`CiderD`: a fixed corpus, the training images, as in the reference self-critical
  implementations: a batch of 32 images is too small a corpus for idf. Its references are counted and
  weighted once; each batch of sampled captions is then scored in a few numpy passes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from training.ngrams import NgramCounts, NgramIndex, NgramTable, Tokens, distinct, gather

__all__ = ["CiderD", "corpus_cider_d"]


class CiderD:
    """Per-caption CIDEr-D against fixed references, with their corpus's document frequencies.

    ``references[i]`` holds the tokenised reference captions of image ``i``. With ``references`` equal
    to the evaluated set, scores equal :func:`corpus_cider_d` (``metrics.compute_cider_d``).
    """

    def __init__(self, references: Sequence[Sequence[Tokens]], *, n: int = 4, sigma: float = 6.0) -> None:
        if not references:
            raise ValueError("CiderD needs at least one image's references")
        if any(len(refs) == 0 for refs in references):
            raise ValueError("CiderD needs at least one reference caption for every image")
        self.n, self.sigma = n, sigma
        sentences = [ref for refs in references for ref in refs]
        self._index, counts = NgramIndex.build(sentences, n)
        ref_len = np.array([len(s) for s in sentences], dtype=np.int64)
        refs_per_image = np.array([len(refs) for refs in references], dtype=np.int64)
        self._refs = _References(counts, ref_len, refs_per_image, n)

    def __len__(self) -> int:
        return len(self._refs.refs_per_image)

    def scores(self, images: Sequence[int], captions: Sequence[Tokens]) -> np.ndarray:
        """CIDEr-D (x10, as reported) of each tokenised caption ``captions[i]`` for image ``images[i]``."""
        if len(images) != len(captions):
            raise ValueError(f"got {len(captions)} captions for {len(images)} images")
        hyp_len = np.array([len(c) for c in captions], dtype=np.int64)
        image_rows = np.asarray(images, dtype=np.int64).reshape(-1)
        return self._refs.score(self._index.count(captions), hyp_len, image_rows, self.sigma)

    def score(self, image: int, tokens: Tokens) -> float:
        """CIDEr-D (x10, as reported) of one tokenised caption for image ``image``."""
        return float(self.scores([image], [tokens])[0])


def corpus_cider_d(table: NgramTable, *, sigma: float = 6.0) -> np.ndarray:
    """Per-image CIDEr-D of the table's candidates, as coco-caption's ``Cider``: document frequencies
    from the references of the table's images."""
    hyp, ref = table.hyp, table.ref
    refs = _References(
        NgramCounts(ref.caption, ref.gram, ref.order, ref.count, table.n_grams),
        table.ref_len,
        table.refs_per_image,
        table.n,
    )
    hyps = NgramCounts(hyp.caption, hyp.gram, hyp.order, hyp.count, table.n_grams)
    return refs.score(hyps, table.hyp_len, np.arange(table.n_images), sigma)


class _References:
    """The references' side: tf-idf weights, their norms and the lengths, computed once.

    ``counts`` are the references' n-grams (``counts.sentence`` numbers the references, image by
    image); ``refs_per_image`` says how many belong to each image.
    """

    def __init__(self, counts: NgramCounts, ref_len: np.ndarray, refs_per_image: np.ndarray, n: int) -> None:
        n_refs, n_images = len(ref_len), len(refs_per_image)
        self.n = n
        self.refs_per_image = refs_per_image
        self.first_ref = np.cumsum(refs_per_image) - refs_per_image
        ref_image = np.repeat(np.arange(n_images), refs_per_image)
        # Document frequency: the number of images whose references contain the n-gram.
        image_grams = distinct(ref_image[counts.sentence] * counts.n_ids + counts.gram)
        df = np.bincount(image_grams % counts.n_ids, minlength=counts.n_ids)
        self.idf = np.log(float(n_images)) - np.log(np.maximum(1.0, df))
        self.unseen_idf = np.log(float(n_images)) - np.log(1.0)  # of an n-gram no reference has
        self.gram, self.order = counts.gram, counts.order
        self.weight = counts.count * self.idf[counts.gram]
        norm_sq = np.bincount(counts.sentence * n + counts.order, self.weight**2, minlength=n_refs * n)
        self.norm = np.sqrt(norm_sq).reshape(n_refs, n)
        self.length = np.maximum(ref_len - 1, 0)  # pycocoevalcap's "length" counts bigrams
        self.entries = np.bincount(counts.sentence, minlength=n_refs)  # n-grams per reference
        self.first_entry = np.cumsum(self.entries) - self.entries

    def score(self, hyp: NgramCounts, hyp_len: np.ndarray, images: np.ndarray, sigma: float) -> np.ndarray:
        """CIDEr-D (x10) of caption ``i`` (``hyp.sentence == i``, in these references' ids) for ``images[i]``."""
        n, n_captions = self.n, len(images)
        idf = np.full(len(hyp.gram), self.unseen_idf)
        seen = hyp.gram < len(self.idf)
        idf[seen] = self.idf[hyp.gram[seen]]
        hyp_w = hyp.count * idf
        hyp_norm = np.sqrt(np.bincount(hyp.sentence * n + hyp.order, hyp_w**2, minlength=n_captions * n))
        hyp_norm = hyp_norm.reshape(n_captions, n)
        # Every (caption, reference of its image) pair, caption by caption, and each pair's reference n-grams.
        refs_per_caption = self.refs_per_image[images]
        pair_caption = np.repeat(np.arange(n_captions), refs_per_caption)
        pair_ref = _ranges(self.first_ref[images], refs_per_caption)
        n_pairs = len(pair_ref)
        pair = np.repeat(np.arange(n_pairs), self.entries[pair_ref])
        entry = _ranges(self.first_entry[pair_ref], self.entries[pair_ref])
        ref_w = self.weight[entry]
        # Clipped dot product: only n-grams in both the caption and the reference contribute.
        hyp_keys = hyp.sentence * hyp.n_ids + hyp.gram
        hyp_w_at_ref = gather(hyp_w, hyp_keys, pair_caption[pair] * hyp.n_ids + self.gram[entry])
        clipped = np.minimum(hyp_w_at_ref, ref_w) * ref_w
        dot = np.bincount(pair * n + self.order[entry], clipped, minlength=n_pairs * n).reshape(n_pairs, n)
        dot = dot.astype(np.float64, copy=False)  # bincount gives int64 when nothing is counted
        norms = hyp_norm[pair_caption] * self.norm[pair_ref]
        sim = np.divide(dot, norms, out=dot.copy(), where=norms != 0)
        delta = (np.maximum(hyp_len - 1, 0)[pair_caption] - self.length[pair_ref]).astype(float)
        sim *= np.exp(-(delta**2) / (2 * sigma**2))[:, None]
        per_caption = np.stack([np.bincount(pair_caption, sim[:, k], minlength=n_captions) for k in range(n)], axis=1)
        return per_caption.mean(axis=1) / refs_per_caption * 10.0


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``concatenate([arange(s, s + l) for s, l in zip(starts, lengths)])`` without the Python loop."""
    ends = np.cumsum(lengths)
    total = int(ends[-1]) if len(ends) else 0
    return np.arange(total) - np.repeat(ends - lengths - starts, lengths)
