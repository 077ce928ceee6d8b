"""One stored result per partition of a partitioned analysis (a CV fold, a held-out source).

A partition's result is a JSON *record* -- the result's description, the recipe it was trained
with and that recipe's identity for the partition -- plus any data files it describes; the record
is written last, so its presence marks the partition complete. Reading refuses, naming the file,
what a store never writes (a link, a FIFO, a device: unread, so nothing blocks or leaks in) and
any damaged file, so a result that cannot be trusted makes its partition run again instead of
entering an aggregate. :class:`PartitionStore` holds that logic once; each store says how a key
maps to its files and how its result is (de)serialised.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any, ClassVar, Generic, Protocol, Self, TypeVar

from fer_pipeline.atomic import write_json


class Recipe(Protocol):
    """What a store needs of a recipe (:class:`fer_pipeline.analysis.cross_validation.TrainingRecipe`)."""

    def identity(self, unit: object) -> str: ...

    def to_json(self) -> dict[str, Any]: ...

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Self: ...


K = TypeVar("K")  # what names a partition (a fold number, a source name)
T = TypeVar("T")  # a partition's result
R = TypeVar("R", bound=Recipe)


def not_a_stored_file(path: Path) -> str | None:
    """Why ``path`` is not a file a store wrote (None: it is, or there is none): stores write
    regular files by atomic rename, so a link (to a device, to a file elsewhere) is refused unread."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"cannot be examined ({type(exc).__name__}: {exc})"
    if stat.S_ISLNK(mode):
        return "is a symbolic link, not a stored result: remove it and re-materialize"
    if not stat.S_ISREG(mode):
        return "is not a regular file: remove it and re-materialize"
    return None


class PartitionStore(Generic[K, T, R]):
    """Results of one partitioned analysis under ``directory``. A store sets :attr:`recipe_type`,
    :attr:`missing` and :attr:`refusal`, and says :meth:`files`, :meth:`encode` and :meth:`decode`
    (:meth:`check` and :meth:`read` when it needs them)."""

    recipe_type: type[R]
    missing: ClassVar[str]  # what :meth:`load` says of a partition with no record
    refusal: ClassVar[str] = ""  # what every refusal starts with

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)

    # --- what a store says ------------------------------------------------------------------------

    def files(self, key: K) -> tuple[Path, ...]:
        """The partition's record (JSON), then the data files it describes."""
        raise NotImplementedError

    def encode(self, result: T, data: tuple[Path, ...]) -> dict[str, Any]:
        """Write the result's data files (``data``, as :meth:`files` names them); the record's
        description of the result."""
        raise NotImplementedError

    def check(self, key: K, record: Any) -> None:
        """Raise when ``record`` cannot be ``key``'s, before its recipe is read (default: no check)."""

    def read(self, path: Path) -> Any:
        """One data file's content."""
        raise NotImplementedError

    def decode(self, key: K, record: Any, data: list[Any]) -> T:
        """The result from its record and its data files' contents (raise when they are damaged)."""
        raise NotImplementedError

    # --- the store --------------------------------------------------------------------------------

    def write(self, key: K, result: T, recipe: R) -> tuple[Path, ...]:
        """Store ``result`` of ``key`` trained with ``recipe``: data files first, the record last."""
        files = self.files(key)
        write_json(files[0], {**self.encode(result, files[1:]), "recipe": recipe.to_json(),
                              "identity": recipe.identity(key)})
        return files

    def stored_identity(self, key: K) -> str | None:
        """The identity (:meth:`TrainingRecipe.identity`) of the stored result, None if there is no
        usable one (a result :meth:`load` refuses is never "current": its partition runs again)."""
        loaded = self.load(key)
        return None if isinstance(loaded, str) else loaded[1].identity(key)

    def load(self, key: K) -> tuple[T, R] | str:
        """The stored result and its recipe, or why there is none usable (naming the file)."""
        record_path, *data_paths = self.files(key)
        if not os.path.lexists(record_path):
            return self.missing
        for path in (record_path, *data_paths):
            if why := not_a_stored_file(path):
                return f"{self.refusal}{path} {why}"
        path = record_path
        try:
            record = json.loads(record_path.read_text())
            self.check(key, record)
            recipe = self.recipe_type.from_json(record["recipe"])
            data = []
            for path in data_paths:
                data.append(self.read(path))
            path = record_path
            return self.decode(key, record, data), recipe
        except Exception as exc:  # noqa: BLE001 -- any damage (pyarrow raises many kinds): refuse, naming the file
            return f"{self.refusal}unreadable stored result ({type(exc).__name__}: {exc}): {path}"

