"""The training config: one JSON file, validated into nested dataclasses before any work starts.

    {"output_dir": "runs/cfg",
     "deepspeed":    {micro-batch, accumulation, AdamW, ZeRO stage, bf16, clipping}  -> DeepSpeed
     "data":         {...}                  -> data_pipeline.dataset.DataConfig
     "model":        {...}                  -> engine.model.unet.UNetConfig
     "diffusion":    {...}                  -> engine.diffusion.schedule.DiffusionConfig
     "conditioning": {"p_uncond": 0.5}
     "training":     {steps, cadences, seed, EMA}
     "compile":      {enabled (null = on for CUDA), mode, backend}
     "logging":      {TensorBoard, sample grids}
     optional sections (augment, dp, screening, ...) default to null = off}

Every error is one line naming the file and the key, e.g.
    configs/x.json: training.steps: expected int > 0, got -3

Every section, here and in the packages that own one (data, augment, model, diffusion, dp,
screening), is declared the same way: a `data_pipeline.config_schema.ConfigSection` dataclass whose
fields are checked by their type hints, `constrained(default, "what is expected", predicate)` for
a value check and `check()` for checks across its fields. Adding a section is such a dataclass plus
one field on `TrainConfig`; checks that span sections are the `_check_*` functions below.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from data_pipeline.augment import AugmentConfig
from data_pipeline.config_schema import ConfigSection, FieldError, InvalidConfig, build, constrained, to_jsonable
from data_pipeline.dataset import DataConfig
from engine.diffusion.schedule import DiffusionConfig
from engine.model.unet import UNetConfig
from engine.training.dp_sgd import DPConfig, check_deepspeed_for_dp
from engine.training.screening import ScreeningConfig


class ConfigError(ValueError):
    """A one-line message `<file>: <key>: <problem>`."""


# ----------------------------------------------------------------------------- sections

@dataclass(frozen=True)
class AdamWParams(ConfigSection):
    SECTION = "deepspeed.optimizer.params"
    lr: float = constrained(1e-4, "float > 0", lambda v: v > 0)
    betas: tuple[float, float] = constrained((0.9, 0.999), "two floats in [0, 1)",
                                             lambda v: all(0 <= b < 1 for b in v))
    eps: float = constrained(1e-8, "float > 0", lambda v: v > 0)
    weight_decay: float = constrained(0.0, "float >= 0", lambda v: v >= 0)


@dataclass(frozen=True)
class OptimizerSection(ConfigSection):
    SECTION = "deepspeed.optimizer"
    type: Literal["AdamW"] = "AdamW"
    params: AdamWParams = field(default_factory=AdamWParams)


# The scheduler key that sets the peak learning rate, per DeepSpeed scheduler. DeepSpeed lets it
# override the optimizer's lr without a word (and WarmupDecayLR defaults it to 0.001), so a config
# gives one learning rate: the key is filled from deepspeed.optimizer.params.lr and must not differ.
PEAK_LR_KEYS = {"WarmupLR": "warmup_max_lr", "WarmupDecayLR": "warmup_max_lr", "OneCycle": "cycle_max_lr"}


@dataclass(frozen=True)
class SchedulerSection(ConfigSection):
    SECTION = "deepspeed.scheduler"
    # DeepSpeed's schedulers; their params are checked by DeepSpeed itself at start-up.
    type: Literal["WarmupLR", "WarmupDecayLR", "WarmupCosineLR", "OneCycle", "LRRangeTest"] = "WarmupLR"
    params: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ZeroSection(ConfigSection):
    SECTION = "deepspeed.zero_optimization"
    stage: int = constrained(0, "int in 0..3", lambda v: 0 <= v <= 3)
    # Further ZeRO knobs (overlap_comm, reduce_bucket_size, offload_*) go to DeepSpeed unchanged and
    # are validated there by its own config model when the config is loaded.
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class BF16Section(ConfigSection):
    SECTION = "deepspeed.bf16"
    enabled: bool = False


@dataclass(frozen=True)
class DeepSpeedSection(ConfigSection):
    SECTION = "deepspeed"
    train_micro_batch_size_per_gpu: int = constrained(32, "int > 0", lambda v: v > 0)
    gradient_accumulation_steps: int = constrained(1, "int > 0", lambda v: v > 0)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    scheduler: SchedulerSection | None = None
    zero_optimization: ZeroSection = field(default_factory=ZeroSection)
    bf16: BF16Section = field(default_factory=BF16Section)
    gradient_clipping: float = constrained(1.0, "float >= 0 (0 = off)", lambda v: v >= 0)
    steps_per_print: int = constrained(10**9, "int > 0", lambda v: v > 0)

    def check(self) -> None:
        key = PEAK_LR_KEYS.get(self.scheduler.type) if self.scheduler is not None else None
        peak, lr = (self.scheduler.params.get(key), self.optimizer.params.lr) if key else (None, None)
        if peak is not None and peak != lr:
            raise FieldError(f"scheduler.params.{key}", f"{peak!r} contradicts deepspeed.optimizer.params.lr = "
                                                        f"{lr!r} (DeepSpeed would train at {peak!r}); give one "
                                                        f"learning rate: drop {key} or set it to lr")

    def to_deepspeed(self) -> dict:
        """The dict handed to deepspeed.initialize (DeepSpeed's own key names)."""
        ds = {
            "train_micro_batch_size_per_gpu": self.train_micro_batch_size_per_gpu,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "optimizer": {"type": self.optimizer.type, "params": {**dataclasses.asdict(self.optimizer.params),
                                                                  "betas": list(self.optimizer.params.betas)}},
            "zero_optimization": {"stage": self.zero_optimization.stage, **self.zero_optimization.options},
            "bf16": {"enabled": self.bf16.enabled},
            "gradient_clipping": self.gradient_clipping,
            "steps_per_print": self.steps_per_print,
        }
        if self.scheduler is not None:
            params = dict(self.scheduler.params)
            if self.scheduler.type in PEAK_LR_KEYS:
                params[PEAK_LR_KEYS[self.scheduler.type]] = self.optimizer.params.lr
            ds["scheduler"] = {"type": self.scheduler.type, "params": params}
        return ds


@dataclass(frozen=True)
class ConditioningSection(ConfigSection):
    SECTION = "conditioning"
    # Classifier-free guidance training: replace the prompt by the null prompt with this probability.
    p_uncond: float = constrained(0.1, "float in [0, 1]", lambda v: 0 <= v <= 1)


@dataclass(frozen=True)
class TrainingSection(ConfigSection):
    SECTION = "training"
    steps: int = constrained(1000, "int > 0", lambda v: v > 0)
    seed: int = constrained(0, "int in [0, 2^31)", lambda v: 0 <= v < 2**31)
    log_every: int = constrained(50, "int > 0", lambda v: v > 0)
    sample_every: int = constrained(1000, "int >= 0 (0 = only at the end)", lambda v: v >= 0)
    checkpoint_every: int = constrained(1000, "int >= 0 (0 = only at the end)", lambda v: v >= 0)
    keep_checkpoints: int = constrained(2, "int >= 1", lambda v: v >= 1)
    # Every this many steps rank 0 also exports the EMA model to <run>/exports/step_N/ (kept, not pruned):
    # the memorization audit of each snapshot is a dose-response over training length. 0 = never.
    export_every: int = constrained(0, "int >= 0 (0 = never)", lambda v: v >= 0)
    ema_decay: float = constrained(0.999, "float in [0, 1)", lambda v: 0 <= v < 1)
    # decay_t = min(ema_decay, (1 + t) / (10 + t)): early averages do not drag the random init along.
    ema_warmup: bool = True
    # Stop (keeping the last good checkpoint and export) when a logged loss exceeds this many times
    # the median of the last 20 logged losses; a diverging run would otherwise train on and export.
    divergence_factor: float | None = constrained(100.0, "float > 1 or null (off)", lambda v: v > 1)
    channels_last: bool = False
    # Batches: DALI where it loads (GPU), else the PyTorch path; both give the same stream.
    loader: Literal["auto", "dali", "torch"] = "auto"


@dataclass(frozen=True)
class CompileSection(ConfigSection):
    SECTION = "compile"
    enabled: bool | None = None   # null: on when training on CUDA, off on CPU
    mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    backend: str = "inductor"


@dataclass(frozen=True)
class LoggingSection(ConfigSection):
    SECTION = "logging"
    tensorboard: bool = True
    progress: bool = True
    # Sample grids: the first `sample_prompts` prompts of `sample_split` x `sample_seeds`, at every
    # guidance weight (CFG models) or at w = 1 only (models trained without the null prompt).
    sample_split: Literal["train", "val", "test"] = "val"
    sample_prompts: int = constrained(4, "int >= 1", lambda v: v >= 1)
    sample_seeds: tuple[int, ...] = constrained((0, 1, 2, 3), "a non-empty list of ints >= 0",
                                                lambda v: len(v) > 0 and all(s >= 0 for s in v))
    sample_guidance: tuple[float, ...] = constrained((1.0, 3.0, 7.5), "a non-empty list of floats >= 0",
                                                     lambda v: len(v) > 0 and all(w >= 0 for w in v))
    sample_steps: int = constrained(50, "int >= 1", lambda v: v >= 1)
    sample_sampler: Literal["ddim", "ddpm"] = "ddim"


@dataclass(frozen=True, kw_only=True)
class TrainConfig(ConfigSection):
    output_dir: str = "runs/default"
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    data: DataConfig                           # data_pipeline.dataset: read, cached, split, tokenized
    model: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    conditioning: ConditioningSection = field(default_factory=ConditioningSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    compile: CompileSection = field(default_factory=CompileSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    # Mitigation sections (null = off).
    augment: AugmentConfig | None = None       # data_pipeline.augment
    dp: DPConfig | None = None                 # engine.training.dp_sgd
    screening: ScreeningConfig | None = None   # engine.training.screening

    def to_dict(self) -> dict:
        return to_jsonable(self)


# ----------------------------------------------------------------------------- checks across sections

def _without_cpu_fallback_notice(record: logging.LogRecord) -> bool:
    """DeepSpeed logs "Setting accelerator to CPU ..." on every import without a GPU. memdiff picks its device
    itself (torch.cuda.is_available(), --device), so on a CPU machine the notice only printed itself above
    every one-line config or data error. A filter on DeepSpeed's named logger, set before DeepSpeed creates it,
    drops that one message and nothing else."""
    return "Setting accelerator to CPU" not in record.getMessage()


def _check_zero_options(cfg: TrainConfig) -> None:
    options = {"stage": cfg.deepspeed.zero_optimization.stage, **cfg.deepspeed.zero_optimization.options}
    ds_logger = logging.getLogger("DeepSpeed")
    if _without_cpu_fallback_notice not in ds_logger.filters:
        ds_logger.addFilter(_without_cpu_fallback_notice)
    try:
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    except ImportError:
        return
    try:
        DeepSpeedZeroConfig(**options)
    except Exception as exc:  # pydantic's ValidationError: first line names the problem
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        detail = lines[2] if len(lines) > 2 else lines[-1]
        bad = lines[1] if len(lines) > 1 else "?"
        raise InvalidConfig(f"deepspeed.zero_optimization.{bad}", detail) from None


def _check_consistency(cfg: TrainConfig) -> None:
    """Checks that span sections."""
    size = cfg.data.image_size
    if size != cfg.model.image_size:
        raise InvalidConfig("model.image_size", f"expected data.image_size ({size}), got {cfg.model.image_size}")


def _check_mitigations(cfg: TrainConfig) -> None:
    if cfg.dp is not None and cfg.dp.enabled:
        try:
            check_deepspeed_for_dp(cfg.deepspeed.to_deepspeed())
        except ValueError as exc:
            key, _, message = str(exc).partition(": ")
            raise InvalidConfig(key, message) from None
        if cfg.model.grad_checkpointing:
            raise InvalidConfig("model.grad_checkpointing", "expected false with dp.enabled (per-sample norms "
                                                            "need the recorded activations)")
        if cfg.screening is not None and cfg.screening.enabled:
            raise InvalidConfig("screening.enabled", "expected false with dp.enabled (screening looks at each "
                                                     "sample's data outside the clipped gradient: no DP guarantee)")


def _pull_zero_options(raw: dict) -> dict:
    """ZeRO knobs other than `stage` are written flat in JSON, as DeepSpeed users expect."""
    ds = raw.get("deepspeed")
    if isinstance(ds, dict) and isinstance(ds.get("zero_optimization"), dict):
        zero = dict(ds["zero_optimization"])
        options = {k: zero.pop(k) for k in list(zero) if k not in ("stage", "options")}
        if options:
            zero["options"] = {**zero.get("options", {}), **options}
        raw = {**raw, "deepspeed": {**ds, "zero_optimization": zero}}
    return raw


def parse_override(text: str) -> tuple[list[str], Any]:
    """`training.steps=10` -> (["training", "steps"], 10); values are JSON, else plain strings."""
    if "=" not in text:
        raise ConfigError(f"--set {text}: expected key.sub=value")
    key, value = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {text}: empty key component")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return parts, parsed


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Set single values in the raw JSON tree (creating missing objects: validation judges them)."""
    raw = json.loads(json.dumps(raw))
    for text in overrides:
        parts, value = parse_override(text)
        node = raw
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text}: {'.'.join(parts[:i + 1])} is not an object")
            node = child
        node[parts[-1]] = value
    return raw


def config_from_dict(raw: dict, source: str = "<config>") -> TrainConfig:
    try:
        cfg = build(TrainConfig, _pull_zero_options(raw), "")
        _check_zero_options(cfg)
        _check_consistency(cfg)
        _check_mitigations(cfg)
    except InvalidConfig as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return cfg


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read, override and validate a training config; raises ConfigError with a one-line message."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start})") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level")
    try:
        raw = apply_overrides(raw, list(overrides))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return config_from_dict(raw, str(path))


def resolved_json(cfg: TrainConfig) -> str:
    """The fully resolved config (defaults filled in), as saved into the run directory."""
    d = cfg.to_dict()
    zero = d["deepspeed"]["zero_optimization"]
    d["deepspeed"]["zero_optimization"] = {"stage": zero["stage"], **zero["options"]}
    return json.dumps(d, indent=2)
