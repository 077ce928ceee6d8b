"""The YAML files people write (the settings file, ``sources.yaml``): read small, parsed strictly,
and quoted short in errors. One copy of these rules, so both files fail the same way: fast,
naming the file, and never echoing a large value.

* **Bounded read**: a directory is said to be one; a FIFO, socket, device or dangling link is
  refused unread (opening a FIFO blocks); a file above its size cap is refused after reading
  one byte more than the cap; bytes that are not UTF-8 are refused.
* **No alias bombs**: a 610-byte file of nested aliases expands to gigabytes. The settings file
  refuses aliases outright (:class:`StrictLoader`); ``sources.yaml`` allows them (``yaml.dump``
  writes an anchor for every object used twice, such as one ``label_map`` shared by two sources)
  but only while the document, aliases expanded, holds at most a bound of values
  (:class:`BoundedAliasLoader`). Both are checked when the document is composed, before any value
  is built; an alias that contains itself is refused.
* **No repeated keys**: one of two values for a key would win silently.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import yaml

SHORT_REPR = 60  # the most characters of a value an error message quotes


def short_repr(value: Any, limit: int = SHORT_REPR) -> str:
    """``repr(value)`` cut to ``limit`` characters (ending ``...``), so no error dumps a value.
    The repr of a large container is never built whole: containers are summarised by size."""
    if isinstance(value, (dict, list, tuple, set, frozenset)) and len(value) > limit:
        return f"<{type(value).__name__} of {len(value)} items>"
    if isinstance(value, (str, bytes)) and len(value) > 4 * limit:
        value = value[: 4 * limit]
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def short_text(text: str, limit: int = SHORT_REPR) -> str:
    """``text`` cut to ``limit`` characters (ending ``...``): a name or field path in an error."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


class YamlRefused(ValueError):
    """What :class:`StrictLoader` refuses (an alias, a repeated key); the message starts with the
    line. Callers re-raise it as their own error, naming their file."""


class StrictLoader(yaml.SafeLoader):
    """Safe YAML without anchors or aliases and without a key repeated in one mapping."""

    max_values: int | None = None  # None: aliases refused; else the most values the expanded document holds

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.max_values is None and self.check_event(yaml.AliasEvent):  # refused before anything is built
            mark = self.peek_event().start_mark
            raise YamlRefused(f"line {mark.line + 1}: YAML aliases are not allowed (anchors '&' and aliases '*')")
        return super().compose_node(parent, index)

    def compose_document(self) -> Any:
        node = super().compose_document()
        if self.max_values is not None and node is not None:
            _expanded_values(node, {}, set(), self.max_values)
        return node

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                earlier = first.setdefault(key, line)
            except TypeError:  # an unhashable key: the SafeLoader's own check reports it
                continue
            if earlier != line:
                raise YamlRefused(f"line {line}: key {short_repr(key)} appears twice in the same mapping "
                                  f"(first on line {earlier}); keep one of them")
        return super().construct_mapping(node, deep=deep)


class BoundedAliasLoader(StrictLoader):
    """:class:`StrictLoader` that allows aliases while the expanded document holds at most
    :data:`MAX_EXPANDED_VALUES` values (scalars, sequences and mappings each count one)."""

    max_values = 1_000_000


MAX_EXPANDED_VALUES = BoundedAliasLoader.max_values


def _expanded_values(node: yaml.Node, memo: dict[int, int], active: set[int], limit: int) -> int:
    """How many values ``node`` stands for with every alias expanded (each distinct node is
    counted once: an alias is the node it names, so a bomb is measured without being built)."""
    key = id(node)
    if key in memo:
        return memo[key]
    line = node.start_mark.line + 1
    if key in active:
        raise YamlRefused(f"line {line}: a YAML alias refers to the value that contains it")
    active.add(key)
    if isinstance(node, yaml.SequenceNode):
        children = list(node.value)
    elif isinstance(node, yaml.MappingNode):
        children = [part for pair in node.value for part in pair]
    else:
        children = []
    total = 1
    for child in children:
        total += _expanded_values(child, memo, active, limit)
        if total > limit:
            raise YamlRefused(f"line {line}: YAML aliases expand this document past {limit} values "
                              "(an alias bomb?)")
    active.discard(key)
    memo[key] = total
    return total


def load_yaml(text: str, loader: type[StrictLoader] = StrictLoader) -> Any:
    """``text`` parsed by ``loader`` (raises :class:`YamlRefused` or ``yaml.YAMLError``)."""
    return yaml.load(text, Loader=loader)


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML syntax error in a few words: where, never the text around it."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    where = f" at line {mark.line + 1}" if mark is not None else ""
    return f"not valid YAML{where}" + (f" ({short_text(str(problem))})" if problem else "")


def read_config_text(path: Path, max_bytes: int, what: str, error: type[ValueError]) -> str:
    """The text of the config file ``path`` (a byte-order mark dropped), or ``error`` naming it:
    a directory, a special file or dangling link (refused unread), a file above ``max_bytes``,
    bytes that are not UTF-8. ``what`` names the kind of file in messages (``a settings file``)."""
    origin = str(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.lexists(path):
            raise error(f"{origin}: not a regular file (a dangling link): refused unread") from None
        raise error(f"{origin}: not found") from None
    except OSError as exc:
        raise error(f"{origin}: cannot be read ({exc.strerror or type(exc).__name__})") from None
    if stat.S_ISDIR(st.st_mode):
        raise error(f"{origin}: is a directory, not {what}")
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{origin}: not a regular file (a FIFO, socket or device): refused unread")
    try:  # non-blocking, and checked again on the open file: a FIFO swapped in meanwhile never blocks
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise error(f"{origin}: cannot be read ({exc.strerror or type(exc).__name__})") from None
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise error(f"{origin}: not a regular file (a FIFO, socket or device): refused unread")
        raw = fh.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise error(f"{origin}: larger than {max_bytes} bytes: not {what}")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise error(f"{origin}: not UTF-8 text") from None
