"""What the model classes share: presets, config field names kept from earlier releases, and factory arguments."""
import functools
import warnings

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


def check_backend(config, ops):
    """Validate config.backend against the op families the model runs (tlv_fast.backends.validate)."""
    config.backend = backends.validate(config.backend, ops=ops, where=f"{type(config).__name__}.backend")
