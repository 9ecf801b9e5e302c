"""Classes made at run time by putting a gradfilter mixin in front of a model's own module class
(``module.__class__ = mixed_class(...)``: parameters, hooks and state-dict keys stay as they
were), made picklable: pickle finds a class by its name, which these lack in any module, so
their instances pickle by (mixin, own class) and the class is made again on load."""

from __future__ import annotations

from torch import nn

_CLASSES: dict[tuple[type, type, str], type] = {}


def mixed_class(mixin: type, cls: type, prefix: str) -> type:
    """``{prefix}{cls.__name__}``: ``mixin`` in front of ``cls`` (one class per triple)."""
    key = (mixin, cls, prefix)
    if key not in _CLASSES:
        _CLASSES[key] = type(f"{prefix}{cls.__name__}", (mixin, cls),
                             {"__module__": mixin.__module__, "__reduce_ex__": _reduce,
                              "_gradfilter_mix": key})
    return _CLASSES[key]


def _new(mixin: type, cls: type, prefix: str) -> nn.Module:
    """Unpickling: an empty instance of the mixed class (made again where this process has not
    made it yet); pickle then restores its state."""
    mixed = mixed_class(mixin, cls, prefix)
    return mixed.__new__(mixed)


def _reduce(self: nn.Module, protocol: int) -> tuple:
    return _new, type(self)._gradfilter_mix, self.__getstate__()
