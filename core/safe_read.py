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
  before it runs, :func:`scan_pickle` bounds what the pickle may rebuild (a small pickle can
  refer to one large string many times over: see :data:`PICKLE_BUDGET`), and every array it
  rebuilds is checked against the data it comes with before it is allocated;
- :class:`NpzReader` reads an ``.npz`` archive member by member, each member's npy header
  first, so that a member whose shape or dtype is wrong is refused before its data is
  inflated (a 1 MB member can inflate to gigabytes).
"""

from __future__ import annotations

import array
import errno
import math
import os
import pickle
import pickletools
import reprlib
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
    nothing is there at all, ``kind`` what is there instead of a regular file (e.g. "a folder")."""

    def __init__(self, where: object, detail: str, missing: bool = False, kind: str | None = None):
        super().__init__(f"{where}: {detail}")
        self.where, self.detail, self.missing, self.kind = str(where), detail, missing, kind


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
            raise UnsafeFileError(path, "a socket, not a regular file; put the file itself there",
                                  kind="a socket") from None
        raise UnsafeFileError(path, f"cannot open ({exc.strerror})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
        raise UnsafeFileError(path, f"{kind}, not a regular file; put the file itself there", kind=kind)
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


# ------------------------------------------------------------------------------ pickles

_RECONSTRUCT = np.empty(0).__reduce__()[0]  # numpy's own helpers, whatever module this numpy keeps them in
_SCALAR = np.float64(0).__reduce__()[0]
_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]  # protocol 5: an array from its bytes, no object dtype
RECONSTRUCT_LIMIT = 1 << 20  # bytes an array may have before its data arrives (numpy writes shape (0,))


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle names something outside :data:`ALLOWED`, or asks for more than it holds."""


class _ArrayClass:
    """What a pickle gets for ``numpy.ndarray``: the class handed to ``_reconstruct``, never
    called itself (``ndarray(shape)`` would allocate whatever shape the pickle names)."""

    def __call__(self, *args: object, **kwargs: object) -> None:
        raise UnsafePickleError("the pickle calls numpy.ndarray directly, which np.save never writes")


_NDARRAY = _ArrayClass()


class _CheckedArray(np.ndarray):
    """An array being unpickled: its state is checked against its data before numpy
    allocates it (an object array of any shape is allocated, then filled)."""

    def __setstate__(self, state: tuple) -> None:
        try:
            shape, dtype, data = state[1], np.dtype(state[2]), state[-1]
            size = math.prod(int(n) for n in shape) * dtype.itemsize
            held = len(data)
        except Exception as exc:
            raise UnsafePickleError(f"an array's state is not numpy's ({type(exc).__name__}: {exc})") from None
        if size > 64 * (held + 1):
            raise UnsafePickleError(f"an array of shape {tuple(shape)} {dtype} ({size} bytes) comes with {held} "
                                    "items of data")
        super().__setstate__(state)

    def __reduce__(self) -> tuple:  # pickled again (one left inside a tuple), it is a plain array
        rebuild, args, state = super().__reduce__()[:3]
        return rebuild, (np.ndarray, *args[1:]), state


def _plain(tree: object) -> object:
    """``tree`` with every :class:`_CheckedArray` in its dicts, lists and object arrays made a
    plain ndarray (a view: nothing is copied); each container is visited once (the scan bounded
    how many there are), however often it is referred to."""
    def plain(value: object) -> object:
        if isinstance(value, _CheckedArray):
            value = value.view(np.ndarray)
        if isinstance(value, (dict, list, np.ndarray)) and id(value) not in seen:
            seen.add(id(value))
            todo.append(value)
        return value

    seen: set[int] = set()
    todo: list = []
    top = plain(tree)
    while todo:
        node = todo.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                node[key] = plain(value)
        elif isinstance(node, list):
            for i, value in enumerate(node):
                node[i] = plain(value)
        elif node.dtype.hasobject and node.ndim:
            flat = node.reshape(-1)
            for i, value in enumerate(flat):
                flat[i] = plain(value)
        elif node.dtype.hasobject:
            node[()] = plain(node[()])
    return top


def _reconstruct(cls: object, shape: object, dtype: object) -> np.ndarray:
    try:
        size = math.prod(int(n) for n in shape) * np.dtype(dtype).itemsize
    except Exception as exc:
        raise UnsafePickleError(f"numpy _reconstruct with {reprlib.repr((shape, dtype))} ({exc})") from None
    if cls is not _NDARRAY or size > RECONSTRUCT_LIMIT:
        raise UnsafePickleError(f"numpy _reconstruct of {reprlib.repr(cls)} {reprlib.repr(shape)} {size} bytes, "
                                "which np.save never writes")
    return _RECONSTRUCT(_CheckedArray, shape, dtype)


def _latin1(text: object, encoding: object = "utf-8", errors: object = "strict") -> bytes:
    """``_codecs.encode`` as pickle protocol 2 writes bytes: a str to latin1, nothing else (other
    codecs grow their input, and chained they grow it without bound)."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise UnsafePickleError(f"the pickle encodes {type(text).__name__} with {encoding!r}, which pickle never "
                                "writes (bytes are latin1)")
    return text.encode("latin1")


ALLOWED: dict[tuple[str, str], object] = {
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.multiarray", "scalar"): _SCALAR,
    ("numpy._core.multiarray", "scalar"): _SCALAR,
    ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
    ("_codecs", "encode"): _latin1,  # how pickle protocol 2 spells a bytes object
}
"""Everything a pickle may name: what rebuilds numpy arrays, dtypes and scalars. Plain
containers, strings and numbers need no names at all."""

PICKLE_BUDGET = (64 << 20, 4)
"""What a pickle of F bytes may rebuild, counting every reference to a memoized string again:
at most 64 MiB + 4 F characters of strings and bytes and 1 M + 4 F objects. A real CALVIN
annotation file refers to each of its strings a few times at most (tens of thousands of
short instructions); a 1 MB pickle that refers to one 1 MB string a hundred thousand times
is refused by its scan, before it is rebuilt."""

_TEXT_OPS = {"UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "STRING", "BINSTRING", "SHORT_BINSTRING",
             "SHORT_BINBYTES", "BINBYTES", "BINBYTES8", "BYTEARRAY8"}


class _Bounded:
    """A file read by a pickle, refusing a read longer than what is left of it (a length in
    the pickle is not trusted to allocate)."""

    def __init__(self, stream: BinaryIO, left: int):
        self.stream, self.left = stream, left

    def read(self, n: int = -1) -> bytes:
        if n > self.left:
            raise UnsafePickleError(f"the pickle asks to read {n} bytes, the file has {self.left} left")
        data = self.stream.read(self.left if n < 0 else n)
        self.left -= len(data)
        return data

    def readline(self) -> bytes:
        line = self.stream.readline(self.left)  # protocol 0 writes a whole string on one line
        self.left -= len(line)
        return line


def scan_pickle(stream: _Bounded, size: int) -> None:
    """Walk the pickle's opcodes without building anything; refuse it when the strings it
    refers to (each reference counted) or its objects exceed :data:`PICKLE_BUDGET`."""
    fixed, factor = PICKLE_BUDGET
    text_limit, object_limit = fixed + factor * size, (1 << 20) + factor * size
    memo, text, objects, last = array.array("q"), 0, 0, 0
    for op, arg, _ in pickletools.genops(stream):
        objects += 1
        if op.name == "FRAME":  # framing only: it may fall between a string and its MEMOIZE
            continue
        if op.name in _TEXT_OPS:
            last = len(arg)
        elif op.name in ("GET", "BINGET", "LONG_BINGET"):
            last = memo[arg] if 0 <= arg < len(memo) else 0
        elif op.name == "MEMOIZE":
            memo.append(last)
            continue
        elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
            if not 0 <= arg <= objects:
                raise UnsafePickleError(f"memo index {arg} past the pickle's {objects} objects")
            memo.extend([0] * (arg + 1 - len(memo)))
            memo[arg] = last
            continue
        else:
            last = 0
        text += last
        if text > text_limit or objects > object_limit:
            what = f"{text} characters of strings" if text > text_limit else f"{objects} objects"
            raise UnsafePickleError(f"the pickle refers to at least {what} (counting each reference again), past "
                                    f"the {text_limit} characters and {object_limit} objects a {size}-byte pickle "
                                    "of data may hold")


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


def unpickle(stream: BinaryIO, size: int) -> object:
    """The pickle of ``size`` bytes at ``stream``'s position (a seekable file), scanned by
    :func:`scan_pickle` first, then rebuilt by :class:`RestrictedUnpickler`."""
    start = stream.tell()
    scan_pickle(_Bounded(stream, size), size)
    stream.seek(start)
    return _plain(RestrictedUnpickler(_Bounded(stream, size), encoding="ASCII").load())


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
                loaded = unpickle(f, os.fstat(f.fileno()).st_size - f.tell())
            except UnsafePickleError as exc:
                raise RefusedPickleError(path, f"refused to unpickle: {exc}; the file was altered or is not the "
                                         "dataset's own: download it again") from None
            except MemoryError:
                raise RefusedPickleError(path, "refused to unpickle: it needs more memory than there is; the file "
                                         "was altered or is not the dataset's own: download it again") from None
            except Exception as exc:  # truncated or malformed pickle: the data itself is unreadable
                raise UnsafeFileError(path, f"unreadable pickle ({type(exc).__name__}: {exc})") from None
            if not isinstance(loaded, np.ndarray):
                raise UnsafeFileError(path, f"the pickle holds a {type(loaded).__name__}, not the array np.save "
                                      "writes")
            return loaded
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
