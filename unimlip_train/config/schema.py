"""The run configuration's schema: one dataclass per YAML section, a one-line note per key.

Every key with a fixed set of values is typed ``Literal[...]``: that list is the only place its choices are
written; loading (``config.load``) rejects any other value, naming the key, the file and the choices. The
defaults here are the defaults of every run; ``configs/*.yaml`` change only what differs.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from unimlip_train.format.limits import DEFAULT_MAX_IMAGE_PIXELS

# ----------------------------------------------------------------------------------------------------
# Choices (each written once; ``typing.get_args`` lists them)
# ----------------------------------------------------------------------------------------------------

#: ``data.text.sections`` as one word: which report sections the model reads (``random``: one per sample and
#: epoch; evaluation reads it as ``findings+impression``, the first choice).
Sections = Literal["findings+impression", "impression", "findings", "random"]
#: ``data.text.order``: which section comes first, so truncation at ``max_length`` drops the other one first.
SectionOrder = Literal["impression_first", "findings_first"]
#: ``data.view``: which image of a multi-view (study) sample (``pair``: the image SSL view is another image).
View = Literal["random", "frontal", "pair"]
InChans = Literal[1, 3]  # grayscale or RGB input to the image tower
WorkerStart = Literal["forkserver", "spawn", "fork"]  # how loader workers start (data/worker_start.py says why)
Pooling = Literal["cls", "mean"]  # text tower: the [CLS] state or the mean over tokens
Projection = Literal["linear", "mlp"]  # tower features -> the shared embedding space
LossKind = Literal["infonce", "sigmoid"]  # image-text contrast: CLIP's InfoNCE or SigLIP's sigmoid loss
Positives = Literal["report", "report+group", "none"]  # which other samples count as the same image-text pair
#: ``loss.feature_perturbation``: the preset that sets the three keys below together ('': none, each its own)
FeaturePerturbation = Literal["", "encoder", "pooled_dropout"]
FeatureNoise = Literal["encoder", "pooled_dropout"]  # where the feature-level noise goes
ImageFeaturePair = Literal["clean_noised", "two_noised"]  # the two sides image_feature contrasts
TextFeatureSpace = Literal["ssl_head", "shared"]  # where text_feature contrasts its two dropout passes
MlmView = Literal["augmented", "report"]  # which report MLM masks (augmented: reads text_ssl's pass)
ItmNegatives = Literal["one_per_pair", "image_and_text"]  # ITM negatives per pair: one, or two (ALBEF)
TextSslSpace = Literal["ssl_head", "shared"]  # where text_ssl contrasts a report and its augmented copy
TextPositives = Literal["identity", "labels", "labels_ssl"]  # which reports the text SSL pair keeps out of its negatives
Negatives = Literal["accumulated", "micro"]  # contrastive negatives: all K micro batches of a step, or one
Optimizer = Literal["adamw", "fused_adam", "cpu_adam"]
Precision = Literal["fp32", "bf16", "fp16"]
Backend = Literal["", "gloo", "nccl"]  # '': nccl on CUDA, gloo on CPU
ZeroStage = Literal[0, 1, 2, 3]

#: what ``loss.feature_perturbation`` stands for (``config.load.apply_feature_preset``; explicit keys win)
FEATURE_PRESETS = {
    "encoder": {"feature_noise": "encoder", "image_feature_pair": "clean_noised", "text_feature_space": "ssl_head"},
    "pooled_dropout": {"feature_noise": "pooled_dropout", "image_feature_pair": "two_noised",
                       "text_feature_space": "shared"},
}

SECTION_CHOICES: tuple = typing.get_args(Sections)
SECTION_ORDERS: tuple = typing.get_args(SectionOrder)

#: ``monitor.wandb`` keys, passed to ``wandb.init`` (the run id, resume mode and folder come from the run dir).
WANDB_SETTINGS = ("project", "entity", "name", "group", "tags", "notes", "mode", "job_type")


# ----------------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------------


@dataclass
class DataSource:
    """One shard source mixed into training: brace pattern, shard list file, directory or index.json."""

    path: str = ""  # where the shards are
    weight: float = 1.0  # share of each epoch's samples (relative to the other sources)
    split: str = "train"  # the split to read from an index.json


def default_augment() -> list:
    """``data.augment``'s default: medical-tailored views (mild crops, small rotations and shifts, no flip:
    laterality matters on radiographs; CLAHE, gamma / contrast, light blur and noise mimic acquisition, no colour
    jitter). albumentations specs, ``{name: <class>, ...arguments}``; the ``Medical*`` names are the project's
    own albumentations transforms (``data.medical_transforms``, docs/training.md "Augmentation")."""
    return [
        {"name": "MedicalCropAffine", "scale": [0.5, 1.0], "rotate": 10.0, "shift": 0.05, "affine_p": 0.8,
         "hflip_p": 0.0},
        {"name": "MedicalCLAHE", "clip_limit": [1.0, 2.0], "tile_grid_size": [8, 8], "p": 0.3},
        {"name": "MedicalTone", "gamma": [0.8, 1.2], "gamma_p": 0.3, "contrast_limit": [-0.2, 0.2],
         "brightness_limit": [-0.1, 0.1], "contrast_p": 0.3},
        {"name": "MedicalGaussianBlur", "kernel_sizes": [3, 5], "sigma_limit": [0.1, 1.0], "p": 0.1},
        {"name": "MedicalGaussNoise", "std_range": [0.01, 0.04], "p": 0.1},
    ]


#: The former ``data.augment`` mapping (before it became a list) and its defaults.
FORMER_AUGMENT = {"min_scale": 0.5, "max_scale": 1.0, "rotate_degrees": 10.0, "shift_fraction": 0.05, "clahe_p": 0.3,
                  "gamma_p": 0.3, "contrast_p": 0.3, "blur_p": 0.1, "noise_p": 0.1, "hflip_p": 0.0}


def augment_from_former(mapping: dict) -> list:
    """The list that does what a former ``data.augment`` mapping did (its defaults give ``default_augment()``), so
    configs, run dirs and checkpoints written before the list still load; ``KeyError`` names an unknown key."""
    if unknown := sorted(set(mapping) - set(FORMER_AUGMENT)):
        raise KeyError(", ".join(unknown))
    old = {**FORMER_AUGMENT, **mapping}
    crop, clahe, tone, blur, noise = default_augment()
    crop.update(scale=[old["min_scale"], old["max_scale"]], rotate=old["rotate_degrees"], shift=old["shift_fraction"],
                hflip_p=old["hflip_p"])
    clahe["p"], blur["p"], noise["p"] = old["clahe_p"], old["blur_p"], old["noise_p"]
    tone.update(gamma_p=old["gamma_p"], contrast_p=old["contrast_p"])
    return [crop, clahe, tone, blur, noise]


@dataclass
class TextConfig:
    """Report handling before tokenization, and the light text augmentation for the second view."""

    # One of the Sections, or a list of section names read in its own order.
    sections: Union[Sections, list[str]] = "findings+impression"
    order: SectionOrder = "impression_first"  # truncation at max_length drops the second section first
    max_length: int = 64  # tokens per report
    sentence_shuffle_p: float = 0.5  # text SSL view: probability of shuffling the sentence order
    sentence_drop_p: float = 0.2  # text SSL view: probability of dropping each sentence (one always stays)
    span_mask_p: float = 0.0  # text SSL view: probability of masking a span of words


@dataclass
class DataConfig:
    """The training stream (and the validation data of periodic evaluation)."""

    train: Any = ""  # str (brace pattern / index.json / dir) or a list of DataSource mappings
    val: Any = ""  # the same, for periodic evaluation ('': none)
    image_size: int = 224  # square input size; with model.image.pretrained, from the weights unless set
    in_chans: InChans = 1  # 1: grayscale radiographs, 3: RGB
    num_workers: int = 2  # data loader processes per rank
    worker_start: WorkerStart = "forkserver"  # forked from a single-threaded server, never from the rank
    shuffle_buffer: int = 1000  # samples in the streaming shuffle buffer
    resampled: bool = False  # draw shards with replacement (unbounded streaming)
    samples_per_epoch: int = 0  # 0: from index.json (required when resampled)
    mlm_probability: float = 0.15  # fraction of report tokens masked for the mlm term
    view: View = "random"  # which image of a multi-view (study) sample
    max_skip_fraction: float = 0.01  # corrupt samples skipped / samples read, above which training stops
    # images above this many pixels are skipped before decoding (0: no limit); 40 MP is above any radiograph
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    # Per-channel normalisation. Empty: CLIP's constants for a random-init image tower; with
    # model.image.pretrained, the timm pretrained config of those weights (filled in when the config loads).
    mean: list = field(default_factory=list)
    std: list = field(default_factory=list)  # set together with mean
    # The training views' augmentation: albumentations transforms in order, {name: <class>, ...arguments}.
    augment: list = field(default_factory=default_augment)
    text: TextConfig = field(default_factory=TextConfig)


@dataclass
class ImageTowerConfig:
    """A timm model by name (a tag such as ``vit_base_patch16_224.augreg2_in21k_ft_in1k`` picks its weights);
    ``pretrained``: '' (random init), ``hub`` (timm's weights of that tag, from the hub or the Hugging Face
    cache) or a local weights file / folder."""

    name: str = "vit_tiny_patch16_224"  # timm model name (with an optional pretrained tag)
    pretrained: str = ""  # '' | hub | a local weights file or timm hub folder
    kwargs: dict = field(default_factory=dict)  # extra timm.create_model arguments
    token_drop: float = 0.75  # FLIP patch dropout of the feature-level image pass (loss.feature_noise=encoder)
    spatial_drop: float = 0.1  # the same pass's spatial dropout of CNN stage outputs (towers without patch tokens)
    lock: bool = False  # LiT: freeze the tower (eval mode, no optimizer state)
    lock_unlocked_groups: int = 0  # with lock: the last N blocks stay trainable


@dataclass
class TextTowerConfig:
    """A Hugging Face encoder: ``name`` is a hub id or local folder; empty means random init from ``config``."""

    name: str = ""  # hub id or local folder ('': a random-init BERT from config)
    config: dict = field(default_factory=dict)  # BertConfig fields of a random-init tower, or overrides
    pooling: Pooling = "cls"  # how token states become one text feature
    dropout: float = 0.1  # the encoder's own dropout, active in every layer (SimCSE's feature-level noise)
    lock: bool = False  # LiT: freeze the tower (eval mode, no optimizer state)
    lock_unlocked_groups: int = 0  # with lock: the last N layers stay trainable


@dataclass
class FusionConfig:
    """The image-conditioned text encoder of the fused terms (mlm, itm)."""

    layers: int = 2  # cross-attention transformer layers
    heads: int = 4  # attention heads per layer
    # image tokens from the tower's last N stages (1: the final map; 2: also the one before it, through its own
    # projection; a 64 px ResNet's final map is 2 x 2 = 4 tokens, its third stage adds 4 x 4 = 16)
    image_stages: int = 1


@dataclass
class ModelConfig:
    """The two towers, their projections into the shared space, and the fusion encoder."""

    image: ImageTowerConfig = field(default_factory=ImageTowerConfig)
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    tokenizer: str = ""  # hub id or local folder; empty: the text tower's name
    embed_dim: int = 256  # the shared image-text embedding size
    projection: Projection = "linear"  # tower feature -> shared embedding
    ssl_embed_dim: int = 256  # output size of the image / text SSL heads
    init_temperature: float = 0.07  # the learnable contrastive temperature at start
    max_logit_scale: float = 100.0  # upper clamp of 1 / temperature
    feature_dropout: float = 0.1  # dropout on pooled features (loss.feature_noise=pooled_dropout)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    grad_checkpointing: bool = False  # recompute tower activations in the backward pass (less memory)


@dataclass
class TermConfig:
    """One term of the objective."""

    weight: float = 1.0  # its weight in the total loss (0: off)
    temperature: float = 0.1  # for uni-modal NT-Xent terms; ITC terms use the model's learnable one
    kind: LossKind = "infonce"  # itc only (itc_feature follows it)
    center: bool = False  # uni-modal NT-Xent terms only: subtract the step's global batch mean first (issue 21)


def _aux(weight: float, center: bool = False) -> TermConfig:
    return TermConfig(weight=weight, center=center)


@dataclass
class LossConfig:
    """The Uni-Mlip objective matrix: scope (cross / image / text / fused) x level (data / feature)."""

    # Auxiliary weights sum to ITC's 1.0 by default: a quarter per auxiliary cell of the matrix (cross-feature,
    # image, text, fused), split evenly inside a cell (SLIP: SSL 1 : ITC 1; ALBEF: ITC 1 : ITM 1 : MLM 1).
    itc: TermConfig = field(default_factory=TermConfig)  # image view <-> report
    itc_feature: TermConfig = field(default_factory=lambda: _aux(0.25))  # the same between feature-perturbed passes
    image_ssl: TermConfig = field(default_factory=lambda: _aux(0.125))  # NT-Xent between two augmented views (SLIP)
    image_feature: TermConfig = field(default_factory=lambda: _aux(0.125))  # view vs. its noised pass (FLIP)
    text_ssl: TermConfig = field(default_factory=lambda: _aux(0.125, center=True))  # report <-> augmented report
    text_feature: TermConfig = field(default_factory=lambda: _aux(0.125, center=True))  # two dropout passes (SimCSE)
    mlm: TermConfig = field(default_factory=lambda: _aux(0.125))  # image-conditioned masked language modelling
    itm: TermConfig = field(default_factory=lambda: _aux(0.125))  # image-text matching with hard negatives (ALBEF)
    uniformity: TermConfig = field(default_factory=lambda: _aux(0.0))  # Wang & Isola 2020 push-apart, off by default
    positives: Positives = "report"  # which other samples count as the same pair
    feature_perturbation: FeaturePerturbation = ""  # preset of feature_noise / image_feature_pair / text_feature_space
    text_ssl_space: TextSslSpace = "ssl_head"  # where text_ssl contrasts report and augmented report
    text_positives: TextPositives = "identity"  # labels: text_ssl / text_feature also spare same-label reports; labels_ssl: text_ssl only
    feature_noise: FeatureNoise = "encoder"  # inside the encoders, or dropout on pooled features
    image_feature_pair: ImageFeaturePair = "clean_noised"  # clean view vs. its noised pass, or two noised passes
    text_feature_space: TextFeatureSpace = "ssl_head"  # the text SSL head's space or the shared embedding space
    aux_warmup_steps: int = 0  # linear ramp of every weight but ITC's over the first N optimizer steps (0: off)
    mlm_view: MlmView = "augmented"  # which report MLM masks (augmented: one text pass fewer)
    itm_negatives: ItmNegatives = "one_per_pair"  # ITM's negatives per pair (image_and_text: 2, ALBEF)
    itm_hardness: float = 1.0  # ITM negatives drawn by exp(hardness * logit_scale * sim): 1 ALBEF, 0 uniform
    itm_fraction: float = 0.5  # share of the global batch's pairs ITM scores (a seeded sample), in (0, 1]

    def enabled(self) -> dict:
        """Terms with a non-zero weight, by name."""
        terms = ((f.name, getattr(self, f.name)) for f in dataclasses.fields(self))
        return {name: t for name, t in terms if isinstance(t, TermConfig) and t.weight != 0}


@dataclass
class TrainConfig:
    """Steps, batch, optimizer and schedule, checkpoints and logging."""

    steps: int = 300  # optimizer steps
    micro_batch_size: int = 32  # samples per rank per forward
    grad_accum: int = 1  # micro batches per optimizer step (derived when global_batch_size is set)
    global_batch_size: int = 0  # samples per optimizer step over all ranks (0: micro x world x grad_accum)
    negatives: Negatives = "accumulated"  # contrastive negatives span the K micro batches or one
    optimizer: Optimizer = "adamw"  # torch AdamW, DeepSpeed FusedAdam or DeepSpeedCPUAdam (forced by offload)
    lr: float = 5e-4  # peak learning rate
    lr_image: float = 0.0  # 0: use lr
    lr_text: float = 0.0  # 0: use lr
    lr_head: float = 0.0  # projections, SSL heads, fusion (0: use lr)
    lr_temperature: float = 0.0  # the logit scale (0: use lr)
    weight_decay: float = 0.1  # AdamW decoupled weight decay (not on biases, norms, temperature)
    layer_decay: float = 1.0  # layer-wise lr decay of both towers (1: off)
    betas: list = field(default_factory=lambda: [0.9, 0.98])  # Adam betas
    warmup_steps: int = 20  # linear warmup, then cosine decay
    min_lr_ratio: float = 0.0  # the cosine's floor, as a fraction of the peak lr
    clip_grad: float = 1.0  # gradient norm clipping (0: off)
    checkpoint_every: int = 100  # steps between checkpoints (0: only at the end)
    checkpoint_minutes: float = 0.0  # also checkpoint when this many minutes passed since the last one (0: off)
    image_every: int = 0  # TensorBoard grid of augmented view pairs every N steps (0: only at the start)
    keep_checkpoints: int = 3  # newest checkpoints kept (0: all)
    log_every: int = 10  # steps per metrics line (losses are means over them)
    max_nonfinite_in_row: int = 5  # skipped steps with a non-finite loss in a row before training stops
    compile: bool = False  # torch.compile the towers
    compile_backend: str = "inductor"  # torch.compile backend of the towers (aot_eager: graph capture only)
    eval_every: int = 0  # steps between periodic evaluations on data.val (0: off)
    # Training health (docs/training.md#training-health): the hang watchdog and the loss-spike rollback.
    hang_timeout_s: float = 1800.0  # no optimizer step (or checkpoint, evaluation) for this long: hung (0: off)
    spike_factor: float = 10.0  # a loss above this x the running median is a spike (0: the guard is off)
    spike_window: int = 50  # the running median is over the losses of this many recent normal steps
    spike_patience: int = 3  # spike steps in a row before rolling back
    max_rollbacks: int = 3  # rollbacks per run before it stops (exit status 5; 0: stop at the first spike)


@dataclass
class DeepSpeedConfig:
    """What the generated DeepSpeed config is made of."""

    zero_stage: ZeroStage = 1  # ZeRO optimizer/gradient/parameter partitioning stage
    precision: Precision = "fp32"  # training precision (bf16 reduces and accumulates gradients in fp32)
    offload_optimizer: bool = False  # keep the optimizer state on the CPU (needs ZeRO >= 1)
    backend: Backend = ""  # torch.distributed backend


@dataclass
class EvalConfig:
    """Periodic evaluation during training; also the defaults of ``unimlip-eval``."""

    split: str = "val"  # the index split evaluated
    max_samples: int = 0  # evaluate at most this many samples (0: all)
    classes: list = field(default_factory=list)  # zero-shot class names ([]: retrieval only)
    label_key: str = "labels"  # sample metadata field with the labels
    prompts: str = ""  # prompt YAML for zero-shot; empty: the packaged chest X-ray set
    multi_label: bool = False  # a sample may carry several classes


@dataclass
class MonitorConfig:
    """Optional mirrors of the metrics (TensorBoard and metrics.jsonl are always written)."""

    wandb: dict = field(default_factory=dict)  # {project, entity, ...}: optional Weights & Biases mirror


@dataclass
class Config:
    """One run: everything a YAML config (and its overrides) can set."""

    seed: int = 0  # seeds the model init, the data order and the augmentations
    run_dir: str = "runs/default"  # checkpoints, config.yaml, tb/ and metrics.jsonl
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        """Hash of everything that defines the model and objective (not run bookkeeping, nor what follows from
        the world size: ``grad_accum`` when ``global_batch_size`` sets it)."""
        d = self.to_dict()
        d.pop("run_dir", None)
        if self.train.global_batch_size:
            d["train"].pop("grad_accum")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]
