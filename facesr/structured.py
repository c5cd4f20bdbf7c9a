"""Typed configs through OmegaConf's structured configs: a dataclass is the schema, mappings are merged onto it
in order, and what does not fit is refused naming its dotted key.

    build(RobustDegradation, {"blur": {"p": 0.5}})          -> RobustDegradation(blur=Blur(p=0.5, ...), ...)
    build(TrainConfig, base_yaml, file_yaml, overrides)      -> TrainConfig (cluster/config.py)

OmegaConf does the type checks (ints widen to floats, quoted numbers convert, ``true``/``false``), the merge that
keeps a section's defaults for the fields a layer leaves out, and struct mode (an unknown key is an error). This
module only turns its exceptions into one short line naming the key, ``FieldError(key, message)``: the callers
re-raise it as their own error type (``ConfigError``, ``DegradationError``).
"""

from __future__ import annotations

import re
import reprlib
from typing import Any, Iterator, Mapping

_KINDS = {"Integer": "an integer", "Float": "a number", "Boolean": "true or false", "String": "a string"}
_SHOW = reprlib.Repr()  # a value in a message is shown, never expanded (a huge string or list stays one short line)
_SHOW.maxstring = _SHOW.maxother = 80
_CONVERT = re.compile(r"Value '(?P<value>.*)' of type '\S+' could not be converted to (?P<kind>\w+)", re.S)


class FieldError(ValueError):
    """A value that does not fit the schema: ``key`` is its dotted name, ``message`` says why."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key, self.message = key, message


def build(cls: type, *layers: Mapping[str, Any], prefix: str = "") -> Any:
    """An instance of dataclass ``cls``: its defaults, then each layer merged on top (later layers win).

    ``prefix`` (``"data.degradation."``) goes before every key an error names."""
    from omegaconf import OmegaConf  # here: facesr's inference never builds a config, so never imports it
    from omegaconf.errors import OmegaConfBaseException

    schema = _schema(cls)  # a frozen dataclass's schema still takes the layers; the result is frozen
    try:
        return OmegaConf.to_object(OmegaConf.merge(schema, *layers))
    except OmegaConfBaseException as e:
        key, message = _explain(cls, layers, e)
        raise FieldError(prefix + key, message) from None


def _explain(cls: type, layers, e: Exception) -> tuple[str, str]:
    """(dotted key, one-line reason) for an OmegaConf error; where OmegaConf does not say which key (a tuple's
    element, a section given a scalar) the layers' leaves are merged one at a time to find it."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    key, value = e.full_key, getattr(e, "value", None)
    if not key:
        for leaf, leaf_value in (kv for layer in layers for kv in _leaves(layer)):
            try:
                OmegaConf.to_object(OmegaConf.merge(_schema(cls), _nested(leaf, leaf_value)))
            except OmegaConfBaseException as inner:
                key, value, e = inner.full_key or leaf, leaf_value, inner
                break
    return key or "config", _reason(cls, key or "", value, e)


def _reason(cls: type, key: str, value: Any, e: Exception) -> str:
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    if isinstance(e, (ConfigKeyError, ConfigAttributeError)):
        parent = key.rpartition(".")[0]
        node = OmegaConf.select(_schema(cls), parent) if parent else _schema(cls)
        known = f" (known: {', '.join(node.keys())})" if isinstance(node, DictConfig) else ""
        return f"unknown key{known}"
    m = _CONVERT.search(first)
    if m:
        # OmegaConf leaves a tuple element's message unformatted: then the leaf's whole value is shown
        shown = _SHOW.repr(value) if "$VALUE" in m.group("value") else _SHOW.repr(m.group("value"))
        return f"expected {_KINDS.get(m.group('kind'), m.group('kind'))}, got {shown}"
    if "is not a subclass of" in first or "is not a DictConfig" in first:
        return f"expected a mapping (a section), got {_SHOW.repr(value)}"
    if "is not a TupleConfig" in first or "is not a ListConfig" in first:
        return f"expected a list, got {_SHOW.repr(value)}"
    return first


def _schema(cls: type):
    from omegaconf import OmegaConf

    schema = OmegaConf.structured(cls)
    OmegaConf.set_readonly(schema, False)
    return schema


def _leaves(tree: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for k, v in tree.items():
        if isinstance(v, Mapping) and v:
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _nested(dotted: str, value: Any) -> dict:
    for part in reversed(dotted.split(".")):
        value = {part: value}
    return value


__all__ = ["FieldError", "build"]
