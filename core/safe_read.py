"""Reading files that came with a download, without trusting them.

A dataset folder is data from elsewhere, so its files are read as data only:

- :func:`open_regular` opens a path only when it is a regular file: a named pipe (FIFO),
  a device, a folder or a symbolic-link loop in its place is an error naming the path,
  never a read that blocks or never ends;
- :func:`load_npy` reads an ``.npy`` file, checking the header's shape against the file's
  size before reading the data; an object array (a pickle) is rebuilt by
  :class:`RestrictedUnpickler`, which makes only dict, list, tuple, str, bytes, int,
  float, bool, None and numpy arrays, dtypes and scalars: any other callable a pickle names
  (``os.system``, ``builtins.eval``, a class) is refused before anything is imported;
- :class:`NpzReader` reads an ``.npz`` archive member by member, each member's npy header
  first, so that a member whose shape or dtype is wrong is refused before its data is
  inflated (a 1 MB member can inflate to gigabytes).
"""

from __future__ import annotations

import errno
import math
import os
import pickle
import stat
import zipfile
import zlib
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np

from robovla.errors import RobovlaError

HEADER_LIMIT = 10_000  # bytes of npy header read at most (numpy's own default)


class UnsafeFileError(RobovlaError, ValueError):
    """A file is not what a data file may be; the message names the file and what is wrong.
    ``where`` is the file (and member), ``detail`` what is wrong, ``missing`` True when
    nothing is there at all."""

    def __init__(self, where: object, detail: str, missing: bool = False):
        super().__init__(f"{where}: {detail}")
        self.where, self.detail, self.missing = str(where), detail, missing


class RefusedPickleError(UnsafeFileError):
    """A pickle asked for something outside :data:`ALLOWED`; nothing it named was imported or called."""


_KINDS = [(stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")]


def open_regular(path: Path | str) -> BinaryIO:
    """``open(path, "rb")`` for a regular file (or a link to one); anything else raises
    :class:`UnsafeFileError`. The type is checked on the opened descriptor (no race), and
    the open itself does not block on a FIFO."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise UnsafeFileError(path, "missing", missing=True) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeFileError(path, "a loop of symbolic links (or too many levels of them); replace the "
                                  "link with the file itself") from None
        if exc.errno == errno.ENXIO:
            raise UnsafeFileError(path, "a socket, not a regular file; put the file itself there") from None
        raise UnsafeFileError(path, f"cannot open ({exc.strerror})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
        raise UnsafeFileError(path, f"{kind}, not a regular file; put the file itself there")
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


# ------------------------------------------------------------------------------ pickles

_RECONSTRUCT = np.empty(0).__reduce__()[0]  # numpy's own helpers, whatever module this numpy keeps them in
_SCALAR = np.float64(0).__reduce__()[0]
_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]  # protocol 5: an array from its bytes, no object dtype
ALLOWED: dict[tuple[str, str], object] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy.core.multiarray", "scalar"): _SCALAR,
    ("numpy._core.multiarray", "scalar"): _SCALAR,
    ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
    ("_codecs", "encode"): __import__("_codecs").encode,  # how pickle protocol 2 spells a bytes object
}
"""Everything a pickle may name: what rebuilds numpy arrays, dtypes and scalars. Plain
containers, strings and numbers need no names at all."""


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle names something outside :data:`ALLOWED`."""


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler that builds data only: every global outside :data:`ALLOWED` is refused,
    unimported and uncalled."""

    def find_class(self, module: str, name: str) -> object:
        found = ALLOWED.get((module, name))
        if found is None:
            raise UnsafePickleError(f"the pickle asks for {module}.{name}, which data never needs (only dicts, lists, "
                                    "tuples, strings, numbers and numpy arrays are read)")
        return found

    def persistent_load(self, pid: object) -> object:
        raise UnsafePickleError("the pickle refers to a persistent object, which data never needs")


def _header(stream: BinaryIO, where: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """The npy header of ``stream``: (shape, fortran order, dtype)."""
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(stream, max_header_size=HEADER_LIMIT)
        if version == (2, 0):
            return np.lib.format.read_array_header_2_0(stream, max_header_size=HEADER_LIMIT)
    except (ValueError, OSError, EOFError, SyntaxError, zipfile.BadZipFile, zlib.error) as exc:
        raise UnsafeFileError(where, f"not a readable npy array ({type(exc).__name__}: {exc})") from None
    raise UnsafeFileError(where, f"npy format version {version[0]}.{version[1]}, which robovla does not read; "
                          "save it with numpy.save (version 1.0)")


def _read_exact(stream: BinaryIO, shape: tuple[int, ...], dtype: np.dtype, fortran: bool, where: str) -> np.ndarray:
    size = math.prod(shape) * dtype.itemsize
    buffer = bytearray(size)
    view, got = memoryview(buffer), 0
    while got < size:
        n = stream.readinto(view[got:])
        if not n:
            raise UnsafeFileError(where, f"truncated: the header says {shape} {dtype} ({size} bytes), the data "
                                  f"ends after {got} bytes")
        got += n
    return np.frombuffer(buffer, dtype=dtype).reshape(shape, order="F" if fortran else "C")


def load_npy(path: Path | str, allow_pickle: bool = False) -> np.ndarray:
    """An ``.npy`` file as an array. An object array needs ``allow_pickle`` and is rebuilt by
    :class:`RestrictedUnpickler`; a refused pickle raises :class:`UnsafeFileError` naming the
    file and what the pickle asked for."""
    with open_regular(path) as f:
        shape, fortran, dtype = _header(f, str(path))
        if dtype.hasobject:
            if not allow_pickle:
                raise UnsafeFileError(path, "an object array (a pickle), where plain numbers are expected")
            try:
                array = RestrictedUnpickler(f, encoding="ASCII").load()
            except UnsafePickleError as exc:
                raise RefusedPickleError(path, f"refused to unpickle: {exc}; the file was altered or is not the "
                                         "dataset's own: download it again") from None
            except Exception as exc:  # truncated or malformed pickle: the data itself is unreadable
                raise UnsafeFileError(path, f"unreadable pickle ({type(exc).__name__}: {exc})") from None
            if not isinstance(array, np.ndarray):
                raise UnsafeFileError(path, f"the pickle holds a {type(array).__name__}, not the array np.save "
                                      "writes")
            return array
        left = os.fstat(f.fileno()).st_size - f.tell()
        if math.prod(shape) * dtype.itemsize > left:
            raise UnsafeFileError(path, f"truncated: the header says {shape} {dtype}, the file holds {left} bytes "
                                  "of data")
        return _read_exact(f, shape, dtype, fortran, str(path))


# ------------------------------------------------------------------------------ npz archives

class NpzReader:
    """An ``.npz`` archive read one member at a time, each checked from its header first.

    ``read(key, check)`` calls ``check(shape, dtype)`` on the member's npy header; a message
    it returns is raised as :class:`UnsafeFileError` before any of the data is inflated.
    """

    def __init__(self, path: Path | str):
        self.path = str(path)
        self._file = open_regular(path)
        try:
            self._zip = zipfile.ZipFile(self._file)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
            self._file.close()
            raise UnsafeFileError(path, f"not an npz archive ({type(exc).__name__}: {exc})") from None
        self.keys = [n.removesuffix(".npy") for n in self._zip.namelist() if n.endswith(".npy")]

    def __enter__(self) -> "NpzReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._zip.close()
        self._file.close()

    def read(self, key: str, check: Callable[[tuple[int, ...], np.dtype], str | None] | None = None) -> np.ndarray:
        where = f"{self.path} [{key}]"
        try:
            info = self._zip.getinfo(f"{key}.npy")
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                # zipfile inflates bzip2 and lzma without a bound per read; numpy writes neither
                raise UnsafeFileError(where, f"compressed with zip method {info.compress_type}; numpy's npz members "
                                             "are stored or deflated")
            with self._zip.open(info) as stream:
                shape, fortran, dtype = _header(stream, where)
                if dtype.hasobject:
                    raise UnsafeFileError(where, "an object array (a pickle), where numbers are expected")
                problem = check(shape, dtype) if check is not None else None
                if problem:
                    raise UnsafeFileError(where, problem)
                array = _read_exact(stream, shape, dtype, fortran, where)
                if stream.read(1):  # reading to the end also checks the member's CRC
                    raise UnsafeFileError(where, f"more data than its header's {shape} {dtype}")
                return array
        except KeyError:
            raise UnsafeFileError(where, f"missing key (has {sorted(self.keys)})") from None
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError, NotImplementedError, RuntimeError) as exc:
            # bad CRC, a corrupt deflate stream, an unsupported compression or an encrypted member
            raise UnsafeFileError(where, f"unreadable ({type(exc).__name__}: {exc})") from None
