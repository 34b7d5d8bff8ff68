"""The one configuration that travels: into ``wrap``, into saved files, back out."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ADAPTER_INITS",
    "MAX_WIDTH",
    "METHODS",
    "AdapterConfig",
    "check_field_types",
    "option_names",
    "parse_field",
]

# Presets: "rada" (RationalMask), "rada+adapter" (RAda with residual adapters,
# the paper's best base-to-new variant), "mma" (MMA as in the paper),
# "mma-master" (the earlier released MMA), "mma+rada" (ours: RAda over MMA's
# adapted features).
METHODS = ("rada", "rada+adapter", "mma", "mma-master", "mma+rada")
_RADA_FAMILY = ("rada", "rada+adapter", "mma+rada")
_MMA_FAMILY = ("mma", "mma-master", "mma+rada")
_VARIANTS = {"paper": "mma", "master": "mma-master"}
_SOFTMAXES = ("flat", "row")
_REGULARIZERS = ("linf", "mse", "l1")
# The widest embedding any adapter is built for: bounds what a config (or a crafted file) can make allocate.
# CLIP widths are 512-1280; 65536 leaves room and keeps every parameter count far from an overflow.
MAX_WIDTH = 1 << 16
# RAda+Adapter's adapters: "small" (residual, W2 drawn small and non-zero: starts at
# zero-shot and trains), "released" (residual, W2 = 0: they never move), "blend"
# (CLIP-Adapter's learnable blend, the authors' adapter_mask form). "small" is the
# default: on the demo world it beat the blend on every seed (docs/methods.md section 4.3).
ADAPTER_INITS = ("small", "released", "blend")
DEFAULT_ADAPTER_INIT = "small"


@dataclass(frozen=True)
class AdapterConfig:
    """Everything needed to rebuild an adapter module, and nothing else.

    Build one with :meth:`for_method`, which fills each method's released
    defaults; fields that do not apply to a method keep their defaults and are
    ignored by it.
    """

    method: str
    dim: int  # embedding width D of the CLIP the adapter sits on
    # RAda family
    heads: int = 8  # heads of the mask attention (D / heads per head)
    temperature: float = 1.0  # τ dividing the attention scores
    softmax: str = "flat"  # "flat": released softmax over all K·K entries × K; "row": textbook
    regularizer: str = "linf"  # reg(M, 1) added to the loss: "linf", "mse" or "l1"
    alpha: float = 0.0  # weight of the regulariser (0 as released)
    reduction: int = 4  # residual adapters' bottleneck is D / reduction ("rada+adapter")
    adapter_init: str = DEFAULT_ADAPTER_INIT  # "rada+adapter": "small", "released" or "blend" (ADAPTER_INITS)
    # MMA family
    bottleneck: int = 0  # MMA's down-sampled width d; 0 means D / 4 (stored resolved)
    mma_heads: int = 4  # heads of MMA's attention over the bottleneck
    blend: float = 0.2  # λ mixing adapted and original features
    hidden: int = 32  # inner width of the two-layer down/up maps ("mma-master")

    @classmethod
    def for_method(cls, method: str, dim: int, **options: Any) -> AdapterConfig:
        """Config for ``method`` at width ``dim`` with the released defaults and ``options``.

        For ``"mma"`` and ``"mma-master"``, whose only attention is MMA's, ``heads``
        means ``mma_heads`` (as in ``MultiModalAdapter(heads=...)``); ``"mma+rada"``
        has both, ``heads`` (RAda's) and ``mma_heads``. An option that the method
        does not use is an error rather than silently ignored.
        """
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        if method in ("mma", "mma-master") and "heads" in options:
            if "mma_heads" in options:
                raise TypeError(f"give heads or mma_heads for {method!r}, not both: they are the same option")
            options["mma_heads"] = options.pop("heads")
        fields = {f.name for f in dataclasses.fields(cls)} - {"method", "dim"}
        unknown = sorted(set(options) - fields)
        if unknown:
            raise TypeError(
                f"unknown adapter option(s) {unknown} for method {method!r}; "
                f"known options: {', '.join(sorted(fields))}"
            )
        unused = sorted(set(options) - set(option_names(method)))
        if unused:
            raise TypeError(
                f"option(s) {unused} do not apply to method {method!r}; its options are "
                f"{', '.join(option_names(method))}"
            )
        if method == "rada+adapter":
            options.setdefault("regularizer", "mse")  # the RAda+Adapter trainer's choice
        return cls(method=method, dim=dim, **options)

    @classmethod
    def from_keywords(cls, family: tuple[str, ...], options: dict[str, Any]) -> AdapterConfig:
        """A module's keyword arguments (``RationalMask(dim=512, heads=8)``) as a config.

        ``method`` picks a member of ``family`` (default: its first). Two
        spellings read better on a module and map onto the method:
        ``adapter_reduction=r`` is ``method="rada+adapter", reduction=r``, and
        ``variant="paper"|"master"`` is ``method="mma"|"mma-master"``.
        """
        options = dict(options)
        method = options.pop("method", family[0])
        reduction = options.pop("adapter_reduction", None)
        if reduction is not None:
            method, options["reduction"] = "rada+adapter", reduction
        variant = options.pop("variant", None)
        if variant is not None:
            if variant not in _VARIANTS:
                raise ValueError(f"variant must be 'paper' or 'master', got {variant!r}")
            method = _VARIANTS[variant]
        if method not in family:
            raise ValueError(f"this module builds {' or '.join(map(repr, family))}, not {method!r}")
        if "dim" not in options:
            raise TypeError("give dim=<embedding width D>, e.g. dim=512 for ViT-B/16")
        if options.get("bottleneck") is None:
            options.pop("bottleneck", None)
        return cls.for_method(method, options.pop("dim"), **options)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        check_field_types(self)
        if not 0 < self.dim <= MAX_WIDTH:
            raise ValueError(
                f"dim must be a positive int up to {MAX_WIDTH} (the embedding width), got {self.dim!r}"
            )
        if self.method in _RADA_FAMILY:
            _divides(self.heads, self.dim, "heads", "the embedding width")
            if not self.temperature > 0:
                raise ValueError(f"temperature must be a finite number > 0, got {self.temperature}")
            if self.softmax not in _SOFTMAXES:
                raise ValueError(f"softmax must be one of {_SOFTMAXES}, got {self.softmax!r}")
            if self.regularizer not in _REGULARIZERS:
                raise ValueError(
                    f"regularizer must be one of {_REGULARIZERS}, got {self.regularizer!r}"
                )
            if not self.alpha >= 0:
                raise ValueError(f"alpha must be a finite number >= 0, got {self.alpha}")
        if self.method == "rada+adapter":
            _divides(self.reduction, self.dim, "reduction", "the embedding width")
            if self.adapter_init not in ADAPTER_INITS:
                raise ValueError(
                    f"adapter_init must be one of {ADAPTER_INITS} ('released': the authors' W2 = 0 residual "
                    f"adapters, which never train), got {self.adapter_init!r}"
                )
        if self.method in _MMA_FAMILY:
            if not 0 <= self.bottleneck <= MAX_WIDTH:
                raise ValueError(
                    f"bottleneck must be > 0 (or 0 for dim / 4) and at most {MAX_WIDTH}, got {self.bottleneck}"
                )
            # store the width itself, so that configs of the same model compare equal
            object.__setattr__(self, "bottleneck", self.bottleneck or self.dim // 4)
            if self.bottleneck == 0:
                raise ValueError(f"dim={self.dim} is too small for MMA's default bottleneck dim / 4; set bottleneck")
            _divides(self.mma_heads, self.mma_width, "mma_heads", "the MMA bottleneck width")
            if not 0.0 <= self.blend <= 1.0:
                raise ValueError(f"blend (λ) must lie in [0, 1], got {self.blend}")
        if self.method == "mma-master" and not 0 < self.hidden <= MAX_WIDTH:
            raise ValueError(
                f"hidden must be a positive int up to {MAX_WIDTH} (the inner width of mma-master's down/up maps), "
                f"got {self.hidden}; the released value is 32"
            )

    @property
    def mma_width(self) -> int:
        """MMA's down-sampled width ``d`` (``D / 4`` unless ``bottleneck`` is set)."""
        return self.bottleneck or self.dim // 4

    @property
    def variant(self) -> str:
        """MMA's variant: ``"master"`` for ``"mma-master"``, else ``"paper"``."""
        return "master" if self.method == "mma-master" else "paper"

    def forward_fields(self) -> tuple[str, ...]:
        """The fields that shape the parameters or the logits of this method.

        ``alpha`` and ``regularizer`` only enter the training loss, and fields of
        the other family are ignored by the method.
        """
        training_only = ("alpha", "regularizer")
        return ("method", "dim", *(n for n in option_names(self.method) if n not in training_only))

    @property
    def has_mask(self) -> bool:
        """Whether the method produces a RAda mask (and so can be regularised)."""
        return self.method in _RADA_FAMILY

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> AdapterConfig:
        data = json.loads(text)
        if data.get("method") == "rada+adapter":
            # written before adapter_init existed, when the released form was the only one
            data.setdefault("adapter_init", "released")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ValueError(
                f"adapter config has unknown field(s) {unknown}: it was written by a newer "
                "rada_mma; upgrade rada_mma to read it"
            )
        return cls(**data)


def option_names(method: str) -> tuple[str, ...]:
    """The options (config fields besides ``method`` and ``dim``) that ``method`` uses."""
    names = []
    if method in _RADA_FAMILY:
        names += ["heads", "temperature", "softmax", "regularizer", "alpha"]
    if method == "rada+adapter":
        names += ["reduction", "adapter_init"]
    if method in _MMA_FAMILY:
        names += ["bottleneck", "mma_heads", "blend"]
    if method == "mma-master":
        names.append("hidden")
    return tuple(names)


def check_field_types(config: Any) -> None:
    """Each field of a config dataclass has its declared type: ints are integers (not bools), floats finite
    real numbers, bools bools, strings strings.

    Integer-valued floats are not ints here: ``heads=8.0`` is a typo worth hearing about. Numbers are stored
    as plain ``int``/``float`` (``blend=1`` as ``1.0``, numpy scalars as Python's), so that configs compare
    and serialise alike.
    """
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.type == "int":
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{f.name} must be an integer, got {value!r} ({type(value).__name__})")
            object.__setattr__(config, f.name, int(value))
        elif f.type == "float":
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"{f.name} must be a number, got {value!r} ({type(value).__name__})")
            if not math.isfinite(value):
                raise ValueError(f"{f.name} must be a finite number, got {value!r}")
            object.__setattr__(config, f.name, float(value))
        elif f.type == "bool":
            if not isinstance(value, bool):
                raise TypeError(f"{f.name} must be True or False, got {value!r} ({type(value).__name__})")
        elif f.type == "str" and not isinstance(value, str):
            raise TypeError(f"{f.name} must be a string, got {value!r} ({type(value).__name__})")


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def parse_field(config: type, name: str, text: str) -> Any:
    """``text`` (from a command line) as a value of field ``name`` of the config dataclass ``config``.

    The field's ``parse`` metadata reads it when it has one (e.g. ``TrainConfig.views``); otherwise its
    declared type does: ``int``, ``float``, ``bool`` (``true``/``false``, ``yes``/``no``, ``on``/``off``,
    ``1``/``0``) or ``str`` (as it is). Whether the value is allowed (a choice, a range) is the config's
    own check, when it is built.

    Example:
        >>> parse_field(AdapterConfig, "heads", "4"), parse_field(AdapterConfig, "temperature", "0.5")
        (4, 0.5)
    """
    fields = {f.name: f for f in dataclasses.fields(config)}
    if name not in fields:
        raise ValueError(f"{config.__name__} has no field {name!r}; its fields are {', '.join(fields)}")
    field, text = fields[name], text.strip()
    parse = field.metadata.get("parse")
    if parse is not None:
        return parse(text)  # its error says what the field takes
    try:
        if field.type == "int":
            return int(text)
        if field.type == "float" and math.isfinite(value := float(text)):
            return value
    except ValueError:
        pass
    if field.type in _TYPE_WORDS:
        raise ValueError(f"{name} takes {_TYPE_WORDS[field.type]}, got {text!r}")
    if field.type == "bool":
        if text.lower() not in _TRUE + _FALSE:
            raise ValueError(f"{name} takes true or false, got {text!r}")
        return text.lower() in _TRUE
    return text


_TYPE_WORDS = {"int": "an integer", "float": "a finite number"}


def _divides(parts: int, whole: int, name: str, what: str) -> None:
    if not isinstance(parts, int) or parts <= 0 or whole % parts:
        raise ValueError(
            f"{name}={parts!r} must be a positive divisor of {what} ({whole}); "
            f"pick {name} from {[n for n in range(1, min(whole, 64) + 1) if whole % n == 0]}"
        )
