"""Portable files of a :class:`~graphpatch_cache.runtime.patchable_graph.PatchableGraph`:
every graph variant as one file of pure data (JSON text, never weights) that ``pg.save``
writes and ``PatchableGraph.load`` reads back through the loader's checks
(:func:`graphpatch_cache.trust.validate.read_portable`)."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import IO, Any, List, Union

from .._files import write_atomic
from ..artifact import GraphArtifact, portable_to_bytes
from ..errors import ArtifactFormatError, CacheMissError
from ..trust.validate import read_portable

#: a path, or an open file (binary or text) to write to / read from
FileLike = Union[str, "os.PathLike[str]", IO[bytes], IO[str]]


def write_portable(artifacts: List[GraphArtifact], file: FileLike) -> None:
    """Write ``artifacts`` to ``file``: atomically to a path, or at the position of a file
    object open for writing (binary or text), which is left open."""
    data = portable_to_bytes(artifacts)
    if hasattr(file, "write"):
        file.write(data.decode("utf-8") if _is_text_stream(file) else data)  # type: ignore[arg-type]
        return
    write_atomic(file, data)


def read_portable_file(file: FileLike) -> List[GraphArtifact]:
    """The checked artifacts of a portable file: a path, or a file object open for reading
    (binary or text), read from its position to its end.

    :raises CacheMissError: no such file.
    :raises ArtifactFormatError: not an artifact file (or an unsupported version), such as a
        pickle graphpatch's ``pg.save`` wrote (never unpickled).
    """
    if hasattr(file, "read"):
        name = str(getattr(file, "name", "<file object>"))
        data = file.read()
        if isinstance(data, str):
            data = data.encode("utf-8")
    else:
        name = str(file)
        try:
            data = Path(file).read_bytes()
        except FileNotFoundError as exc:
            raise CacheMissError(f"no artifact file at {file}", path=name,
                                 hint="write one with pg.save(path) or `graphpatch-cache export`") from exc
    if data[:4] == b"PK\x03\x04" or data[:1] == b"\x80":
        # torch.save's zip archive, or a bare pickle: what graphpatch's pg.save wrote
        raise ArtifactFormatError(
            f"{name} is a pickle (torch.save or graphpatch's pg.save), not a file pg.save writes here; "
            "it is never unpickled, since unpickling runs code", path=name,
            hint="build the graph again with PatchableGraph(model, *example_inputs) and write it with pg.save(file)",
        )
    return read_portable(data, name)


def _is_text_stream(file: Any) -> bool:
    if isinstance(file, io.TextIOBase):
        return True
    if isinstance(file, (io.RawIOBase, io.BufferedIOBase)):
        return False
    mode = getattr(file, "mode", None)  # other file-likes: trust their mode when they have one
    return isinstance(mode, str) and "b" not in mode


__all__ = ["FileLike", "read_portable_file", "write_portable"]
