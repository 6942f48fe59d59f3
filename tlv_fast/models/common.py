"""What the model classes share: presets, config field names kept from earlier releases, and factory arguments."""
import functools
import warnings

import torch

from .. import backends


class Presets:
    """Mixin: cls.from_preset(name, device=None, dtype=None, **overrides) for a model class with PRESETS and CONFIG
    class attributes."""

    @classmethod
    def from_preset(cls, name, device=None, dtype=None, **overrides):
        if name not in cls.PRESETS:
            raise ValueError(f"unknown {cls.__name__} preset {name!r}; presets: {sorted(cls.PRESETS)}")
        return cls(build_config(cls.CONFIG, cls.PRESETS[name], overrides), device=device, dtype=dtype)


def renamed_fields(**old_to_new):
    """Class decorator for a config dataclass: keyword arguments under the old field names keep working (with a
    DeprecationWarning), so every model spells its fields the same way (dim, num_layers, num_heads...)."""
    def wrap(cls):
        init = cls.__init__

        @functools.wraps(init)
        def __init__(self, *args, **kwargs):
            init(self, *args, **_renamed(cls, kwargs, strict=True))

        cls.__init__ = __init__
        cls.RENAMED = dict(old_to_new)
        return cls
    return wrap


def _renamed(cls, kwargs, strict):
    kwargs = dict(kwargs)
    for old, new in getattr(cls, "RENAMED", {}).items():
        if old in kwargs:
            if strict and new in kwargs:
                raise TypeError(f"{cls.__name__}: pass {new!r}, not both {new!r} and {old!r}")
            warnings.warn(f"{cls.__name__}: {old!r} is now called {new!r}", DeprecationWarning, stacklevel=3)
            kwargs[new] = kwargs.pop(old)
    return kwargs


def build_config(cls, fields, overrides):
    """cls(**fields) with `overrides` (old field names allowed) taking precedence."""
    return cls(**{**fields, **_renamed(cls, overrides, strict=False)})


def check_positive(config, *names):
    """Config fields that must be ints >= 1, and dim divisible by num_heads (head dim >= 1)."""
    cls = type(config).__name__
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{cls}: {name} must be an int >= 1, got {value!r}")
    if hasattr(config, "num_heads") and config.dim % config.num_heads:
        raise ValueError(f"{cls}: dim ({config.dim}) must be divisible by num_heads ({config.num_heads})")


def check_backend(config, ops):
    """Validate config.backend against the op families the model runs (tlv_fast.backends.validate)."""
    config.backend = backends.validate(config.backend, ops=ops, where=f"{type(config).__name__}.backend")


def check_ids(model, input_ids, name="input_ids", min_len=0):
    """Token ids (B, N) of an integer dtype, min_len <= N <= max_positions; ValueError/TypeError naming them."""
    cls = type(model).__name__
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"{cls}: {name} must be a torch.Tensor of token ids, got {type(input_ids).__name__}")
    if input_ids.dim() != 2:
        raise ValueError(f"{cls}: {name} must be (batch, tokens), got shape {tuple(input_ids.shape)}; add a batch "
                         "dim with input_ids[None]")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise TypeError(f"{cls}: {name} must hold integer token ids, got {input_ids.dtype}")
    if input_ids.shape[1] < min_len:
        raise ValueError(f"{cls}: {name} must hold at least {min_len} token(s) per sequence, got "
                         f"{input_ids.shape[1]}")
