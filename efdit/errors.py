"""User-facing failures, the bottom of every layer.

`EfditError` is the one exception type for bad user input: the CLI prints its message on one line, no traceback;
`EfditWarning` likewise for warnings.
Two helpers build such failures the same way everywhere:
  did_you_mean(name, options)   "; did you mean 'x'?" (or "") for an unknown name
  atomic_write(path)            write to a temporary file beside `path`, rename it into place on success; on any
                                failure nothing is left behind and an OS error becomes one EfditError naming the path
"""
from __future__ import annotations

import contextlib
import difflib
import os
import tempfile
from pathlib import Path
from typing import Iterable, Iterator


class EfditError(Exception):
    """A clear, user-facing error (bad input, missing file, wrong checkpoint shape, NaN loss)."""


class EfditWarning(UserWarning):
    """Something the user should know that does not stop the work (skipped files, a fallback). The command line
    prints it as one line, `efdit: warning: …`; a library user gets a plain Python warning."""


def did_you_mean(name: str, options: Iterable[str], n: int = 3, cutoff: float = 0.5) -> str:
    """"; did you mean 'a', 'b'?" for the options closest to `name`, or "" when none is close."""
    close = difflib.get_close_matches(str(name), [str(o) for o in options], n=n, cutoff=cutoff)
    return f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""


def _umask_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, what: str = "") -> Iterator[Path]:
    """Yield a temporary path in `path`'s folder; on success it is renamed to `path` (mode from the umask).

    The folder is created if missing. Whatever fails inside (the writer, a full disk, an unwritable folder),
    the temporary file is removed; an OSError is re-raised as an EfditError naming `path`:

        with atomic_write(out / "metrics.json") as tmp:
            tmp.write_text(text)
    """
    path = Path(path)
    label = f"{what} " if what else ""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise EfditError(f"cannot write {label}{path}: {e.strerror or e}") from None
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, _umask_mode())  # mkstemp (and safetensors) create 0600 files
        os.replace(tmp, path)
    except OSError as e:
        raise EfditError(f"cannot write {label}{path}: {e.strerror or e}") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
